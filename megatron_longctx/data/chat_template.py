"""The tokenizer's own chat template for SFT, with a loss mask on the assistant turns.

A Hugging Face tokenizer directory usually ships its chat template (``chat_template`` in
``tokenizer_config.json``, or ``chat_template.jinja``): Llama 3 trims every content, ChatML
templates add a default system prompt, some start without a BOS. The model is served with that
template, so SFT renders with it too, through transformers' own ``apply_chat_template``: the tokens
are exactly the ids ``apply_chat_template(messages, tokenize=True)`` returns.

The loss mask: templates rarely mark generation spans (``{% generation %}``), so the assistant
turns are found in the rendered text. Each message's content is searched for, in order, from where
the previous one ended (as given, else trimmed, as most templates render it); an assistant turn's
span runs from its content to the end of the first special token after it (its end-of-turn:
``<|eot_id|>``, ``<|im_end|>``, ``</s>``). A token is trained on (mask 1) when its characters
overlap such a span. An empty assistant turn is placed where the template's generation prompt
ends (the conversation before it rendered with ``add_generation_prompt``), so its end-of-turn
token is trained on too. A template that does not show an assistant content verbatim is refused.

``load_chat_template`` picks the tokenizer's template when it has one and the project's built-in
Llama-3-style template (``data.sft.ChatTemplate``) otherwise, and says which one it chose.
"""

from __future__ import annotations

import logging
import os

import numpy as np

from megatron_longctx.data.preprocess.readers import BadRecord

logger = logging.getLogger(__name__)

TEMPLATE_ERROR = "chat_template_error"
CHOICES = ("auto", "tokenizer", "builtin")


class ChatTemplateError(ValueError):
    """The chosen chat template cannot be used (the message says why and what to do)."""


def _tokenizer_dir(tokenizer_model: str) -> str:
    return tokenizer_model if os.path.isdir(tokenizer_model) else os.path.dirname(tokenizer_model)


def _load_hf_tokenizer(tokenizer_model: str):
    from transformers import PreTrainedTokenizerFast

    directory = _tokenizer_dir(tokenizer_model)
    tokenizer_file = (
        tokenizer_model
        if os.path.isfile(tokenizer_model)
        else os.path.join(directory, "tokenizer.json")
    )
    return PreTrainedTokenizerFast.from_pretrained(
        directory or ".", tokenizer_file=tokenizer_file, local_files_only=True
    )


class TokenizerChatTemplate:
    """Renders conversations with a transformers tokenizer's ``chat_template``.

    Args:
        hf_tokenizer: a transformers fast tokenizer whose ``chat_template`` is set.
    """

    name = "tokenizer"

    def __init__(self, hf_tokenizer) -> None:
        if not hf_tokenizer.chat_template:
            raise ChatTemplateError("the tokenizer has no chat_template")
        self.hf = hf_tokenizer
        self.special_ids = set(int(i) for i in hf_tokenizer.all_special_ids)
        self.special_ids |= {
            int(i) for i, t in hf_tokenizer.added_tokens_decoder.items() if t.special
        }

    def _empty_turn_start(self, text: str, messages: list[dict], i: int) -> int | None:
        """Where empty assistant message ``i`` sits in ``text``: the end of the conversation
        before it rendered with the generation prompt (``<|im_start|>assistant\n``), when the
        template renders that prefix as a prefix of ``text``; else None."""
        try:
            head = self.hf.apply_chat_template(
                messages[:i], tokenize=False, add_generation_prompt=True
            )
        except Exception:  # noqa: BLE001 - a template that needs the full conversation
            return None
        return len(head) if i and text.startswith(head) else None

    def _assistant_spans(self, text: str, messages: list[dict]) -> list[tuple[int, int]]:
        """Character spans of the assistant contents in ``text`` (without their end-of-turn).
        An empty assistant content is an empty span where its content would be, so its
        end-of-turn token is trained on like any other's."""
        spans, cursor = [], 0
        for i, m in enumerate(messages):
            content = m["content"]
            if m["role"] == "assistant" and not content.strip():
                at = self._empty_turn_start(text, messages, i)
                if at is not None and at >= cursor:
                    spans.append((at, at))
                    cursor = at
                    continue
            found = -1
            for candidate in (content, content.strip()):
                if candidate:
                    found = text.find(candidate, cursor)
                    if found >= 0:
                        content = candidate
                        break
            if found < 0:
                if m["role"] == "assistant" and content.strip():
                    raise BadRecord(
                        TEMPLATE_ERROR,
                        f"message {i} (assistant) does not appear verbatim or trimmed in the "
                        "rendered chat template, so its loss mask cannot be placed; use "
                        "--chat-template builtin or a template that keeps contents",
                    )
                continue
            cursor = found + len(content)
            if m["role"] == "assistant":
                spans.append((found, cursor))
        return spans

    def render(self, messages: list[dict]) -> tuple[np.ndarray, np.ndarray]:
        """Tokens (= ``apply_chat_template(messages, tokenize=True)``) and the 0/1 loss mask."""
        try:
            text = self.hf.apply_chat_template(messages, tokenize=False)
        except Exception as err:  # jinja's raise_exception, undefined variables, ...
            raise BadRecord(TEMPLATE_ERROR, f"the chat template refused it: {err}") from None
        # What apply_chat_template(tokenize=True) does: the template holds the special tokens.
        enc = self.hf(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
        mask = np.zeros(len(ids), dtype=np.uint16)
        for start, end in self._assistant_spans(text, messages):
            gap = []  # whitespace the assistant emits between its content and its end-of-turn
            for t, (a, b) in enumerate(offsets):
                if b > start and a < end and b > a:
                    mask[t] = 1
                elif a >= end and ids[t] in self.special_ids:
                    mask[[*gap, t]] = 1  # the end-of-turn token closing this assistant turn
                    break
                elif a >= end and text[a:b].strip():
                    break  # ordinary text first: the template ends this turn without a token
                elif a >= end:
                    gap.append(t)
        return np.asarray(ids, dtype=np.int64), mask


def load_chat_template(tokenizer_type: str, tokenizer_model: str, tokenizer, choice: str = "auto"):
    """The chat template SFT renders with, and a line saying which one it is.

    Args:
        tokenizer_type / tokenizer_model: as given to ``load_tokenizer``.
        tokenizer: the project tokenizer (for the built-in template).
        choice: "auto" (the tokenizer's template when it has one, else built-in), "tokenizer"
            (refuse to fall back) or "builtin".

    Returns:
        ``(template, description)``; ``template.render(messages) -> (tokens, mask)``.
    """
    from megatron_longctx.data.sft import ChatTemplate

    if choice not in CHOICES:
        raise ChatTemplateError(f"chat template {choice!r}: choose one of {CHOICES}")
    if choice != "builtin" and tokenizer_type == "HuggingFaceTokenizer":
        hf = _load_hf_tokenizer(tokenizer_model)
        if hf.chat_template:
            where = _tokenizer_dir(tokenizer_model) or "."
            return TokenizerChatTemplate(hf), f"the tokenizer's own chat_template ({where})"
    if choice == "tokenizer":
        raise ChatTemplateError(
            f"{tokenizer_model} has no chat_template (tokenizer_config.json 'chat_template' or "
            "chat_template.jinja); add the model's template or use --chat-template auto / builtin"
        )
    return ChatTemplate(tokenizer), "built-in Llama-3-style template (the tokenizer has none)"
