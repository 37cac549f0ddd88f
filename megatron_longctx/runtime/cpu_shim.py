"""The smallest set of redirections that lets megatron-core 0.16.1 run its real code on CPU.

megatron-core calls a handful of CUDA entry points unconditionally. On a CPU-only torch build each of
them raises ("Torch not compiled with CUDA enabled") or, worse, silently queues work that never runs
(``torch.cuda._lazy_call``). ``apply()`` redirects exactly these, and nothing else:

1. ``torch.cuda.current_device()`` -> ``torch.device("cpu")``. Used to place buffers
   (tensor_parallel/mappings.py, layers, pipeline p2p recv buffers, DDP grad buffers, rope inv_freq).
2. RNG: ``torch.cuda.get_rng_state`` / ``set_rng_state`` / ``manual_seed`` (and the same names in
   ``torch.cuda.random``) -> the CPU default generator; megatron's private
   ``tensor_parallel.random._get_cuda_rng_state`` / ``_set_cuda_rng_state`` -> the CPU generator
   (the upstream setter goes through ``_lazy_call``, which on CPU would never run: a silent no-op).
   The RNG tracker (``get_cuda_rng_tracker``, ``model_parallel_cuda_manual_seed``,
   ``CheckpointFunction``) thereby forks the CPU generator, as it forks the CUDA one on GPU.
3. ``torch.cuda.synchronize`` / ``torch.cuda.empty_cache`` -> no-ops (dist_checkpointing,
   p2p_communication, DDP buffer management). There is nothing asynchronous to wait for on CPU.
4. A ``TorchFunctionMode`` (``_CpuRedirectMode``) that rewrites, inside torch calls only:
   ``device="cuda"`` / ``torch.device("cuda")`` / ``device=<int>`` -> cpu (schedules.py builds
   ``torch.zeros(..., device="cuda")``; clip_grads.py a ``device='cuda'`` overflow buffer);
   ``Tensor.cuda()`` -> the tensor itself; ``pin_memory=True`` / ``Tensor.pin_memory()`` -> not pinned
   (pinning needs a CUDA context);
   ``Tensor.type()`` with no argument -> ``"torch.cuda.<X>Tensor"`` for a CPU tensor, because
   optimizer.py, distrib_optimizer.py and clip_grads.py compare it with ``'torch.cuda.FloatTensor'``.

5. megatron's activation-recompute backward functions (``CheckpointFunction``,
   ``CheckpointWithoutOutput``) run under that mode: the autograd engine calls backward functions
   with no torch-function mode active, and recompute re-runs layer forwards there.

Everything else (CUDA streams, events, graphs, nvtx, memory stats) is deliberately *not* covered:
the configurations we run on CPU never reach it, and ``tests/distributed/test_canary.py`` makes every
uncovered ``torch.cuda`` function raise while a forward, backward, optimizer step and
dist_checkpointing save/load run, so a new megatron-core code path that needs CUDA fails loudly.

The shim is applied only when CUDA is unavailable, is idempotent, and must be applied in every
process before any megatron model is built (``runtime.distributed.initialize`` does this).
"""

from __future__ import annotations

import logging

import torch
from torch.overrides import TorchFunctionMode

logger = logging.getLogger(__name__)

_CPU = torch.device("cpu")
_APPLIED = False
_MODE: TorchFunctionMode | None = None

#: The torch.cuda attributes that apply() replaces (the canary test leaves exactly these alone).
COVERED_CUDA_FUNCTIONS = (
    "current_device",
    "get_rng_state",
    "set_rng_state",
    "manual_seed",
    "manual_seed_all",
    "synchronize",
    "empty_cache",
    "is_available",
    "device_count",
)


def _is_cuda_device(value) -> bool:
    if isinstance(value, torch.device):
        return value.type == "cuda"
    if isinstance(value, str):
        return value.startswith("cuda")
    return False


def _cpu_tensor_type_name(tensor: torch.Tensor) -> str:
    # 'torch.FloatTensor' -> 'torch.cuda.FloatTensor' (what megatron's optimizer expects).
    name = torch._C._TensorBase.type(tensor)
    return name.replace("torch.", "torch.cuda.", 1) if tensor.device.type == "cpu" else name


class _CpuRedirectMode(TorchFunctionMode):
    """Rewrites CUDA placement requests inside torch calls to the CPU (see module docstring, item 4)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.pin_memory:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            return _cpu_tensor_type_name(args[0])
        device = kwargs.get("device")
        if device is not None and (_is_cuda_device(device) or isinstance(device, int)):
            kwargs["device"] = _CPU
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], _CPU, *args[2:])
        return func(*args, **kwargs)


def _patch_megatron_recompute() -> None:
    """The autograd engine runs backward functions with no torch-function mode active, and
    megatron's activation recompute re-runs layer forwards there (building causal masks with
    ``device="cuda"``). Run those recomputations under the redirection mode."""
    from megatron.core.tensor_parallel import random as mcore_random

    def under_mode(fn):
        def wrapped(*args, **kwargs):
            with _CpuRedirectMode():
                return fn(*args, **kwargs)

        wrapped.__wrapped__ = fn
        return wrapped

    for cls, name in (
        (mcore_random.CheckpointFunction, "backward"),
        (mcore_random.CheckpointWithoutOutputFunction, "backward"),
    ):
        original = cls.__dict__[name]
        setattr(cls, name, staticmethod(under_mode(original.__func__)))
    cls = mcore_random.CheckpointWithoutOutput
    cls._recompute = under_mode(cls._recompute)


def _patch_megatron_rng() -> None:
    from megatron.core.tensor_parallel import random as mcore_random

    def _get_state(device="cuda", clone=False, graph_safe=False):
        return torch.get_rng_state()

    def _set_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    mcore_random._get_cuda_rng_state = _get_state
    mcore_random._set_cuda_rng_state = _set_state


def apply() -> bool:
    """Installs the redirections. Call it in a process that trains on the CPU (runtime/distributed.py
    does for device cpu), also on a machine with a GPU (``LONGCTX_DEVICE=cpu`` on a GPU node):
    there ``torch.cuda.is_available`` / ``device_count`` then report no GPU, so megatron's checks
    and the project's agree with the training device instead of the machine. Returns True."""
    global _APPLIED, _MODE
    if _APPLIED:
        return True
    if torch.cuda.is_available():
        torch.cuda.is_available = lambda: False
        torch.cuda.device_count = lambda: 0

    def _get_rng_state(device="cuda"):
        return torch.get_rng_state()

    def _set_rng_state(new_state, device="cuda"):
        torch.set_rng_state(new_state)

    def _manual_seed(seed):
        torch.default_generator.manual_seed(int(seed))

    def _noop(*args, **kwargs):
        return None

    for module in (torch.cuda, torch.cuda.random):
        module.get_rng_state = _get_rng_state
        module.set_rng_state = _set_rng_state
        module.manual_seed = _manual_seed
        module.manual_seed_all = _manual_seed
    torch.cuda.current_device = lambda: _CPU
    torch.cuda.synchronize = _noop
    torch.cuda.empty_cache = _noop
    _patch_megatron_rng()
    _patch_megatron_recompute()

    _MODE = _CpuRedirectMode()
    _MODE.__enter__()  # stays on the mode stack for the life of the process
    _APPLIED = True
    logger.debug("megatron-core CPU shim applied")
    return True


def is_applied() -> bool:
    return _APPLIED
