"""Raw JSONL corpora -> Megatron-Core indexed datasets (``.bin``/``.idx``) plus length statistics.

Layout (one concept per module):
    tokenizer.py   ``load_tokenizer``: sentencepiece / Hugging Face tokenizers behind one small interface.
    readers.py     input expansion (file, glob, directory; ``.jsonl`` / ``.jsonl.gz``) and record checks.
    writer.py      streaming, atomic writer of Megatron's ``.bin``/``.idx`` format (numpy only, no torch).
    stats.py       document-length statistics (power-of-two histogram) and the ``_stats.json`` sidecar.
    pipeline.py    parallel tokenization with an ordered single writer; ``preprocess(config)``.
    train_spm.py   sentencepiece BPE training from JSONL.
    sample_corpus.py  a small deterministic multi-domain corpus built from files on any machine.
"""

from megatron_longctx.data.preprocess.tokenizer import (
    HuggingFaceTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    load_tokenizer,
)

__all__ = ["HuggingFaceTokenizer", "SentencePieceTokenizer", "Tokenizer", "load_tokenizer"]
