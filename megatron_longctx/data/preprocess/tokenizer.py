"""One small tokenizer interface over sentencepiece models and Hugging Face ``tokenizer.json``
files.

Every consumer in the project (preprocessing, mixture inspection, evaluation, SFT) goes through
``load_tokenizer(tokenizer_type, tokenizer_model)``. The returned object has ``encode(text)``,
``encode_batch(texts)``, ``decode(ids)``, ``vocab_size``, ``eod_id`` and ``bos_id``. Nothing is ever
downloaded: models are local files.

``encode`` never adds special tokens (no BOS/EOS); callers append ``eod_id`` themselves, as
Megatron's ``--append-eod`` does, so ``decode(encode(text)) == text`` for lossless models
(sentencepiece with identity normalization, byte-level BPE).
"""

from __future__ import annotations

import json
import os
from typing import Protocol

TOKENIZER_TYPES = ("SentencePieceTokenizer", "HuggingFaceTokenizer")

# Special-token spellings tried, in order, when a Hugging Face tokenizer does not name its EOS/BOS.
_EOD_CANDIDATES = ("<|end_of_text|>", "<|endoftext|>", "</s>", "<eos>", "<|eot_id|>")
_BOS_CANDIDATES = ("<|begin_of_text|>", "<s>", "<bos>")
# End-of-text / end-of-document spellings: the default --append-eod separator (``resolve_eod``).
END_OF_TEXT = ("<|end_of_text|>", "<|endoftext|>", "</s>", "<eos>")


class Tokenizer(Protocol):
    """What the rest of the project may rely on."""

    vocab_size: int
    eod_id: int | None
    bos_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...

    def decode(self, ids: list[int]) -> str: ...


class SentencePieceTokenizer:
    """A sentencepiece ``.model`` file.

    Args:
        model_path: path of the ``.model`` file (e.g. written by ``tools/train_tokenizer.py``).
    """

    def __init__(self, model_path: str) -> None:
        import sentencepiece as spm

        self.model_path = model_path
        self._sp = spm.SentencePieceProcessor(model_file=model_path)
        self.vocab_size: int = int(self._sp.vocab_size())
        eos, bos = int(self._sp.eos_id()), int(self._sp.bos_id())
        self.eod_id: int | None = eos if eos >= 0 else None
        self.bos_id: int | None = bos if bos >= 0 else None
        self.num_threads: int | None = None

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens."""
        return self._sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text (one C++ call; no special tokens).

        Uses ``self.num_threads`` sentencepiece threads (None: sentencepiece's default, all cores).
        """
        return self._sp.encode(texts, num_threads=self.num_threads)

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``."""
        return self._sp.decode([int(i) for i in ids])

    def token_to_id(self, token: str) -> int | None:
        """The id of the piece ``token``, or None when the model has no such piece."""
        i = int(self._sp.piece_to_id(token))
        return i if self._sp.id_to_piece(i) == token else None

    def id_to_token(self, token_id: int) -> str:
        return str(self._sp.id_to_piece(int(token_id)))


class HuggingFaceTokenizer:
    """A Hugging Face fast tokenizer: a ``tokenizer.json`` file or a directory holding one.

    EOS/BOS come from ``tokenizer_config.json`` next to it when present
    (``eos_token``/``bos_token``), else from common spellings (``<|end_of_text|>``, ``</s>``, ...).

    Args:
        model_path: ``tokenizer.json`` or a directory containing it (e.g. a Llama 3 checkpoint dir).
    """

    def __init__(self, model_path: str) -> None:
        from tokenizers import Tokenizer as _HFTokenizer

        json_path = model_path
        if os.path.isdir(model_path):
            json_path = os.path.join(model_path, "tokenizer.json")
            if not os.path.isfile(json_path):
                raise FileNotFoundError(
                    f"{model_path} is a directory without tokenizer.json: HuggingFaceTokenizer "
                    "needs a fast-tokenizer file; save one with AutoTokenizer.save_pretrained(dir) "
                    "or point --tokenizer-model at the tokenizer.json itself"
                )
        self.model_path = model_path
        self._tok = _HFTokenizer.from_file(json_path)
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        named = _read_special_tokens(os.path.dirname(os.path.abspath(json_path)))
        self.eod_id = self._find_token(named.get("eos_token"), _EOD_CANDIDATES)
        self.bos_id = self._find_token(named.get("bos_token"), _BOS_CANDIDATES)

    def _find_token(self, named: str | None, candidates: tuple[str, ...]) -> int | None:
        for token in ((named,) if named else ()) + candidates:
            token_id = self._tok.token_to_id(token)
            if token_id is not None:
                return int(token_id)
        return None

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text (no special tokens)."""
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids`` (special tokens kept, so an appended EOD stays visible)."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        """The id of ``token`` (a special token or a vocabulary entry), or None."""
        i = self._tok.token_to_id(token)
        return None if i is None else int(i)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(int(token_id))


def resolve_eod(tokenizer, spec: str | int | None = None) -> tuple[int, str]:
    """The document separator that ``--append-eod`` appends: ``(id, token)``.

    Args:
        tokenizer: from ``load_tokenizer``.
        spec: ``--eod-token``: a token (``<|endoftext|>``) or an id (``0``). None: the
            tokenizer's end-of-text token when its vocabulary has one (``END_OF_TEXT``, in that
            order), else its EOS. Instruct tokenizers name their end-of-turn token as EOS
            (``<|im_end|>``, Llama 3's ``<|eot_id|>``): a pretraining separator should be the
            end-of-text one (``<|endoftext|>``, ``<|end_of_text|>``), as their base models saw.

    Raises:
        ValueError: ``spec`` is not in the vocabulary, or the tokenizer has no EOS/EOD at all.
    """
    if spec is not None and str(spec).strip().lstrip("-").isdigit():
        token_id = int(spec)
        if not 0 <= token_id < tokenizer.vocab_size:
            raise ValueError(
                f"--eod-token {spec}: id out of the vocabulary [0, {tokenizer.vocab_size})"
            )
        return token_id, str(tokenizer.id_to_token(token_id))
    if spec is not None:
        token_id = tokenizer.token_to_id(str(spec))
        if token_id is None:
            raise ValueError(
                f"--eod-token {spec!r} is not a token of {tokenizer.model_path}; give a token of "
                "its vocabulary (e.g. <|endoftext|>) or an id"
            )
        return token_id, str(spec)
    for token in END_OF_TEXT:
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return token_id, token
    if tokenizer.eod_id is None:
        raise ValueError(
            f"--append-eod was given but tokenizer {tokenizer.model_path} defines no EOS/EOD "
            "token: pass --eod-token, use a tokenizer with an eos piece, or drop --append-eod"
        )
    return int(tokenizer.eod_id), str(tokenizer.id_to_token(tokenizer.eod_id))


def _read_special_tokens(directory: str) -> dict[str, str]:
    path = os.path.join(directory, "tokenizer_config.json")
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    out = {}
    for key in ("eos_token", "bos_token"):
        value = config.get(key)
        if isinstance(value, dict):  # AddedToken serialized as {"content": ...}
            value = value.get("content")
        if isinstance(value, str):
            out[key] = value
    return out


def load_tokenizer(
    tokenizer_type: str, tokenizer_model: str
) -> SentencePieceTokenizer | HuggingFaceTokenizer:
    """Loads a local tokenizer by Megatron's type name.

    Args:
        tokenizer_type: ``"SentencePieceTokenizer"`` or ``"HuggingFaceTokenizer"``.
        tokenizer_model: path of the sentencepiece ``.model``, or of a ``tokenizer.json`` /
            directory.

    Returns:
        An object with ``encode``, ``encode_batch``, ``decode``, ``vocab_size``, ``eod_id``,
        ``bos_id``.

    Raises:
        ValueError: unknown ``tokenizer_type``.
        FileNotFoundError: ``tokenizer_model`` does not exist.
    """
    if tokenizer_type not in TOKENIZER_TYPES:
        raise ValueError(
            f"unknown tokenizer type {tokenizer_type!r}: use one of {', '.join(TOKENIZER_TYPES)}"
        )
    if not tokenizer_model or not os.path.exists(tokenizer_model):
        raise FileNotFoundError(
            f"tokenizer model {tokenizer_model!r} does not exist: pass --tokenizer-model with a "
            "local sentencepiece .model (train one with tools/train_tokenizer.py) or a "
            "tokenizer.json"
        )
    if tokenizer_type == "SentencePieceTokenizer":
        if os.path.isdir(tokenizer_model):
            raise ValueError(
                f"{tokenizer_model} is a directory: SentencePieceTokenizer needs the .model file "
                "itself (or use --tokenizer-type HuggingFaceTokenizer for a tokenizer directory)"
            )
        return SentencePieceTokenizer(tokenizer_model)
    return HuggingFaceTokenizer(tokenizer_model)
