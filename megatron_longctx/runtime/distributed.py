"""torch.distributed + megatron parallel_state initialisation from torchrun's or SLURM's environment.

Order (called once per process):
  1. ``dist_env()``: rank / world size / local rank / master address from torchrun (RANK, WORLD_SIZE,
     LOCAL_RANK, MASTER_ADDR, MASTER_PORT) or SLURM (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, master =
     first host of SLURM_JOB_NODELIST).
  2. choose the device; on CPU apply the megatron-core shim (runtime.cpu_shim).
  3. ``torch.distributed.init_process_group`` (gloo on CPU, nccl on GPU).
  4. validate the layout against the world size (parallel.layout), then
     ``parallel_state.initialize_model_parallel``.
"""

from __future__ import annotations

import datetime
import importlib.util
import logging
import math
import os
import re
from dataclasses import dataclass

import torch

from megatron_longctx.parallel.layout import ParallelLayout
from megatron_longctx.runtime import cpu_shim
from megatron_longctx.runtime.device import backend_for, choose_device

DEFAULT_MASTER_PORT = 29500
DEFAULT_TIMEOUT_S = 1800.0  # config/schema.py TrainingSection.dist_timeout_minutes

# The timeout the world group was created with; megatron's groups (initialize_model_parallel)
# get the same one, so one setting bounds every collective.
_TIMEOUT_S = DEFAULT_TIMEOUT_S
logger = logging.getLogger(__name__)
_NOTED_FALLBACKS = False


def log0(msg: str) -> None:
    """Prints on global rank 0 only (the trainer's user-facing lines)."""
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print(msg, flush=True)


def note_fallback_kernels(rank: int) -> None:
    """One line, once per process, on rank 0: which fused-kernel libraries megatron lacks (their
    per-module warnings are silenced in ``megatron_longctx/__init__.py``)."""
    global _NOTED_FALLBACKS
    if os.environ.get("LONGCTX_FALLBACK_NOTED"):  # a parent (tools/demo.py) already said it
        _NOTED_FALLBACKS = True
    missing = [m for m in ("transformer_engine", "apex") if importlib.util.find_spec(m) is None]
    if missing and not _NOTED_FALLBACKS and rank == 0:
        logger.warning(
            "%s not installed: megatron-core uses its torch fallbacks (expected on CPU; "
            "on GPU machines: README 'GPU install')",
            " / ".join(missing),
        )
    _NOTED_FALLBACKS = True


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list: 'gpu[003-005,9],cpu1' -> 'gpu003'; 'node7' -> 'node7'."""
    first = re.split(r",(?![^\[]*\])", nodelist.strip())[0]
    match = re.match(r"^([^\[]+)\[([^\]]+)\]", first)
    if not match:
        return first
    prefix, ranges = match.groups()
    return prefix + ranges.split(",")[0].split("-")[0]


def dist_env(environ: dict | None = None) -> DistEnv:
    """Reads the process's place in the job from torchrun's variables, else SLURM's, else single process."""
    env = os.environ if environ is None else environ
    port = int(env.get("MASTER_PORT", DEFAULT_MASTER_PORT))
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=port,
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "127.0.0.1"
        return DistEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            master_addr=env.get("MASTER_ADDR") or first_slurm_host(nodelist),
            master_port=port,
        )
    return DistEnv(rank=0, world_size=1, local_rank=0, master_addr="127.0.0.1", master_port=port)


def init_process_group(
    env: DistEnv | None = None, device: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S
) -> torch.device:
    """Steps 1-3 of the module docstring. Returns the device. Idempotent.

    ``timeout_s`` bounds every collective of the world group and, through
    ``initialize_model_parallel``, of megatron's NCCL and gloo groups.
    """
    global _TIMEOUT_S
    env = env or dist_env()
    note_fallback_kernels(env.rank)
    dev = choose_device(device)
    if dev.type == "cpu":
        cpu_shim.apply()
    else:
        torch.cuda.set_device(dev)
    if not torch.distributed.is_initialized():
        _TIMEOUT_S = float(timeout_s)
        torch.distributed.init_process_group(
            backend=backend_for(dev),
            init_method=f"tcp://{env.master_addr}:{env.master_port}",
            rank=env.rank,
            world_size=env.world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    return dev


def initialize_model_parallel(layout: ParallelLayout) -> None:
    """Step 4: validates ``layout`` against the world size, then sets up megatron's process groups."""
    from megatron.core import parallel_state

    layout.validate_world_size(torch.distributed.get_world_size())
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tensor_model_parallel_size,
        pipeline_model_parallel_size=layout.pipeline_model_parallel_size,
        context_parallel_size=layout.context_parallel_size,
        virtual_pipeline_model_parallel_size=layout.virtual_pipeline_model_parallel_size,
        distributed_timeout_minutes=max(1, math.ceil(_TIMEOUT_S / 60)),
    )


def initialize(layout: ParallelLayout, device: str | None = None, seed: int = 1234) -> torch.device:
    """The whole sequence: process group, megatron groups, model-parallel RNG seeds."""
    from megatron.core import tensor_parallel

    dev = init_process_group(device=device)
    initialize_model_parallel(layout)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return dev
