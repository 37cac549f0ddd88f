"""How the tokenizing workers start: forked workers (and the one in-process worker) reuse the
parent's loaded tokenizer instead of loading the model again; spawned workers load their own. Every
way gives the bytes of whole-document encoding written by megatron-core's own builder."""

from __future__ import annotations

import json
import multiprocessing as mp
import random

import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_longctx.data.preprocess import load_tokenizer
from megatron_longctx.data.preprocess import worker as worker_lib
from megatron_longctx.data.preprocess.pipeline import PreprocessConfig, preprocess
from megatron_longctx.data.preprocess.train_bpe import train_byte_level_bpe
from tests.unit.test_preprocess_split import _reference  # megatron-core's whole-document bytes

WORDS = "def return x 123 🤖 Grüße (a,b) : 日本".split() + ["\n", "\r\n", "\t", "  ", " "]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(tokenizer dir, corpus path, documents): one ~200 KB document among short ones."""
    root = tmp_path_factory.mktemp("workers")
    rng = random.Random(0)
    docs = ["".join(rng.choice(WORDS) for _ in range(rng.randint(1, 80))) for _ in range(60)]
    docs.insert(30, "".join(rng.choice(WORDS) for _ in range(60_000)))
    docs = [d for d in docs if d.strip()]
    model = train_byte_level_bpe(docs, str(root / "l3"), vocab_size=600)
    corpus = root / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return model, str(corpus), docs


def _run(model: str, corpus: str, prefix: str, workers: int) -> list[bytes]:
    report = preprocess(
        PreprocessConfig(
            input=corpus,
            output_prefix=prefix,
            tokenizer_type="HuggingFaceTokenizer",
            tokenizer_model=model,
            append_eod=True,
            workers=workers,
            quiet=True,
            batch_bytes=2048,
            max_piece_chars=8192,
        )
    )
    assert report.split.documents == 1
    paths = report.outputs["text"]
    assert len(IndexedDataset(paths["prefix"])) == report.stats["text"]["documents"]
    return [open(paths[k], "rb").read() for k in ("bin", "idx")]


@pytest.mark.skipif("fork" not in mp.get_all_start_methods(), reason="needs fork")
@pytest.mark.parametrize("workers", [1, 2])
def test_workers_reuse_the_parents_tokenizer(setup, tmp_path, monkeypatch, workers):
    model, corpus, docs = setup

    marker = tmp_path / "reloaded"
    load = worker_lib.load_tokenizer

    def recording_load(*args):
        marker.write_text("a worker loaded the tokenizer model again")  # seen across processes
        return load(*args)

    # Forked workers inherit this patch, so a reload inside them leaves the marker file.
    monkeypatch.setattr(worker_lib, "load_tokenizer", recording_load)
    got = _run(model, corpus, str(tmp_path / "o"), workers)
    assert not marker.exists()
    assert got == _reference(
        load_tokenizer("HuggingFaceTokenizer", model), docs, str(tmp_path / "ref")
    )


def test_spawned_workers_load_their_own_tokenizer(setup, tmp_path, monkeypatch):
    model, corpus, docs = setup
    monkeypatch.setattr(mp, "get_all_start_methods", lambda: ["spawn"])
    got = _run(model, corpus, str(tmp_path / "o"), 2)
    assert got == _reference(
        load_tokenizer("HuggingFaceTokenizer", model), docs, str(tmp_path / "ref")
    )


def test_init_worker_loads_when_given_no_tokenizer(setup):
    model, _, _ = setup
    settings = worker_lib.WorkerSettings("HuggingFaceTokenizer", model, ("text",), True, "uint16")
    worker_lib.init_worker(settings, in_child=False)
    tok = load_tokenizer("HuggingFaceTokenizer", model)
    text = "def f(x):\n\treturn x  # 🤖"
    assert worker_lib.tokenize_piece(text).tolist() == tok.encode(text)
