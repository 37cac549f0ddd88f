"""A tiny pretrained-model stand-in with the traits of a real instruct model nobody here wrote.

SmolLM2-135M-Instruct's traits at test size: tied embeddings; 9 query / 3 KV heads (not divisible
by 2); a byte-level BPE ``tokenizer.json`` whose pre-tokenizer splits digits one by one
(``Sequence[Digits(individual_digits), ByteLevel]``, as SmolLM2 / StarCoder); ChatML chat template
whose ``eos_token`` is the end-of-turn ``<|im_end|>`` and whose end-of-text ``<|endoftext|>`` is
a separate token; special-token ids in ``config.json`` (bos, eos, pad, unk) and a
``generation_config.json``; RoPE theta 1e5.
"""

from __future__ import annotations

import json
from pathlib import Path

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIALS = [ENDOFTEXT, IM_START, IM_END]  # ids 0, 1, 2 as in SmolLM2
# SmolLM2-Instruct's template (the default system prompt shortened).
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TEXTS = [
    "The year 2024 had 366 days; 1,000,000 people counted 3.14159 twice.",
    "def add(a, b):\n    return a + b  # 12 + 30 = 42\n",
    "Long-context training extends RoPE from 8192 to 65536 positions.",
    "You are a helpful assistant. What is 7 times 6? It is 42.",
]


def write_tokenizer(directory: str | Path, vocab_size: int = 400) -> Path:
    """A SmolLM2-like tokenizer directory (tokenizer.json + tokenizer_config.json)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    directory = Path(directory)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(TEXTS * 20, trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": IM_START,
        "eos_token": IM_END,
        "unk_token": ENDOFTEXT,
        "pad_token": IM_END,
        "model_max_length": 256,
        "chat_template": CHATML,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    return directory


def make_tiny_instruct_model(
    directory: str | Path, seed: int = 0, max_position_embeddings: int = 64
) -> Path:
    """A random tiny LlamaForCausalLM with the traits above, saved like a Hub download."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    directory = Path(directory)
    write_tokenizer(directory)
    vocab = json.loads((directory / "tokenizer.json").read_text())["model"]["vocab"]
    cfg = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=72,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-5,
        initializer_range=0.1,
        rope_parameters={"rope_type": "default", "rope_theta": 1e5},
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model.save_pretrained(directory)
    raw = json.loads((directory / "config.json").read_text())
    raw["unk_token_id"] = 0  # some Hub configs carry it; an export must keep it
    (directory / "config.json").write_text(json.dumps(raw, indent=1))
    return directory


def save_tiny_llama(
    directory: str | Path,
    *,
    vocab_size: int = 512,
    rope_theta: float = 10000.0,
    initializer_range: float = 0.02,
    seed: int = 0,
) -> Path:
    """A random HF Llama of the ``tiny`` preset's shape (hidden 64, FFN 128, 4 heads / 2 KV
    heads, untied) with 2 layers, saved to ``directory`` (what the recipe tests convert)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_theta=rope_theta,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        initializer_range=initializer_range,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(cfg).save_pretrained(directory)
    return Path(directory)
