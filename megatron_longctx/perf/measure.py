"""Measure activation memory as the bytes autograd saves for backward during one forward.

On CPU there is no allocator peak to read that means the same thing as a GPU's, so the honest proxy
for activation memory is what the forward keeps alive for the backward: every tensor autograd saves
(``torch.autograd.graph.saved_tensors_hooks``), counted once per unique storage, excluding
parameters (they are weights, not activations). Views of one storage count once; a saved tensor
that is later freed by the forward still counts (autograd holds it until backward), which is exactly
what a GPU holds at the end of the forward of a micro-batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class SavedTensorBytes:
    """Context manager summing unique storages saved for backward (parameters excluded).

    Args:
        exclude: tensors whose storages are not counted (default none; pass ``model.parameters()``).

    Example:
        with SavedTensorBytes(model.parameters()) as saved:
            loss = model(x).sum()
        saved.total_bytes
    """

    def __init__(self, exclude=()):
        self._excluded = {self._key(t) for t in exclude}
        self._seen: dict[tuple, int] = {}
        self._hooks = None

    @staticmethod
    def _key(t: torch.Tensor) -> tuple:
        storage = t.untyped_storage()
        return (storage.data_ptr(), storage.nbytes())

    def _pack(self, t: torch.Tensor):
        if t.layout == torch.strided and t.device.type != "meta":
            key = self._key(t)
            if key not in self._excluded and key[0] != 0:
                self._seen[key] = key[1]
        return t

    def __enter__(self) -> SavedTensorBytes:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    @property
    def total_bytes(self) -> int:
        """Sum of unique saved storages, in bytes."""
        return sum(self._seen.values())


def saved_activation_bytes(forward: Callable[[], torch.Tensor], exclude=()) -> int:
    """Bytes saved for backward by ``forward()``; its graph is dropped afterwards, not run.

    Args:
        forward: runs one forward and returns its output (the graph is freed with it).
        exclude: tensors (usually the model's parameters) not to count.
    """
    with SavedTensorBytes(exclude) as saved:
        out = forward()
    del out
    return saved.total_bytes
