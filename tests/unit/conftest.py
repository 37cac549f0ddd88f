"""Shared data fixtures for unit tests: a small real corpus and a sentencepiece model trained on it.

``sample_corpus_dir``: ``{code,books,web}.jsonl`` from ``make_sample_corpus`` (scaled down) plus
``unicode.jsonl`` (non-ASCII, digits, tabs, emoji). ``spm_model``: a 1,000-piece BPE model trained
on that directory with the project's own trainer (EOD id 2). Both are built once per session.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

UNICODE_DOCS = [
    "Grüße aus Köln: 12 Äpfel, 345 Birnen.\n\tTabulated line\n",
    "  leading spaces and trailing  ",
    "日本語のテキストと emoji 🤖🚀 mixed with code: x = f(1, 2)\n",
    "Line one\n\n\nLine four after blank lines\r\nwindows newline",
]


@pytest.fixture(scope="session")
def sample_corpus_dir(tmp_path_factory) -> str:
    """A few hundred KB of real multi-domain text (see module docstring)."""
    from megatron_longctx.data.preprocess.sample_corpus import make_sample_corpus

    out = str(tmp_path_factory.mktemp("sample_corpus"))
    make_sample_corpus(out, scale=0.1)
    with open(os.path.join(out, "unicode.jsonl"), "w", encoding="utf-8") as f:
        for text in UNICODE_DOCS:
            f.write(json.dumps({"text": text}) + "\n")
    return out


@pytest.fixture(scope="session")
def spm_model(sample_corpus_dir, tmp_path_factory) -> str:
    """Path of a sentencepiece BPE model (vocab 1,000) trained on ``sample_corpus_dir``."""
    from megatron_longctx.data.preprocess.train_spm import train_sentencepiece

    prefix = os.path.join(str(tmp_path_factory.mktemp("spm")), "tiny")
    return train_sentencepiece(sample_corpus_dir, prefix, vocab_size=1000, num_threads=1)


def read_jsonl_texts(path: str, key: str = "text") -> list[str]:
    """Texts of a JSONL file in order (test helper)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)[key] for line in f if line.strip()]


def run_tool(name: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Runs ``tools/{name}.py`` in a subprocess with a hard timeout."""
    return subprocess.run(
        [sys.executable, os.path.join(REPO_ROOT, "tools", f"{name}.py"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO_ROOT,
    )
