"""Streaming HF safetensors I/O: lazy reads from a (sharded) HF dir, shard-by-shard writes.

``HFReader`` opens tensors with ``safetensors.safe_open`` only when asked, so a converter holds one
tensor at a time. ``ShardWriter`` buffers tensors up to ``max_shard_bytes``, writes that shard, and
frees it; at the end it names the shards ``model-0000i-of-0000N.safetensors`` and writes the
``model.safetensors.index.json`` that transformers expects (one shard: ``model.safetensors``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch

from megatron_longctx.checkpoint.hf.config_map import ConversionError

logger = logging.getLogger(__name__)

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
_MODEL_FILES = re.compile(r"^(config\.json|model.*\.safetensors(\.index\.json)?|pytorch_model.*)$")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]?I?B?)\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """'5GB' / '200KB' / '1048576' -> bytes (decimal units, like transformers' max_shard_size)."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(str(text))
    if not m:
        raise ValueError(f"cannot read size {text!r}; use e.g. 5GB, 500MB, 200KB or a byte count")
    unit = m.group(2).upper().rstrip("B").rstrip("I")
    return int(float(m.group(1)) * {"": 1, "K": 10**3, "M": 10**6, "G": 10**9}[unit])


class HFReader:
    """Lazy access to the tensors of an HF checkpoint directory.

    Args:
        hf_dir: directory with ``config.json`` and ``model.safetensors`` or a sharded index.

    Raises:
        ConversionError: no config, no safetensors weights, or a shard named by the index missing.
    """

    def __init__(self, hf_dir: str | Path):
        self.dir = Path(hf_dir)
        cfg_path = self.dir / "config.json"
        if not cfg_path.is_file():
            raise ConversionError(f"{self.dir} has no config.json: not a Hugging Face model dir")
        self.config = json.loads(cfg_path.read_text())
        if (self.dir / INDEX).is_file():
            index = json.loads((self.dir / INDEX).read_text())
            self.weight_map: dict[str, str] = index["weight_map"]
        elif (self.dir / SINGLE).is_file():
            from safetensors import safe_open

            with safe_open(self.dir / SINGLE, "pt") as f:
                self.weight_map = {k: SINGLE for k in f.keys()}  # noqa: SIM118 - not a dict
        else:
            found = sorted(p.name for p in self.dir.iterdir())
            raise ConversionError(
                f"{self.dir} has neither {SINGLE} nor {INDEX} (found {found}); "
                "save the model with safe_serialization (safetensors) first"
            )
        missing = sorted({f for f in self.weight_map.values() if not (self.dir / f).is_file()})
        if missing:
            raise ConversionError(
                f"{self.dir}: {INDEX} names shard(s) {missing} that are missing; "
                "download the complete checkpoint"
            )
        self._handles: dict[str, object] = {}

    def _handle(self, file: str):
        if file not in self._handles:
            from safetensors import safe_open

            self._handles[file] = safe_open(self.dir / file, "pt")
        return self._handles[file]

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(self.weight_map[name]).get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        """The safetensors dtype string of a tensor ("F32", "BF16", ...)."""
        return self._handle(self.weight_map[name]).get_slice(name).get_dtype()

    def get(self, name: str) -> torch.Tensor:
        return self._handle(self.weight_map[name]).get_tensor(name)

    def copy_tokenizer(self, dest: str | Path) -> list[str]:
        """Copies the tokenizer files present in the HF dir into ``dest``; returns their names."""
        return copy_tokenizer_files(self.dir, dest)


def copy_tokenizer_files(src: str | Path, dest: str | Path) -> list[str]:
    """Copies ``TOKENIZER_FILES`` present in ``src`` into ``dest``; returns the names copied."""
    present = [n for n in TOKENIZER_FILES if (Path(src) / n).is_file()]
    if present:
        Path(dest).mkdir(parents=True, exist_ok=True)
    for name in present:
        shutil.copyfile(Path(src) / name, Path(dest) / name)
    return present


def prepare_output_dir(out_dir: str | Path, new_config: dict, overwrite: bool) -> Path:
    """Refuses to write into a directory holding model files unless ``overwrite``; with it, removes
    the old weights so no stale shard survives next to the new ones."""
    out = Path(out_dir)
    old = (
        sorted(p.name for p in out.iterdir() if _MODEL_FILES.match(p.name)) if out.is_dir() else []
    )
    if old and not overwrite:
        what = "a model"
        try:
            old_cfg = json.loads((out / "config.json").read_text())
            keys = (
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "vocab_size",
                "num_attention_heads",
                "num_key_value_heads",
                "tie_word_embeddings",
            )
            diff = {
                k: (old_cfg.get(k), new_config.get(k))
                for k in keys
                if old_cfg.get(k) != new_config.get(k)
            }
            what = f"a different model (existing vs new: {diff})" if diff else "a model"
        except (OSError, ValueError):
            pass
        raise ConversionError(
            f"output directory {out} already holds {what} ({old}); pass "
            "--overwrite to replace it, or choose another --save directory"
        )
    out.mkdir(parents=True, exist_ok=True)
    for name in old:
        (out / name).unlink()
    return out


class ShardWriter:
    """Writes HF safetensors shards one at a time (see module docstring).

    Args:
        out_dir: destination directory (must exist).
        max_shard_bytes: a shard is closed before it would grow past this (a single larger tensor
            gets a shard of its own).
    """

    def __init__(self, out_dir: str | Path, max_shard_bytes: int):
        self.out = Path(out_dir)
        self.max_bytes = max_shard_bytes
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._buffer and self._buffer_bytes + size > self.max_bytes:
            self._flush()
        self._buffer[name] = tensor.contiguous()
        self._buffer_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        tmp = self.out / f".shard-{len(self._shards):05d}.safetensors.tmp"
        save_file(self._buffer, str(tmp), metadata={"format": "pt"})
        self._shards.append((tmp, list(self._buffer)))
        logger.info("wrote shard %d (%.1f MB)", len(self._shards), self._buffer_bytes / 1e6)
        self._buffer, self._buffer_bytes = {}, 0

    def finish(self) -> list[str]:
        """Writes the last shard, names the shards, writes the index; returns the file names."""
        if self._buffer:
            self._flush()
        n = len(self._shards)
        if n == 1:
            os.replace(self._shards[0][0], self.out / SINGLE)
            return [SINGLE]
        weight_map, files = {}, []
        for i, (tmp, names) in enumerate(self._shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(tmp, self.out / final)
            files.append(final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.out / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return files + [INDEX]
