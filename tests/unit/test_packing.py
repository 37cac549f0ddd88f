"""Packing against a brute-force stream rebuilt with megatron-core's own IndexedDataset reader."""

from __future__ import annotations

import numpy as np
import pytest

from megatron_longctx.data.index_cache import build_mixture_index
from megatron_longctx.data.packing import SamplePacker
from tests.unit.test_mixture import two_component_spec, write_dataset

S = 32


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("packing")
    rng = np.random.default_rng(11)
    write_dataset(root / "long_a", rng.integers(5, 120, 12), seed=1)
    write_dataset(root / "long_b", rng.integers(5, 120, 9), seed=2)
    write_dataset(root / "short", rng.integers(1, 30, 60), seed=3)
    spec = two_component_spec(root / "long_a", root / "short", min_long=S)
    spec.components[0].prefixes.append(str(root / "long_b"))
    index = build_mixture_index(spec, S, 120, vocab_size=1000)
    return spec, index


def brute_force_stream(spec, index, c):
    """The component's token stream and document ids, from megatron's reader and the bucket rule."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    comp = spec.components[c]
    docs = []
    for p in comp.prefixes:
        ds = IndexedDataset(p)
        for i in range(len(ds)):
            doc = np.array(ds[i])  # copy: the reader unmaps its file when collected
            if comp.min_tokens <= len(doc) < (comp.max_tokens or np.inf):
                docs.append(doc)
    order = index.components[c].stream_doc
    # the index's epochs must each be a permutation of exactly the eligible documents
    for e in range(len(index.components[c].epoch_starts) - 1):
        lo, hi = index.components[c].epoch_starts[e : e + 2]
        assert sorted(order[lo:hi].tolist()) == list(range(len(docs)))
    tokens = np.concatenate([docs[d] for d in order]).astype(np.int64)
    doc_id = np.concatenate([np.full(len(docs[d]), k) for k, d in enumerate(order)])
    return docs, tokens, doc_id


def test_every_sample_matches_brute_force(data):
    spec, index = data
    packer = SamplePacker(index)
    for c in range(2):
        docs, stream, doc_id = brute_force_stream(spec, index, c)
        for s in np.flatnonzero(index.sample_component == c):
            j = int(index.sample_local[s])
            window, ids = stream[j * S : j * S + S + 1], doc_id[j * S : j * S + S + 1]
            got = packer.get(int(s))
            assert np.array_equal(got["tokens"], window[:-1])
            assert np.array_equal(got["labels"], window[1:])
            starts = [i for i in range(1, S) if ids[i] != ids[i - 1]]
            assert got["cu_seqlens"].tolist() == [0, *starts, S]
            # no loss where the label is the first token of the next document
            expected_mask = (ids[1:] == ids[:-1]).astype(np.float32)
            assert np.array_equal(got["loss_mask"], expected_mask)
            assert got["position_ids"].tolist() == list(range(S))


def test_bucket_rules_and_counts(data):
    spec, index = data
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    for c, comp in enumerate(spec.components):
        readers = [IndexedDataset(p) for p in comp.prefixes]  # keep alive: they own the mmap
        lengths = np.concatenate([np.array(r.sequence_lengths) for r in readers])
        st = index.stats["components"][c]
        top = comp.max_tokens or np.inf
        assert st["docs_dropped_below_min"] == int((lengths < comp.min_tokens).sum())
        assert st["docs_dropped_above_max"] == int((lengths >= top).sum())
        kept = lengths[(lengths >= comp.min_tokens) & (lengths < top)]
        assert st["docs_kept"] == len(kept) and st["tokens_kept"] == int(kept.sum())
        assert st["tokens_kept"] + st["tokens_dropped_below_min"] + st[
            "tokens_dropped_above_max"
        ] == int(lengths.sum())  # every token accounted for
        # long bucket: every kept document is at least S tokens, so it spans a sample boundary
        if comp.min_tokens >= S:
            assert kept.min() >= S
        # carried = sample boundaries falling strictly inside a document (brute force)
        _, _, doc_id = brute_force_stream(spec, index, c)
        n = st["samples"]
        carried = sum(doc_id[k * S] == doc_id[k * S - 1] for k in range(1, n + 1))
        assert st["docs_carried_across_samples"] == carried
        assert st["tokens_left_in_last_epoch"] == len(doc_id) - n * S


def test_every_stream_token_is_an_input_once_and_a_label_once(data):
    spec, index = data
    packer = SamplePacker(index)
    c = 0
    _, stream, _ = brute_force_stream(spec, index, c)
    n = index.stats["components"][c]["samples"]
    samples = sorted(
        np.flatnonzero(index.sample_component == c), key=lambda s: index.sample_local[s]
    )
    inputs = np.concatenate([packer.get(int(s))["tokens"] for s in samples])
    labels = np.concatenate([packer.get(int(s))["labels"] for s in samples])
    assert np.array_equal(inputs, stream[: n * S]) and np.array_equal(labels, stream[1 : n * S + 1])


def test_docs_per_sample_matches_cu_seqlens(data):
    _, index = data
    packer = SamplePacker(index)
    counts = index.docs_per_sample()
    for s in range(index.num_samples):
        assert counts[s] == len(packer.get(s)["cu_seqlens"]) - 1
