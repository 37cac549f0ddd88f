"""Raw JSONL corpora -> Megatron-Core indexed datasets (``.bin``/``.idx``) plus length statistics.

Layout (one concept per module):
    tokenizer.py      ``load_tokenizer``: sentencepiece / Hugging Face tokenizers, one interface.
    readers.py        input expansion (file, glob, directory; ``.jsonl``/``.jsonl.gz``), checks.
    writer.py         streaming, atomic writer of Megatron's ``.bin``/``.idx`` (numpy, no torch).
    stats.py          document-length statistics (power-of-two histogram), ``_stats.json``.
    split.py          safe cut points for encoding one long document in pieces (the proofs).
    tasks.py          the reading half: lines -> batches of short records / pieces of long ones.
    worker.py         the tokenizing half: batches and pieces -> flat token arrays (in workers).
    pipeline.py       parallel tokenization with an ordered single writer; ``preprocess(config)``.
    progress.py       the stderr progress bar (tqdm, TTY only): tokens, documents, split docs.
    train_spm.py      sentencepiece BPE training from JSONL.
    train_bpe.py      Llama-3-style byte-level BPE training (Hugging Face tokenizers).
    sample_corpus.py  a small deterministic multi-domain corpus built from files on any machine.
"""

from megatron_longctx.data.preprocess.tokenizer import (
    HuggingFaceTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    load_tokenizer,
)

__all__ = ["HuggingFaceTokenizer", "SentencePieceTokenizer", "Tokenizer", "load_tokenizer"]
