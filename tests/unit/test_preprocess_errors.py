"""Bad records in both --on-error modes, flag validation, and interrupted runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_longctx.data.preprocess import load_tokenizer
from megatron_longctx.data.preprocess.pipeline import PreprocessConfig, PreprocessError, preprocess
from tests.unit.conftest import REPO_ROOT, run_tool

GOOD = [b'{"text": "good one"}\n', b'{"text": "good two"}\n']
BAD_LINES = {
    "malformed_json": b'{"text": "unterminated}\n',
    "not_an_object": b'["text", "a list"]\n',
    "missing_key": b'{"body": "wrong key"}\n',
    "not_a_string": b'{"text": 42}\n',
    "invalid_utf8": b'{"text": "caf\xe9 latin-1"}\n',
}
LONE_SURROGATE = b'{"text": "half a pair \\ud800 here"}\n'


def _write_with_bad_line(tmp_path, bad: bytes) -> str:
    path = tmp_path / "in.jsonl"
    path.write_bytes(GOOD[0] + bad + GOOD[1])  # the bad record is on line 2
    return str(path)


def _config(inp, tmp_path, model, **kw) -> PreprocessConfig:
    return PreprocessConfig(
        input=inp,
        output_prefix=str(tmp_path / "out" / "data"),
        tokenizer_type="SentencePieceTokenizer",
        tokenizer_model=model,
        quiet=True,
        **kw,
    )


@pytest.mark.parametrize("reason", sorted(BAD_LINES))
def test_fail_mode_reports_file_line_reason_and_leaves_nothing(reason, spm_model, tmp_path):
    inp = _write_with_bad_line(tmp_path, BAD_LINES[reason])
    with pytest.raises(PreprocessError) as info:
        preprocess(_config(inp, tmp_path, spm_model))
    assert str(info.value).startswith(f"{inp}:2: {reason}: ")
    assert "--on-error skip" in str(info.value)
    assert os.listdir(tmp_path / "out") == []


@pytest.mark.parametrize("reason", sorted(BAD_LINES))
@pytest.mark.parametrize("workers", [1, 2])
def test_skip_mode_counts_reason_and_keeps_good_records(reason, workers, spm_model, tmp_path):
    inp = _write_with_bad_line(tmp_path, BAD_LINES[reason])
    report = preprocess(_config(inp, tmp_path, spm_model, on_error="skip", workers=workers))
    assert report.skipped[reason] == 1 and sum(report.skipped.values()) == 1
    stats = json.load(open(report.outputs["text"]["stats"]))
    assert stats["skipped"][reason] == 1 and stats["documents"] == 2
    tok = load_tokenizer("SentencePieceTokenizer", spm_model)
    ds = IndexedDataset(report.outputs["text"]["prefix"])
    assert [tok.decode(ds[i].tolist()) for i in range(len(ds))] == ["good one", "good two"]


@pytest.mark.parametrize("on_error", ["fail", "skip"])
def test_empty_text_is_skipped_and_counted_whitespace_is_text(
    on_error, spm_model, tmp_path, caplog
):
    """Megatron-LM keeps going on empty documents (real corpora have them): an empty text is
    skipped, counted and warned about under either mode; whitespace-only text is a document."""
    path = tmp_path / "in.jsonl"
    path.write_bytes(GOOD[0] + b'{"text": ""}\n' + b'{"text": "  \\n\\t "}\n' + GOOD[1])
    with caplog.at_level("WARNING"):
        report = preprocess(_config(str(path), tmp_path, spm_model, on_error=on_error))
    assert report.skipped["empty_text"] == 1 and sum(report.skipped.values()) == 1
    assert f"{path}:2: empty_text" in caplog.text
    stats = json.load(open(report.outputs["text"]["stats"]))
    assert stats["skipped"]["empty_text"] == 1 and stats["documents"] == 3
    tok = load_tokenizer("SentencePieceTokenizer", spm_model)
    ds = IndexedDataset(report.outputs["text"]["prefix"])
    texts = [tok.decode(ds[i].tolist()) for i in range(len(ds))]
    assert texts == ["good one", "  \n\t ", "good two"]


def test_lone_surrogate_is_invalid_utf8_in_both_modes(spm_model, tmp_path):
    inp = _write_with_bad_line(tmp_path, LONE_SURROGATE)
    with pytest.raises(PreprocessError, match=r"in\.jsonl:2: invalid_utf8: .*surrogate"):
        preprocess(_config(inp, tmp_path, spm_model))
    report = preprocess(_config(inp, tmp_path, spm_model, on_error="skip"))
    assert report.skipped["invalid_utf8"] == 1 and report.stats["text"]["documents"] == 2


def test_all_records_bad_is_an_error(spm_model, tmp_path):
    inp = tmp_path / "bad.jsonl"
    inp.write_bytes(BAD_LINES["missing_key"] * 3)
    with pytest.raises(PreprocessError, match="no documents were written.*missing_key=3"):
        preprocess(_config(str(inp), tmp_path, spm_model, on_error="skip"))
    assert os.listdir(tmp_path / "out") == []


def test_bad_flags_name_the_fix(spm_model, tmp_path):
    with pytest.raises(ValueError, match="--workers must be >= 1"):
        _config("x", tmp_path, spm_model, workers=0)
    with pytest.raises(ValueError, match="--tokenizer-type 'GPT2BPETokenizer' is not supported"):
        PreprocessConfig(
            input="x",
            output_prefix="o",
            tokenizer_type="GPT2BPETokenizer",
            tokenizer_model=spm_model,
        )
    with pytest.raises(FileNotFoundError, match="matches no file"):
        preprocess(_config(str(tmp_path / "nothing*.jsonl"), tmp_path, spm_model))
    with pytest.raises(FileNotFoundError, match="train one with tools/train_tokenizer.py"):
        preprocess(
            _config(_write_with_bad_line(tmp_path, b""), tmp_path, str(tmp_path / "x.model"))
        )


def test_cli_fail_and_skip_exit_codes(spm_model, tmp_path):
    inp = _write_with_bad_line(tmp_path, BAD_LINES["not_a_string"])
    common = [
        "--input",
        inp,
        "--output-prefix",
        str(tmp_path / "cli" / "d"),
        "--tokenizer-type",
        "SentencePieceTokenizer",
        "--tokenizer-model",
        spm_model,
    ]
    failed = run_tool("preprocess_data", *common)
    assert failed.returncode == 1
    assert f"{inp}:2: not_a_string: value of 'text' is int" in failed.stderr
    assert not (tmp_path / "cli").exists() or os.listdir(tmp_path / "cli") == []
    skipped = run_tool("preprocess_data", *common, "--on-error", "skip", "--workers", "2")
    assert skipped.returncode == 0, skipped.stderr
    assert "not_a_string=1" in skipped.stdout and skipped.stderr.count("\r") == 0  # no TTY: no bar
    assert len(IndexedDataset(str(tmp_path / "cli" / "d_text_document"))) == 2


@pytest.mark.timeout(90)
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_interrupted_run_leaves_no_final_idx(sig, spm_model, tmp_path):
    """The input is a named pipe, so the kill lands while the tool is mid-way, blocked on input."""
    fifo = tmp_path / "stream.jsonl"
    os.mkfifo(fifo)
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [
            sys.executable,
            os.path.join(REPO_ROOT, "tools", "preprocess_data.py"),
            "--input",
            str(fifo),
            "--output-prefix",
            str(out / "d"),
            "--tokenizer-type",
            "SentencePieceTokenizer",
            "--tokenizer-model",
            spm_model,
            "--workers",
            "2",
            "--quiet",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO_ROOT,
    )
    try:
        with open(fifo, "wb") as writer:  # blocks until the tool opens the pipe
            for i in range(3000):
                writer.write(json.dumps({"text": f"document number {i} " * 5}).encode() + b"\n")
            writer.flush()
            deadline = time.monotonic() + 30
            while not any(".bin.tmp-" in n for n in _names(out)):
                assert proc.poll() is None, proc.communicate(timeout=10)[1]
                assert time.monotonic() < deadline, "the tool never created its temporary .bin"
                time.sleep(0.05)
            time.sleep(0.3)
            proc.send_signal(sig)
            proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    names = _names(out)
    assert not [n for n in names if n.endswith((".idx", ".bin", ".json")) and ".tmp-" not in n]
    if sig == signal.SIGTERM:  # a catchable signal cleans its temporary files too
        assert proc.returncode == 128 + signal.SIGTERM and names == []


def _names(directory) -> list[str]:
    return sorted(os.listdir(directory)) if os.path.isdir(directory) else []
