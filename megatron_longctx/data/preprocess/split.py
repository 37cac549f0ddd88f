r"""Cutting one long document into pieces whose encodings concatenate to the whole encoding.

A cut at character ``p`` is *safe* when ``encode(text) == encode(text[:p]) + encode(text[p:])`` for
every text, which holds when no step of the tokenizer looks across ``p``. Safe cuts are recognised
only for tokenizer configurations whose semantics are known exactly; anything else (another regex,
a normalizer, BPE dropout, truncation) gets no splitter and is encoded whole.

Byte-level BPE with Llama-3's split regex (``LLAMA3_PATTERN``; Hugging Face ``Split(Isolated)`` then
``ByteLevel(use_regex=False)``, no normalizer). BPE merges never cross a pre-token, so a cut is safe
if it is a pre-token boundary of the whole text that the left and right pieces reproduce. The regex
has no lookbehind and no anchors, so matches from ``p`` on do not depend on ``text[:p]``; its only
lookaround is the ``(?!\S)`` of ``\s+(?!\S)``. Every character is matched (``\p{L}``,
``\p{N}``, ``\s`` and "other" each have an alternative), so there are no unmatched gaps. Rules:

- A. ``text[p-1] == "\n"`` and ``text[p]`` is a letter. No alternative matches "\n" followed by a
  letter (the optional prefix of ``[^\r\n\p{L}\p{N}]?\p{L}+`` excludes "\r\n"; the others
  hold no letters after a newline), so the match holding the newline ends at ``p``. That match is
  ``' ?[^\s\p{L}\p{N}]+[\r\n]*'`` or ``\s*[\r\n]+`` (a whitespace run ending in "\n" is taken
  by ``\s*[\r\n]+`` before ``\s+(?!\S)`` is tried); neither has lookaround, and alternatives
  before them have none either, so the truncated left piece makes the same match.
- B. ``text[p-1]`` is a letter and ``text[p]`` is not. Only the contractions and
  ``[^\r\n\p{L}\p{N}]?\p{L}+`` match letters; both end inside the letter run and have no
  lookaround, so the match holding ``text[p-1]`` ends at ``p`` and is the same in the left piece.

GPT-2's ``ByteLevel(use_regex=True)`` regex gets rule B only (rule A fails there: ``\s+(?!\S)``
sees past the cut: ``"x \nA"`` splits ``" "|"\n"`` whole, ``" \n"`` truncated). "Letter" is
restricted to characters whose Unicode category has been ``L*`` for decades (ASCII, Latin-1 and
Latin Extended-A/B, Greek, Cyrillic, kana, CJK U+4E00-U+9FA5, Hangul syllables), "not a letter" to
ASCII non-letters and common CJK punctuation, so Python's tables and the Rust regex engine agree.
Added tokens (``<|end_of_text|>``, ...) are matched on the raw text before the regex: a cut is
refused within one token length of any added token's spelling.

Byte-level BPE with a digit-splitting pre-tokenizer in front of GPT-2's regex
(``Sequence[Digits, ByteLevel(use_regex=True)]``: SmolLM2, StarCoder). ``Digits`` cuts the text
into pieces by one test per character (Rust's ``char::is_numeric``): with
``individual_digits`` every numeric character is a piece of its own and the maximal runs of the
other characters are pieces; without it, maximal numeric runs and maximal other runs. The GPT-2
regex then runs inside each piece, and BPE inside each of its matches. Rules:

- D (individual digits). ``text[p-1]`` or ``text[p]`` is an ASCII digit. That digit is a piece
  of its own whatever its neighbours, so ``p`` is a piece boundary of the whole text, of
  ``text[:p]`` and of ``text[p:]``, and every other piece boundary is decided by its own character
  alone: the pieces of the left and right texts are exactly the whole text's pieces, split at
  ``p``; the regex and BPE see the same pieces.
- D' (digit runs). ``text[p-1]`` is an ASCII digit and ``text[p]`` an ASCII non-digit, or the
  other way round. ASCII non-digits are non-numeric in Unicode (``"²5"`` is one run: a cut
  after a non-ASCII numeric character is not taken), so ``p`` ends one maximal run and starts the
  next in all three texts; as in D, the pieces are the whole text's, split at ``p``.
- B holds unchanged: when ``text[p]`` is a digit, D / D' applies; otherwise ``p`` lies inside
  one non-numeric piece, its boundaries are the same in the left and right texts (they depend on
  single characters), and within that piece B's argument for GPT-2's regex holds as stated.

Sentencepiece BPE (identity normalization, whitespace kept, spaces escaped to U+2581): the cut is
before a space that follows a non-space. BPE symbols evolve independently on the two sides when no
vocabulary piece spans the cut, which the vocabulary check guarantees (every piece holds U+2581
only in its leading run). The dummy prefix sentencepiece adds to every input is the U+2581 of that
space, so a continuation piece is sent without its leading space.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass

LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Long-assigned blocks whose letters are letters in every Unicode version since the 1990s.
_LETTER_BLOCKS = (
    (0x41, 0x24F),
    (0x386, 0x3CE),
    (0x400, 0x4FF),
    (0x3041, 0x30FA),
    (0x4E00, 0x9FA5),
    (0xAC00, 0xD7A3),
)
_CJK_PUNCTUATION = "\u3000\u3001\u3002\u300c\u300d\u300e\u300f\uff01\uff08\uff09\uff0c\uff1a\uff1b"


def _letter_class() -> str:
    ranges: list[list[int]] = []
    for lo, hi in _LETTER_BLOCKS:
        for cp in range(lo, hi + 1):
            c = chr(cp)
            if c.isalpha() and unicodedata.category(c).startswith("L"):
                if ranges and ranges[-1][1] == cp - 1:
                    ranges[-1][1] = cp
                else:
                    ranges.append([cp, cp])
    return "".join(
        re.escape(chr(a)) if a == b else f"{re.escape(chr(a))}-{re.escape(chr(b))}"
        for a, b in ranges
    )


_LETTER = f"[{_letter_class()}]"
_NON_LETTER = f"[\\x00-\\x40\\x5b-\\x60\\x7b-\\x7f{_CJK_PUNCTUATION}]"
_RULE_A = rf"(?<=\n)(?={_LETTER})"
_RULE_B = rf"(?<={_LETTER})(?={_NON_LETTER})"
_ASCII_NON_DIGIT = r"[\x00-\x2f\x3a-\x7f]"
_RULE_D = r"(?<=[0-9])|(?=[0-9])"
_RULE_D_RUNS = rf"(?<=[0-9])(?={_ASCII_NON_DIGIT})|(?<={_ASCII_NON_DIGIT})(?=[0-9])"
_SEARCH_WINDOW = 4096  # characters searched back from the size limit before the wider search


@dataclass(frozen=True)
class Splitter:
    """Finds safe cuts for one tokenizer.

    Attributes:
        name: which proof applies (``llama3-regex``, ``gpt2-bytelevel``,
            ``digits-gpt2-bytelevel``, ``sentencepiece-bpe``).
        boundary: zero-width regex matching candidate cut positions.
        forbidden: spellings (added tokens) a cut may not come within one length of.
        drop_leading_space: send continuation pieces without their first character (sentencepiece
            adds that space back as its dummy prefix).
    """

    name: str
    boundary: re.Pattern
    forbidden: tuple[str, ...] = ()
    drop_leading_space: bool = False

    def _ok(self, text: str, p: int) -> bool:
        if not 0 < p < len(text) - (1 if self.drop_leading_space else 0):
            return False
        return not any(t in text[max(0, p - len(t) - 1) : p + len(t) + 1] for t in self.forbidden)

    def cuts(self, text: str, max_chars: int) -> list[int]:
        """Safe cut positions so that pieces are at most ``max_chars`` long where a safe cut allows
        it (a stretch without one becomes one longer piece)."""
        if max_chars < 1:
            raise ValueError(f"max_chars must be >= 1, got {max_chars}")
        out: list[int] = []
        start, n = 0, len(text)
        while n - start > max_chars:
            hi = start + max_chars
            cut = None
            for lo in (max(start + 1, hi - _SEARCH_WINDOW), start + 1):
                found = [m.start() for m in self.boundary.finditer(text, lo, hi + 1)]
                cut = next((p for p in reversed(found) if p <= hi and self._ok(text, p)), None)
                if cut is not None:
                    break
            if cut is None:  # none within the limit: the first one after it
                for m in self.boundary.finditer(text, hi + 1):
                    if self._ok(text, m.start()):
                        cut = m.start()
                        break
            if cut is None:
                break
            out.append(cut)
            start = cut
        return out

    def pieces(self, text: str, max_chars: int) -> Iterator[str]:
        """The texts to encode, in order; their encodings concatenate to ``encode(text)``."""
        bounds = [0, *self.cuts(text, max_chars), len(text)]
        for i in range(len(bounds) - 1):
            piece = text[bounds[i] : bounds[i + 1]]
            yield piece[1:] if i and self.drop_leading_space else piece


def make_splitter(tokenizer) -> tuple[Splitter | None, str]:
    """The splitter for a loaded tokenizer, or ``None`` and the reason no safe cut is known.

    Args:
        tokenizer: a ``SentencePieceTokenizer`` or ``HuggingFaceTokenizer``.

    Returns:
        ``(splitter, description)``.
    """
    if hasattr(tokenizer, "_sp"):
        return _sentencepiece_splitter(tokenizer._sp)
    if hasattr(tokenizer, "_tok"):
        return _hf_splitter(json.loads(tokenizer._tok.to_str()))
    return None, f"{type(tokenizer).__name__} is not a known tokenizer type"


def _hf_splitter(config: dict) -> tuple[Splitter | None, str]:
    model = config.get("model") or {}
    if model.get("type") != "BPE" or model.get("dropout") not in (None, 0, 0.0):
        return None, "the model is not deterministic BPE"
    if config.get("normalizer") is not None:
        return None, "the tokenizer has a normalizer"
    if config.get("truncation") is not None or config.get("padding") is not None:
        return None, "tokenizer.json enables truncation or padding"
    forbidden = tuple(t["content"] for t in config.get("added_tokens") or [] if t.get("content"))
    pre = config.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    if (
        len(steps) == 2
        and steps[0].get("type") == "Split"
        and steps[0].get("pattern") == {"Regex": LLAMA3_PATTERN}
        and steps[0].get("behavior") == "Isolated"
        and not steps[0].get("invert")
        and _plain_byte_level(steps[1], use_regex=False)
    ):
        return Splitter("llama3-regex", re.compile(f"{_RULE_A}|{_RULE_B}"), forbidden), (
            "Llama-3 byte-level regex: cut after a newline before a letter, or after a letter"
        )
    if (
        len(steps) == 2
        and steps[0].get("type") == "Digits"
        and _plain_byte_level(steps[1], use_regex=True)
    ):
        single = bool(steps[0].get("individual_digits"))
        rule = _RULE_D if single else _RULE_D_RUNS
        return Splitter("digits-gpt2-bytelevel", re.compile(f"{_RULE_B}|{rule}"), forbidden), (
            "Digits + GPT-2 byte-level regex: cut after a letter, or "
            + ("before or after a digit" if single else "where a digit run starts or ends")
        )
    if len(steps) == 1 and _plain_byte_level(steps[0], use_regex=True):
        return Splitter("gpt2-bytelevel", re.compile(_RULE_B), forbidden), (
            "GPT-2 byte-level regex: cut after a letter"
        )
    return None, f"pre-tokenizer {json.dumps(pre)[:200]} has no known safe boundary"


def _plain_byte_level(step: dict, use_regex: bool) -> bool:
    return (
        step.get("type") == "ByteLevel"
        and not step.get("add_prefix_space")
        and bool(step.get("use_regex", True)) == use_regex
    )


def _sentencepiece_splitter(sp) -> tuple[Splitter | None, str]:
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError:  # protobuf missing: the model's settings cannot be read
        return None, "the sentencepiece model proto cannot be read (install protobuf)"
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(sp.serialized_model_proto())
    norm, trainer = proto.normalizer_spec, proto.trainer_spec
    if trainer.model_type != sentencepiece_model_pb2.TrainerSpec.BPE:
        return None, "the sentencepiece model is not BPE"
    if norm.precompiled_charsmap or norm.remove_extra_whitespaces or not norm.escape_whitespaces:
        return None, "the sentencepiece normalizer is not identity with whitespace kept"
    if trainer.treat_whitespace_as_suffix:
        return None, "the sentencepiece model treats whitespace as a suffix"
    ws = "\u2581"
    if any(ws in p.piece.lstrip(ws) for p in proto.pieces):
        return None, "a sentencepiece piece holds U+2581 after other characters"
    expected = (ws if norm.add_dummy_prefix else "") + f"{ws}{ws}b\tc\n"
    if sp.normalize("  b\tc\n") != expected:  # the behaviour the proof assumes, checked
        return None, "sentencepiece normalization is not the identity assumed"
    boundary = re.compile(f"(?<=[^ {ws}])(?= )")
    return Splitter("sentencepiece-bpe", boundary, (), bool(norm.add_dummy_prefix)), (
        "sentencepiece BPE: cut before a space that follows a non-space"
    )
