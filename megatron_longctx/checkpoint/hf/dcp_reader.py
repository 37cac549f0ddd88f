"""Read single tensors (or one layer of a layer-stacked tensor) from a megatron dist checkpoint.

Megatron's default ``torch_dist`` format is PyTorch Distributed Checkpoint (DCP): ``.metadata``
lists every global tensor with the chunks (offsets, sizes) the saving ranks wrote, and the
``__<rank>_<n>.distcp`` files hold the chunks. ``DcpTensorReader.read`` asks DCP's own
``FileSystemReader`` for just the chunks that overlap the requested region, so reading a model
tensor by tensor keeps peak memory at about one tensor; optimizer state and anything else in the
checkpoint is never read. No process group is needed.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list


class _IntoTensor(LoadPlanner):
    """The smallest LoadPlanner: every read item lands in one destination tensor."""

    def __init__(self, dest: torch.Tensor):
        self.dest = dest

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        view = self.dest
        for dim, (start, length) in enumerate(
            zip(read_item.dest_offsets, read_item.lengths, strict=True)
        ):
            view = view.narrow(dim, start, length)
        return view

    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        pass  # resolve_tensor returned a view of dest: the copy already landed

    def load_bytes(self, read_item, value) -> None:  # pragma: no cover - tensors only
        raise NotImplementedError

    def set_up_planner(self, *args, **kwargs) -> None:  # pragma: no cover - unused
        pass

    def create_local_plan(self):  # pragma: no cover - unused
        raise NotImplementedError

    def create_global_plan(self, global_plan):  # pragma: no cover - unused
        raise NotImplementedError

    def finish_plan(self, central_plan):  # pragma: no cover - unused
        raise NotImplementedError


class DcpTensorReader:
    """Tensor-by-tensor access to a DCP (megatron ``torch_dist``) checkpoint directory.

    Args:
        path: the checkpoint directory (holding ``.metadata`` and ``*.distcp``).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not (self.path / ".metadata").is_file():
            raise FileNotFoundError(
                f"{self.path} has no .metadata: not a torch_dist (PyTorch DCP) checkpoint; "
                "mcore-to-hf reads megatron's default torch_dist format only"
            )
        self._reader = FileSystemReader(str(self.path))
        self.metadata = self._reader.read_metadata()
        self._reader.set_up_storage_reader(self.metadata, True)

    def _tensor_md(self, key: str) -> TensorStorageMetadata:
        md = self.metadata.state_dict_metadata.get(key)
        if not isinstance(md, TensorStorageMetadata):
            raise KeyError(f"checkpoint {self.path} has no tensor {key!r}")
        return md

    def __contains__(self, key: str) -> bool:
        return isinstance(self.metadata.state_dict_metadata.get(key), TensorStorageMetadata)

    def shape(self, key: str) -> tuple[int, ...]:
        """Global shape of tensor ``key`` (layer-stacked tensors include the layer dimension)."""
        return tuple(self._tensor_md(key).size)

    def dtype(self, key: str) -> torch.dtype:
        return self._tensor_md(key).properties.dtype

    def read(self, key: str, index: int | None = None) -> torch.Tensor:
        """Tensor ``key``; with ``index``, only ``key[index]`` (one layer of a stacked tensor)."""
        md = self._tensor_md(key)
        size = list(md.size)
        offsets = [0] * len(size)
        if index is not None:
            if not 0 <= index < size[0]:
                raise IndexError(f"{key}: index {index} outside the leading dimension {size[0]}")
            offsets[0], size[0] = index, 1
        dest = torch.empty(size, dtype=md.properties.dtype)
        region = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(size))
        items = create_read_items_for_chunk_list(key, md, [region])
        covered = sum(torch.Size(item.lengths).numel() for item in items)
        if covered != dest.numel():
            raise ValueError(
                f"checkpoint {self.path}: the saved chunks of {key!r} cover "
                f"{covered} of {dest.numel()} elements; the checkpoint is incomplete"
            )
        self._reader.read_data(LoadPlan(items), _IntoTensor(dest)).wait()
        return dest[0] if index is not None else dest
