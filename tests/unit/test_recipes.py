"""Every shipped recipe resolves and validates (--dry-run) at the world size it is meant for."""

from pathlib import Path

import pytest

from megatron_longctx.train import main

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
# recipe -> the world size (GPUs / CPU processes) it is laid out for
WORLD_SIZES = {
    "tiny_cpu": 2,
    "tiny_test": 2,
    "prolong_64k": 64,
    "prolong_512k": 128,
    "llama2_long_32k": 32,
    "prolong_sft": 64,
}


def test_every_recipe_is_listed():
    recipes = {p.stem for p in EXAMPLES.glob("*.yaml")}
    assert recipes <= set(WORLD_SIZES), f"add {recipes - set(WORLD_SIZES)} to WORLD_SIZES"


@pytest.mark.parametrize("name", sorted(WORLD_SIZES))
def test_recipe_dry_run(name, capsys, monkeypatch):
    monkeypatch.setenv("LONGCTX_RUN", "/tmp/longctx-recipes")
    rc = main(
        [
            "--config",
            str(EXAMPLES / f"{name}.yaml"),
            "--dry-run",
            "--world-size",
            str(WORLD_SIZES[name]),
        ]
    )
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "# parallel layouts" in out.out and "mixture:" in out.out


def test_prolong_recipe_numbers(capsys):
    from megatron_longctx.config.loading import from_dict, load_yaml
    from megatron_longctx.config.schema import ExperimentConfig

    cfg = from_dict(ExperimentConfig, load_yaml(EXAMPLES / "prolong_512k.yaml"))
    s1, s2 = cfg.stages
    assert (s1.seq_length, s1.rope_theta, s1.lr, s1.num_steps) == (65536, 8e6, 1e-5, 5000)
    assert (s2.seq_length, s2.rope_theta, s2.lr, s2.num_steps) == (524288, 1.28e8, 5e-6, 2500)
    assert s1.samples_per_step * s1.seq_length == 4194304
    assert s2.samples_per_step * s2.seq_length == 8388608
    assert (cfg.optimizer.adam_beta2, cfg.optimizer.weight_decay, cfg.optimizer.clip_grad) == (
        0.95,
        0.1,
        1.0,
    )
    assert cfg.model_config(s2).max_position_embeddings == 524288


def test_dotted_override_and_unknown_key(capsys):
    rc = main(
        [
            "--config",
            str(EXAMPLES / "tiny_cpu.yaml"),
            "--dry-run",
            "--world-size",
            "2",
            "stages.1.lr=7e-4",
            "stages.0.parallel.tensor_model_parallel_size=2",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0 and "lr: 0.0007" in out and "TP 2 x PP 1 x CP 1 x DP 1" in out
    rc = main(["--config", str(EXAMPLES / "tiny_cpu.yaml"), "--dry-run", "stages.9.lr=1"])
    assert rc == 2 and "has 2 items, no index 9" in capsys.readouterr().err


@pytest.mark.parametrize("name", [n for n in sorted(WORLD_SIZES) if not n.startswith("tiny")])
def test_checkpoint_interval_follows_the_planners_step_time(name):
    """A crash loses at most ~45 min: each GPU stage's checkpoint interval x the planner's step
    time for the stage's own layout at the recipe's world size (512K: ~68 s a step, 25 steps)."""
    from megatron_longctx.config.loading import from_dict, load_yaml
    from megatron_longctx.config.schema import ExperimentConfig
    from megatron_longctx.perf.planner import PlanRequest, evaluate

    cfg = from_dict(ExperimentConfig, load_yaml(EXAMPLES / f"{name}.yaml"))
    for stage in cfg.stages:
        req = PlanRequest(
            cfg.model_config(stage),
            stage.seq_length,
            WORLD_SIZES[name],
            global_batch_tokens=stage.samples_per_step * stage.seq_length,
        )
        step_s = evaluate(
            req,
            stage.parallel,
            stage.micro_batch_size,
            stage.recompute,
            cfg.optimizer.use_distributed_optimizer,
        ).step_time_s
        interval = stage.checkpoint_interval or cfg.checkpoint.interval
        assert 5 <= interval * step_s / 60 <= 45, (stage.name, interval, step_s)
