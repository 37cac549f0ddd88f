"""`make demo`'s pipeline end to end (tools/demo.py): sample corpus -> tokenizer -> preprocessing ->
passkey documents -> the two-stage tiny curriculum (examples/tiny_cpu.yaml, CP 2 in stage 2) with
an evaluation after each stage -> passkey accuracy of both stages -> HF export + generation with
transformers. Asserts what the demo shows (the stage-2 model retrieves the passkey at the stage-2
length, the stage-1 model does not) at the recipe's seed, and that its output stays readable."""

import json
import re
import subprocess
import sys

import pytest

from tests.integration.run_utils import ROOT

# The bars. Measured (40 prompts per cell) with the default seeds (this test) and with
# --seed 1 / 2: stage 1 at 1,024 tokens 0.00 / 0.03 / 0.10, stage 2 0.93 / 0.90 / 0.80 (margins
# >= 0.10 and >= 0.30; /work/notes/issue32.md). At fixed seeds the run is deterministic on CPU.
STAGE1_MAX, STAGE2_MIN = 0.2, 0.5


@pytest.mark.timeout(1600)
def test_demo_pipeline(tmp_path):
    out = tmp_path / "demo"
    with open(tmp_path / "demo.log", "w") as log:
        proc = subprocess.run(
            [sys.executable, "tools/demo.py", "--out", str(out)],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=1500,  # a hang guard: ~3 min on 2 idle cores, 18 min measured on a shared one
        )
    text = (tmp_path / "demo.log").read_text()
    assert proc.returncode == 0, text[-4000:]
    lines = text.splitlines()
    assert len(lines) < 150, text
    assert not [x for x in lines if re.search(r"FutureWarning|DeprecationWarning", x)], text
    recs = [json.loads(x) for x in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    n1, n2 = 250, 40  # examples/tiny_cpu.yaml's stages
    assert [r["iteration"] for r in recs] == list(range(1, n1 + n2 + 1))
    for r in recs:  # balance telemetry on every step (stage s1k runs CP 2 with balanced chunks)
        assert r["cp_work_max_over_mean"] >= 1 and r["dp_work_max_over_mean"] >= 1
        assert r["cp_work_max_over_min"] >= 1
        assert 0 <= r["padding_share"] < 0.05
    first = sum(r["loss"] for r in recs[:10]) / 10
    last_s1 = sum(r["loss"] for r in recs[n1 - 10 : n1]) / 10
    assert last_s1 < first - 0.5  # the tiny model learns (mostly the passkey digits)
    # what the demo shows: retrieval at the stage-2 length appears with stage 2
    acc = json.loads((out / "passkey.json").read_text())
    (label1, s1), (label2, s2) = acc.items()
    assert s1["rope_theta"] == 1e4 and s2["rope_theta"] == 5e5
    assert s1["accuracy"]["1024"] < STAGE1_MAX < STAGE2_MIN < s2["accuracy"]["1024"], acc
    assert f"{s1['accuracy']['1024']:.2f} for the model trained at" in lines[-2]
    assert str(out) in lines[-1]
    for stage in ("s256", "s1k"):
        res = json.loads((out / "run" / "eval" / stage / "eval_results.json").read_text())
        assert res["loss_by_position"]["length"] == 1024  # stage 1: extrapolated past 256
        assert (out / "run" / "eval" / stage / "report.md").exists()
    hf_cfg = json.loads((out / "hf" / "config.json").read_text())
    theta = hf_cfg.get("rope_theta") or hf_cfg["rope_parameters"]["rope_theta"]
    assert theta == 5e5 and hf_cfg["max_position_embeddings"] == 1024
    assert "generation:" in text and "== demo artifacts" in text
