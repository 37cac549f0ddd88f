"""Train a sentencepiece BPE tokenizer from JSONL, so demos and tests have a real tokenizer offline.

Settings follow Llama 2's tokenizer where it matters for lossless round trips: BPE, byte fallback
(no unknown tokens), digits split one per token, identity normalization and no whitespace
collapsing, so ``decode(encode(text)) == text``. Newline is a dedicated piece. Ids: unk 0, bos 1,
eos (EOD) 2.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Iterator

from megatron_longctx.data.preprocess.readers import expand_inputs, open_binary

logger = logging.getLogger(__name__)

_LINES_PER_SENTENCE = 16  # documents are cut into chunks of lines; newlines stay inside the chunks


def iter_training_chunks(
    inputs: str | list[str], json_key: str = "text", max_chars: int = 8192
) -> Iterator[str]:
    """Yields pieces of every document (``max_chars`` at most), newlines kept, bad lines skipped.

    Args:
        inputs: file, glob or directory of JSONL (as ``--input`` of preprocess_data).
        json_key: the text key.
        max_chars: longest chunk; sentencepiece drops longer sentences.
    """
    for path in expand_inputs(inputs):
        with open_binary(path) as f:
            for line in f:
                try:
                    text = json.loads(line).get(json_key)
                except (ValueError, AttributeError):
                    continue
                if not isinstance(text, str) or not text.strip():
                    continue
                lines = text.splitlines(keepends=True)
                for i in range(0, len(lines), _LINES_PER_SENTENCE):
                    chunk = "".join(lines[i : i + _LINES_PER_SENTENCE])
                    for j in range(0, len(chunk), max_chars):
                        yield chunk[j : j + max_chars]


def train_sentencepiece(
    inputs: str | list[str],
    model_prefix: str,
    vocab_size: int = 8000,
    json_key: str = "text",
    max_sentences: int = 200_000,
    seed: int = 0,
    num_threads: int = 2,
) -> str:
    """Trains a BPE model and writes ``{model_prefix}.model`` and ``.vocab``.

    Args:
        inputs: JSONL file(s), glob(s) or directories.
        model_prefix: output prefix; its directory is created.
        vocab_size: number of pieces (byte fallback adds 256 of them; must be > 300).
        json_key: the text key of each record.
        max_sentences: chunks sampled for training (reservoir sample, deterministic for ``seed``);
            bounds memory and time on large corpora.
        seed: sampling seed.
        num_threads: sentencepiece trainer threads.

    Returns:
        The path of the ``.model`` file.

    Raises:
        ValueError: vocabulary too small, or no text found under ``json_key``.
    """
    import sentencepiece as spm

    if vocab_size <= 300:
        raise ValueError(
            f"--vocab-size {vocab_size} is too small: byte fallback alone needs 256 pieces plus "
            "specials; use at least 512"
        )
    rng = random.Random(seed)
    sample: list[str] = []
    for seen, chunk in enumerate(iter_training_chunks(inputs, json_key)):
        if len(sample) < max_sentences:
            sample.append(chunk)
        else:
            slot = rng.randint(0, seen)
            if slot < max_sentences:
                sample[slot] = chunk
    if not sample:
        raise ValueError(
            f"no text found under key {json_key!r} in {inputs}: check the files and --json-key"
        )
    os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)
    logger.info("training sentencepiece BPE (vocab %d) on %d chunks", vocab_size, len(sample))
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sample),
        model_prefix=model_prefix,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        user_defined_symbols=["\n"],
        character_coverage=0.9995,
        max_sentence_length=1 << 15,
        input_sentence_size=0,
        num_threads=num_threads,
        minloglevel=2,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
    )
    return model_prefix + ".model"
