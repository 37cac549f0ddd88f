"""The in-process evaluation's pure pieces (issue 29): token scoring, packing, JSON KV, the cost
guard, settings; and its collectives under NCCL's device rule on fake CUDA tensors.

The end-to-end checks (megatron at every layout vs transformers' greedy generate, planted bugs,
the stage-end evaluation on 2 ranks) are in tests/distributed/test_inprocess_eval.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from megatron_longctx.eval.in_process import estimate_cost, refusal
from megatron_longctx.eval.json_kv import json_kv
from megatron_longctx.eval.packing import ScoreRequest, build_pack, pack_requests, plan_packs
from megatron_longctx.model.loss import token_logprobs
from megatron_longctx.eval.teacher_forced import TeacherForcedSettings
from tests.distributed.test_inprocess_eval import ByteTokenizer
from tests.nccl_rules import enforce_nccl_device
from tests.unit.test_gpu_path import CUDA, fake_cuda


def test_token_scores_equal_dense_log_softmax_without_padding():
    """The evaluation's scoring (model/loss.py token_logprobs, chunked) on logits made exact by an
    identity output weight: padding ids never win or count, ties go to the smallest id."""
    g = torch.Generator().manual_seed(0)
    vocab, padded = 50, 64
    logits = torch.randn(37, padded, generator=g) * 3
    logits[:, vocab:] = 100.0  # megatron's padding ids must never win or count
    logits[5, [7, 11]] = 50.0  # an exact tie: the smallest id is the greedy token
    targets = torch.randint(0, vocab, (37,), generator=g)
    targets[5] = 11
    targets[6] = logits[6, :vocab].argmax()
    lp, hit = token_logprobs(logits, torch.eye(padded), targets, 8, None, vocab)  # 5 chunks
    ref = torch.log_softmax(logits[:, :vocab].double(), -1).gather(1, targets[:, None])[:, 0]
    torch.testing.assert_close(lp.double(), ref, rtol=0, atol=1e-5)
    assert torch.equal(hit, logits[:, :vocab].argmax(-1) == targets)
    assert not hit[5] and hit[6]


def test_packing_layout_hand_computed():
    reqs = [ScoreRequest([10, 11, 12, 13], 2), ScoreRequest([20, 21, 22], 1, per_position=True)]
    p = build_pack(reqs, [0, 1])
    assert p.micro["tokens"][0].tolist() == [10, 11, 12, 13, 20, 21, 22]
    assert p.micro["cu_seqlens"].tolist() == [0, 4, 7]
    # request 0 scores 12, 13 (predicted at positions 1, 2); request 1 scores 21, 22
    assert p.micro["loss_mask"][0].tolist() == [0, 1, 1, 0, 1, 1, 0]
    assert p.micro["labels"][0].tolist()[:3] == [11, 12, 13]
    assert p.micro["labels"][0].tolist()[4:6] == [21, 22]
    assert p.request.tolist() == [-1, 0, 0, -1, 1, 1, -1]
    assert p.slot.tolist() == [-1, -1, -1, -1, 0, 1, -1]


def test_packs_fill_capacity_and_refuse_too_long():
    lengths = [700, 300, 500, 200, 1000, 300]
    packs = plan_packs(lengths, 1000)
    assert sorted(i for p in packs for i in p) == list(range(6))
    assert all(sum(lengths[i] for i in p) <= 1000 for p in packs)
    assert len(packs) == 3  # first-fit decreasing: 1000 | 700+300 | 500+300+200
    with pytest.raises(ValueError, match="does not fit the sequence length 1000"):
        pack_requests([ScoreRequest([1] * 1001, 1)], 1000)
    with pytest.raises(ValueError, match="score_start"):
        ScoreRequest([1, 2], 0)


@pytest.mark.parametrize("length", [420, 2048])
def test_json_kv_is_valid_json_of_the_right_length(length):
    tok = ByteTokenizer()
    s = json_kv(tok, length, seed=0, index=3)
    assert length - 100 <= len(s.prompt) + s.max_new_tokens <= length  # a pair is ~80 tokens
    text = tok.decode(s.prompt)
    body = text[text.index("{") : text.index("}") + 1]
    data = json.loads(body)
    key = text.split('Key: "')[1].split('"')[0]
    assert len(data) >= 2 and data[key] == s.answers[0]
    assert json_kv(tok, length, 0, 3).prompt == s.prompt  # deterministic
    with pytest.raises(ValueError, match="too short for json_kv"):
        json_kv(tok, 150, 0, 0)


def test_cost_guard_and_settings():
    reqs = [ScoreRequest([1] * 600, 590), ScoreRequest([1] * 300, 290)]
    cost = estimate_cost(reqs, 1000, train_tokens_per_s=300.0)
    assert (cost.forward_tokens, cost.num_packs) == (900, 1)
    assert cost.estimated_seconds == pytest.approx(900 / (3 * 300.0))
    assert refusal(cost, TeacherForcedSettings(max_forward_tokens=900)) is None
    assert "exceed max_forward_tokens 899" in refusal(
        cost, TeacherForcedSettings(max_forward_tokens=899)
    )
    assert "exceeds max_seconds 0.5" in refusal(cost, TeacherForcedSettings(max_seconds=0.5))
    with pytest.raises(ValueError, match="eval_settings.in_process"):
        TeacherForcedSettings.from_dict({"num_sample": 2})
    with pytest.raises(ValueError, match="held-out data"):
        TeacherForcedSettings(tasks=["loss"])


class _Group:
    """A 2-rank TP group in name only (``dist.get_world_size`` / ``get_rank`` are patched)."""


def test_collectives_take_device_tensors(monkeypatch):
    """NCCL's rule on fake CUDA tensors: token scoring's TP reductions (model/loss.py
    token_logprobs: max, sum-exp + target logit, greedy id per chunk) and the scorer's DP x CP
    all-reduce + PP broadcast only see tensors on the device (gloo would accept CPU ones).
    Replaced: the model forward (fake hidden states / scores) and the process groups."""
    from megatron.core import parallel_state

    from megatron_longctx.eval.megatron_model import MegatronScorer
    from megatron_longctx.training.batch import BatchSharding, batch_to_device

    group = _Group()
    real_ws, real_rank = torch.distributed.get_world_size, torch.distributed.get_rank
    monkeypatch.setattr(
        torch.distributed, "get_world_size", lambda g=None: 2 if g is group else real_ws(g)
    )
    monkeypatch.setattr(torch.distributed, "get_rank", lambda g=None: 0 if g is group else 0)
    for name, value in [
        ("get_tensor_model_parallel_group", group),
        ("get_data_parallel_world_size", 1),
        ("get_data_parallel_rank", 0),
        ("get_data_parallel_group", None),
        ("get_pipeline_model_parallel_world_size", 2),
        ("get_pipeline_model_parallel_last_rank", 1),
        ("get_pipeline_model_parallel_group", None),
    ]:
        monkeypatch.setattr(parallel_state, name, lambda *a, v=value, **k: v)
    scorer = MegatronScorer([torch.nn.Linear(1, 1)], BatchSharding(), vocab_size=40, seq_length=64)
    reqs = [ScoreRequest(list(range(3, 20)), 15), ScoreRequest(list(range(3, 40)), 1, True)]
    host = [scorer._model_batch(p, 2, 36) for p in pack_requests(reqs, 64)]
    with fake_cuda() as fake, enforce_nccl_device(CUDA, call_through=False) as seen:
        scorer.device, scorer._ref = CUDA, fake(torch.empty(1))
        batches = []
        for b in host:
            moved = batch_to_device(b, CUDA)
            moved["eval_request"] = b["eval_request"].to(CUDA)
            moved["eval_slot"] = b["eval_slot"].to(CUDA)
            batches.append(moved)
        scorer._model_batch = lambda pack, r, s: batches.pop(0)
        token_logprobs(  # the last stage's scoring, 2 chunks of 8 tokens
            fake(torch.empty(16, 8)), fake(torch.empty(20, 8)), fake(torch.zeros(16).long()),
            8, group, 40,
        )
        scorer._run = lambda bs: [
            scorer._score(b, fake(torch.empty(2, 1, b["tokens"].shape[1]))) for b in bs
        ]
        with pytest.raises(RuntimeError, match="numpy"):  # only the final read-back fails
            scorer.score(reqs)
    names = [name for name, _ in seen]
    assert names == ["all_reduce"] * 3 * 2 + ["all_reduce", "broadcast"]
    assert all(d == CUDA for _, devices in seen for d in devices) and seen


def test_nothing_to_evaluate_and_refusal_run_no_forward(tmp_path):
    """Every task too long for the sequence, or a cost above the bound: recorded and reported,
    and the model is never called (no rank enters a forward or a collective)."""
    from types import SimpleNamespace

    from megatron_longctx.eval.in_process import evaluate_in_process

    def never(requests):
        raise AssertionError("the model must not run")

    scorer = SimpleNamespace(seq_length=96, score=never)
    res = evaluate_in_process(scorer, ByteTokenizer(), {"tasks": ["needle"]}, str(tmp_path))
    assert res["refused"].startswith("nothing to evaluate: needle 96: context budget")
    assert "not run: nothing to evaluate" in (tmp_path / "report.md").read_text()
    scorer.seq_length = 2048
    res = evaluate_in_process(
        scorer, ByteTokenizer(), {"tasks": ["json_kv"], "max_forward_tokens": 100}, None
    )
    assert "exceed max_forward_tokens 100" in res["refused"] and res["cost"]["forward_tokens"] > 100
