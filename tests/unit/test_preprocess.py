"""preprocess_data output checked against megatron-core's own IndexedDataset and builder."""

from __future__ import annotations

import glob
import gzip
import json
import os
import shutil

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

from megatron_longctx.data.preprocess import load_tokenizer
from megatron_longctx.data.preprocess.pipeline import PreprocessConfig, preprocess
from megatron_longctx.data.preprocess.readers import expand_inputs
from megatron_longctx.data.preprocess.stats import length_histogram, summarize_lengths
from megatron_longctx.data.preprocess.writer import token_dtype
from tests.unit.conftest import read_jsonl_texts


def _corpus_texts(corpus_dir: str) -> list[str]:
    return [t for path in expand_inputs(corpus_dir) for t in read_jsonl_texts(path)]


def _run(corpus, prefix, model, **kw) -> object:
    kw.setdefault("quiet", True)
    return preprocess(
        PreprocessConfig(
            input=corpus,
            output_prefix=prefix,
            tokenizer_type="SentencePieceTokenizer",
            tokenizer_model=model,
            **kw,
        )
    )


@pytest.mark.parametrize("append_eod", [True, False])
def test_megatron_reads_back_input_text(sample_corpus_dir, spm_model, tmp_path, append_eod):
    prefix = str(tmp_path / "out")
    report = _run(sample_corpus_dir, prefix, spm_model, append_eod=append_eod)
    tok = load_tokenizer("SentencePieceTokenizer", spm_model)
    texts = _corpus_texts(sample_corpus_dir)

    ds = IndexedDataset(report.outputs["text"]["prefix"])
    assert len(ds) == len(texts) and ds.index.dtype == np.uint16
    np.testing.assert_array_equal(ds.document_indices, np.arange(len(texts) + 1))
    for i, text in enumerate(texts):
        ids = ds[i].tolist()
        if append_eod:
            assert ids[-1] == tok.eod_id == 2
            ids = ids[:-1]
        assert tok.decode(ids) == text
        assert ids == tok.encode(text)


def test_idx_and_bin_byte_identical_to_megatron_builder(sample_corpus_dir, spm_model, tmp_path):
    report = _run(sample_corpus_dir, str(tmp_path / "ours"), spm_model, append_eod=True)
    tok = load_tokenizer("SentencePieceTokenizer", spm_model)
    ref_prefix = str(tmp_path / "ref")
    builder = IndexedDatasetBuilder(ref_prefix + ".bin", dtype=np.uint16)
    import torch

    for text in _corpus_texts(sample_corpus_dir):
        builder.add_item(torch.tensor(tok.encode(text) + [tok.eod_id]))
        builder.end_document()
    builder.finalize(ref_prefix + ".idx")
    ours = report.outputs["text"]["prefix"]
    for ext in (".bin", ".idx"):
        with open(ours + ext, "rb") as a, open(ref_prefix + ext, "rb") as b:
            assert a.read() == b.read(), ext


def test_workers_1_and_2_write_identical_bytes(sample_corpus_dir, spm_model, tmp_path):
    outputs = []
    for workers in (1, 2):
        # small batches: many batches in flight, so ordering is really exercised
        report = _run(
            sample_corpus_dir,
            str(tmp_path / f"w{workers}"),
            spm_model,
            append_eod=True,
            workers=workers,
            batch_bytes=4096,
        )
        paths = report.outputs["text"]
        outputs.append([open(paths[k], "rb").read() for k in ("bin", "idx", "stats")])
    assert outputs[0][:2] == outputs[1][:2]
    s1, s2 = (json.loads(o[2]) for o in outputs)
    assert s1 == s2


def test_token_dtype_boundary():
    assert token_dtype(32000) == np.uint16
    assert token_dtype(65536) == np.uint16  # ids 0..65535 fit
    assert token_dtype(65537) == np.int32
    assert token_dtype(128256) == np.int32  # Llama 3
    with pytest.raises(ValueError, match="positive"):
        token_dtype(0)


def _wordlevel_tokenizer_dir(directory, vocab_size: int) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "</s>": 1}
    words = ["alpha", "beta", "gamma", "delta"]
    vocab.update({w: vocab_size - 1 - i for i, w in enumerate(words)})  # ids near the top
    vocab.update({f"w{i}": i for i in range(2, vocab_size - len(words))})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    os.makedirs(directory, exist_ok=True)
    tok.save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "</s>"}, f)
    return str(directory)


def test_large_vocab_hf_tokenizer_writes_int32(tmp_path):
    tok_dir = _wordlevel_tokenizer_dir(tmp_path / "tok", vocab_size=70_000)
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": t}) for t in ["alpha beta", "gamma w5 delta"]))
    report = preprocess(
        PreprocessConfig(
            input=str(corpus),
            output_prefix=str(tmp_path / "o"),
            tokenizer_type="HuggingFaceTokenizer",
            tokenizer_model=tok_dir,
            append_eod=True,
            quiet=True,
        )
    )
    ds = IndexedDataset(report.outputs["text"]["prefix"])
    assert ds.index.dtype == np.int32
    with open(report.outputs["text"]["idx"], "rb") as f:
        assert f.read(18)[17] == 4  # dtype code after 9-byte magic and uint64 version
    assert ds[0].tolist() == [69_999, 69_998, 1]
    assert ds[1].tolist() == [69_997, 5, 69_996, 1]


def test_length_histogram_and_summary_hand_computed():
    lengths = np.array([1, 2, 3, 4, 7, 8, 1000, 1024], dtype=np.int32)
    assert length_histogram(lengths) == {"1": 1, "2": 2, "4": 2, "8": 1, "512": 1, "1024": 1}
    summary = summarize_lengths(lengths)
    assert summary["min_length"] == 1 and summary["max_length"] == 1024
    assert summary["median_length"] == 5.5 and summary["tokens"] == 2049


def test_stats_sidecar_matches_dataset(sample_corpus_dir, spm_model, tmp_path):
    report = _run(sample_corpus_dir, str(tmp_path / "s"), spm_model, append_eod=True, plot=True)
    paths = report.outputs["text"]
    stats = json.load(open(paths["stats"]))
    ds = IndexedDataset(paths["prefix"])  # keep it alive: sequence_lengths views its mmap
    lengths = np.array(ds.sequence_lengths)
    assert stats["documents"] == len(lengths) and stats["tokens"] == int(lengths.sum())
    assert stats["max_length"] == int(lengths.max()) and stats["min_length"] == int(lengths.min())
    assert stats["median_length"] == float(np.median(lengths))
    assert sum(stats["length_histogram"].values()) == len(lengths)
    assert stats["skipped_total"] == 0 and stats["dtype"] == "uint16"
    with open(paths["plot"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_multiple_keys_gz_and_blank_lines(spm_model, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    rows = [{"q": "first question", "a": "first answer 42"}, {"q": "second", "a": "two"}]
    with gzip.open(src / "b.jsonl.gz", "wt") as f:
        f.write(json.dumps(rows[1]) + "\n")
    (src / "a.jsonl").write_text(json.dumps(rows[0]) + "\n\n   \n")
    report = _run(str(src), str(tmp_path / "o"), spm_model, json_keys=["q", "a"])
    tok = load_tokenizer("SentencePieceTokenizer", spm_model)
    assert report.num_blank_lines == 2
    for key in ("q", "a"):
        ds = IndexedDataset(report.outputs[key]["prefix"])
        assert [tok.decode(ds[i].tolist()) for i in range(len(ds))] == [r[key] for r in rows]


def test_rerun_replaces_outputs_and_leaves_no_temp_files(spm_model, tmp_path):
    corpus = tmp_path / "c.jsonl"
    prefix = str(tmp_path / "out" / "data")
    tok = load_tokenizer("SentencePieceTokenizer", spm_model)
    for texts in (["one", "two", "three"], ["replaced"]):
        corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        report = _run(str(corpus), prefix, spm_model)
        ds = IndexedDataset(report.outputs["text"]["prefix"])
        assert [tok.decode(ds[i].tolist()) for i in range(len(ds))] == texts
    leftovers = [p for p in glob.glob(str(tmp_path / "out" / ".*")) if ".tmp-" in p]
    assert leftovers == []
    shutil.rmtree(tmp_path / "out")
