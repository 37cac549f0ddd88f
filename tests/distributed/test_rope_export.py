"""RoPE end to end: a megatron model trained with each RoPE variant and its HF export agree.

For default / linear / llama3 / yarn (non-default llama3 factors and an original length of 64, so
megatron's hard-coded llama3 constants or a dropped YaRN would show), the megatron GPTModel's logits
on positions 0..255 (4x the original context) must equal transformers' ``LlamaForCausalLM`` loaded
from the ``mcore-to-hf`` export. The export parity gate must pass on these and refuse exports whose
config or weights were changed (what other converters shipped: a dropped ``rope_scaling``, a
rewritten length, mis-mapped weights), with the CLI exiting 2.
"""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch

from megatron_longctx.testing.distributed import run_distributed

ORIGINAL, TRAINED = 64, 256  # trained length = 4x the original context
VARIANTS = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 4.0},
    "llama3": {
        "rope_type": "llama3",
        "factor": 4.0,
        "low_freq_factor": 2.0,
        "high_freq_factor": 8.0,
        "original_max_position_embeddings": ORIGINAL,
    },
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL},
}


def _model_config(scaling):
    from megatron_longctx.model.config import ModelConfig

    # A large init std makes attention sharp, so a RoPE difference moves the logits visibly.
    return ModelConfig(
        hidden_size=64,
        ffn_hidden_size=128,
        num_layers=2,
        num_attention_heads=4,
        num_query_groups=2,
        vocab_size=300,
        rope_theta=10000.0,
        rope_scaling=scaling,
        max_position_embeddings=TRAINED,
        make_vocab_size_divisible_by=16,
        init_method_std=0.25,
    )


def _train_save_and_forward(rank, world, root, tokens):
    from megatron.core import tensor_parallel

    from megatron_longctx.checkpoint.dist import save_checkpoint
    from megatron_longctx.model.build import build_gpt_model
    from megatron_longctx.parallel.layout import ParallelLayout
    from megatron_longctx.runtime.distributed import initialize_model_parallel

    class _Warnings(logging.Handler):
        def emit(self, record):
            out["warnings"].append(record.getMessage())

    logging.getLogger("megatron.core.dist_checkpointing").addHandler(_Warnings(logging.WARNING))
    layout = ParallelLayout(1, 1, 1)
    initialize_model_parallel(layout)
    out = {"warnings": []}
    for name, scaling in VARIANTS.items():
        tensor_parallel.model_parallel_cuda_manual_seed(0)
        torch.manual_seed(0)
        cfg = _model_config(scaling)
        model = build_gpt_model(cfg, layout, backend="local")
        opt = torch.optim.SGD(model.parameters(), lr=0.05)  # a few steps: a trained model
        pos = torch.arange(tokens.shape[1])[None]
        for _ in range(2):
            logits = model(tokens, pos, None)
            loss = torch.nn.functional.cross_entropy(
                logits[0, :-1, : cfg.vocab_size], tokens[0, 1:]
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            out[name] = model(tokens, pos, None)[..., : cfg.vocab_size].clone()
        save_checkpoint(os.path.join(root, name), 0, [model], state={"model": cfg.to_dict()})
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("rope_ckpt")
    tokens = torch.randint(0, 300, (1, TRAINED), generator=torch.Generator().manual_seed(3))
    (logits,) = run_distributed(
        _train_save_and_forward, world_size=1, args=(str(root), tokens), timeout=240
    )
    # save_checkpoint hands megatron an empty directory (it warns "Overwriting old incomplete /
    # corrupted checkpoint..." on any other one, which buried real messages)
    assert not [w for w in logits.pop("warnings") if "Overwriting" in w]
    return root, tokens, logits


def _hf_logits(hf_dir, tokens):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits.float()


def test_megatron_and_hf_export_agree_up_to_4x_original_context(trained, tmp_path):
    from megatron_longctx.checkpoint.hf import mcore_to_hf

    root, tokens, megatron = trained
    for name, scaling in VARIANTS.items():
        out = str(tmp_path / name)
        summary = mcore_to_hf(root / name, out, verify="rope")
        assert summary["verify"]["rope"]["last_position"] == TRAINED - 1
        with open(os.path.join(out, "config.json")) as f:
            rope = json.load(f)["rope_parameters"]
        assert rope["rope_type"] == (scaling or {}).get("rope_type", "default")
        hf = _hf_logits(out, tokens)
        diff = (hf - megatron[name]).abs().amax(-1)[0]
        assert diff.max() < 1e-4, f"{name}: max |logit diff| {diff.max():.3g} at {diff.argmax()}"
        if name != "default":  # same weights, other RoPE: far apart beyond the original context
            other = (megatron[name] - megatron["default"]).abs().amax(-1)[0]
            assert other[ORIGINAL:].max() > 1e-2, name


def test_parity_gate_passes_full_on_a_faithful_yarn_export(trained, tmp_path):
    from megatron_longctx.checkpoint.hf import mcore_to_hf

    root, _, _ = trained
    summary = mcore_to_hf(root / "yarn", str(tmp_path / "hf"))  # verify="full" by default
    assert summary["verify"]["mode"] == "full"
    assert summary["verify"]["logits"]["rel_diff"] < 1e-4


def _export_with(monkeypatch, tmp_path, root, name, edit, verify="rope"):
    """Runs the CLI's main with the exported config edited by ``edit`` (a converter bug)."""
    import importlib

    import tools.convert_checkpoint as cli

    module = importlib.import_module("megatron_longctx.checkpoint.hf.mcore_to_hf")

    real = module.hf_config_from_model

    def buggy(*args, **kwargs):
        config = real(*args, **kwargs)
        edit(config)
        return config

    monkeypatch.setattr(module, "hf_config_from_model", buggy)
    argv = ["mcore-to-hf", "--load", str(root / name), "--save", str(tmp_path / name)]
    return cli.main([*argv, "--verify", verify])


def test_parity_gate_refuses_a_dropped_rope_scaling_and_exits_2(
    trained, tmp_path, monkeypatch, capsys
):
    root, _, _ = trained

    def drop_scaling(config):
        config.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}

    assert _export_with(monkeypatch, tmp_path, root, "llama3", drop_scaling) == 2
    err = capsys.readouterr().err
    assert "RoPE cos/sin differ" in err and "'rope_type': 'llama3'" in err, err


def test_parity_gate_refuses_a_rewritten_length(trained, tmp_path, monkeypatch, capsys):
    root, _, _ = trained

    def shorten(config):
        config.max_position_embeddings = ORIGINAL

    assert _export_with(monkeypatch, tmp_path, root, "linear", shorten) == 2
    assert (
        f"max_position_embeddings: exported {ORIGINAL}, trained {TRAINED}"
        in capsys.readouterr().err
    )


def test_parity_gate_refuses_mismapped_weights(trained, tmp_path):
    from safetensors.torch import load_file, save_file

    from megatron_longctx.checkpoint.hf import ExportParityError, mcore_to_hf
    from megatron_longctx.checkpoint.hf.verify import verify_logits

    root, _, _ = trained
    out = tmp_path / "hf"
    summary = mcore_to_hf(root / "default", str(out), verify="none")
    assert "rope" not in summary["verify"]
    path = out / "model.safetensors"
    tensors = load_file(str(path))
    q = "model.layers.0.self_attn.q_proj.weight"  # heads in the wrong order (a QKV split bug)
    tensors[q] = torch.cat(tensors[q].chunk(4, 0)[::-1])
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(ExportParityError, match="logits of the export differ"):
        verify_logits(root / "default" / "iter_0000000", _model_config(None), out, torch.float32)
