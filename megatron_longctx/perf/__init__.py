"""Performance model: FLOPs (Megatron's formula), per-GPU memory, communication, hardware presets,
and the parallel-layout planner built from them (tools/plan.py is its CLI).

The trainer's MFU logging uses ``flops.flops_per_token`` and ``flops.mfu``: one implementation.
"""

from megatron_longctx.perf.flops import flops_per_token, mfu
from megatron_longctx.perf.hardware import HARDWARE, Hardware, get_hardware

__all__ = ["HARDWARE", "Hardware", "flops_per_token", "get_hardware", "mfu"]
