"""Build a stage's mixture index once and cache it on disk as memory-mapped ``.npy`` arrays.

Cache layout: ``{cache_dir}/mixture-{key}/`` holding one ``.npy`` per array and ``meta.json``
(written last) with the key, the config, the stats and each array's shape, dtype and byte size.
``key`` is a SHA-256 of the config (S, number of samples, seed, components) and of every input
file's size and mtime, so changed inputs or config select a different directory.

Concurrency: a build writes into a private temporary directory and publishes it with an atomic
``rename``; builders of the same key serialise on an ``fcntl`` file lock, so a second process finds
the finished cache instead of building it again. Under ``torch.distributed`` rank 0 builds first and
the other ranks wait at a barrier, then load (or build, if their file system is not shared).

A cache directory whose ``meta.json`` is missing or unreadable, whose key or config differs, or
whose arrays are missing or have the wrong size (truncated) is moved aside and rebuilt.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import uuid
from pathlib import Path

import numpy as np

from megatron_longctx.data.index import (
    COMPONENT_FIELDS,
    INDEX_VERSION,
    ComponentIndex,
    MixtureIndex,
    build_index,
)
from megatron_longctx.data.mixture import MixtureError, MixtureSpec
from megatron_longctx.data.sources import (
    check_mask_source,
    check_source,
    file_identity,
    read_document_table,
)
from megatron_longctx.parallel.layout import check_sequence_length

logger = logging.getLogger(__name__)

#: Index builds done by this process (tests check that one rank built and the others loaded).
NUM_BUILDS = 0


def index_config(spec: MixtureSpec, seq_length: int, num_samples: int) -> dict:
    """The inputs that determine the index (hashed into the cache key)."""
    return {
        "version": INDEX_VERSION,
        "seq_length": seq_length,
        "num_samples": num_samples,
        "seed": spec.seed,
        "components": [_component_config(c) for c in spec.components],
    }


def _component_config(c) -> dict:
    out = {
        "name": c.name,
        "weight": c.weight,
        "min_tokens": c.min_tokens,
        "max_tokens": c.max_tokens,
        "files": [file_identity(p) for p in c.prefixes],
    }
    if c.mask_prefixes:  # only present for SFT components, so pretraining keys are unchanged
        out["mask_files"] = [file_identity(p) for p in c.mask_prefixes]
    return out


def config_key(config: dict) -> str:
    """SHA-256 (first 24 hex digits) of the canonical JSON of ``config``."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:24]


def _array_items(index: MixtureIndex) -> dict[str, np.ndarray]:
    items = {"sample_component": index.sample_component, "sample_local": index.sample_local}
    for c, comp in enumerate(index.components):
        for name, arr in comp.arrays().items():
            items[f"c{c}_{name}"] = arr
    return items


def save_index(index: MixtureIndex, directory: Path, config: dict) -> None:
    """Writes ``index`` into ``directory`` (which must not exist yet): arrays first, meta last."""
    directory.mkdir(parents=True)
    arrays = {}
    for name, arr in _array_items(index).items():
        path = directory / f"{name}.npy"
        np.save(path, np.ascontiguousarray(arr))
        arrays[name] = {
            "shape": list(arr.shape),
            "dtype": str(arr.dtype),
            "bytes": path.stat().st_size,
        }
    meta = {
        "key": index.key,
        "config": config,
        "stats": index.stats,
        "arrays": arrays,
        "prefixes": index.prefixes,
    }
    tmp = directory / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, directory / "meta.json")


def load_index(directory: Path, spec: MixtureSpec, key: str, config: dict) -> MixtureIndex | None:
    """Loads a cached index memory-mapped; ``None`` if it is incomplete, truncated or mismatched."""
    try:
        meta = json.loads((directory / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    if meta.get("key") != key or meta.get("config") != json.loads(json.dumps(config)):
        logger.warning("mixture cache %s does not match this config; rebuilding", directory)
        return None
    arrays = {}
    for name, info in meta.get("arrays", {}).items():
        path = directory / f"{name}.npy"
        try:
            if path.stat().st_size != info["bytes"]:
                raise ValueError("size")
            arr = np.load(path, mmap_mode="r")
        except (OSError, ValueError):
            logger.warning("mixture cache array %s is missing or truncated; rebuilding", path)
            return None
        if list(arr.shape) != info["shape"] or str(arr.dtype) != info["dtype"]:
            return None
        arrays[name] = arr
    num = len(spec.components)
    try:
        comps = [
            ComponentIndex(**{f: arrays[f"c{c}_{f}"] for f in COMPONENT_FIELDS}) for c in range(num)
        ]
        return MixtureIndex(
            spec,
            config["seq_length"],
            config["num_samples"],
            arrays["sample_component"],
            arrays["sample_local"],
            comps,
            meta["stats"],
            key,
            meta["prefixes"],
        )
    except KeyError:
        return None


def _get_or_build(
    spec: MixtureSpec,
    seq_length: int,
    num_samples: int,
    vocab_size: int | None,
    cache_dir: Path,
    config: dict,
    key: str,
) -> MixtureIndex:
    cache_dir.mkdir(parents=True, exist_ok=True)
    final = cache_dir / f"mixture-{key}"
    with open(cache_dir / f"mixture-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            index = load_index(final, spec, key, config) if final.exists() else None
            if index is not None:
                logger.info("loaded mixture index from %s", final)
                return index
            index = _build(spec, seq_length, num_samples, vocab_size)
            index.key = key
            global NUM_BUILDS
            NUM_BUILDS += 1
            tmp = cache_dir / f".mixture-{key}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            save_index(index, tmp, config)
            if final.exists():  # stale or broken: move aside atomically, then delete
                aside = cache_dir / f".mixture-{key}.stale-{uuid.uuid4().hex[:8]}"
                os.rename(final, aside)
                shutil.rmtree(aside, ignore_errors=True)
            os.rename(tmp, final)
            logger.info("built mixture index %s (%d samples)", final, num_samples)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    loaded = load_index(final, spec, key, config)
    if loaded is None:
        raise MixtureError(
            f"mixture cache {final} was written but cannot be read back; check the "
            f"file system (free space, a shared cache_dir on every node)"
        )
    return loaded


def _build(
    spec: MixtureSpec, seq_length: int, num_samples: int, vocab_size: int | None
) -> MixtureIndex:
    tables = [[read_document_table(p, vocab_size) for p in c.prefixes] for c in spec.components]
    return build_index(spec, tables, seq_length, num_samples)


def build_mixture_index(
    spec: MixtureSpec,
    seq_length: int,
    num_samples: int,
    *,
    vocab_size: int | None = None,
    cp_size: int = 1,
    cache_dir: str | Path | None = None,
) -> MixtureIndex:
    """Validates a stage's data and returns its sample index (cached when ``cache_dir`` is set).

    Call it on every rank before training; all checks run here, so bad data fails before step 0.

    Args:
        spec: The stage's mixture.
        seq_length: S, input tokens per sample; must be divisible by 2 x ``cp_size``.
        num_samples: Global samples the stage trains on (train iterations x global batch size).
        vocab_size: Tokenizer vocabulary size, checked against each dataset's token dtype.
        cp_size: Context-parallel size (only for the divisibility check).
        cache_dir: Directory for the memory-mapped cache (shared by all ranks); ``None`` builds
            in memory on every rank.

    Raises:
        MixtureError: any problem with the config or the data (the message names the fix).
    """
    check_sequence_length(seq_length, cp_size, error=MixtureError)
    for comp in spec.components:  # header, size and dtype checks first, on every rank
        for p in comp.prefixes:
            check_source(p, vocab_size)
        for p, m in zip(comp.prefixes, comp.mask_prefixes or []):
            check_mask_source(p, m)
    if cache_dir is None:
        return _build(spec, seq_length, num_samples, vocab_size)
    config = index_config(spec, seq_length, num_samples)
    key = config_key(config)
    cache_dir = Path(cache_dir)
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized()
    if distributed and dist.get_rank() == 0:
        index = _get_or_build(spec, seq_length, num_samples, vocab_size, cache_dir, config, key)
    if distributed:
        dist.barrier()
    if not distributed or dist.get_rank() != 0:
        index = _get_or_build(spec, seq_length, num_samples, vocab_size, cache_dir, config, key)
    return index
