"""Every shipped GPU recipe, loaded from its file as a user would, runs at tiny shapes on CPU.

What the test changes, through dotted overrides and the recipes' own variables only (the files are
not edited): the model shrunk to a tiny HF Llama converted with ``tools/convert_checkpoint.py
hf-to-mcore`` (``LONGCTX_INIT_FROM``: its --save folder as written), lengths and batch sizes
scaled down (2 steps per stage), each stage's parallel layout scaled to 2 processes (the recipe's
TP 2 + sequence parallelism kept where the file has it; context parallelism 2 for the 512K
stage), the recipe's mixture file with its prefixes pointed at tiny test datasets and its length
floors scaled like the sequence, wandb and the stage-end evaluation off.

Replaced to run on the CPU: the device (``LONGCTX_DEVICE=cpu``), NCCL (gloo), the CUDA attention
kernels (``training.attention_kernel: auto`` picks torch's CPU flash kernel), Transformer Engine
(``backend: auto`` resolves to megatron's local spec on the CPU) and TE's fused Adam (megatron's
torch-AdamW fallback). Kept from the file: bf16, the distributed optimizer, Adam settings, LR
schedule, RoPE theta per stage, recompute, stage structure, init_from, SFT.

Each recipe: SIGTERM after step 1 (checkpoint, exit 75), resume to the end, then
``mcore-to-hf`` with its parity gate (RoPE vs transformers at sampled positions; for
prolong_512k ``--verify full``, also the logits probe). prolong_64k.yaml is prolong_512k.yaml's
first stage, setting for setting (checked here), so it runs inside prolong_512k's run. The
two-stage ProLong recipe (transition TP 2 x DP 1 -> CP 2 under the distributed optimizer) is also
SIGKILLed inside its stage-1-final save and again in stage 2 before its first checkpoint (the
transition is redone), and run uninterrupted: the two exports are bitwise equal.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from megatron_longctx.testing.data import tiny_corpus
from tests.integration.run_utils import ROOT, launch, metrics

VOCAB = 512
#: recipe -> per stage (sequence length, TP, CP); DP = 2 / (TP x CP).
LAYOUTS = {
    "prolong_512k": [(256, 2, 1), (512, 1, 2)],
    "llama2_long_32k": [(256, 1, 1)],
    "prolong_sft": [(256, 2, 1)],
}


def _sft_data(root: Path) -> str:
    """Token and loss-mask datasets as tools/preprocess_sft.py writes them (random tokens,
    assistant-like spans of mask 1)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(5)
    lengths = rng.integers(30, 120, 120).tolist()
    text = IndexedDatasetBuilder(str(root / "chat_text_document.bin"), dtype=np.uint16)
    mask = IndexedDatasetBuilder(str(root / "chat_mask_document.bin"), dtype=np.uint16)
    for n in lengths:
        text.add_document(torch.from_numpy(rng.integers(1, VOCAB, n)), [n])
        m = np.zeros(n, dtype=np.int64)
        m[n // 2 :] = 1
        mask.add_document(torch.from_numpy(m), [n])
    text.finalize(str(root / "chat_text_document.idx"))
    mask.finalize(str(root / "chat_mask_document.idx"))
    return str(root / "chat")


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """Test datasets and a tiny HF Llama converted by the CLI."""
    from megatron_longctx.testing.hf_model import save_tiny_llama

    root = tmp_path_factory.mktemp("recipes")
    data = tiny_corpus(root / "data", vocab=VOCAB)
    data["sft"] = _sft_data(root / "data")
    save_tiny_llama(root / "hf", vocab_size=VOCAB, rope_theta=500000.0)
    _cli("hf-to-mcore", "--hf-dir", root / "hf", "--save", root / "mcore")
    return root, data


def _cli(*args) -> None:
    proc = subprocess.run(
        [sys.executable, "tools/convert_checkpoint.py", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def _scaled_mixture(recipe: dict, index: int, seq: int, data: dict, out: Path) -> Path:
    """The stage's own mixture file, prefixes pointed at the test data, length floors scaled by
    the same factor as the sequence."""
    stage = recipe["stages"][index]
    spec = yaml.safe_load((ROOT / "examples" / stage["mixture"]).read_text())
    factor = seq / stage["seq_length"]
    for comp in spec["mixture"]["components"]:
        if "mask_prefixes" in comp:
            comp["prefixes"] = [data["sft"] + "_text_document"]
            comp["mask_prefixes"] = [data["sft"] + "_mask_document"]
        elif comp.get("min_tokens"):
            comp["prefixes"] = [data["long"]]
            comp["min_tokens"] = max(1, int(comp["min_tokens"] * factor))
        else:
            comp["prefixes"] = [data["short"]]
    path = out / f"mixture_{index}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _overrides(name: str, data: dict, out: Path) -> list[str]:
    recipe = yaml.safe_load((ROOT / "examples" / f"{name}.yaml").read_text())
    model = ["model.preset=tiny", "model.num_layers=2", f"model.vocab_size={VOCAB}"]
    extra = ["model.make_vocab_size_divisible_by=128", f"data.vocab_size={VOCAB}"]
    extra += ["logging.wandb_mode=disabled", "logging.interval=1"]
    for i, (seq, tp, cp) in enumerate(LAYOUTS[name]):
        stage = recipe["stages"][i]
        s = f"stages.{i}."
        length = f"{s}tokens={4 * seq}" if "tokens" in stage else f"{s}steps=2"
        extra += [
            f"{s}seq_length={seq}",
            f"{s}global_batch_tokens={2 * seq}",
            length,
            f"{s}parallel.tensor_model_parallel_size={tp}",
            f"{s}parallel.context_parallel_size={cp}",
            f"{s}parallel.sequence_parallel={str(tp > 1).lower()}",
            f"{s}mixture={_scaled_mixture(recipe, i, seq, data, out)}",
            f"{s}eval=false",
        ]
    return model + extra


def test_prolong_64k_is_the_first_stage_of_prolong_512k():
    """prolong_64k.yaml is run through prolong_512k.yaml (same stage name and checkpoint
    directory, so the 512K file continues a 64K run): every setting but the name and the second
    stage is the same, so the tiny-shape run of prolong_512k runs prolong_64k's stage as well."""
    from megatron_longctx.config.loading import load_yaml

    short = load_yaml(ROOT / "examples" / "prolong_64k.yaml")
    full = load_yaml(ROOT / "examples" / "prolong_512k.yaml")
    assert short.pop("name") == "prolong_64k" and full.pop("name") == "prolong_512k"
    eval_flag = short["stages"][0].pop("eval", None)  # 64K alone evaluates its end
    assert eval_flag in (True, None)
    assert full.pop("stages")[:1] == short.pop("stages")
    assert full == short


def _run(name, root, data, run, faults: tuple[str, ...], verify: str = "rope"):
    """Launches until the recipe completes: one launch per fault, then a clean one."""
    config = ROOT / "examples" / f"{name}.yaml"
    overrides = _overrides(name, data, root)
    env = {"LONGCTX_INIT_FROM": str(root / "mcore")}
    for fault in faults:
        p = launch(config, run, data, *overrides, fault=fault, env=env)
        if fault.startswith("term"):
            assert "exiting with 75" in p.stdout, p.stdout[-3000:] + p.stderr[-3000:]
        else:
            assert p.returncode != 0
    p = launch(config, run, data, *overrides, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    if faults:
        assert "resumed stage" in p.stdout or "Adam moments from" in p.stdout
    recs = metrics(run)
    assert len(recs) == 2 * len(LAYOUTS[name]), recs
    assert all(np.isfinite(r["loss"]) for r in recs)
    _cli("mcore-to-hf", "--load", run / "checkpoints", "--save", run / "hf", "--verify", verify)
    return run / "hf"


@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_recipe_runs_at_tiny_shapes(artifacts, tmp_path, name):
    root, data = artifacts
    faults, verify = ("term_after_step:1",), "rope"
    if name == "prolong_512k":  # + SIGKILL inside the stage-1-final save, then in stage 2
        faults += ("kill_in_save:2", "kill_after_step:3")
        verify = "full"  # + the logits probe (megatron vs transformers), once
    hf = _run(name, root, data, tmp_path / "interrupted", faults, verify)
    cfg = yaml.safe_load((hf / "config.json").read_text())
    theta = cfg.get("rope_theta") or cfg["rope_parameters"]["rope_theta"]
    recipe = yaml.safe_load((ROOT / "examples" / f"{name}.yaml").read_text())
    last = recipe["stages"][len(LAYOUTS[name]) - 1]
    # (YAML 1.1 reads "1.28e8" as a string; the project's config loader converts it)
    assert theta == float(last.get("rope_theta") or recipe["model"]["rope_theta"])
    if name != "prolong_512k":
        return
    straight = _run(name, root, data, tmp_path / "straight", (), "none")
    from safetensors.torch import load_file

    a, b = load_file(hf / "model.safetensors"), load_file(straight / "model.safetensors")
    assert a.keys() == b.keys() and len(a) > 5
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
