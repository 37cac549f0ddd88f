"""Loader resume equivalence, DP resharding, the on-disk cache and every bad-input error."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_longctx.data.index_cache import build_mixture_index
from megatron_longctx.data.loader import MixtureLoader
from megatron_longctx.data.mixture import MixtureComponent, MixtureError, MixtureSpec
from tests.unit.test_mixture import two_component_spec, write_dataset

S, GB, MBS = 32, 8, 2
KEYS = ("tokens", "labels", "loss_mask", "position_ids", "cu_seqlens", "sample_index")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    rng = np.random.default_rng(5)
    write_dataset(root / "long", rng.integers(20, 150, 20), seed=1)
    write_dataset(root / "short", rng.integers(1, 30, 80), seed=2)
    spec = two_component_spec(root / "long", root / "short", min_long=S)
    return root, spec


def build(corpus, num_samples=GB * 60, **kw):
    root, spec = corpus
    return build_mixture_index(
        spec, S, num_samples, vocab_size=1000, cache_dir=root / "cache", **kw
    )


def take(loader, n):
    return [next(loader) for _ in range(n)]


def same(a, b):
    return all(torch.equal(a[k], b[k]) for k in KEYS)


def test_resume_twice_gives_identical_batches(corpus):
    index = build(corpus)
    ref = take(MixtureLoader(index, GB, MBS, 1, 2), 56)  # uninterrupted run, DP rank 1 of 2
    first = MixtureLoader(index, GB, MBS, 1, 2)
    take(first, 40)
    state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint round trip
    second = MixtureLoader(build(corpus), GB, MBS, 1, 2)  # fresh index object from the cache
    second.load_state_dict(state)
    got = take(second, 8)
    assert all(same(x, y) for x, y in zip(got, ref[40:48]))
    third = MixtureLoader(
        build(corpus), GB, MBS, 1, 2, consumed_samples=second.state_dict()["consumed_samples"]
    )
    assert all(same(x, y) for x, y in zip(take(third, 8), ref[48:56]))


def _global_batches(loaders, num_global):
    """Per global batch: the sample tensors of all ranks, keyed by global sample number."""
    out = []
    for _ in range(num_global):
        rows = {}
        for loader in loaders:
            for _ in range(loader.num_micro_batches):
                mb = next(loader)
                for i, s in enumerate(mb["sample_index"].tolist()):
                    rows[s] = (mb["tokens"][i], mb["labels"][i], mb["loss_mask"][i])
        out.append(rows)
    return out


def test_dp2_to_dp1_at_fixed_global_batch(corpus):
    index = build(corpus)
    reference = _global_batches([MixtureLoader(index, GB, MBS, r, 2) for r in range(2)], 10)
    two = [MixtureLoader(index, GB, MBS, r, 2) for r in range(2)]
    _global_batches(two, 6)
    state = two[0].state_dict()
    one = MixtureLoader(index, GB, MBS, 0, 1)
    one.load_state_dict(state)
    resumed = _global_batches([one], 4)
    for want, got in zip(reference[6:], resumed):
        assert sorted(want) == sorted(got)
        assert all(all(torch.equal(x, y) for x, y in zip(want[s], got[s])) for s in want)


def test_loader_size_errors(corpus):
    index = build(corpus)
    with pytest.raises(MixtureError, match="not divisible by 6"):
        MixtureLoader(index, GB, MBS, 0, 3)
    with pytest.raises(MixtureError, match="micro-step boundary"):
        MixtureLoader(index, GB, MBS, 0, 2, consumed_samples=3)
    with pytest.raises(MixtureError, match="dp_rank"):
        MixtureLoader(index, GB, MBS, 2, 2)
    loader = MixtureLoader(index, GB, MBS, 0, 2)
    with pytest.raises(MixtureError, match="different|changed"):
        loader.load_state_dict({"consumed_samples": 0, "index_key": "other", "seq_length": S})


def test_cache_reused_then_rebuilt_when_broken(corpus):
    root, spec = corpus
    index = build(corpus)
    want = np.array(index.components[0].stream_cum)  # in memory: the test corrupts the file
    cache = root / "cache" / f"mixture-{index.key}"
    stamp = (cache / "meta.json").stat().st_mtime_ns
    again = build(corpus)
    assert (cache / "meta.json").stat().st_mtime_ns == stamp  # loaded, not rebuilt
    assert isinstance(again.sample_component, np.memmap)
    victim = cache / "c0_stream_cum.npy"
    victim.write_bytes(victim.read_bytes()[:-8])  # truncated array
    rebuilt = build(corpus)
    assert np.array_equal(np.asarray(rebuilt.components[0].stream_cum), want)
    meta = json.loads((cache / "meta.json").read_text())
    meta["config"]["seed"] = 999  # mismatched config under the same key
    (cache / "meta.json").write_text(json.dumps(meta))
    build(corpus)
    assert json.loads((cache / "meta.json").read_text())["config"]["seed"] == spec.seed
    assert not [p for p in (root / "cache").iterdir() if ".tmp-" in p.name or ".stale-" in p.name]


def test_changed_input_changes_the_key(tmp_path):
    write_dataset(tmp_path / "a", [40, 50, 60], seed=1)
    spec = MixtureSpec([MixtureComponent("a", [str(tmp_path / "a")], 1.0)])
    first = build_mixture_index(spec, S, 8, cache_dir=tmp_path / "c")
    os.utime(tmp_path / "a.bin", ns=(1, 1))  # a rewritten input is a stale cache
    second = build_mixture_index(spec, S, 8, cache_dir=tmp_path / "c")
    assert first.key != second.key


def _spec(prefix: Path, **kw) -> MixtureSpec:
    return MixtureSpec([MixtureComponent("c", [str(prefix)], 1.0, **kw)])


def test_bad_inputs_fail_before_training(tmp_path, monkeypatch):
    write_dataset(tmp_path / "ok", [40, 50, 60], seed=1)
    write_dataset(tmp_path / "narrow", [40, 50], vocab=100, dtype=np.uint16)
    cases = {
        "missing": (_spec(tmp_path / "nope"), {}, "nope.idx is missing"),
        "placeholder": (_spec(Path("${LONGCTX_TEST_UNSET}/x")), {}, "LONGCTX_TEST_UNSET"),
        "dtype": (_spec(tmp_path / "narrow"), {"vocab_size": 128256}, "uint16.*128256.*int32"),
        "empty bucket": (_spec(tmp_path / "ok", min_tokens=1000), {}, "no document falls"),
        "cp": (_spec(tmp_path / "ok"), {"cp_size": 3}, "not divisible by 2 x"),
    }
    monkeypatch.delenv("LONGCTX_TEST_UNSET", raising=False)
    for spec, kw, needle in cases.values():
        with pytest.raises(MixtureError, match=needle):
            build_mixture_index(spec, S, 8, **kw)  # S=32: 32 % 6 != 0
    for ext, needle in (("bin", r"ok_t\.bin is truncated"), ("idx", r"ok_t\.idx is truncated")):
        write_dataset(tmp_path / "ok_t", [40, 50, 60], seed=1)
        path = tmp_path / f"ok_t.{ext}"
        path.write_bytes(path.read_bytes()[:-10])
        with pytest.raises(MixtureError, match=needle):
            build_mixture_index(_spec(tmp_path / "ok_t"), S, 8)
    with pytest.raises(MixtureError, match="weights must sum to 1"):
        MixtureSpec([MixtureComponent("a", ["/x"], 0.5)])


def test_loader_state_refuses_another_index_and_survives_moved_files(corpus, tmp_path):
    """The resume check compares what each sample holds: another mixture seed or sample count is
    refused with the reason; the same data copied elsewhere (new paths, mtimes, cache key) and an
    index built without cache resume."""
    import dataclasses
    import shutil

    root, spec = corpus
    loader = MixtureLoader(build(corpus), GB, MBS, 0, 2)
    take(loader, 3)
    state = json.loads(json.dumps(loader.state_dict()))
    other_seed = dataclasses.replace(spec, seed=spec.seed + 1)
    for changed in (
        build_mixture_index(other_seed, S, GB * 60, vocab_size=1000),
        build(corpus, num_samples=GB * 61),
    ):
        with pytest.raises(MixtureError, match="saved for another sample index.*mixture"):
            MixtureLoader(changed, GB, MBS, 0, 2).load_state_dict(state)
    for name in ("long", "short"):  # the same data, re-staged under another directory
        for ext in ("bin", "idx"):
            shutil.copy(root / f"{name}.{ext}", tmp_path / f"{name}.{ext}")
    moved = dataclasses.replace(
        spec,
        components=[
            dataclasses.replace(c, prefixes=[str(tmp_path / Path(p).name) for p in c.prefixes])
            for c in spec.components
        ],
    )
    index = build_mixture_index(moved, S, GB * 60, vocab_size=1000, cache_dir=tmp_path / "c")
    assert index.key != state["index_key"]
    resumed = MixtureLoader(index, GB, MBS, 0, 2)
    resumed.load_state_dict(state)
    assert resumed.consumed_samples == loader.consumed_samples
    assert same(next(resumed), next(loader))
