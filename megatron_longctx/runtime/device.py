"""Device choice: CUDA when available (or asked for), else CPU with the megatron-core shim."""

from __future__ import annotations

import os

import torch


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
    local_rank = os.environ.get("LOCAL_RANK") or os.environ.get("SLURM_LOCALID") or "0"
    return torch.device("cuda", int(local_rank))


def backend_for(device: torch.device) -> str:
    """gloo on CPU, nccl on GPU."""
    return "nccl" if device.type == "cuda" else "gloo"
