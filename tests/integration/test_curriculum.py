"""The curriculum as users run it (torchrun, 2 CPU processes, examples/tiny_test.yaml: stage 1 at
S=128 with DP 2, stage 2 at S=256 with CP 2 and a new RoPE theta).

* exact resume: SIGTERM (checkpoint + exit), SIGKILL inside a save (after all data, before the
  completion marker), SIGKILL in stage 2 before its first checkpoint (the transition is redone),
  then a final resume -> the same loss sequence and bitwise-identical final weights as one
  uninterrupted run;
* stage transition restarts the LR schedule (warmup again) and changes RoPE theta;
* a NaN halts without a checkpoint after it; bad configs fail before any step.
"""

import shutil

import pytest
import torch

from megatron_longctx.checkpoint.dist import MARKER, find_latest, iteration_dir, list_checkpoints
from megatron_longctx.runtime.spawn import free_port
from megatron_longctx.testing.data import tiny_corpus
from tests.integration.run_utils import ROOT, launch, metrics, read_model_tensors

CONFIG = ROOT / "examples" / "tiny_test.yaml"
TOTAL = 10  # 6 + 4 iterations


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_corpus(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data):
    run = tmp_path_factory.mktemp("uninterrupted")
    proc = launch(CONFIG, run, data)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run


def _losses(run):
    return [(r["iteration"], r["loss"]) for r in metrics(run)]


@pytest.mark.timeout(600)
def test_killed_and_resumed_equals_uninterrupted(tmp_path, data, reference):
    run = tmp_path / "run"
    # 1. SIGTERM after iteration 3 (between checkpoints at 2 and 4): saves iteration 3, exits 75.
    p = launch(CONFIG, run, data, fault="term_after_step:3")
    assert "exiting with 75" in p.stdout, p.stdout[-2000:] + p.stderr[-2000:]
    assert find_latest(run / "checkpoints") == 3
    # 1b. the same run with another mixture under it: the saved loader state refuses to resume.
    p = launch(CONFIG, run, data, "stages.0.mixture.seed=5")
    assert p.returncode != 0 and "exitcode: 2" in p.stderr, p.stderr[-3000:]
    assert "saved for another sample index" in p.stderr and "mixture" in p.stderr
    assert not _traceback_of_ours(p.stderr), p.stderr[-3000:]  # one line (torchrun adds its own)
    assert find_latest(run / "checkpoints") == 3  # nothing lost
    # 2. SIGKILL inside the stage-1-final save, before its completion marker.
    p = launch(CONFIG, run, data, fault="kill_in_save:6")
    assert p.returncode != 0
    assert iteration_dir(run / "checkpoints", 6).exists()
    assert not (iteration_dir(run / "checkpoints", 6) / MARKER).exists()
    assert find_latest(run / "checkpoints") == 4  # the torn save is ignored
    # 3. SIGKILL in stage 2 before its first checkpoint: the transition is redone on resume.
    p = launch(CONFIG, run, data, fault="kill_after_step:7")
    assert p.returncode != 0 and find_latest(run / "checkpoints") == 6
    # 4. Resume to the end.
    p = launch(CONFIG, run, data)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "resumed" not in p.stdout or "stage 'long'" in p.stdout
    assert _losses(run) == _losses(reference)  # bitwise-equal floats, every iteration
    assert len(_losses(run)) == TOTAL
    final = read_model_tensors(iteration_dir(run / "checkpoints", TOTAL))
    ref = read_model_tensors(iteration_dir(reference / "checkpoints", TOTAL))
    assert final.keys() == ref.keys() and len(final) > 5
    for k in ref:
        assert torch.equal(final[k], ref[k]), k
    # retention kept the stage-final checkpoints and the newest one only
    assert list_checkpoints(run / "checkpoints") == [6, 10]


def test_stage_transition_restarts_schedule_and_rope(reference):
    recs = metrics(reference)
    s1 = [r for r in recs if r["stage"] == "short"]
    s2 = [r for r in recs if r["stage"] == "long"]
    assert len(s1) == 6 and len(s2) == 4
    # logged lr is after the step's scheduler update: warmup 2 steps of stage 1 (0.34 x 6),
    # 1 step of stage 2 (0.25 x 4) -> stage 2 starts again from a warmup value at its own peak.
    assert s1[0]["lr"] == pytest.approx(3e-3 / 2)
    assert s2[0]["lr"] == pytest.approx(1e-3)
    assert s2[-1]["lr"] == pytest.approx(1e-4)  # cosine down to min_lr_ratio 0.1 x peak
    from megatron_longctx.checkpoint.dist import read_state

    st6 = read_state(iteration_dir(reference / "checkpoints", 6))["state"]
    st10 = read_state(iteration_dir(reference / "checkpoints", 10))["state"]
    assert st6["model"]["rope_theta"] == 1e4 and st10["model"]["rope_theta"] == 1.28e8
    assert st10["model"]["max_position_embeddings"] == 256
    assert (reference / "loss_curve.png").stat().st_size > 1000


@pytest.mark.timeout(300)
def test_nan_halts_without_checkpoint(tmp_path, data):
    run = tmp_path / "run"
    p = launch(CONFIG, run, data, fault="nan_at_step:3")
    assert p.returncode != 0
    assert "non-finite loss" in p.stdout
    assert list_checkpoints(run / "checkpoints", complete_only=False) == [2]


@pytest.mark.parametrize(
    "override,message",
    [
        ("stages.0.sequence_length=64", "unknown config key(s) stages.0.sequence_length"),
        (
            "stages.1.parallel.context_parallel_size=3",
            "world size 2 is not TP 1 x PP 1 x CP 3 x DP",
        ),
        ("model.hidden=8", "unknown config key(s) model.hidden"),
        ("stages.1.seq_length=250", "sequence length 250 is not divisible by 2 x CP = 4"),
    ],
)
def test_bad_config_fails_before_any_step(tmp_path, capsys, monkeypatch, override, message):
    from megatron_longctx.train import main

    monkeypatch.setenv("LONGCTX_RUN", str(tmp_path))
    monkeypatch.setenv("LONGCTX_DATA", str(tmp_path))
    rc = main(["--config", str(CONFIG), "--dry-run", "--world-size", "2", override])
    assert rc == 2
    assert message in capsys.readouterr().err


@pytest.mark.timeout(200)
def test_missing_dataset_is_a_clear_error(tmp_path, data):
    shutil.copy(data["long"] + ".idx", tmp_path / "long.idx")  # .bin missing
    p = launch(CONFIG, tmp_path / "run", {"long": str(tmp_path / "long")})
    assert p.returncode != 0
    assert "long" in p.stderr and ".bin" in p.stderr
    assert list_checkpoints(tmp_path / "run" / "checkpoints", complete_only=False) == []


@pytest.mark.timeout(300)
def test_trained_checkpoint_exports_to_hf_with_stage_rope(tmp_path, reference):
    """The curriculum's final checkpoint (stage 2: theta 1.28e8, trained at 256 tokens) exports and
    loads in transformers with those RoPE settings (the pitfall other converters hit)."""
    import subprocess
    import sys

    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path / "hf"
    proc = subprocess.run(
        [
            sys.executable,
            "tools/convert_checkpoint.py",
            "mcore-to-hf",
            "--load",
            str(reference / "checkpoints"),
            "--save",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    cfg = LlamaConfig.from_pretrained(out, local_files_only=True)
    theta = getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"]
    assert theta == 1.28e8 and cfg.max_position_embeddings == 256
    model = LlamaForCausalLM.from_pretrained(out, local_files_only=True)
    ref = read_model_tensors(iteration_dir(reference / "checkpoints", TOTAL))
    emb = model.get_input_embeddings().weight.detach()
    assert torch.equal(emb, ref["embedding.word_embeddings.weight"][: emb.shape[0]])
    logits = model(torch.tensor([[1, 5, 9, 13]])).logits
    assert torch.isfinite(logits).all()


@pytest.mark.timeout(200)
def test_checkpoint_of_another_model_shape_is_refused(tmp_path, data, reference):
    run = tmp_path / "run"
    shutil.copytree(reference / "checkpoints", run / "checkpoints")
    shutil.rmtree(iteration_dir(run / "checkpoints", TOTAL))  # resume at the stage transition
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    p = launch(CONFIG, run, data, "model.hidden_size=32", "model.ffn_hidden_size=64")
    assert p.returncode != 0
    assert "is for another model shape" in p.stderr and "hidden_size" in p.stderr
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before  # nothing lost


def _traceback_of_ours(stderr: str) -> bool:
    return any('File "' in line and "megatron_longctx" in line for line in stderr.splitlines())


_TWO_RUNS = """
import sys
from megatron_longctx.train import main
cfg, run, fresh = sys.argv[1:4]
for save_dir, override in ((run, "stages.1.name=renamed"),
                           (fresh, f"stages.0.init_from={fresh}/no_such_checkpoint")):
    rc = main(["--config", cfg, "stages.1.parallel.context_parallel_size=1",
               f"checkpoint.save_dir={save_dir}", override])
    print(f"rc={rc}", file=sys.stderr, flush=True)
"""


@pytest.mark.timeout(200)
def test_errors_inside_training_exit_2_with_one_line(tmp_path, data, reference):
    """A checkpoint from a stage the config lacks (found inside training), and an ``init_from``
    that does not exist (found at config load): the documented one line on stderr and exit 2, not
    a traceback (one process, world size 1)."""
    import os
    import subprocess
    import sys

    run = tmp_path / "run"
    shutil.copytree(reference / "checkpoints", run / "checkpoints")
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        LONGCTX_DEVICE="cpu",
        LONGCTX_RUN=str(tmp_path),
        LONGCTX_DATA=os.path.dirname(data["long"]),
        MASTER_PORT=str(free_port()),
    )
    args = [str(CONFIG), str(run / "checkpoints"), str(tmp_path / "fresh")]
    p = subprocess.run(
        [sys.executable, "-c", _TWO_RUNS, *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr[-3000:]
    lines = [x for x in p.stderr.splitlines() if x.startswith(("error:", "config error:", "rc="))]
    assert lines[1::2] == ["rc=2", "rc=2"], p.stderr[-3000:]
    assert "checkpoint" in lines[0] and "is from stage 'long', which this config" in lines[0]
    assert str(tmp_path / "fresh" / "no_such_checkpoint") in lines[2]
