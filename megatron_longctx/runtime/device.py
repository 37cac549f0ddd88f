"""Device choice: CUDA when available (or asked for), else CPU with the megatron-core shim.

GPU binding (which ``cuda:i`` this process uses), the two ways clusters hand out GPUs:
  * node binding (torchrun, ``srun`` with all GPUs visible to every task): the task sees every
    GPU of the node and takes ``cuda:LOCAL_RANK``;
  * task binding (``srun --gpus-per-task=1``, ``--gpu-bind=single:1``, many Kubernetes setups):
    ``CUDA_VISIBLE_DEVICES`` holds one device, so the task sees ``cuda:0`` only, whatever its
    LOCAL_RANK (``cuda:LOCAL_RANK`` would raise "invalid device ordinal").
``LONGCTX_GPU_BINDING=node|task`` (set by launch/common.sh) says which one applies; unset, a process
that sees exactly one GPU takes it and otherwise takes ``cuda:LOCAL_RANK``.
"""

from __future__ import annotations

import os

import torch

BINDINGS = ("node", "task")


def cuda_index(environ: dict | None = None, device_count: int | None = None) -> int:
    """The CUDA ordinal this process should use (see the module docstring).

    Args:
        environ: the environment (default ``os.environ``): LOCAL_RANK / SLURM_LOCALID and
            LONGCTX_GPU_BINDING.
        device_count: GPUs this process sees (default ``torch.cuda.device_count()``).
    """
    env = os.environ if environ is None else environ
    count = torch.cuda.device_count() if device_count is None else device_count
    local_rank = int(env.get("LOCAL_RANK") or env.get("SLURM_LOCALID") or 0)
    binding = (env.get("LONGCTX_GPU_BINDING") or "").lower()
    if binding and binding not in BINDINGS:
        raise ValueError(f"LONGCTX_GPU_BINDING must be 'node' or 'task', got {binding!r}")
    visible = env.get("CUDA_VISIBLE_DEVICES", "<unset>")
    if count < 1:
        raise RuntimeError(f"no CUDA device is visible (CUDA_VISIBLE_DEVICES={visible})")
    if binding == "task" or (not binding and count == 1):
        if count != 1:
            raise RuntimeError(
                f"LONGCTX_GPU_BINDING=task but this task sees {count} GPUs "
                f"(CUDA_VISIBLE_DEVICES={visible}): bind one GPU per task "
                "(srun --gpus-per-task=1) or set LONGCTX_GPU_BINDING=node"
            )
        return 0
    if local_rank >= count:
        raise RuntimeError(
            f"local rank {local_rank} has no GPU: this process sees {count} GPU(s) "
            f"(CUDA_VISIBLE_DEVICES={visible}); start at most {count} tasks per node, or bind "
            "one GPU per task (srun --gpus-per-task=1, LONGCTX_GPU_BINDING=task)"
        )
    return local_rank


def choose_device(requested: str | None = None) -> torch.device:
    """Returns the device this process computes on.

    Args:
        requested: "cuda", "cpu" or None/"auto" (CUDA if available). Also read from the
            ``LONGCTX_DEVICE`` environment variable when not given, so launch scripts can force CPU.
    """
    if requested in (None, "", "auto"):  # an explicit config value wins over the environment
        requested = os.environ.get("LONGCTX_DEVICE") or "auto"
    requested = requested.lower()
    if requested not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {requested!r}")
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            "device 'cuda' was requested but torch.cuda.is_available() is False: "
            "install a CUDA build of torch or set device=cpu (LONGCTX_DEVICE=cpu)"
        )
    if requested == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", cuda_index())


def backend_for(device: torch.device) -> str:
    """gloo on CPU, nccl on GPU."""
    return "nccl" if device.type == "cuda" else "gloo"
