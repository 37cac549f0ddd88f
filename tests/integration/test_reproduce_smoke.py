"""Smoke test of ``examples/reproduce_longctx.py`` (issue 11): the pipeline's mechanics at a few
steps, never its accuracy. The full run is ``make reproduce`` (out of the test suite)."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from megatron_longctx.data.index_cache import build_mixture_index
from megatron_longctx.data.mixture import mixture_from_dict
from megatron_longctx.data.packing import SamplePacker
from megatron_longctx.eval.passkey import (
    DIGIT0,
    KEY,
    NUM_DIGITS,
    QUERY,
    eval_prompts,
    write_passkey_dataset,
)
from tests.integration.run_utils import ROOT


def _script():
    spec = importlib.util.spec_from_file_location(
        "reproduce_longctx", ROOT / "examples" / "reproduce_longctx.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_passkey_packing_puts_loss_on_answer_digits_only(tmp_path):
    """Through the mixture / packing path: whole documents per sample, loss on the 5 digits."""
    comps = []
    for n in (32, 64):
        tok, mask = write_passkey_dataset(tmp_path / f"p{n}", [n] * 12, 128, seed=n)
        comps.append({"name": f"p{n}", "prefixes": [tok], "mask_prefixes": [mask], "weight": 0.5})
    index = build_mixture_index(
        mixture_from_dict({"seed": 0, "components": comps}), 128, 8, vocab_size=128
    )
    packer = SamplePacker(index)
    for j in range(8):
        s = packer.get(j)
        n = (32, 64)[s["component"]]
        assert s["cu_seqlens"].tolist() == list(range(0, 129, n))  # no passkey is cut
        docs = s["tokens"].reshape(-1, n)
        assert (docs[:, -NUM_DIGITS - 1] == QUERY).all() and (docs == KEY).sum(1).tolist() == [
            1
        ] * (128 // n)
        # label t is token t + 1: the loss sits on the labels that are answer digits
        expect = np.zeros(128, dtype=np.float32)
        for d in range(128 // n):
            expect[d * n + n - NUM_DIGITS - 1 : d * n + n - 1] = 1
        np.testing.assert_array_equal(s["loss_mask"], expect)
        lab = s["labels"][expect == 1]
        assert ((lab >= DIGIT0) & (lab < DIGIT0 + 10)).all()


def test_eval_prompts_answer_matches_key():
    tokens, answers = eval_prompts(256, 6, 128, seed=0)
    for row, ans in zip(tokens, answers):
        k = int((row == KEY).nonzero()[0])
        assert row[k + 1 : k + 1 + NUM_DIGITS].tolist() == ans.tolist()
        assert row[-NUM_DIGITS - 1] == QUERY


@pytest.mark.timeout(200)
def test_reproduce_smoke(tmp_path):
    """Stage 0 (DP 2) -> ABF extension with CP 2 -> accuracy grid and report files."""
    out = tmp_path / "results"
    results = _script().main(
        [
            "--out",
            str(out),
            "--stage0-steps",
            "3",
            "--stage0-batch",
            "4",
            "--stage0-micro",
            "2",
            "--ext-steps",
            "2",
            "--ext-batch",
            "2",
            "--eval-interval",
            "1",
            "--eval-samples",
            "2",
            "--curve-samples",
            "2",
            "--arms",
            "abf",
            "--timeout",
            "150",
        ]
    )
    for name in ("results.md", "results.json", "accuracy.png"):
        assert (out / name).stat().st_size > 0, name
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["final"]) == {"stage0", "abf"}
    for grid in saved["final"].values():
        assert sorted(int(n) for n in grid["accuracy"]) == [256, 512, 1024, 2048]
        assert all(0 <= a <= 1 for a in grid["accuracy"].values())
    # each model is evaluated with the RoPE its checkpoint was trained with
    assert saved["final"]["stage0"]["rope_theta"] == 1e4
    assert saved["final"]["abf"]["rope_theta"] == 5e5
    assert [s for s, _ in results["curves"]["abf"]] == [0, 1, 2]
    # the extension ran as a stage transition with context parallelism 2
    log = (out / "abf" / "train.log").read_text()
    assert "weights and Adam moments from" in log and "RoPE theta 500000" in log
    recipe = (out / "abf" / "recipe.yaml").read_text()
    assert "context_parallel_size: 2" in recipe
    rows = [json.loads(x) for x in (out / "abf" / "metrics.jsonl").read_text().splitlines()]
    ext = [r for r in rows if r["stage"] == "ext_abf"]
    assert len(ext) == 2 and all(np.isfinite(r["loss"]) and r["loss_tokens"] > 0 for r in ext)
    assert "| stage 0 |" in (out / "results.md").read_text()


def test_plain_reference_smoke():
    """The plain-PyTorch side-by-side reference runs its stage 0 + one arm and fills the table."""
    spec = importlib.util.spec_from_file_location(
        "reference_passkey_plain", ROOT / "examples" / "reference_passkey_plain.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    args = ["--stage0-steps", "2", "--ext-steps", "1", "--ext-batch", "1", "--eval-samples", "10"]
    table = mod.main([*args, "--arms", "abf"])
    assert set(table) == {"stage0", "abf"}
    assert all(sorted(row) == [256, 512, 1024, 2048] for row in table.values())
    assert all(0 <= a <= 1 for row in table.values() for a in row.values())
