"""Multi-process index cache: one rank builds, the others wait and load the same arrays."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from megatron_longctx.testing.distributed import run_distributed

S = 32


def _digest(index) -> str:
    h = hashlib.sha256(np.asarray(index.sample_component).tobytes())
    for comp in index.components:
        h.update(np.asarray(comp.stream_cum).tobytes())
    return h.hexdigest()


def _build_on_rank(rank, world_size, root, use_barrier):
    from megatron_longctx.data import index_cache
    from tests.unit.test_mixture import two_component_spec

    spec = two_component_spec(Path(root) / "long", Path(root) / "short", min_long=S)
    if use_barrier:
        index = index_cache.build_mixture_index(
            spec, S, 400, vocab_size=1000, cache_dir=Path(root) / "cache"
        )
    else:  # both ranks race for the same key at once: only the file lock serialises them
        config = index_cache.index_config(spec, S, 400)
        index = index_cache._get_or_build(
            spec, S, 400, 1000, Path(root) / "cache_race", config, index_cache.config_key(config)
        )
    return index_cache.NUM_BUILDS, _digest(index), index.key


@pytest.mark.timeout(90)
@pytest.mark.parametrize("use_barrier", [True, False])
def test_one_rank_builds_the_others_load(tmp_path, use_barrier):
    from tests.unit.test_mixture import write_dataset

    rng = np.random.default_rng(0)
    write_dataset(tmp_path / "long", rng.integers(20, 150, 30), seed=1)
    write_dataset(tmp_path / "short", rng.integers(1, 30, 100), seed=2)
    results = run_distributed(_build_on_rank, 2, (str(tmp_path), use_barrier), timeout=80)
    builds = [r[0] for r in results]
    assert sorted(builds) == [0, 1], builds
    if use_barrier:
        assert builds[0] == 1  # rank 0 builds, rank 1 waits at the barrier and loads
    assert results[0][1:] == results[1][1:]
    cache = tmp_path / ("cache" if use_barrier else "cache_race")
    assert [p.name for p in cache.iterdir() if p.is_dir()] == [f"mixture-{results[0][2]}"]
