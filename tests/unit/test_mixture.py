"""Mixture spec, YAML recipes, blending proportions, epochs. Also hosts the test-data helpers."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_longctx.data.index import MixtureIndex, blend_components
from megatron_longctx.data.mixture import (
    MixtureComponent,
    MixtureError,
    MixtureSpec,
    load_mixture_yaml,
)

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted((REPO / "examples" / "mixtures").glob("*.yaml"))


def write_dataset(prefix: str | Path, lengths, vocab: int = 1000, dtype=np.int32, seed: int = 0):
    """Writes documents of random ids with megatron-core's own builder; returns the documents."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    docs = []
    for n in lengths:
        doc = rng.integers(0, vocab, int(n)).astype(np.int64)
        builder.add_item(torch.from_numpy(doc))
        builder.end_document()
        docs.append(doc)
    builder.finalize(f"{prefix}.idx")
    return docs


def two_component_spec(long_prefix, short_prefix, min_long: int, seed: int = 7) -> MixtureSpec:
    return MixtureSpec(
        [
            MixtureComponent("long", [str(long_prefix)], 0.6, min_tokens=min_long),
            MixtureComponent("short", [str(short_prefix)], 0.4, max_tokens=min_long),
        ],
        seed=seed,
    )


@pytest.mark.parametrize(
    "weights, needle",
    [
        ([0.5, 0.6], "sum to 1"),
        ([1.0, 0.0], "positive"),
        ([1.2, -0.2], "positive"),
        ([0.3, 0.3], "= 0.6"),
    ],
)
def test_bad_weights_are_rejected_not_renormalised(weights, needle):
    comps = [dict(name=f"c{i}", prefixes=["/x"], weight=w) for i, w in enumerate(weights)]
    with pytest.raises(MixtureError, match=needle):
        MixtureSpec(comps)


def test_spec_field_checks():
    with pytest.raises(MixtureError, match="empty"):
        MixtureComponent("a", ["/x"], 1.0, min_tokens=10, max_tokens=10)
    with pytest.raises(MixtureError, match="unique"):
        MixtureSpec([MixtureComponent("a", ["/x"], 0.5), MixtureComponent("a", ["/y"], 0.5)])
    with pytest.raises(MixtureError, match="no components"):
        MixtureSpec([])
    with pytest.raises(MixtureError, match="unknown keys"):
        MixtureSpec([dict(name="a", prefixes=["/x"], weight=1.0, bucket=3)])


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.name for r in RECIPES])
def test_shipped_recipes_load(recipe):
    spec = load_mixture_yaml(recipe)
    assert math.isclose(sum(spec.weights), 1.0, abs_tol=1e-9)
    assert all("${" in p for c in spec.components for p in c.prefixes)  # placeholders to fill


def test_recipes_match_longctx_facts():
    assert {r.name for r in RECIPES} >= {
        "prolong_64k.yaml",
        "prolong_512k.yaml",
        "llama2_long_32k.yaml",
    }
    s1 = {
        c.name: c for c in load_mixture_yaml(REPO / "examples/mixtures/prolong_64k.yaml").components
    }
    long1 = sum(c.weight for c in s1.values() if c.min_tokens >= 65536)
    assert math.isclose(long1, 0.63) and math.isclose(s1["books"].weight, 0.30)
    s2 = load_mixture_yaml(REPO / "examples/mixtures/prolong_512k.yaml").components
    by_bucket = {(c.name.split("_")[0], c.min_tokens): c.weight for c in s2}
    assert by_bucket[("code", 524288)] == 0.15 and by_bucket[("code", 65536)] == 0.15
    assert by_bucket[("books", 524288)] == 0.05 and by_bucket[("books", 65536)] == 0.25


def test_yaml_errors_name_the_file(tmp_path):
    bad = tmp_path / "m.yaml"
    bad.write_text("mixture:\n  components:\n    - {name: a, prefixes: [x], weight: 0.7}\n")
    with pytest.raises(MixtureError, match=r"m\.yaml.*sum to 1"):
        load_mixture_yaml(bad)
    with pytest.raises(MixtureError, match="does not exist"):
        load_mixture_yaml(tmp_path / "nope.yaml")


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 1000), min_size=1, max_size=8), st.integers(1, 400))
def test_realized_share_within_one_sample_at_every_prefix(raw, num_samples):
    weights = [w / sum(raw) for w in raw]
    chosen = blend_components(weights, num_samples)
    onehot = np.zeros((num_samples, len(weights)))
    onehot[np.arange(num_samples), chosen] = 1
    counts = np.cumsum(onehot, axis=0)  # brute-force per-prefix counts
    expected = np.arange(1, num_samples + 1)[:, None] * np.array(weights)[None, :]
    bound = 1.0 - (1.0 / (2 * len(weights) - 2) if len(weights) > 1 else 1.0)
    assert np.abs(counts - expected).max() <= bound + 1e-9 < 1.0


def test_index_blending_and_epochs_match_brute_force():
    spec = MixtureSpec(
        [MixtureComponent("a", ["/x"], 0.7, min_tokens=5), MixtureComponent("b", ["/y"], 0.3)],
        seed=3,
    )
    la, lb = np.array([3, 8, 12, 5, 40]), np.array([2, 9, 4])
    index = MixtureIndex.from_document_lengths(spec, [[la], [lb]], seq_length=16, num_samples=50)
    assert np.array_equal(index.sample_component, blend_components([0.7, 0.3], 50))
    for c, (lengths, minimum) in enumerate([(la, 5), (lb, 1)]):
        eligible = np.flatnonzero(lengths >= minimum)
        comp = index.components[c]
        n_local = int((index.sample_component == c).sum())
        epochs = math.ceil((n_local * 16 + 1) / lengths[eligible].sum())
        st_ = index.stats["components"][c]
        assert st_["epochs_started"] == epochs and st_["epochs_restarted"] == epochs - 1
        for e in range(epochs):  # each epoch is a permutation of the eligible documents
            part = comp.stream_doc[comp.epoch_starts[e] : comp.epoch_starts[e + 1]]
            assert sorted(comp.doc_length[part].tolist()) == sorted(lengths[eligible].tolist())
        assert st_["docs_dropped_below_min"] == int((lengths < minimum).sum())
        local = index.sample_local[index.sample_component == c]
        assert np.array_equal(local, np.arange(n_local))


def test_seed_determines_order():
    lengths = [[np.arange(1, 200)]]
    spec = lambda s: MixtureSpec([MixtureComponent("a", ["/x"], 1.0)], seed=s)  # noqa: E731
    a = MixtureIndex.from_document_lengths(spec(1), lengths, 32, 100).components[0].stream_doc
    b = MixtureIndex.from_document_lengths(spec(1), lengths, 32, 100).components[0].stream_doc
    c = MixtureIndex.from_document_lengths(spec(2), lengths, 32, 100).components[0].stream_doc
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_last_epoch_prefix_is_distinct_documents_covering_the_need():
    lengths = np.random.default_rng(0).integers(1, 50, 20_000)
    spec = MixtureSpec([MixtureComponent("a", ["/x"], 1.0)], seed=5)
    S, total = 64, int(lengths.sum())
    num_samples = total // S + 40  # a little into the second epoch
    comp = MixtureIndex.from_document_lengths(spec, [[lengths]], S, num_samples).components[0]
    first = comp.stream_doc[: comp.epoch_starts[1]]
    last = comp.stream_doc[comp.epoch_starts[1] :]
    assert sorted(first.tolist()) == list(range(len(lengths)))
    assert len(set(last.tolist())) == len(last) < len(lengths) // 4  # distinct, partial
    assert comp.stream_cum[-1] >= num_samples * S + 1  # enough tokens for every sample


def test_prefixes_expand_like_recipes_and_dead_knob_is_refused(monkeypatch, tmp_path):
    """One expansion rule (``$VAR``, ``${VAR}``, ``${VAR:-default}``) for recipes and mixture
    prefixes; ``reset_position_ids`` (ignored by megatron's THD RoPE) is refused with the reason."""
    from megatron_longctx.data.mixture import mixture_from_dict
    from megatron_longctx.data.sources import DataSourceError, resolve_prefix

    monkeypatch.setenv("MIXDIR", str(tmp_path))
    monkeypatch.delenv("UNSET_MIXDIR", raising=False)
    assert resolve_prefix("${UNSET_MIXDIR:-/srv/tok}/books") == "/srv/tok/books"
    assert resolve_prefix("$MIXDIR/books") == resolve_prefix("${MIXDIR}/books")
    assert resolve_prefix("${MIXDIR}/books") == str(tmp_path / "books")
    with pytest.raises(DataSourceError, match=r"placeholder\(s\) \['UNSET_MIXDIR'\]: export"):
        resolve_prefix("${UNSET_MIXDIR}/books")
    raw = {"components": [{"name": "a", "prefixes": ["x"], "weight": 1.0}]}
    with pytest.raises(MixtureError, match="'reset_position_ids' was removed: it had no effect"):
        mixture_from_dict({**raw, "reset_position_ids": True})
