"""Long documents encoded in pieces give the tokens of whole-document encoding, for a Llama-3-style
byte-level BPE, a GPT-2-style one, GPT-2-style ones behind a Digits pre-tokenizer (SmolLM2 /
StarCoder: individual digits; and digit runs) and sentencepiece BPE (all trained here), on
adversarial text."""

from __future__ import annotations

import json
import logging
import random

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from megatron_longctx.data.preprocess import load_tokenizer
from megatron_longctx.data.preprocess.pipeline import PreprocessConfig, preprocess
from megatron_longctx.data.preprocess.split import _LETTER, _NON_LETTER, make_splitter
from megatron_longctx.data.preprocess.train_bpe import train_byte_level_bpe
from megatron_longctx.data.preprocess.train_spm import train_sentencepiece
from tests.unit.conftest import run_tool

# Every kind of boundary: newlines, CRLF, tabs, runs of spaces before letters, digits, emoji,
# contractions, non-ASCII letters, CJK punctuation, combining marks, U+2581, an added token.
FRAGMENTS = [
    "\n", "\r\n", "\r", "\t", " ", "  ", "    ", "\n\n", " \n", "\t\n", "\n ", "\n\t", "12",
    "12345", "3.14", "2024-01-01", "🤖", "🚀🚀", "Hello", "world", "x", "A", "it's", "THEY'LL",
    "'s", "'", "Grüße", "Köln", "日本語", "テキスト", "。", "、", "，", "x=f(1,2);",
    "<|end_of_text|>",
    "\u2581", "▁▁", "naïve", "Ωmega", "привет", "µ", "ª", "--", "//", "{", "}", "\u00a0", "\u3000",
    "Z9", "_x", "a\u0301", "\u200b", "ﬀ", "ǅ", "한국어", "\\n", "\"q\"", "#", "$x", "%",
    "²", "½", "٣", "１", "x2", " 7", "v1.2.3", "0x1F", "99%",
]  # fmt: skip
NO_NEWLINE = [f for f in FRAGMENTS if "\n" not in f and "\r" not in f]


def adversarial(seed: int, num_fragments: int, fragments=FRAGMENTS) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice(fragments) for _ in range(num_fragments))


@pytest.fixture(scope="module")
def training_texts(sample_corpus_dir):
    from megatron_longctx.data.preprocess.readers import expand_inputs
    from tests.unit.conftest import read_jsonl_texts

    texts = [t for p in expand_inputs(sample_corpus_dir) for t in read_jsonl_texts(p)]
    return texts + [adversarial(s, 300) for s in range(100)]


@pytest.fixture(scope="module")
def tokenizers(training_texts, tmp_path_factory):
    """name -> (tokenizer type, model path) for the three tokenizers."""
    root = tmp_path_factory.mktemp("tok")
    corpus = root / "train.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in training_texts))
    return {
        "llama3": ("HuggingFaceTokenizer", train_byte_level_bpe(training_texts, str(root / "l3"))),
        "gpt2": (
            "HuggingFaceTokenizer",
            train_byte_level_bpe(training_texts, str(root / "g2"), style="gpt2"),
        ),
        # SmolLM2 / StarCoder: Digits(individual_digits) then GPT-2's regex; and digit runs
        "digits": (
            "HuggingFaceTokenizer",
            train_byte_level_bpe(training_texts, str(root / "dg"), style="digits"),
        ),
        "digit_runs": (
            "HuggingFaceTokenizer",
            train_byte_level_bpe(training_texts, str(root / "dr"), style="digit_runs"),
        ),
        "spm": (
            "SentencePieceTokenizer",
            train_sentencepiece(str(corpus), str(root / "spm"), vocab_size=1000, num_threads=1),
        ),
    }


def _load(tokenizers, name):
    tok = load_tokenizer(*tokenizers[name])
    splitter, why = make_splitter(tok)
    assert splitter is not None, why
    return tok, splitter


def _cut_positions(splitter, text):
    return [m.start() for m in splitter.boundary.finditer(text) if splitter._ok(text, m.start())]


@pytest.mark.parametrize("name", ["llama3", "gpt2", "digits", "digit_runs", "spm"])
def test_every_candidate_cut_is_safe_on_adversarial_text(tokenizers, name):
    tok, splitter = _load(tokenizers, name)
    for text in (adversarial(1, 700), adversarial(2, 700, NO_NEWLINE)):
        whole = tok.encode(text)
        cuts = _cut_positions(splitter, text)
        assert len(cuts) > 30
        drop = 1 if splitter.drop_leading_space else 0
        for p in cuts:
            assert tok.encode(text[:p]) + tok.encode(text[p + drop :]) == whole, (
                repr(text[max(0, p - 12) : p]),
                repr(text[p : p + 12]),
            )
        # The comparison is sensitive: cutting anywhere else often changes the tokens.
        others = sorted(set(range(1, len(text), 5)) - set(cuts))
        changed = sum(tok.encode(text[:p]) + tok.encode(text[p:]) != whole for p in others)
        assert changed > len(others) // 10


def test_newline_rule_is_unsafe_for_gpt2_regex(tokenizers):
    """Why GPT-2's regex gets no cut after a newline: ``\\s+(?!\\S)`` sees past the cut."""
    gpt2 = load_tokenizer(*tokenizers["gpt2"])
    llama3 = load_tokenizer(*tokenizers["llama3"])
    text, p = "x \nAbc", 3
    assert gpt2.encode(text[:p]) + gpt2.encode(text[p:]) != gpt2.encode(text)
    assert llama3.encode(text[:p]) + llama3.encode(text[p:]) == llama3.encode(text)


def test_digit_rules(tokenizers):
    """Digits + GPT-2 regex: every digit is a cut (individual digits) or every ASCII digit-run
    edge; a non-ASCII numeric character (``²``) joins a digit run, so no cut is taken beside
    it, and there the cut would change the pieces. A digit-only stretch has cuts everywhere."""
    from tokenizers import Tokenizer

    single, why = make_splitter(load_tokenizer(*tokenizers["digits"]))
    runs, _ = make_splitter(load_tokenizer(*tokenizers["digit_runs"]))
    assert single.name == runs.name == "digits-gpt2-bytelevel" and "digit" in why
    text = "x²5 year 2024, v1.2"
    assert _cut_positions(single, text) == [2, 3, 8, 9, 10, 11, 12, 13, 16, 17, 18]
    assert _cut_positions(runs, text) == [3, 8, 9, 13, 16, 17, 18]  # not inside "²5" nor "2024"
    pre = Tokenizer.from_file(tokenizers["digit_runs"][1] + "/tokenizer.json").pre_tokenizer
    assert [t for t, _ in pre.pre_tokenize_str("x²5")] == ["x", "Â²5"]  # one run: 2 unsafe
    tok = load_tokenizer(*tokenizers["digits"])
    digits = "31415926535" * 400
    assert len(list(single.pieces(digits, 100))) == len(digits) // 100
    assert [i for p in single.pieces(digits, 100) for i in tok.encode(p)] == tok.encode(digits)


def test_letter_classes_agree_with_the_tokenizer_regex(tokenizers):
    """The cut rules' letter / non-letter sets are \\p{L} / not \\p{L} for the Rust regex engine."""
    import re

    from tokenizers import Tokenizer

    pre = Tokenizer.from_file(tokenizers["llama3"][1] + "/tokenizer.json").pre_tokenizer
    letters = [chr(c) for c in range(0x110000) if re.fullmatch(_LETTER, chr(c))]
    assert 30_000 < len(letters) < 40_000
    for c in letters:  # ".cc" is one pre-token exactly when c is \p{L}
        assert len(pre.pre_tokenize_str("." + c + c)) == 1, hex(ord(c))
    non_letters = [chr(c) for c in range(0x3100) if re.fullmatch(_NON_LETTER, chr(c))]
    for c in non_letters:  # "ab" + c splits after b when c is not \p{L}
        assert pre.pre_tokenize_str("ab" + c)[0][0] == "ab", hex(ord(c))


@pytest.mark.parametrize("name", ["llama3", "gpt2", "spm"])
def test_multi_megabyte_documents_encode_identically_in_pieces(tokenizers, name):
    tok, splitter = _load(tokenizers, name)
    for text, megabytes in ((adversarial(3, 560_000), 2), (adversarial(4, 280_000, NO_NEWLINE), 1)):
        assert len(text.encode()) > megabytes * 1_000_000
        pieces = list(splitter.pieces(text, 4096))
        assert len(pieces) > len(text) // 4096 and max(len(p) for p in pieces) <= 4096
        split_ids = [i for ids in tok.encode_batch(pieces) for i in ids]
        assert split_ids == tok.encode(text)


def _reference(tok, docs, prefix):
    """Megatron-LM's way: each document encoded whole, written by megatron-core's builder."""
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for doc in docs:
        builder.add_item(torch.tensor(tok.encode(doc) + [tok.eod_id]))
        builder.end_document()
    builder.finalize(prefix + ".idx")
    return [open(prefix + ext, "rb").read() for ext in (".bin", ".idx")]


@pytest.mark.parametrize("name", ["llama3", "spm"])
def test_giant_and_small_documents_same_bytes_for_1_2_4_workers(tokenizers, name, tmp_path):
    tok, splitter = _load(tokenizers, name)
    docs = [adversarial(100 + i, random.Random(i).randint(1, 60)) for i in range(150)]
    docs.insert(40, adversarial(5, 60_000))  # ~300 KB with newlines
    docs.insert(90, adversarial(6, 30_000, NO_NEWLINE))
    docs = [d for d in docs if d.strip()]
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    expected = _reference(tok, docs, str(tmp_path / "ref"))
    num_pieces = sum(len(list(splitter.pieces(d, 8192))) for d in docs if len(d) > 8192)
    for workers, max_piece_chars in ((1, 1 << 30), (1, 8192), (2, 8192), (4, 8192)):
        report = preprocess(
            PreprocessConfig(
                input=str(corpus),
                output_prefix=str(tmp_path / f"w{workers}_{max_piece_chars}"),
                tokenizer_type=tokenizers[name][0],
                tokenizer_model=tokenizers[name][1],
                append_eod=True,
                workers=workers,
                quiet=True,
                batch_bytes=4096,
                max_piece_chars=max_piece_chars,
            )
        )
        paths = report.outputs["text"]
        assert [open(paths[k], "rb").read() for k in ("bin", "idx")] == expected, workers
        assert report.split.documents == (0 if max_piece_chars > 1e6 else 2)
        assert report.split.pieces == (0 if max_piece_chars > 1e6 else num_pieces) != 2
        assert report.stats["text"]["split_documents"] == report.split.documents


def test_unknown_tokenizer_encodes_whole_and_says_so_once(tmp_path, caplog):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "</s>": 1, "a": 2, "b": 3}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "tokenizer.json"))
    assert make_splitter(load_tokenizer("HuggingFaceTokenizer", str(tmp_path)))[0] is None
    docs = ["a b " * 5000, "b a", "a " * 8000]
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    with caplog.at_level(logging.WARNING):
        report = preprocess(
            PreprocessConfig(
                input=str(corpus),
                output_prefix=str(tmp_path / "o"),
                tokenizer_type="HuggingFaceTokenizer",
                tokenizer_model=str(tmp_path),
                quiet=True,
                max_piece_chars=1000,
            )
        )
    warnings = [r for r in caplog.records if "encoded whole" in r.getMessage()]
    assert len(warnings) == 1 and "not deterministic BPE" in warnings[0].getMessage()
    assert report.split.unsplit == 2 and report.split.documents == 0
    assert report.stats["text"]["tokens"] == 10_000 + 2 + 8000


def test_cli_reports_split_documents(tokenizers, tmp_path):
    corpus = tmp_path / "c.jsonl"
    docs = ["short one", adversarial(7, 20_000), "short two"]
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    args = ["--input", str(corpus), "--output-prefix", str(tmp_path / "o"), "--append-eod"]
    args += ["--tokenizer-type", tokenizers["llama3"][0], "--tokenizer-model"]
    args += [tokenizers["llama3"][1], "--workers", "2", "--max-piece-chars", "5000", "--quiet"]
    out = run_tool("preprocess_data", *args)
    assert out.returncode == 0, out.stderr
    assert "split documents: 1 (" in out.stdout and "llama-3" in out.stdout.lower()
    bad = run_tool("preprocess_data", *args[:-2], "0")
    assert bad.returncode == 1 and "--max-piece-chars" in bad.stderr


def test_no_tokenizer_call_sees_more_than_the_piece_size(tokenizers, tmp_path, monkeypatch):
    """What bounds a worker's memory: the longest text handed to the tokenizer in one call."""
    from megatron_longctx.data.preprocess.tokenizer import HuggingFaceTokenizer

    longest = [0]
    encode, encode_batch = HuggingFaceTokenizer.encode, HuggingFaceTokenizer.encode_batch

    def spy(self, text):
        longest[0] = max(longest[0], len(text))
        return encode(self, text)

    def spy_batch(self, texts):
        longest[0] = max([longest[0], *map(len, texts)])
        return encode_batch(self, texts)

    monkeypatch.setattr(HuggingFaceTokenizer, "encode", spy)
    monkeypatch.setattr(HuggingFaceTokenizer, "encode_batch", spy_batch)
    corpus = tmp_path / "c.jsonl"
    giant = adversarial(8, 100_000)
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in ["a b", giant, "c"]))
    report = preprocess(
        PreprocessConfig(
            input=str(corpus),
            output_prefix=str(tmp_path / "o"),
            tokenizer_type=tokenizers["llama3"][0],
            tokenizer_model=tokenizers["llama3"][1],
            quiet=True,
            max_piece_chars=10_000,
        )
    )
    assert report.split.documents == 1 and len(giant) > 20 * 10_000
    assert 9_000 < longest[0] <= 10_000


def test_stretch_without_safe_cut_becomes_one_counted_piece(tokenizers, tmp_path):
    digits = "1234567890" * 3000  # no letter anywhere: no safe cut for the byte-level regex
    text = "intro words\n" + digits + " tail words\n" + "more text " * 2000
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"text": text}) + "\n")
    report = preprocess(
        PreprocessConfig(
            input=str(corpus),
            output_prefix=str(tmp_path / "o"),
            tokenizer_type=tokenizers["llama3"][0],
            tokenizer_model=tokenizers["llama3"][1],
            quiet=True,
            max_piece_chars=5000,
        )
    )
    tok = load_tokenizer(*tokenizers["llama3"])
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(report.outputs["text"]["prefix"])  # kept alive: ds[0] views its mmap
    assert ds[0].tolist() == tok.encode(text)
    assert report.split.documents == 1 and report.split.oversized == 1
