"""Raw JSONL corpora -> Megatron-Core indexed datasets (``.bin``/``.idx``) plus length statistics.

Layout (one concept per module):
    tokenizer.py      ``load_tokenizer``: sentencepiece / Hugging Face tokenizers, one interface.
    readers.py        input expansion (file, glob, directory; ``.jsonl``/``.jsonl.gz``), checks.
    writer.py         streaming, atomic writer of Megatron's ``.bin``/``.idx`` (numpy, no torch).
    stats.py          document-length statistics (power-of-two histogram), ``_stats.json``.
    worker.py         the tokenizing half: raw lines -> flat token arrays (runs in workers).
    pipeline.py       parallel tokenization with an ordered single writer; ``preprocess(config)``.
    progress.py       the stderr progress line (TTY only).
    train_spm.py      sentencepiece BPE training from JSONL.
    sample_corpus.py  a small deterministic multi-domain corpus built from files on any machine.
"""

from megatron_longctx.data.preprocess.tokenizer import (
    HuggingFaceTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    load_tokenizer,
)

__all__ = ["HuggingFaceTokenizer", "SentencePieceTokenizer", "Tokenizer", "load_tokenizer"]
