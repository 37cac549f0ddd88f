"""A non-editable install (wheel of ``pip install .``) in a fresh venv, used from outside the repo.

The wheel is built from this checkout and installed into a new venv without pip's network access;
the already-installed third-party dependencies are made visible through a ``.pth`` line (installing
torch and megatron-core again would take minutes). The venv's ``megatron_longctx`` must be the
installed copy (not this checkout), its CLIs must run from PATH, and a one-stage tiny training with
its stage-end evaluation (export to HF + needle test) must finish: the evaluation used to run
``tools/convert_checkpoint.py`` through a path built from ``__file__``, which only exists in a
source checkout. About 30-40 s on 2 cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from megatron_longctx.runtime.spawn import free_port
from megatron_longctx.testing.data import tiny_corpus
from tests.integration.run_utils import ROOT

RECIPE = """
name: packaged
seed: 3
model: {preset: tiny, vocab_size: 512, num_layers: 2}
data: {tokenizer_type: HuggingFaceTokenizer, tokenizer_model: "${PKG_RUN}/tok"}
checkpoint: {save_dir: "${PKG_RUN}/checkpoints", interval: 2}
logging: {run_dir: "${PKG_RUN}", interval: 1, wandb_mode: disabled}
stages:
  - name: only
    seq_length: 64
    global_batch_size: 2
    micro_batch_size: 1
    lr: 1.0e-3
    steps: 2
    parallel: {tensor_model_parallel_size: 1, pipeline_model_parallel_size: 1}
    eval: true
    eval_settings: {context_lengths: [64], depths: [0.5], num_samples: 1, tasks: [needle],
                    plots: false}
    mixture:
      components:
        - {name: short, prefixes: ["${PKG_DATA}/short"], weight: 1.0}
"""


def _tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>", "</s>", "<s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(["The grass is green. The magic number is 12345."] * 20, trainer)
    path.mkdir(parents=True)
    tok.save(str(path / "tokenizer.json"))


def _run(cmd, cwd, env, timeout=120):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.mark.timeout(300)
def test_wheel_install_in_fresh_venv_runs_clis_and_train_with_stage_eval(tmp_path):
    pytest.importorskip("setuptools", reason="building the wheel offline needs setuptools")
    env = dict(os.environ, OMP_NUM_THREADS="1", LONGCTX_DEVICE="cpu", PIP_NO_INDEX="1")
    env.pop("PYTHONPATH", None)
    dist = tmp_path / "dist"
    _run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
        + ["-w", str(dist), str(ROOT)],
        tmp_path,
        env,
    )
    (wheel,) = dist.glob("megatron_longctx-*.whl")
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path, env)
    python = venv / "bin" / "python"
    _run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps"]
        + [str(wheel)],
        tmp_path,
        env,
    )
    site = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                tmp_path, env).stdout.strip()  # fmt: skip
    # third-party dependencies from the test environment (a plain path line: its .pth files,
    # among them the editable install of this checkout, are not processed)
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    where = _run([str(python), "-c", "import megatron_longctx as m; print(m.__file__)"],
                 tmp_path, env).stdout  # fmt: skip
    assert where.startswith(site) and str(ROOT) not in where, where
    for tool in ("convert_checkpoint.py", "preprocess_data.py", "eval_longctx.py", "plan.py"):
        assert "usage" in _run([str(venv / "bin" / tool), "--help"], tmp_path, env).stdout

    data = tiny_corpus(tmp_path / "data")
    _tokenizer(tmp_path / "run" / "tok")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)
    env.update(
        PKG_RUN=str(tmp_path / "run"),
        PKG_DATA=os.path.dirname(data["short"]),
        MASTER_PORT=str(free_port()),
    )
    train = [str(python), "-m", "megatron_longctx.train", "--config", str(recipe)]
    _run(train, tmp_path, env, timeout=200)
    results = json.loads((tmp_path / "run" / "eval" / "only" / "eval_results.json").read_text())
    assert results["model"]["max_position_embeddings"] == 64
    assert (tmp_path / "run" / "eval" / "only" / "hf" / "config.json").exists()
