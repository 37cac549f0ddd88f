"""NCCL's tensor rule where no NCCL exists: every collective tensor on the training device.

gloo reduces CPU tensors happily, so a gloo run proves nothing about where a collective's tensor
lives; NCCL rejects CPU tensors. ``enforce_nccl_device(device)`` replaces torch.distributed's
tensor collectives by checks that raise ``NcclRuleError`` naming the collective and the device, and
then (``call_through=True``) run the real gloo collective, or (``call_through=False``, a single
rank with fake CUDA tensors that gloo cannot touch) apply the one-rank semantics: identity.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

COLLECTIVES = (
    "all_reduce",
    "broadcast",
    "reduce",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter_tensor",
    "all_to_all_single",
    "send",
    "recv",
    "isend",
    "irecv",
)


class NcclRuleError(RuntimeError):
    pass


def _tensors(args, kwargs):
    for value in list(args) + list(kwargs.values()):
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, (list, tuple)):
            yield from (v for v in value if isinstance(v, torch.Tensor))


@contextlib.contextmanager
def enforce_nccl_device(device: torch.device | str, call_through: bool = True):
    """Context manager; yields the list of (collective name, tensor devices) calls seen."""
    device = torch.device(device)
    seen: list[tuple[str, list[torch.device]]] = []
    originals = {name: getattr(dist, name) for name in COLLECTIVES}

    def checked(name):
        def run(*args, **kwargs):
            devices = [t.device for t in _tensors(args, kwargs)]
            seen.append((name, devices))
            bad = [d for d in devices if d.type != device.type]
            if bad:
                raise NcclRuleError(
                    f"dist.{name} on a tensor on {bad[0]}: NCCL only takes tensors on the "
                    f"training device {device}"
                )
            return originals[name](*args, **kwargs) if call_through else None

        return run

    for name in COLLECTIVES:
        setattr(dist, name, checked(name))
    try:
        yield seen
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
