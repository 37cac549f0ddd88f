"""tools/eval_longctx.py end to end on a random tiny Llama export with its tokenizer.json."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.integration.run_utils import ROOT


def _tiny_export(out_dir):
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    words = (
        "The grass is green sky blue sun yellow Here we go There and back again special "
        "magic number for VAR Question Answer 0123456789 "
    ).split()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>", "</s>", "<s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([" ".join(words)] * 20, trainer)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=320,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    LlamaForCausalLM(cfg).save_pretrained(out_dir)
    tok.save(str(out_dir / "tokenizer.json"))


def test_cli_on_hf_dir_with_tokenizer_json(tmp_path):
    _tiny_export(tmp_path / "hf")
    cmd = [
        sys.executable,
        str(ROOT / "tools" / "eval_longctx.py"),
        "--hf-dir",
        str(tmp_path / "hf"),
        "--output-dir",
        str(tmp_path / "eval"),
        "--context-lengths",
        "256",
        "1024",
        "--depths",
        "0",
        "1",
        "--num-samples",
        "1",
        "--ruler-tasks",
        "niah_multivalue",
        "frequent_words",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| needle |" in proc.stdout and "skipped length 1024" in proc.stdout
    res = json.loads((tmp_path / "eval" / "eval_results.json").read_text())
    assert res["lengths"]["evaluated"] == [256]
    assert set(res["ruler"]) == {"niah_multivalue", "frequent_words"}
    assert (tmp_path / "eval" / "needle_heatmap.png").exists()
    bad = subprocess.run(
        cmd[:2] + ["--hf-dir", str(tmp_path), "--output-dir", str(tmp_path / "x")],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert bad.returncode == 1 and "no tokenizer.json" in bad.stderr
