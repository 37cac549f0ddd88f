"""Evaluation's greedy decoding vs transformers' own ``generate``, token for token.

``HFEvalModel.generate`` runs its own KV-cache loop (left-padded batches, explicit position ids). A
loop that fed a wrong position (e.g. 0 at every step), dropped the cache or mis-aligned the padding
mask would still be deterministic and batch-consistent, so it is compared here with
``LlamaForCausalLM.generate(do_sample=False)`` on each prompt alone, on a random tiny Llama whose
logits are decisive (large init) and whose RoPE makes position errors visible.
"""

from __future__ import annotations

import pytest
import torch

EOD = 3


class _Tok:  # what HFEvalModel reads from a tokenizer
    vocab_size = 64
    eod_id = EOD


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.3,
        rope_parameters={"rope_type": "default", "rope_theta": 100.0},
        eos_token_id=EOD,
        pad_token_id=EOD,
    )
    path = tmp_path_factory.mktemp("llama")
    LlamaForCausalLM(cfg).save_pretrained(path)
    return str(path)


def test_greedy_generation_equals_transformers_generate(llama_dir):
    from megatron_longctx.eval.model import HFEvalModel

    model = HFEvalModel(llama_dir, _Tok())
    g = torch.Generator().manual_seed(1)
    prompts = [
        torch.randint(4, 64, (n,), generator=g).tolist() for n in (5, 17, 40, 9)
    ]  # lengths differ: left padding in the batch
    ours = model.generate(prompts, max_new_tokens=24)
    hf = model.model
    for prompt, got in zip(prompts, ours):
        ref = hf.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=24,
            do_sample=False,
            eos_token_id=EOD,
            pad_token_id=EOD,
        )[0, len(prompt) :].tolist()
        if EOD in ref:
            ref = ref[: ref.index(EOD) + 1]
        assert got == ref
    assert sum(len(x) for x in ours) > 40  # decoding ran many steps (not an early EOD)
