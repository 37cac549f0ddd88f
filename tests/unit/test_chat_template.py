"""SFT with the tokenizer's own chat template: token for token transformers' apply_chat_template.

A byte-level BPE ``tokenizer.json`` (HF ``tokenizers``) is trained here and saved with a
``tokenizer_config.json`` carrying one of three real template shapes: Meta-Llama-3-8B-Instruct's
(BOS, contents trimmed, ``<|eot_id|>``), a Qwen2.5-style ChatML one (a default system prompt when
none is given, no BOS, ``<|im_end|>``) and a Zephyr-style one (no BOS, ``</s>`` then a newline).
``preprocess_sft`` must write exactly ``apply_chat_template(messages, tokenize=True)`` and put the
loss mask on exactly each assistant content (as the template renders it) plus its end-of-turn token.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from megatron_longctx.data.sft import SFTConfig, SFTError, preprocess_sft
from megatron_longctx.data.sources import read_document_table

LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim "
    "+ '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
QWEN = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    "{%- else %}{{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a "
    "helpful assistant.<|im_end|>\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if (message.role == 'user') or (message.role == 'system' "
    "and not loop.first) or (message.role == 'assistant') %}"
    "{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}"
    "{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}"
    "{%- endif %}"
)
ZEPHYR = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n"
    "{{ '<|user|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'system' %}\n"
    "{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n"
    "{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n"
    "{% endfor %}"
)
# template, bos, eos, end-of-turn, does the template trim contents
SHAPES = {
    "llama3": (LLAMA3, "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", True),
    "qwen_default_system": (QWEN, None, "<|im_end|>", "<|im_end|>", False),
    "zephyr_no_bos": (ZEPHYR, None, "</s>", "</s>", False),
}
SPECIALS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eot_id|>", "<|im_start|>", "<|im_end|>", "<s>", "</s>", "<|user|>", "<|assistant|>",
    "<|system|>",
]  # fmt: skip
CONVS = [
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "  What is the capital of France?\n"},
        {"role": "assistant", "content": " Paris. \n"},
    ],
    [
        {"role": "user", "content": "Count to three."},
        {"role": "assistant", "content": "One, two, three."},
        {"role": "user", "content": "Now backwards, with a newline at the end."},
        {"role": "assistant", "content": "Three, two, one.\n\nDone!"},
    ],
]


def _write_tokenizer(directory: Path, template: str | None, bos, eos) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = [m["content"] for c in CONVS for m in c] * 20 + ["system user assistant Qwen Alibaba"]
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(text, trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos}
    if bos:
        config["bos_token"] = bos
    if template:
        config["chat_template"] = template
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def _docs(prefix: str) -> list[np.ndarray]:
    table = read_document_table(prefix)
    data = np.fromfile(prefix + ".bin", dtype=table.dtype)
    return [data[o : o + n] for o, n in zip(table.doc_offsets, table.doc_lengths)]


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(int), [0]])))
    return list(zip(edges[::2], edges[1::2]))


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_sft_renders_with_the_tokenizers_own_template(tmp_path, shape):
    from transformers import PreTrainedTokenizerFast

    template, bos, eos, eot, trims = SHAPES[shape]
    tok_dir = _write_tokenizer(tmp_path / "tok", template, bos, eos)
    src = tmp_path / "chat.jsonl"
    src.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVS))
    report = preprocess_sft(
        SFTConfig(str(src), str(tmp_path / "sft"), "HuggingFaceTokenizer", str(tok_dir))
    )
    assert report.chat_template.startswith("the tokenizer's own chat_template")
    stats = json.loads((tmp_path / "sft_sft_stats.json").read_text())
    assert stats["chat_template"] == report.chat_template
    hf = PreTrainedTokenizerFast.from_pretrained(str(tok_dir))
    tokens, masks = _docs(report.text_prefix), _docs(report.mask_prefix)
    for conv, ids, mask in zip(CONVS, tokens, masks):
        want = hf.apply_chat_template(conv, tokenize=True, return_dict=False)
        assert ids.tolist() == list(want)
        assert (ids[0] == hf.convert_tokens_to_ids("<|begin_of_text|>")) == (bos is not None)
        # Masked: exactly each assistant content as rendered, then its end-of-turn token.
        turns = [m["content"] for m in conv if m["role"] == "assistant"]
        expected = [(c.strip() if trims else c) + eot for c in turns]
        runs = [hf.decode(ids[a:b].tolist()) for a, b in _runs(mask)]
        assert runs == expected
    if shape == "qwen_default_system":  # no system message: the template's default one is there
        assert "You are Qwen" in hf.decode(tokens[1].tolist())


def test_tokenizer_without_template_uses_the_builtin_one_and_says_so(tmp_path):
    tok_dir = _write_tokenizer(tmp_path / "tok", None, "<|begin_of_text|>", "<|end_of_text|>")
    src = tmp_path / "chat.jsonl"
    src.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVS))
    args = (str(src), str(tmp_path / "sft"), "HuggingFaceTokenizer", str(tok_dir))
    report = preprocess_sft(SFTConfig(*args))
    assert report.chat_template.startswith("built-in")
    with pytest.raises(ValueError, match="has no chat_template"):
        preprocess_sft(SFTConfig(*args, chat_template="tokenizer"))


def test_a_template_that_rewrites_assistant_content_is_refused(tmp_path):
    upper = LLAMA3.replace("message['content'] | trim", "message['content'] | upper")
    tok_dir = _write_tokenizer(tmp_path / "tok", upper, "<|begin_of_text|>", "<|end_of_text|>")
    src = tmp_path / "chat.jsonl"
    src.write_text(json.dumps({"messages": CONVS[1]}) + "\n")
    with pytest.raises(
        SFTError, match="chat_template_error: message 1 .assistant. does not appear"
    ):
        preprocess_sft(
            SFTConfig(str(src), str(tmp_path / "sft"), "HuggingFaceTokenizer", str(tok_dir))
        )
