"""Train a Llama-3-style byte-level BPE tokenizer (Hugging Face ``tokenizers``) offline.

Same structure as Llama 3's ``tokenizer.json``: no normalizer, ``Split`` on Llama 3's regex
(``split.LLAMA3_PATTERN``, isolated) then ``ByteLevel(add_prefix_space=False, use_regex=False)``,
BPE, byte-level decoder, ``<|begin_of_text|>`` / ``<|end_of_text|>`` specials (EOS named in
``tokenizer_config.json``). ``style="gpt2"`` uses GPT-2's ``ByteLevel(use_regex=True)`` instead;
``style="digits"`` puts ``Digits(individual_digits=True)`` before it (SmolLM2, StarCoder),
``"digit_runs"`` ``Digits(individual_digits=False)``.
Tests and benchmarks use it where the real Llama 3 tokenizer cannot be downloaded; its vocabulary is
smaller, the pre-tokenization (what decides where pieces may be cut) is the same.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

from megatron_longctx.data.preprocess.split import LLAMA3_PATTERN

SPECIAL_TOKENS = ("<|begin_of_text|>", "<|end_of_text|>")


def train_byte_level_bpe(
    texts: Iterable[str], directory: str, vocab_size: int = 4096, style: str = "llama3"
) -> str:
    """Trains the tokenizer on ``texts`` and writes ``{directory}/tokenizer.json`` (+ config).

    Args:
        texts: training texts.
        directory: output directory (created); pass it as ``--tokenizer-model``.
        vocab_size: vocabulary size including the 256 byte symbols and the specials.
        style: ``"llama3"`` (Llama 3's split regex), ``"gpt2"`` (GPT-2's byte-level regex),
            ``"digits"`` / ``"digit_runs"`` (a Digits pre-tokenizer, then GPT-2's).

    Returns:
        ``directory``.

    Raises:
        ValueError: unknown ``style`` or a vocabulary too small for the byte alphabet.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size {vocab_size} is below the 256 bytes + specials; use >= 512")
    tok = Tokenizer(models.BPE())
    if style == "llama3":
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    elif style == "gpt2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif style in ("digits", "digit_runs"):
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=style == "digits"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    else:
        raise ValueError(f"style must be 'llama3', 'gpt2', 'digits' or 'digit_runs', got {style!r}")
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=list(SPECIAL_TOKENS),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    os.makedirs(directory, exist_ok=True)
    tok.save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": SPECIAL_TOKENS[0], "eos_token": SPECIAL_TOKENS[1]}, f)
    return directory
