"""tools/inspect_mixture.py on a YAML recipe with a placeholder filled from the environment."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from tests.unit.test_mixture import write_dataset

REPO = Path(__file__).resolve().parents[2]


def test_inspect_reports_shares_and_writes_png(tmp_path, monkeypatch, capsys):
    rng = np.random.default_rng(3)
    write_dataset(tmp_path / "long", rng.integers(64, 300, 25), seed=1)
    write_dataset(tmp_path / "short", rng.integers(1, 40, 150), seed=2)
    recipe = tmp_path / "mix.yaml"
    recipe.write_text(
        "mixture:\n  components:\n"
        "    - {name: long, prefixes: ['${MIXDATA}/long'], weight: 0.7, min_tokens: 64}\n"
        "    - {name: short, prefixes: ['${MIXDATA}/short'], weight: 0.3, max_tokens: 64}\n"
    )
    monkeypatch.setenv("MIXDATA", str(tmp_path))
    spec = importlib.util.spec_from_file_location(
        "inspect_mixture", REPO / "tools" / "inspect_mixture.py"
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    png = tmp_path / "mix.png"
    out = tool.main(
        ["--mixture", str(recipe), "--seq-length", "64", "--num-samples", "50", "--png", str(png)]
        + ["--context-parallel-size", "2", "--dp-size", "2", "--global-batch-size", "10"]
    )
    assert png.stat().st_size > 1000
    assert out["per_component"].tolist() == [35 * 64, 15 * 64]  # 0.7 / 0.3 of 50 samples
    assert out["per_bin"].sum() == 50 * 64  # every input token attributed to a length bin
    # long documents are 64..299 tokens: all in the <4K bin of the long component
    assert out["per_bin"][0, 0] == 35 * 64
    text = capsys.readouterr().out
    assert "documents per sample" in text
    assert "load balance over 5 steps (CP 2, DP 2, balanced)" in text
    bal = out["balance"]
    assert len(bal["balanced"]) == len(bal["megatron order"]) == 5
    for got, plain in zip(bal["balanced"], bal["megatron order"]):
        assert got["padding_share"] == plain["padding_share"]  # same samples, same sharding
        assert got["cp_work_max_over_mean"] >= 1 and got["dp_work_max_over_mean"] >= 1
