"""A real pretrained model's road, as users run it, on a tiny stand-in with its traits
(megatron_longctx/testing/hf_model.py: tied embeddings, 9 / 3 heads, ChatML with an end-of-turn
EOS, a Digits pre-tokenizer, pretrained context 64):

HF dir -> ``convert_checkpoint.py hf-to-mcore`` -> a recipe naming only ``model.from_checkpoint``,
``init_from`` = the converter's --save folder, and data -> 2 stages (S=128, then a shorter S=64;
one torchrun process, 2 steps each) -> ``mcore-to-hf`` -> ``eval_longctx.py`` on the export with no
tokenizer flags. The export carries the longest trained context (128: neither the pretrained 64
nor the last stage's 64), the source's special-token ids and generation config, and a tokenizer
that renders the chat template exactly as the source's (transformers' ``apply_chat_template``
on both). A recipe whose model disagrees with ``init_from`` is refused at config load naming the
fields (tied embeddings included).
"""

from __future__ import annotations

import json

import pytest
import yaml

from megatron_longctx.testing.hf_model import TEXTS, make_tiny_instruct_model
from tests.integration.run_utils import launch

CONV = [
    {"role": "user", "content": "What is 7 times 6?"},
    {"role": "assistant", "content": "It is 42."},
]


def _tool(name: str, *args: str) -> None:
    """A CLI run as users run it, in this process (its imports are already paid here)."""
    import importlib

    assert importlib.import_module(f"tools.{name}").main(list(args)) == 0, (name, args)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrained")
    hf = make_tiny_instruct_model(root / "SmolLM2-tiny")
    save = root / "smol_mcore"
    _tool("convert_checkpoint", "hf-to-mcore", "--hf-dir", str(hf), "--save", str(save))
    return root, hf, save


def _recipe(root, save, data_prefix, **model) -> dict:
    stage = {
        "global_batch_size": 2,
        "micro_batch_size": 1,
        "lr": 1.0e-3,
        "steps": 2,
        "warmup_ratio": 0.0,
        "mixture": {
            "seed": 1,
            "components": [{"name": "web", "prefixes": [data_prefix], "weight": 1.0}],
        },
    }
    return {
        "name": "from_pretrained",
        "model": {"from_checkpoint": str(save), **model},
        "checkpoint": {"save_dir": str(root / "run" / "checkpoints"), "interval": 100},
        "logging": {"run_dir": str(root / "run"), "wandb_mode": "disabled"},
        "data": {"cache_dir": str(root / "run" / "cache")},
        "stages": [
            {"name": "long", "seq_length": 128, "init_from": str(save), **stage},
            {"name": "short", "seq_length": 64, **stage},
        ],
    }


@pytest.mark.timeout(600)  # the module's conversion runs in its setup
def test_recipe_model_that_disagrees_with_init_from_is_refused(converted):
    from transformers import AutoConfig

    from megatron_longctx.config.loading import ConfigError, from_dict
    from megatron_longctx.config.schema import ExperimentConfig

    root, hf, save = converted
    source = AutoConfig.from_pretrained(hf)
    cfg = from_dict(ExperimentConfig, _recipe(root, save, "unused"))
    m = cfg.model_config()  # read from the converted checkpoint's stored model section
    assert (m.num_attention_heads, m.num_query_groups, m.vocab_size) == (
        source.num_attention_heads,
        source.num_key_value_heads,
        source.vocab_size,
    )
    assert m.tie_word_embeddings is True and m.hidden_size == source.hidden_size
    with pytest.raises(ConfigError) as err:
        from_dict(ExperimentConfig, _recipe(root, save, "unused", tie_word_embeddings=False))
    assert "tie_word_embeddings True vs False" in str(err.value) and "init_from" in str(err.value)
    typed = _recipe(root, save, "unused")
    typed["model"] = {"preset": "tiny", "vocab_size": source.vocab_size}  # retyped by hand, wrong
    with pytest.raises(ConfigError, match="hidden_size 72 vs 64.*num_attention_heads 9 vs 4"):
        from_dict(ExperimentConfig, typed)


@pytest.mark.timeout(900)
def test_from_pretrained_two_stages_export_and_eval(converted):
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig

    from megatron_longctx.data.preprocess.pipeline import PreprocessConfig, preprocess

    root, hf, save = converted
    (root / "web.jsonl").write_text(
        "".join(json.dumps({"text": f"{t} #{i}"}) + "\n" for i in range(12) for t in TEXTS)
    )
    prefix = str(root / "data" / "web")
    preprocess(
        PreprocessConfig(
            str(root / "web.jsonl"), prefix, "HuggingFaceTokenizer", str(hf), append_eod=True
        )
    )
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(_recipe(root, save, prefix + "_text_document")))
    proc = launch(recipe, root / "run", {"long": prefix}, nproc=1, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "initialised from" in proc.stdout + proc.stderr

    out = root / "export"
    load = str(root / "run" / "checkpoints")
    _tool("convert_checkpoint", "mcore-to-hf", "--load", load, "--save", str(out),
          "--verify", "rope")  # fmt: skip
    exported = LlamaConfig.from_pretrained(out)
    source = json.loads((hf / "config.json").read_text())
    assert exported.max_position_embeddings == 128  # the longer stage; pretrained 64, last 64
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        assert getattr(exported, key) == source[key], key
    gen = GenerationConfig.from_pretrained(out)
    assert (gen.eos_token_id, gen.pad_token_id) == (source["eos_token_id"], source["pad_token_id"])
    theirs, ours = AutoTokenizer.from_pretrained(hf), AutoTokenizer.from_pretrained(out)
    for kw in ({"tokenize": False}, {"tokenize": True, "add_generation_prompt": True}):
        assert ours.apply_chat_template(CONV, **kw) == theirs.apply_chat_template(CONV, **kw)
    assert ours.encode("In 2024: 366 days") == theirs.encode("In 2024: 366 days")

    ev = root / "eval"
    _tool("eval_longctx", "--hf-dir", str(out), "--output-dir", str(ev),
          "--context-lengths", "128", "--depths", "0.5", "--num-samples", "1",
          "--tasks", "needle", "--no-plots")  # fmt: skip
    results = json.loads((ev / "eval_results.json").read_text())
    assert results["needle"], results
