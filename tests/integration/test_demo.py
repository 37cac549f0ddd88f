"""`make demo`'s pipeline end to end (tools/demo.py): sample corpus -> tokenizer -> preprocessing ->
the two-stage tiny curriculum (examples/tiny_cpu.yaml, CP 2 in stage 2) with an evaluation after
each stage -> HF export + generation with transformers."""

import json
import subprocess
import sys

import pytest

from tests.integration.run_utils import ROOT


@pytest.mark.timeout(900)
def test_demo_pipeline(tmp_path):
    out = tmp_path / "demo"
    with open(tmp_path / "demo.log", "w") as log:
        proc = subprocess.run(
            [sys.executable, "tools/demo.py", "--out", str(out)],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=850,
        )
    text = (tmp_path / "demo.log").read_text()
    assert proc.returncode == 0, text[-4000:]
    recs = [json.loads(x) for x in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in recs] == list(range(1, 51))
    for r in recs:  # balance telemetry on every step (stage s1k runs CP 2 with balanced chunks)
        assert r["cp_work_max_over_mean"] >= 1 and r["dp_work_max_over_mean"] >= 1
        assert r["cp_work_max_over_min"] >= 1
        assert 0 <= r["padding_share"] < 0.05
    first, last_s1 = recs[0]["loss"], recs[39]["loss"]
    assert last_s1 < first - 0.5  # real text: the tiny model learns
    for stage in ("s256", "s1k"):
        res = json.loads((out / "run" / "eval" / stage / "eval_results.json").read_text())
        assert res["needle"]["lengths"] and (out / "run" / "eval" / stage / "report.md").exists()
    hf_cfg = json.loads((out / "hf" / "config.json").read_text())
    theta = hf_cfg.get("rope_theta") or hf_cfg["rope_parameters"]["rope_theta"]
    assert theta == 1e5 and hf_cfg["max_position_embeddings"] == 1024
    assert "generation:" in text and "== demo artifacts" in text
