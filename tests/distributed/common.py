"""Shared pieces of the distributed tests: deterministic batches and a sharded-vs-full runner."""

from __future__ import annotations

import torch


def make_batches(
    num_micro: int, micro_batch: int, seq: int, vocab: int, seed: int = 0
) -> list[dict]:
    """Random next-token batches; loss_mask zeroes a few tokens (a non-trivial token average)."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(num_micro):
        t = torch.randint(0, vocab, (micro_batch, seq + 1), generator=g)
        mask = (torch.rand(micro_batch, seq, generator=g) > 0.2).float()
        batches.append(
            dict(
                tokens=t[:, :-1].contiguous(),
                labels=t[:, 1:].contiguous(),
                loss_mask=mask,
                position_ids=torch.arange(seq).expand(micro_batch, seq),
            )
        )
    return batches


def build(model_cfg, layout, seed: int, seq: int):
    """Initialises megatron groups for ``layout``, builds the model chunk and wraps it in DDP."""
    from megatron.core import tensor_parallel

    from megatron_longctx.model.build import build_gpt_model
    from megatron_longctx.runtime.distributed import initialize_model_parallel
    from megatron_longctx.training.setup import wrap_ddp

    initialize_model_parallel(layout)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)
    model = build_gpt_model(model_cfg, layout, seq_length=seq)
    return wrap_ddp([model])


def reference_loss_and_grads(model_cfg, full_params: dict, batches: list[dict], tp: int = 1):
    """Dense single-process reference: one unsharded GPTModel (TP=PP=1 groups of this rank), the
    plain mean over every loss token of all micro-batches, torch autograd. No DDP, no schedule."""
    from megatron.core import parallel_state

    from megatron_longctx.model.build import build_gpt_model
    from megatron_longctx.model.full_state import load_full
    from megatron_longctx.parallel.layout import ParallelLayout
    from megatron_longctx.runtime.distributed import initialize_model_parallel

    world = torch.distributed.get_world_size()
    # Megatron pads the vocabulary to a multiple of divisible_by x TP and the padded logits take
    # part in the softmax: give the reference the same padded size as the sharded model.
    model_cfg = model_cfg.with_updates(
        make_vocab_size_divisible_by=model_cfg.make_vocab_size_divisible_by * tp
    )
    layout = ParallelLayout(1, 1, 1)
    initialize_model_parallel(layout)
    assert parallel_state.get_data_parallel_world_size() == world
    model = build_gpt_model(model_cfg, layout, seq_length=batches[0]["tokens"].shape[1])
    load_full(model, full_params)
    total, count = 0.0, 0.0
    for b in batches:
        losses = model(b["tokens"], b["position_ids"], None, labels=b["labels"])
        total = total + (losses.float() * b["loss_mask"]).sum()
        count += b["loss_mask"].sum().item()
    loss = total / count
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return loss.item(), grads


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()
