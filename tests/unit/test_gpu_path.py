"""The GPU path without a GPU (issue 20): defects 1, 2, 3, 5, 6.

Mechanisms and what they can prove:
* fake CUDA tensors (``FakeTensor`` over meta storage, device ``cuda:0``, MEGATRON_ON_CPU.md): ops
  mixing them with CPU tensors raise as on a GPU. They prove the project's own step code (batch ->
  loss -> reduced loss) keeps every tensor on the training device; not megatron's model forward
  (its embedding aborts in C++ on a fake CUDA weight with a CPU-only torch build), not kernels.
* ``tests/nccl_rules.enforce_nccl_device``: every collective tensor on the training device (NCCL's
  rule, which gloo does not enforce). Single rank, identity semantics; proves the device of what is
  reduced, not NCCL's behaviour.
"""

import pytest
import torch

from megatron_longctx.parallel.layout import LayoutError, ParallelLayout
from megatron_longctx.testing.fake_cuda import fake_cuda
from megatron_longctx.training.batch import BatchSharding, batch_to_device, to_model_batch
from megatron_longctx.training.step import loss_func, reduce_loss
from tests.nccl_rules import NcclRuleError, enforce_nccl_device

CUDA = torch.device("cuda", 0)
DOCS = [5, 7, 3, 9]


def _micro(docs=DOCS):
    total = sum(docs)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 50, (1, total + 1), generator=g)
    return {
        "tokens": tokens[:, :-1],
        "labels": tokens[:, 1:],
        "loss_mask": torch.ones(1, total),
        "position_ids": torch.arange(total)[None],
        "cu_seqlens": torch.tensor([0, *torch.tensor(docs).cumsum(0).tolist()]),
    }


def test_model_batch_lands_on_the_training_device():
    """Defect 1: every tensor the model and the loss read is on the requested device."""
    batch = BatchSharding(2, 1, device="meta")(_micro())
    for key in ("tokens", "labels", "loss_mask", "position_ids"):
        assert batch[key].device.type == "meta", key
    psp = batch["packed_seq_params"]
    for name in ("cu_seqlens_q", "cu_seqlens_kv", "cu_seqlens_q_padded", "cu_seqlens_kv_padded"):
        assert getattr(psp, name).device.type == "meta", name
    assert isinstance(psp.max_seqlen_q, int)  # no device tensor to read back on the host
    host = to_model_batch(_micro(), 2, 1)
    assert host["tokens"].shape == batch["tokens"].shape
    assert torch.equal(
        host["packed_seq_params"].cu_seqlens_q_padded, torch.tensor([0, 8, 16, 20, 32])
    )


def test_loss_on_fake_cuda_needs_the_device_batch():
    """Defect 1: the model output lives on CUDA; the loader's CPU loss mask raises a device
    mismatch there (as on a GPU), the moved batch does not."""
    host = to_model_batch(_micro(), 1, 0)
    with fake_cuda() as fake:
        out = fake(torch.empty(1, host["tokens"].shape[1]))
        with pytest.raises(Exception, match="cpu"):
            loss_func(host["loss_mask"], out)
        on_device = batch_to_device(host, CUDA)
        loss_sum, num_tokens, report = loss_func(on_device["loss_mask"], out)
        assert loss_sum.device == CUDA and report["lm loss"].device == CUDA


@pytest.fixture
def megatron_groups(monkeypatch):
    """parallel_state answers for a 2-stage pipeline with no process group behind it."""
    from megatron.core import parallel_state

    monkeypatch.setattr(parallel_state, "get_data_parallel_group", lambda **kw: None)
    monkeypatch.setattr(parallel_state, "get_pipeline_model_parallel_world_size", lambda: 2)
    monkeypatch.setattr(parallel_state, "get_pipeline_model_parallel_last_rank", lambda: 0)
    monkeypatch.setattr(parallel_state, "get_pipeline_model_parallel_group", lambda: None)


@pytest.mark.parametrize("last_stage", [True, False])
def test_reduce_loss_collectives_on_device(megatron_groups, last_stage):
    """Defect 2: the loss all-reduce and the pipeline broadcast get CUDA tensors, also on a rank
    without a loss report (not the last pipeline stage). The fake value cannot be read back, so the
    final ``.item()`` (a normal host sync on a GPU) raises after the collectives ran."""
    from torch._subclasses.fake_tensor import DataDependentOutputException

    with fake_cuda() as fake, enforce_nccl_device(CUDA, call_through=False) as seen:
        reports = [{"lm loss": fake(torch.empty(2))}] if last_stage else []
        with pytest.raises(DataDependentOutputException):
            reduce_loss(reports, CUDA)
    assert [name for name, _ in seen] == ["all_reduce", "broadcast"]
    assert all(d == CUDA for _, devices in seen for d in devices)


def test_nccl_rule_wrapper_rejects_cpu_tensors():
    """The wrapper itself can fail: a CPU tensor in a collective is refused."""
    with enforce_nccl_device(CUDA, call_through=False), pytest.raises(NcclRuleError, match="cpu"):
        torch.distributed.all_reduce(torch.zeros(2))


def test_signal_agreement_on_device(monkeypatch):
    """Defect 2: the per-step signal/deadline agreement all-reduces a tensor on the device."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from megatron_longctx.training.signals import SignalWatcher

    monkeypatch.setattr(filesystem_async, "_get_write_results_queue", lambda: None)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 1)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 0)
    watcher = SignalWatcher(signals=(), device=CUDA)
    from torch._subclasses.fake_tensor import DataDependentOutputException

    with fake_cuda(), enforce_nccl_device(CUDA, call_through=False) as seen:
        with pytest.raises(DataDependentOutputException):  # flag.tolist() after the all-reduce
            watcher.agreed()
    assert seen == [("all_reduce", [CUDA])]


def test_sequence_parallel_norms_with_the_local_spec():
    """Defect 3: megatron's local spec norm asserts ``not sequence_parallel``; the project's norm
    builds the same torch module with its weight marked for the TP gradient all-reduce.
    (TP 2 + SP against the unsharded model: tests/distributed/test_model_parallel.py.)"""
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    from megatron_longctx.model.build import transformer_config
    from megatron_longctx.model.config import get_preset
    from megatron_longctx.model.norm import SequenceParallelTorchNorm

    config = transformer_config(get_preset("tiny"), ParallelLayout(2, 1, 1, sequence_parallel=True))
    with pytest.raises(AssertionError, match="sequence parallel"):
        WrappedTorchNorm(config, 64)
    norm = SequenceParallelTorchNorm(config, 64, eps=1e-5)
    assert isinstance(norm, torch.nn.RMSNorm) and norm.weight.sequence_parallel is True
    assert list(norm.state_dict()) == ["weight"]


@pytest.mark.parametrize("tp", [2, 4, 8])
@pytest.mark.parametrize("cp", [1, 2])
def test_sequence_parallel_padding(tp, cp):
    """Defect 5: with SP each CP rank's token count is divisible by TP (megatron scatters it over
    TP), every document stays padded to 2 x CP, and the multiple is the one validation uses."""
    layout = ParallelLayout(tp, 1, cp, sequence_parallel=True)
    for rank in range(cp):
        batch = to_model_batch(_micro(), cp, rank, sp_size=tp)
        local = batch["tokens"].shape[1]
        assert local % tp == 0, (local, tp)
        cu = batch["packed_seq_params"].cu_seqlens_q_padded
        assert cu[-1] % layout.token_multiple == 0
        assert all(int(n) % (2 * cp) == 0 for n in cu[1:] - cu[:-1])
        # the real documents are unchanged, one padding-only document at most is appended
        real = batch["packed_seq_params"].cu_seqlens_q
        assert real[: len(DOCS) + 1].tolist() == [0, 5, 12, 15, 24]
        padded_docs = sum(n + (-n) % (2 * cp) for n in DOCS)
        assert int(cu[-1]) == -(-padded_docs // (2 * cp * tp)) * (2 * cp * tp)
    with pytest.raises(LayoutError, match="2 x CP x TP"):
        layout.validate(
            world_size=tp * cp,
            num_layers=2,
            num_attention_heads=8,
            num_query_groups=8,
            seq_length=2 * cp * tp + 2 * cp,
        )


def test_planner_uses_the_trainers_multiple():
    """Defect 5: the planner's TP 4 / 8 candidates are layouts whose multiple the batch pads to."""
    from megatron_longctx.model.config import get_preset
    from megatron_longctx.perf.planner import PlanRequest, enumerate_plans

    req = PlanRequest(model=get_preset("llama3-8b"), seq_length=65536, num_gpus=16)
    tps = {p.layout.tensor_model_parallel_size for p in enumerate_plans(req)}
    assert {4, 8} <= tps
    for p in enumerate_plans(req):
        lay = p.layout
        assert lay.sequence_parallel == (lay.tensor_model_parallel_size > 1)
        assert 65536 % lay.token_multiple == 0


def test_stage_eval_leaves_nccl_jobs(monkeypatch):
    """Defect 6: under NCCL with several ranks the trainer does not run the HF route (no rank
    waits in a collective behind rank 0's export); on one process / gloo it does. The in-process
    evaluation (issue 29, every rank) runs on every backend."""
    from types import SimpleNamespace

    import torch.distributed as dist

    from megatron_longctx.eval import stage_end

    calls, in_process = [], []
    monkeypatch.setattr(stage_end, "evaluate_stage", lambda *a: calls.append(a))
    monkeypatch.setattr(stage_end, "evaluate_stage_in_process", lambda *a: in_process.append(a))
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    monkeypatch.setattr(dist, "get_world_size", lambda: 8)
    monkeypatch.setattr(dist, "get_backend", lambda *a: "nccl")
    stage = SimpleNamespace(name="s1", eval=True)
    cfg = SimpleNamespace(checkpoint=SimpleNamespace(save_dir="ckpts"))
    run = SimpleNamespace(cfg=cfg, stage=stage, step=3, total=3, iteration=7)
    callback = stage_end.StageEndEvaluation()
    callback.after_step(run, None)
    assert not calls and len(in_process) == 1
    monkeypatch.setattr(dist, "get_backend", lambda *a: "gloo")
    callback.after_step(run, None)
    assert len(calls) == 1 and str(calls[0][1]).endswith("iter_0000007")
    assert len(in_process) == 2
    run.step = 2  # not the stage's last step: nothing
    callback.after_step(run, None)
    assert len(calls) == 1 and len(in_process) == 2
