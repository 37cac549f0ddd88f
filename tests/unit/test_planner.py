"""The layout planner against published Llama-3-8B long-context layouts, and its output format."""

from __future__ import annotations

from dataclasses import replace

import pytest

from megatron_longctx.model.config import PRESETS
from megatron_longctx.parallel.layout import LayoutError, ParallelLayout
from megatron_longctx.perf.planner import PlanRequest, enumerate_plans, evaluate, plan

M = PRESETS["llama3-8b"]


def _layout(tp, pp, cp):
    return ParallelLayout(tp, pp, cp, sequence_parallel=tp > 1)


def test_64k_tp4_pp2_cp4_on_32_gpus_is_feasible_on_80gb():
    """The published 64K layout (TP 4, PP 2, CP 4, 32 GPUs) fits even without recompute."""
    req = PlanRequest(M, 65536, 32, global_batch_tokens=4 * 1024 * 1024)  # ProLong stage 1
    p = evaluate(
        req, _layout(4, 2, 4), micro_batch_size=1, recompute=None, distributed_optimizer=True
    )
    assert p.fits, p.reason
    assert p.layout.data_parallel_size == 1 and p.num_micro_batches == 64
    assert 25e9 < p.memory.total < 40e9


def test_128k_cp8_is_feasible_on_80gb():
    req = PlanRequest(M, 131072, 32)
    p = evaluate(
        req, _layout(2, 1, 8), micro_batch_size=1, recompute="full", distributed_optimizer=True
    )
    assert p.fits, p.reason
    assert any(q.layout.context_parallel_size == 8 for q in plan(req))


def test_512k_without_context_parallelism_is_rejected_on_80gb():
    req = PlanRequest(M, 524288, 64)
    plans = enumerate_plans(req)
    cp1 = [p for p in plans if p.layout.context_parallel_size == 1]
    assert cp1 and all(not p.fits for p in cp1 if p.layout.pipeline_model_parallel_size < 8)
    # The one exception the model finds: TP 8 x PP 8 (the whole 64-GPU job as one replica) with
    # full recompute squeezes the unchunked 512K loss (50.7 GB) onto the last stage.
    squeezed = [p for p in cp1 if p.fits]
    assert all(p.layout.tensor_model_parallel_size == 8 and p.recompute == "full" for p in squeezed)
    rejected = [p for p in cp1 if p.layout.pipeline_model_parallel_size == 1]
    assert all("GB usable of 80 GB" in p.reason for p in rejected)
    best = plan(req, top=5)
    assert len(best) == 5 and all(p.layout.context_parallel_size >= 8 for p in best)


def test_plans_are_ranked_and_valid_under_parallel_layout_validate():
    req = PlanRequest(M, 524288, 64)
    best = plan(req, top=10)
    assert [p.step_time_s for p in best] == sorted(p.step_time_s for p in best)
    for p in best:
        lay = p.layout
        dp = lay.validate(
            world_size=64,
            num_layers=32,
            num_attention_heads=32,
            num_query_groups=8,
            seq_length=524288,
            micro_batch_size=p.micro_batch_size,
            global_batch_size=req.global_batch_size,
        )
        assert dp * lay.model_parallel_size == 64
        assert 0 < p.mfu < req.compute_efficiency
        assert p.memory.total <= 0.9 * 80e9


def test_overrides_build_a_valid_stage_config():
    loading = pytest.importorskip("megatron_longctx.config.loading")
    schema = pytest.importorskip("megatron_longctx.config.schema")
    best = plan(PlanRequest(M, 524288, 64), top=1)[0]
    raw = {
        "stages": [
            {"name": "long", "seq_length": 524288, "steps": 1, "global_batch_tokens": 8388608}
        ]
    }
    loading.apply_overrides(raw, best.overrides(stage=0))
    stage = loading.from_dict(schema.StageConfig, raw["stages"][0])
    assert stage.resolved_loss_chunk_tokens == best.loss_chunk_tokens  # the trainer's value
    assert stage.parallel.context_parallel_size == best.layout.context_parallel_size
    assert stage.recompute == best.recompute and stage.micro_batch_size == best.micro_batch_size
    stage.parallel.validate(
        world_size=64, num_layers=32, num_attention_heads=32, num_query_groups=8, seq_length=524288
    )


def test_override_format():
    req = PlanRequest(M, 65536, 32, global_batch_tokens=4194304)
    p = evaluate(req, _layout(4, 2, 4), 1, "full", True)
    assert p.overrides(stage=1) == [
        "stages.1.parallel.tensor_model_parallel_size=4",
        "stages.1.parallel.pipeline_model_parallel_size=2",
        "stages.1.parallel.context_parallel_size=4",
        "stages.1.parallel.sequence_parallel=true",
        "stages.1.micro_batch_size=1",
        "stages.1.recompute=full",
        "stages.1.loss_chunk_tokens=0",
    ]
    chunked = evaluate(replace(req, loss_chunk_tokens=2048), _layout(4, 2, 4), 1, "full", True)
    assert chunked.overrides(stage=1)[-1] == "stages.1.loss_chunk_tokens=2048"


def test_invalid_layouts_and_requests_fail_clearly():
    req = PlanRequest(M, 65536, 32)
    with pytest.raises(LayoutError, match="not divisible"):
        evaluate(req, _layout(1, 3, 1), 1, None, True)  # 32 GPUs / 3
    with pytest.raises(ValueError, match="not a multiple of seq_length"):
        PlanRequest(M, 65536, 32, global_batch_tokens=100_000)
    with pytest.raises(ValueError, match="whole nodes"):
        PlanRequest(M, 65536, 12, gpus_per_node=8)


def test_hardware_changes_speed_not_feasibility():
    from megatron_longctx.perf.hardware import HARDWARE

    h100 = plan(PlanRequest(M, 65536, 32), top=1)[0]
    a100 = plan(PlanRequest(M, 65536, 32, hardware=HARDWARE["a100"]), top=1)[0]
    assert a100.step_time_s > 2.5 * h100.step_time_s  # 989 vs 312 TFLOP/s


def test_plan_cli_prints_overrides_and_bench_refuses_without_cuda():
    from tests.unit.conftest import run_tool

    out = run_tool(
        "plan",
        "--model",
        "llama3-8b",
        "--seq-length",
        "524288",
        "--num-gpus",
        "64",
        "--gpus-per-node",
        "8",
        "--gpu-memory-gb",
        "80",
        "--top",
        "2",
    )
    assert out.returncode == 0, out.stderr
    assert "#1 " in out.stdout and "#3 " not in out.stdout
    assert "stages.0.parallel.context_parallel_size=" in out.stdout
    # the trainer's default for a 512K stage (model.config.resolve_loss_chunk_tokens)
    assert "stages.0.loss_chunk_tokens=2048" in out.stdout and "chunks of 2,048" in out.stdout
    # the #1 plan's step time x the printed checkpoint interval ~ 30 minutes
    step_s = float(out.stdout.split("#1 ")[1].split("| step ")[1].split(" s")[0])
    interval = int(out.stdout.split("stages.0.checkpoint_interval=")[1].split()[0])
    assert 1800 - step_s - 0.1 * interval <= interval * step_s <= 1800 + 0.1 * interval
    none = run_tool(
        "plan",
        "--model",
        "llama3-8b",
        "--seq-length",
        "524288",
        "--num-gpus",
        "8",
        "--gpu-memory-gb",
        "80",
        "--loss-chunk-tokens",
        "0",  # Megatron's unchunked loss (with the default chunked loss a full-recompute plan fits)
    )
    assert none.returncode == 1 and "nothing fits" in none.stdout
    bench = run_tool("bench_attention", "--seq-length", "4096")
    assert bench.returncode == 2 and "needs CUDA" in bench.stderr
