"""The chunked output layer + loss (model/loss.py) against megatron's unchunked path.

One 2-process gloo launch runs every case in turn (parallel_state is re-initialised between them):

* model level: the same weights and batches through ``forward_backward`` with megatron's
  ``output_layer`` + ``vocab_parallel_cross_entropy`` (``loss_chunk_tokens=None``) and with the
  chunked loss at chunk sizes that do and do not divide the rank's token count (and one larger
  than it): the global token-averaged loss (loss mask with zeros) and every parameter gradient
  (``main_grad``: output weight, tied embedding, every layer through the hidden-state gradient)
  at TP 1 (DP 2), TP 2, TP 2 + sequence parallelism, CP 2 (packed THD batch, ring attention) and
  PP 2, untied and tied embeddings, fp32; and bf16 parameters at TP 2 + SP;
* function level (TP 2 + sequence parallelism): loss, hidden-state and output-weight gradients of
  ``chunked_language_model_loss`` vs megatron's ColumnParallelLinear + vocab_parallel_cross_entropy
  in fp32 and bf16, both backward modes (gradients formed in forward for the masked-sum loss;
  recomputed logits otherwise), and ``token_logprobs`` vs a dense fp64 log-softmax of the
  gathered logits;
  ``ChunkedLossGPTModel.token_scores`` vs megatron's logits at every single-stage layout above.

Replaced to run on CPU: NCCL by gloo (the CPU shim of runtime/); the matmuls are torch's CPU ones.
"""

from __future__ import annotations

import pytest
import torch

from megatron_longctx.model.loss import ChunkedLinearCrossEntropy
from megatron_longctx.testing.distributed import run_distributed
from tests.distributed.common import make_batches

SEQ, MICRO, NUM_MICRO = 24, 2, 2  # 48 tokens per micro-batch and rank (24 under CP 2 or SP 2)


def _model_run(layout, preset, chunk, params, batches, packed=False, dtype=torch.float32):
    """(loss, full grads, full params) of one forward_backward with ``loss_chunk_tokens=chunk``."""
    from megatron.core import parallel_state, tensor_parallel

    from megatron_longctx.model.build import build_gpt_model
    from megatron_longctx.model.config import get_preset
    from megatron_longctx.model.full_state import gather_full, load_full
    from megatron_longctx.parallel.cp_split import cp_split, packed_seq_params_for_rank
    from megatron_longctx.runtime.distributed import initialize_model_parallel
    from megatron_longctx.training.setup import wrap_ddp
    from megatron_longctx.training.step import forward_backward

    initialize_model_parallel(layout)
    tensor_parallel.model_parallel_cuda_manual_seed(5)
    torch.manual_seed(5)
    seq = batches[0]["tokens"].shape[1]
    model = build_gpt_model(
        get_preset(preset),
        layout,
        backend="local",
        core_attention="ring" if packed else None,
        seq_length=seq,
        loss_chunk_tokens=chunk,
        params_dtype=dtype,
    )
    if params is not None:
        load_full(model, params)
    model.config.variable_seq_lengths = layout.pipeline_model_parallel_size > 1
    logits_written = []  # megatron's output layer must run only on the unchunked path
    if model.post_process:
        model.output_layer.register_forward_hook(lambda *a: logits_written.append(1))
    chunks = wrap_ddp([model])
    if packed:
        cp, rank = layout.context_parallel_size, parallel_state.get_context_parallel_rank()
        local = []
        for b in batches:
            part = cp_split(b, cp, rank)
            part["packed_seq_params"] = packed_seq_params_for_rank(
                part, parallel_state.get_context_parallel_group()
            )
            local.append(part)
        batches = local
        seq = batches[0]["tokens"].shape[1]
    modes = dict(ChunkedLinearCrossEntropy.backward_modes)
    result = forward_backward(
        chunks, batches, seq_length=seq, micro_batch_size=batches[0]["tokens"].shape[0]
    )
    if model.post_process:
        assert bool(logits_written) == (chunk is None), (chunk, len(logits_written))
        # training takes the gradients-in-forward mode (the loss is the masked sum)
        early = ChunkedLinearCrossEntropy.backward_modes["early"] - modes.get("early", 0)
        assert early == (0 if chunk is None else len(batches)), (chunk, early)
        assert ChunkedLinearCrossEntropy.backward_modes["recompute"] == modes.get("recompute", 0)
    if chunk is None and model.post_process and model.pre_process and dtype == torch.float32:
        _check_token_scores(model, batches[0])
    return result.loss, gather_full(chunks[0], "grad"), gather_full(chunks[0], "param")


def _check_token_scores(model, batch):
    """``token_scores`` (chunked, no logits) vs megatron's logits, gathered over TP, in fp64."""
    from megatron.core import parallel_state

    inputs = dict(input_ids=batch["tokens"], position_ids=batch["position_ids"])
    inputs.update(attention_mask=None, packed_seq_params=batch.get("packed_seq_params"))
    with torch.no_grad():
        logp, hit = model.token_scores(batch["labels"], chunk_tokens=5, **inputs)
        logits = model(**inputs)  # [b, s, V / TP]
    tp = parallel_state.get_tensor_model_parallel_group()
    shards = [torch.empty_like(logits) for _ in range(torch.distributed.get_world_size(tp))]
    torch.distributed.all_gather(shards, logits.contiguous(), group=tp)
    dense = torch.cat(shards, dim=-1).double().log_softmax(-1)
    want = dense.gather(-1, batch["labels"].unsqueeze(-1)).squeeze(-1)
    assert _rel(logp, want) <= 1e-6, _rel(logp, want)
    assert torch.equal(hit, dense.argmax(-1) == batch["labels"])
    if batch["labels"].max() < 300:  # without megatron's padding rows (ids >= 300), as HF scores
        with torch.no_grad():
            logp, hit = model.token_scores(
                batch["labels"], chunk_tokens=5, vocab_size=300, **inputs
            )
        real = torch.cat(shards, dim=-1)[..., :300].double().log_softmax(-1)
        want = real.gather(-1, batch["labels"].unsqueeze(-1)).squeeze(-1)
        assert _rel(logp, want) <= 1e-6, _rel(logp, want)
        assert torch.equal(hit, real.argmax(-1) == batch["labels"])


def _packed_batches(seed: int) -> list[dict]:
    from megatron_longctx.parallel.cp_split import pad_documents_for_cp

    g = torch.Generator().manual_seed(seed)
    out = []
    for lengths in ([13, 3, 20], [9, 27]):
        s = sum(lengths)
        t = torch.randint(0, 500, (1, s + 1), generator=g)
        batch = dict(
            tokens=t[:, :-1],
            labels=t[:, 1:],
            loss_mask=(torch.rand(1, s, generator=g) > 0.2).float(),
            position_ids=torch.arange(s).unsqueeze(0),
            cu_seqlens=torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()]).int(),
        )
        out.append(pad_documents_for_cp(batch, 2, pad_to=40, sharding="document"))
    return out


def _model_cases(rank):
    from megatron_longctx.parallel.layout import ParallelLayout as L

    out = {}
    plain = make_batches(NUM_MICRO, MICRO, SEQ, 300, seed=3)
    for name, layout, preset, batches, packed in (
        ("tp1_dp2", L(1, 1, 1), "tiny", plain, False),
        ("tp2_tied", L(2, 1, 1), "tiny-mha", plain, False),
        ("tp2_sp", L(2, 1, 1, sequence_parallel=True), "tiny", plain, False),
        ("cp2", L(1, 1, 2), "tiny", _packed_batches(4), True),
        ("pp2_tied", L(1, 2, 1), "tiny-mha", plain, False),
    ):
        ref_loss, ref_grads, params = _model_run(layout, preset, None, None, batches, packed)
        # 7 divides no token count here; 8 divides 48, 24 and 40; 1000 is one partial chunk
        sizes = {"tp1_dp2": (7, 8, 1000), "tp2_sp": (7, 8), "cp2": (7, 8)}.get(name, (7,))
        for chunk in sizes:
            loss, grads, _ = _model_run(layout, preset, chunk, params, batches, packed)
            out[f"{name}_chunk{chunk}"] = (loss, ref_loss, _errors(grads, ref_grads))
    # bf16 parameters and activations (the GPU recipes' dtype), TP 2 + SP
    layout, bf16 = L(2, 1, 1, sequence_parallel=True), torch.bfloat16
    ref_loss, ref_grads, params = _model_run(layout, "tiny", None, None, plain, dtype=bf16)
    loss, grads, _ = _model_run(layout, "tiny", 7, params, plain, dtype=bf16)
    out["bf16_tp2_sp_chunk7"] = (loss, ref_loss, _errors(grads, ref_grads))
    return out


def _errors(got: dict, want: dict) -> dict:
    assert got.keys() == want.keys(), sorted(set(got) ^ set(want))
    assert all(bool(v.abs().max() > 0) for v in want.values())  # every gradient is exercised
    return {
        k: float((got[k] - v).abs().max() / v.abs().max().clamp(min=1e-30)) for k, v in want.items()
    }


def _function_cases(rank):
    """TP 2 + SP: the chunked function vs megatron's layer and loss, fp32 and bf16."""
    from megatron.core import parallel_state, tensor_parallel

    from megatron_longctx.model.build import build_gpt_model
    from megatron_longctx.model.config import get_preset
    from megatron_longctx.model.loss import chunked_language_model_loss, token_logprobs
    from megatron_longctx.parallel.layout import ParallelLayout
    from megatron_longctx.runtime.distributed import initialize_model_parallel

    layout = ParallelLayout(2, 1, 1, sequence_parallel=True)
    initialize_model_parallel(layout)
    tensor_parallel.model_parallel_cuda_manual_seed(5)
    model = build_gpt_model(get_preset("tiny"), layout, backend="local", seq_length=32)
    tp = parallel_state.get_tensor_model_parallel_group()
    s, b, h = 15, 2, 64  # 30 tokens: chunks of 4 and 7 leave a remainder, 30 divides
    g = torch.Generator().manual_seed(11 + rank)  # each rank holds its own sequence shard
    out = {}
    for dtype, chunks in ((torch.float32, (4, 7, 30)), (torch.bfloat16, (7,))):
        weight = model.output_layer.weight.detach().to(dtype).requires_grad_()
        hid = torch.randn(s, b, h, generator=g).to(dtype)
        labels_full = torch.randint(0, 512, (b, 2 * s), generator=torch.Generator().manual_seed(2))
        upstream = torch.rand(b, 2 * s, generator=torch.Generator().manual_seed(3))
        upstream[:, ::5] = 0.0  # a loss mask
        # megatron: ColumnParallelLinear (SP gather inside) + vocab_parallel_cross_entropy
        ref_h = hid.clone().requires_grad_()
        logits, _ = model.output_layer(ref_h, weight=weight)
        ref = tensor_parallel.vocab_parallel_cross_entropy(logits, labels_full.t().contiguous()).t()
        (ref * upstream).sum().backward()
        ref_w, weight.grad = weight.grad, None
        # without a mask, and with one the upstream gradient is not proportional to: recompute
        for chunk, mask in [(c, None) for c in chunks] + [(7, (upstream > 0).float())]:
            got_h = hid.clone().requires_grad_()
            before = ChunkedLinearCrossEntropy.backward_modes["recompute"]
            loss = chunked_language_model_loss(
                got_h, weight, labels_full, chunk, tp_group=tp, sequence_parallel=True,
                loss_mask=mask,
            )  # fmt: skip
            (loss * upstream).sum().backward()
            assert ChunkedLinearCrossEntropy.backward_modes["recompute"] == before + 1
            out[f"fn_{dtype}_chunk{chunk}_mask{mask is not None}"] = (
                _rel(loss, ref),
                _rel(got_h.grad, ref_h.grad),
                _rel(weight.grad, ref_w),
            )
            weight.grad = None
        # the training loss: c * sum(mask * losses): gradients formed in forward
        mask = (upstream > 0).float()
        ref_h.grad = None
        logits, _ = model.output_layer(ref_h, weight=weight)
        ref = tensor_parallel.vocab_parallel_cross_entropy(logits, labels_full.t().contiguous()).t()
        (0.37 * (ref * mask).sum()).backward()
        ref_w, weight.grad = weight.grad, None
        got_h = hid.clone().requires_grad_()
        before = ChunkedLinearCrossEntropy.backward_modes["early"]
        loss = chunked_language_model_loss(
            got_h, weight, labels_full, 7, tp_group=tp, sequence_parallel=True, loss_mask=mask
        )
        (0.37 * (loss * mask).sum()).backward()
        assert ChunkedLinearCrossEntropy.backward_modes["early"] == before + 1
        out[f"fn_{dtype}_early"] = (
            _rel(loss, ref),
            _rel(got_h.grad, ref_h.grad),
            _rel(weight.grad, ref_w),
        )
        weight.grad = None
    # token_logprobs vs dense fp64 log-softmax of the gathered logits (TP ranks: the same tokens)
    weight, g = model.output_layer.weight.detach(), torch.Generator().manual_seed(13)
    hid, targets = torch.randn(37, h, generator=g), torch.randint(0, 512, (37,), generator=g)
    logp, hit = token_logprobs(hid, weight, targets, 8, tp)
    shards = [torch.empty_like(weight) for _ in range(2)]
    torch.distributed.all_gather(shards, weight, group=tp)
    dense = (hid.double() @ torch.cat(shards).double().t()).log_softmax(-1)
    out["logprobs"] = (_rel(logp, dense.gather(1, targets[:, None])[:, 0].float()), 0.0, 0.0)
    hit_ref = dense.argmax(-1) == targets
    targets[:5] = dense.argmax(-1)[:5]  # some certain hits
    _, hit5 = token_logprobs(hid, weight, targets, 8, tp)
    out["argmax"] = (float((hit != hit_ref).sum() + (~hit5[:5]).sum()), 0.0, 0.0)
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


def _worker(rank, world):
    return {**_model_cases(rank), **_function_cases(rank)}


@pytest.mark.timeout(240)
def test_chunked_loss_equals_megatron():
    results = run_distributed(_worker, 2, timeout=220)
    for rank, out in enumerate(results):
        for name, value in out.items():
            if name.startswith("fn_"):
                tol = 1e-6 if "float32" in name else 1e-2  # bf16: a few roundings of 2^-8
                assert max(value) <= tol, (rank, name, value)
            elif name in ("logprobs", "argmax"):
                assert value[0] <= 1e-6, (rank, name, value)
            else:
                loss, ref_loss, errs = value
                tol_loss, tol_grad = (1e-3, 3e-2) if name.startswith("bf16") else (1e-6, 1e-6)
                assert loss == pytest.approx(ref_loss, rel=tol_loss), (rank, name, loss, ref_loss)
                worst = max(errs, key=errs.get)
                assert errs[worst] <= tol_grad, (rank, name, worst, errs[worst])
