"""load_tokenizer (sentencepiece and Hugging Face) and tools/train_tokenizer.py."""

from __future__ import annotations

import json
import os

import pytest
import sentencepiece as spm

from megatron_longctx.data.preprocess import load_tokenizer
from megatron_longctx.data.preprocess.train_spm import train_sentencepiece
from tests.unit.conftest import UNICODE_DOCS, run_tool


def test_trained_model_settings_match_llama_style(spm_model):
    """Read the trained model's own proto: BPE, byte fallback, split digits, identity
    normalization."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    with open(spm_model, "rb") as f:
        proto.ParseFromString(f.read())
    assert proto.trainer_spec.model_type == pb.TrainerSpec.BPE
    assert proto.trainer_spec.byte_fallback and proto.trainer_spec.split_digits
    assert proto.normalizer_spec.name == "identity"
    assert not proto.normalizer_spec.remove_extra_whitespaces


def test_sentencepiece_wrapper_agrees_with_sentencepiece(spm_model):
    tok = load_tokenizer("SentencePieceTokenizer", spm_model)
    ref = spm.SentencePieceProcessor(model_file=spm_model)
    assert (tok.vocab_size, tok.eod_id, tok.bos_id) == (1000, 2, 1)
    for text in UNICODE_DOCS:
        ids = tok.encode(text)
        assert ids == ref.encode(text)
        assert tok.decode(ids) == text  # lossless: identity normalization + byte fallback
    assert tok.encode_batch(UNICODE_DOCS) == [tok.encode(t) for t in UNICODE_DOCS]
    ids = tok.encode("x 90210 and 1234567")
    pieces = [tok.decode([i]) for i in ids]
    assert all(sum(c.isdigit() for c in p) <= 1 for p in pieces)  # split digits
    rare = "\U0001d518"  # a character absent from the training text: falls back to 4 byte pieces
    assert [ref.id_to_piece(i) for i in tok.encode(rare)][-4:] == [
        "<0xF0>",
        "<0x9D>",
        "<0x94>",
        "<0x98>",
    ]


def test_hf_tokenizer_json_and_directory(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|begin_of_text|>", "<|eot|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(UNICODE_DOCS * 5, trainer)
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": {"content": "<|eot|>"}})
    )

    for path in (str(tmp_path), str(tmp_path / "tokenizer.json")):
        wrapped = load_tokenizer("HuggingFaceTokenizer", path)
        assert wrapped.eod_id == tok.token_to_id("<|eot|>") == 1
        assert wrapped.bos_id == tok.token_to_id("<|begin_of_text|>") == 0
        assert wrapped.vocab_size == tok.get_vocab_size()
        for text in UNICODE_DOCS:
            assert wrapped.encode(text) == tok.encode(text).ids
            assert wrapped.decode(wrapped.encode(text)) == text


def test_load_tokenizer_errors_name_the_fix(spm_model, tmp_path):
    with pytest.raises(ValueError, match="use one of SentencePieceTokenizer, HuggingFaceTokenizer"):
        load_tokenizer("Llama2Tokenizer", spm_model)
    with pytest.raises(FileNotFoundError, match="tools/train_tokenizer.py"):
        load_tokenizer("SentencePieceTokenizer", str(tmp_path / "missing.model"))
    with pytest.raises(ValueError, match="needs the .model file itself"):
        load_tokenizer("SentencePieceTokenizer", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="without tokenizer.json"):
        load_tokenizer("HuggingFaceTokenizer", str(tmp_path))


def test_train_rejects_tiny_vocab_and_missing_text(sample_corpus_dir, tmp_path):
    with pytest.raises(ValueError, match="at least 512"):
        train_sentencepiece(sample_corpus_dir, str(tmp_path / "m"), vocab_size=100)
    with pytest.raises(ValueError, match="no text found under key 'body'"):
        train_sentencepiece(sample_corpus_dir, str(tmp_path / "m"), json_key="body")


@pytest.mark.timeout(120)
def test_demo_chain_from_the_cli(tmp_path):
    """make_sample_corpus -> train_tokenizer -> preprocess_data, exactly as the docstrings show."""
    sample, tok = str(tmp_path / "sample"), str(tmp_path / "tok" / "spm")
    steps = [
        ("make_sample_corpus", "--output-dir", sample, "--scale", "0.2"),
        ("train_tokenizer", "--input", sample, "--model-prefix", tok, "--vocab-size", "2000"),
        (
            "preprocess_data",
            "--input",
            sample,
            "--output-prefix",
            str(tmp_path / "tokens" / "s"),
            "--tokenizer-type",
            "SentencePieceTokenizer",
            "--tokenizer-model",
            tok + ".model",
            "--append-eod",
            "--workers",
            "2",
        ),
    ]
    stdout = {}
    for name, *args in steps:
        result = run_tool(name, *args)
        assert result.returncode == 0, f"{name}: {result.stderr}"
        stdout[name] = result.stdout
    assert sorted(os.listdir(sample)) == ["books.jsonl", "code.jsonl", "web.jsonl"]
    assert "vocab 2000, eod id 2" in stdout["train_tokenizer"]
    stats = json.load(open(tmp_path / "tokens" / "s_text_stats.json"))
    assert stats["documents"] > 50 and stats["max_length"] > 8 * stats["median_length"]
