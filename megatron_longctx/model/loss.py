"""The output layer and the vocab-parallel cross entropy, chunk by chunk of tokens.

Megatron's path (``GPTModel._postprocess``: ``output_layer`` then ``vocab_parallel_cross_entropy``)
writes the logits ``[tokens, V / TP]`` and keeps their fp32 softmax for backward: 1.5 MB per token
per TP rank with Llama-3's 128,256-token vocabulary, 47 GiB at 64K tokens. Here the projection and
the loss run over chunks of ``chunk_tokens`` tokens (ProLong's ``LOGIT_BLOCK_SIZE``, Liger's fused
linear cross entropy): forward keeps only the per-token loss and log-sum-exp; backward recomputes
each chunk's logits to form the gradients of the hidden states and of the output weight. At most one
chunk's logits (and its fp32 copy) exist at a time.

Tensor parallelism is megatron's vocab-parallel rule: each rank holds rows
``[rank * V / TP, (rank + 1) * V / TP)`` of the output weight, and the max, the sum of exponentials
and the target logit are all-reduced over the TP group (megatron/core/tensor_parallel/
cross_entropy.py). The hidden states enter as megatron's ColumnParallelLinear takes them: gathered
over TP with sequence parallelism (reduce-scattered gradient), else copied (all-reduced gradient).

Legend: hidden ``[s, b, h]`` (megatron's activations; ``[s / TP, b, h]`` with sequence
parallelism), labels and per-token losses ``[b, s]``, the output weight ``[V / TP, h]``; inside the
autograd function tokens are flattened ``s``-major: ``[N = s * b, h]``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """fp32 logits ``[c, V / TP]`` of one chunk: the matmul in the activation dtype, then the
    fp32 copy, as megatron's output layer + ``vocab_parallel_cross_entropy`` do."""
    return torch.matmul(hidden, weight.t()).float()


def _target_logits(logits: torch.Tensor, target: torch.Tensor, vocab_start: int) -> torch.Tensor:
    """This rank's logit of each target ``[c]`` (0 where the target lives on another rank)."""
    local = target - vocab_start
    inside = (local >= 0) & (local < logits.shape[-1])
    picked = logits.gather(1, local.clamp(0, logits.shape[-1] - 1).unsqueeze(1)).squeeze(1)
    return torch.where(inside, picked, torch.zeros_like(picked))


def _chunk_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    vocab_start: int,
    tp_group,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log-sum-exp, target logit, max logit) ``[c]`` fp32 over the whole vocabulary of one chunk.

    Two all-reduces per chunk over TP (max; then sum-exp and target logit together)."""
    logits = _chunk_logits(hidden, weight)
    top = logits.max(dim=-1).values
    if tp_group is not None and dist.get_world_size(tp_group) > 1:
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=tp_group)
    predicted = _target_logits(logits, target, vocab_start)
    logits.sub_(top.unsqueeze(1)).exp_()
    sums = torch.stack([logits.sum(dim=-1), predicted])
    del logits
    if tp_group is not None and dist.get_world_size(tp_group) > 1:
        dist.all_reduce(sums, group=tp_group)
    return top + torch.log(sums[0]), sums[1], top


def _vocab_start(weight: torch.Tensor, tp_group) -> int:
    rank = dist.get_rank(tp_group) if tp_group is not None else 0
    return rank * weight.shape[0]


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Per-token loss ``[N]`` (fp32) of ``hidden [N, h] @ weight.T`` against ``target [N]``.

    Megatron's numerics: logits in the activation dtype, softmax in fp32, the logit gradient cast
    back to the activation dtype before the two backward matmuls. The output-weight gradient is
    accumulated over chunks in fp32 (in the weight's dtype when that is fp32) and returned as the
    weight's autograd gradient, so megatron's DDP hook adds it into ``main_grad`` as it does for
    ColumnParallelLinear with ``gradient_accumulation_fusion=False``; a tied embedding receives it
    through the shared parameter like megatron's output layer.
    """

    @staticmethod
    def forward(ctx, hidden, weight, target, chunk_tokens: int, tp_group):
        vocab_start = _vocab_start(weight, tp_group)
        num = hidden.shape[0]
        losses = torch.empty(num, dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(losses)
        for i in range(0, num, chunk_tokens):
            c = slice(i, i + chunk_tokens)
            lse[c], predicted, _ = _chunk_stats(
                hidden[c], weight, target[c], vocab_start, tp_group
            )
            losses[c] = lse[c] - predicted
        ctx.save_for_backward(hidden, weight, target, lse)
        ctx.chunk_tokens, ctx.vocab_start = chunk_tokens, vocab_start
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        hidden, weight, target, lse = ctx.saved_tensors
        chunk, vocab_start = ctx.chunk_tokens, ctx.vocab_start
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        want_weight = ctx.needs_input_grad[1]
        acc_dtype = torch.float32 if weight.dtype != torch.float64 else weight.dtype
        grad_weight = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device)
        rows = torch.arange(min(chunk, hidden.shape[0]), device=hidden.device)
        for i in range(0, hidden.shape[0], chunk):
            c = slice(i, i + chunk)
            h = hidden[c]
            # softmax recomputed from the saved log-sum-exp, minus one at the target
            probs = _chunk_logits(h, weight).sub_(lse[c].unsqueeze(1)).exp_()
            local = target[c] - vocab_start
            inside = (local >= 0) & (local < weight.shape[0])
            r = rows[: h.shape[0]][inside]
            probs[r, local[inside]] -= 1.0
            probs.mul_(grad_losses[c].float().unsqueeze(1))
            g = probs.to(hidden.dtype)
            del probs
            if grad_hidden is not None:
                torch.matmul(g, weight, out=grad_hidden[c])
            if want_weight:
                if g.dtype == acc_dtype:
                    grad_weight.addmm_(g.t(), h)
                else:
                    grad_weight.add_(torch.matmul(g.t(), h))
        grad_weight = grad_weight.to(weight.dtype) if want_weight else None
        return grad_hidden, grad_weight, None, None, None


def _enter_output_layer(hidden: torch.Tensor, sequence_parallel: bool, tp_group) -> torch.Tensor:
    """The hidden states as megatron's ColumnParallelLinear output layer sees them: gathered over
    TP under sequence parallelism (gradient reduce-scattered), else copied (gradient all-reduced)."""
    from megatron.core.tensor_parallel.mappings import (
        copy_to_tensor_model_parallel_region,
        gather_from_sequence_parallel_region,
    )

    if tp_group is None or dist.get_world_size(tp_group) == 1:
        return hidden
    if sequence_parallel:
        return gather_from_sequence_parallel_region(
            hidden, tensor_parallel_output_grad=True, group=tp_group
        )
    return copy_to_tensor_model_parallel_region(hidden, group=tp_group)


def chunked_language_model_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_tokens: int,
    *,
    tp_group=None,
    sequence_parallel: bool = False,
) -> torch.Tensor:
    """Per-token losses ``[b, s]`` (fp32), what megatron's ``compute_language_model_loss`` returns.

    Args:
        hidden: final-norm hidden states ``[s, b, h]`` (``[s / TP, b, h]`` with sequence
            parallelism).
        weight: this TP rank's output weight ``[V / TP, h]`` (the embedding's when tied).
        labels: target ids ``[b, s]``.
        chunk_tokens: tokens per chunk (>= 1).
        tp_group: the tensor-parallel group (None: no TP).
        sequence_parallel: ``hidden`` is sharded over TP along ``s``.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    full = _enter_output_layer(hidden, sequence_parallel, tp_group)
    s, b, h = full.shape
    if labels.shape != (b, s):
        raise ValueError(f"labels {tuple(labels.shape)} do not match hidden [s={s}, b={b}, h]")
    target = labels.transpose(0, 1).reshape(s * b)
    losses = ChunkedLinearCrossEntropy.apply(
        full.reshape(s * b, h), weight, target, chunk_tokens, tp_group
    )
    return losses.view(s, b).transpose(0, 1).contiguous()


@torch.no_grad()
def token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_tokens: int,
    tp_group=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores tokens without materialising the logits (evaluation; no gradients).

    Args:
        hidden: final-norm hidden states ``[N, h]`` (or ``[..., h]``), all of this rank's tokens
            (gather sequence-parallel shards first).
        weight: this TP rank's output weight ``[V / TP, h]``.
        targets: token ids ``[N]`` (or ``[...]``, the shape of ``hidden`` without ``h``).
        chunk_tokens: tokens per chunk.
        tp_group: the tensor-parallel group (None: no TP); every TP rank must call this.

    Returns:
        ``(log p(target) fp32, target is the argmax)``, both of the shape of ``targets``. The
        argmax test is ``target logit >= max logit`` over the (padded) vocabulary, so a tie counts
        as a hit.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    shape = targets.shape
    flat_h, flat_t = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    vocab_start = _vocab_start(weight, tp_group)
    logp = torch.empty(flat_t.shape, dtype=torch.float32, device=hidden.device)
    hit = torch.empty(flat_t.shape, dtype=torch.bool, device=hidden.device)
    for i in range(0, flat_t.numel(), chunk_tokens):
        c = slice(i, i + chunk_tokens)
        lse, predicted, top = _chunk_stats(flat_h[c], weight, flat_t[c], vocab_start, tp_group)
        logp[c], hit[c] = predicted - lse, predicted >= top
    return logp.view(shape), hit.view(shape)
