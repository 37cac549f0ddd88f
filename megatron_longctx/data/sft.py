"""Chat JSONL -> token + loss-mask indexed datasets for the SFT stage (loss on assistant tokens).

Input: one conversation per line, ``{"messages": [{"role": ..., "content": ...}, ...]}`` with roles
``system``, ``user`` and ``assistant`` (UltraChat's layout).

Chat template: the tokenizer's own ``chat_template`` when it has one (``data/chat_template.py``:
token for token what transformers' ``apply_chat_template`` returns, loss on the assistant contents
and their end-of-turn token); otherwise (a sentencepiece model, a ``tokenizer.json`` without
template) the built-in ``ChatTemplate`` below. ``SFTReport.chat_template`` and the stats file say
which one was used.

Built-in template (Llama-3 style, rendered over the project's tokenizer, segment by segment, so
every token's origin is known exactly; contents are kept as given, not trimmed)::

    [BOS]                                          mask 0   (only if the tokenizer has a BOS id)
    <|start_header_id|>{role}<|end_header_id|>\\n\\n  mask 0   (the header text, encoded)
    {content}                                      mask 1 if role == assistant else 0
    <EOT>                                          mask 1 if role == assistant else 0

``<EOT>`` is the tokenizer's ``<|eot_id|>`` when it has one as a single token (Llama 3), else its
EOD id. With a Llama 3 ``tokenizer.json`` the header markers are its special tokens; with a
sentencepiece model they are ordinary text pieces, which is harmless (the model learns them).
Segments are encoded separately, so token boundaries never merge across a segment edge.

Outputs: ``{prefix}_text_document.bin/.idx`` (tokens), ``{prefix}_mask_document.bin/.idx``
(uint16 0/1, same document sizes) and ``{prefix}_sft_stats.json``. A mixture component uses them as
``prefixes: [{prefix}_text_document]`` + ``mask_prefixes: [{prefix}_mask_document]``; the packer
then multiplies the loss mask by the stored mask of each *label* token (see ``packing.py``).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field

import numpy as np

from megatron_longctx.data.chat_template import load_chat_template
from megatron_longctx.data.preprocess.readers import (
    MALFORMED_JSON,
    NOT_AN_OBJECT,
    BadRecord,
    expand_inputs,
    iter_lines,
)
from megatron_longctx.data.preprocess.tokenizer import load_tokenizer
from megatron_longctx.data.preprocess.writer import IndexedDatasetWriter, token_dtype

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
# Reasons a conversation is rejected (keys of the ``skipped`` counts).
NO_MESSAGES = "no_messages"
EMPTY_CONVERSATION = "empty_conversation"
BAD_MESSAGE = "bad_message"
UNKNOWN_ROLE = "unknown_role"
NO_ASSISTANT = "no_assistant_turn"
INVALID_UTF8 = "invalid_utf8"
ON_ERROR_CHOICES = ("fail", "skip")


class SFTError(RuntimeError):
    """A bad record under ``on_error="fail"``, or a run that produced no conversation."""


class ChatTemplate:
    """Llama-3-style chat template over a project tokenizer (see module docstring).

    Args:
        tokenizer: object from ``load_tokenizer`` (``encode``, ``eod_id``, ``bos_id``).
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        eot = tokenizer.encode("<|eot_id|>")
        if len(eot) == 1:
            self.eot_id = int(eot[0])
        elif tokenizer.eod_id is not None:
            self.eot_id = int(tokenizer.eod_id)
        else:
            raise SFTError(
                "the tokenizer has neither <|eot_id|> nor an EOD token to end turns; "
                "use a tokenizer with an EOS/EOD token"
            )
        self.bos = [int(tokenizer.bos_id)] if tokenizer.bos_id is not None else []
        self._headers = {
            r: [int(t) for t in tokenizer.encode(f"<|start_header_id|>{r}<|end_header_id|>\n\n")]
            for r in ROLES
        }

    def header(self, role: str) -> list[int]:
        """Token ids of the header that opens a turn of ``role``."""
        return self._headers[role]

    def render(self, messages: list[dict]) -> tuple[np.ndarray, np.ndarray]:
        """Tokens and loss mask of one conversation.

        Args:
            messages: validated messages (see :func:`parse_conversation`).

        Returns:
            ``(tokens, mask)``: int64 [n] ids and uint16 [n] 0/1 (1 on assistant content + EOT).
        """
        tokens, mask = list(self.bos), [0] * len(self.bos)
        for m in messages:
            head = self._headers[m["role"]]
            body = [int(t) for t in self.tokenizer.encode(m["content"])] if m["content"] else []
            on = 1 if m["role"] == "assistant" else 0
            tokens += head + body + [self.eot_id]
            mask += [0] * len(head) + [on] * (len(body) + 1)
        return np.asarray(tokens, dtype=np.int64), np.asarray(mask, dtype=np.uint16)


def parse_conversation(line: bytes) -> list[dict] | None:
    """Decodes and validates one chat JSONL line.

    Returns:
        The messages (``role``/``content`` dicts), or ``None`` for a blank line.

    Raises:
        BadRecord: malformed JSON, no ``messages`` list, empty conversation, a message that is not
            ``{role, content: str}``, an unknown role, or no assistant turn.
    """
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRecord(INVALID_UTF8, f"line is not valid UTF-8 ({e.reason})") from None
    if not text.strip():
        return None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadRecord(MALFORMED_JSON, f"{e.msg} at column {e.colno}") from None
    if not isinstance(record, dict):
        raise BadRecord(NOT_AN_OBJECT, f"expected a JSON object, got {type(record).__name__}")
    messages = record.get("messages")
    if not isinstance(messages, list):
        raise BadRecord(
            NO_MESSAGES,
            "expected a 'messages' list of {role, content} objects, got "
            f"{type(messages).__name__ if 'messages' in record else 'no such key'}",
        )
    if not messages:
        raise BadRecord(EMPTY_CONVERSATION, "'messages' is empty; drop the record")
    out = []
    for i, m in enumerate(messages):
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("content"), str)
            or not isinstance(m.get("role"), str)
        ):
            raise BadRecord(
                BAD_MESSAGE,
                f"message {i} must be an object with string 'role' and "
                f"'content', got {json.dumps(m)[:80]}",
            )
        if m["role"] not in ROLES:
            raise BadRecord(
                UNKNOWN_ROLE,
                f"message {i} has role {m['role']!r}; allowed roles: {', '.join(ROLES)}",
            )
        try:
            m["content"].encode("utf-8")
        except UnicodeEncodeError:
            raise BadRecord(INVALID_UTF8, f"message {i} holds an unpaired surrogate") from None
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise BadRecord(
            NO_ASSISTANT,
            "the conversation has no assistant turn, so nothing to train on; drop the record",
        )
    return out


@dataclass
class SFTConfig:
    """Settings of one SFT preprocessing run.

    Args:
        input: chat ``.jsonl``/``.jsonl.gz`` file(s), glob(s) or directory(ies).
        output_prefix: outputs are ``{output_prefix}_text_document`` / ``_mask_document``.
        tokenizer_type: ``SentencePieceTokenizer`` or ``HuggingFaceTokenizer``.
        tokenizer_model: local tokenizer file or directory.
        on_error: ``fail`` (abort at the first bad record, leave nothing) or ``skip``.
        chat_template: ``auto`` (the tokenizer's own template when it has one, else built-in),
            ``tokenizer`` (require the tokenizer's) or ``builtin``.
    """

    input: str | list[str]
    output_prefix: str
    tokenizer_type: str
    tokenizer_model: str
    on_error: str = "fail"
    chat_template: str = "auto"

    def __post_init__(self) -> None:
        if self.on_error not in ON_ERROR_CHOICES:
            raise ValueError(f"on_error must be 'fail' or 'skip', got {self.on_error!r}")


@dataclass
class SFTReport:
    """What a run wrote: conversations, tokens, assistant (trained) tokens, skips by reason."""

    num_conversations: int = 0
    num_tokens: int = 0
    num_assistant_tokens: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    text_prefix: str = ""
    mask_prefix: str = ""
    chat_template: str = ""


def preprocess_sft(config: SFTConfig) -> SFTReport:
    """Tokenizes chat JSONL into token and loss-mask indexed datasets (atomic: all or nothing).

    Raises:
        SFTError: a bad record with ``on_error="fail"`` (message ``file:line: reason: detail``) or
            no valid conversation at all.
    """
    files = expand_inputs(config.input)
    os.makedirs(os.path.dirname(os.path.abspath(config.output_prefix)), exist_ok=True)
    tok = load_tokenizer(config.tokenizer_type, config.tokenizer_model)
    template, which = load_chat_template(
        config.tokenizer_type, config.tokenizer_model, tok, config.chat_template
    )
    logger.info("chat template: %s", which)
    report = SFTReport(
        text_prefix=f"{config.output_prefix}_text_document",
        mask_prefix=f"{config.output_prefix}_mask_document",
        chat_template=which,
    )
    dtype = token_dtype(tok.vocab_size)
    writers = [
        IndexedDatasetWriter(report.text_prefix, dtype),
        IndexedDatasetWriter(report.mask_prefix, np.uint16),
    ]
    try:
        for path in files:
            for line_number, raw, _ in iter_lines(path):
                try:
                    messages = parse_conversation(raw)
                    if messages is not None:
                        tokens, mask = template.render(messages)
                except BadRecord as e:
                    where = f"{path}:{line_number}: {e}"
                    if config.on_error == "fail":
                        raise SFTError(
                            f"{where} (fix the record or pass --on-error skip)"
                        ) from None
                    report.skipped[e.reason] = report.skipped.get(e.reason, 0) + 1
                    if sum(report.skipped.values()) <= 10:
                        logger.warning("skipping %s", where)
                    continue
                if messages is None:
                    continue
                length = np.asarray([len(tokens)], dtype=np.int32)
                writers[0].add_documents(tokens.astype(dtype), length)
                writers[1].add_documents(mask, length)
                report.num_conversations += 1
                report.num_tokens += len(tokens)
                report.num_assistant_tokens += int(mask.sum())
        if report.num_conversations == 0:
            raise SFTError(
                f"no valid conversation in {', '.join(files)} (skipped: "
                f"{report.skipped or 'none'}); nothing written"
            )
        for w in writers:
            w.finalize()
        for w in writers:
            w.commit()
    except BaseException:
        for w in writers:
            w.abort()
        raise
    with open(f"{config.output_prefix}_sft_stats.json", "w", encoding="utf-8") as f:
        json.dump(
            {
                "conversations": report.num_conversations,
                "tokens": report.num_tokens,
                "assistant_tokens": report.num_assistant_tokens,
                "skipped": report.skipped,
                "inputs": files,
                "tokenizer_model": config.tokenizer_model,
                "chat_template": which,
            },
            f,
            indent=1,
        )
    return report
