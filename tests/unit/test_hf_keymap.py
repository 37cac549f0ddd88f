"""The pure HF <-> megatron key/layout map, config mapping (both RoPE layouts), and input errors."""

from __future__ import annotations

import json
import os

import pytest
import torch

from megatron_longctx.checkpoint.hf import keymap
from megatron_longctx.checkpoint.hf.config_map import (
    ConversionError,
    hf_config_from_model,
    hf_rope_theta,
    model_config_from_hf,
)
from megatron_longctx.checkpoint.hf.hf_io import parse_size, prepare_output_dir
from megatron_longctx.model.config import ModelConfig
from tests.distributed.test_convert import make_hf_llama

CFG = ModelConfig(
    hidden_size=32,
    ffn_hidden_size=48,
    num_layers=2,
    num_attention_heads=4,
    num_query_groups=2,
    vocab_size=100,
    make_vocab_size_divisible_by=16,
)


def test_qkv_layout_matches_megatrons_view():
    hn, ng, per = CFG.head_dim, CFG.num_query_groups, CFG.num_attention_heads // 2
    q = torch.randn(CFG.num_attention_heads * hn, 32)
    k, v = torch.randn(ng * hn, 32), torch.randn(ng * hn, 32)
    qkv = keymap.fuse_qkv(q, k, v, CFG)
    # megatron: output viewed as [ng, (np/ng + 2) * hn], split into q heads, k, v per group
    grouped = qkv.view(ng, (per + 2) * hn, 32)
    for g in range(ng):
        assert torch.equal(grouped[g, : per * hn], q[g * per * hn : (g + 1) * per * hn])
        assert torch.equal(grouped[g, per * hn : (per + 1) * hn], k[g * hn : (g + 1) * hn])
        assert torch.equal(grouped[g, (per + 1) * hn :], v[g * hn : (g + 1) * hn])
    assert all(torch.equal(a, b) for a, b in zip(keymap.split_qkv(qkv, CFG), (q, k, v)))


@pytest.mark.parametrize("tied", [False, True])
def test_every_tensor_round_trips_with_vocab_padding(tied):
    cfg = CFG.with_updates(tie_word_embeddings=tied)
    hf = {n: torch.randn(keymap.expected_hf_shape(n, cfg)) for n in keymap.hf_names(cfg)}
    assert ("lm_head.weight" in hf) is not tied
    padded = cfg.padded_vocab_size(2)
    back = {}
    for name in keymap.mcore_names(cfg):
        full = keymap.to_mcore(name, [hf[s] for s in keymap.hf_sources(name)], cfg, padded)
        if name == keymap.EMBEDDING:
            assert full.shape == (padded, 32) and not full[cfg.vocab_size :].any()
        if name.endswith("linear_fc1.weight"):  # [gate; up]
            assert torch.equal(full[:48], hf[keymap.hf_sources(name)[0]])
        back.update(keymap.to_hf(name, full, cfg))
    assert sorted(back) == sorted(hf) and all(torch.equal(back[k], hf[k]) for k in hf)
    assert keymap.dcp_key("decoder.layers.3.input_layernorm.weight") == (
        "decoder.layers.self_attention.linear_qkv.layer_norm_weight",
        3,
    )


def _llama_raw(**over) -> dict:
    raw = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 100,
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
        "rms_norm_eps": 1e-5,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
    }
    raw.update(over)
    return raw


def test_config_reads_both_rope_layouts_and_writes_what_transformers_reads(tmp_path):
    from transformers import AutoConfig

    v5 = model_config_from_hf(
        _llama_raw(rope_parameters={"rope_type": "default", "rope_theta": 1.28e8})
    )
    v4 = model_config_from_hf(
        _llama_raw(rope_theta=8e6, rope_scaling={"rope_type": "linear", "factor": 4.0})
    )
    assert v5.rope_theta == 1.28e8 and v5.rope_scaling is None
    assert v4.rope_theta == 8e6 and v4.rope_scaling == {"rope_type": "linear", "factor": 4.0}
    trained = v4.with_updates(max_position_embeddings=65536)
    hf_config_from_model(trained, "bfloat16", {"eos_token_id": 7}).save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    back = AutoConfig.from_pretrained(tmp_path)
    assert hf_rope_theta(back) == 8e6 and back.max_position_embeddings == 65536
    assert back.eos_token_id == 7 and ("rope_parameters" in written or "rope_theta" in written)
    assert model_config_from_hf(written).rope_scaling == {"rope_type": "linear", "factor": 4.0}


def test_non_llama_and_unsupported_configs_are_refused():
    with pytest.raises(ConversionError, match="Llama checkpoints only"):
        model_config_from_hf(_llama_raw(model_type="mistral", architectures=["MistralForCausalLM"]))
    with pytest.raises(ConversionError, match="attention_bias"):
        model_config_from_hf(_llama_raw(attention_bias=True))


def test_bad_hf_dirs_and_output_dirs(tmp_path):
    from megatron_longctx.checkpoint.hf.hf_to_mcore import hf_to_mcore, open_hf_checkpoint

    src = make_hf_llama(str(tmp_path / "hf"), tied=False, vocab_size=100)
    # a sharded copy with one shard gone
    from transformers import LlamaForCausalLM

    sharded = str(tmp_path / "sharded")
    LlamaForCausalLM.from_pretrained(src).save_pretrained(sharded, max_shard_size="100KB")
    shards = sorted(f for f in os.listdir(sharded) if f.endswith(".safetensors"))
    os.remove(os.path.join(sharded, shards[1]))
    with pytest.raises(ConversionError, match=f"{shards[1]}.*missing"):
        open_hf_checkpoint(sharded)
    # shapes that contradict config.json
    cfg = json.loads(open(os.path.join(src, "config.json")).read())
    json.dump(dict(cfg, intermediate_size=96), open(os.path.join(src, "config.json"), "w"))
    with pytest.raises(ConversionError, match="shapes do not match config.json"):
        open_hf_checkpoint(src)
    json.dump(dict(cfg, model_type="gpt2"), open(os.path.join(src, "config.json"), "w"))
    with pytest.raises(ConversionError, match="Llama checkpoints only"):
        hf_to_mcore(src, str(tmp_path / "ckpt"))
    os.remove(os.path.join(src, "model.safetensors"))
    with pytest.raises(ConversionError, match="safetensors"):
        open_hf_checkpoint(src)
    # output directories: refuse an existing model unless overwrite
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"hidden_size": 8, "vocab_size": 5}))
    (out / "model.safetensors").write_bytes(b"old")
    with pytest.raises(ConversionError, match="different model"):
        prepare_output_dir(out, {"hidden_size": 32, "vocab_size": 100}, overwrite=False)
    prepare_output_dir(out, {"hidden_size": 32}, overwrite=True)
    assert not (out / "model.safetensors").exists()
    assert parse_size("5GB") == 5 * 10**9 and parse_size("100KB") == 10**5
    with pytest.raises(ValueError, match="cannot read size"):
        parse_size("lots")
