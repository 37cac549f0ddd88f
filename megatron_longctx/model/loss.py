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

from collections import Counter

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


def _softmax_stats(logits: torch.Tensor, target: torch.Tensor, vocab_start: int, tp_group):
    """Turns one chunk's fp32 ``logits`` ``[c, V / TP]`` into ``exp(logits - max)`` in place and
    returns it with (log-sum-exp, target logit, max logit, sum-exp) ``[c]`` over the whole
    vocabulary: megatron's vocab-parallel steps, with two all-reduces over TP (the max; then the
    sum of exponentials and the target logit together). Dividing the result by sum-exp gives the
    softmax, as megatron's ``calculate_cross_entropy_loss`` does."""
    top = logits.max(dim=-1).values
    if tp_group is not None and dist.get_world_size(tp_group) > 1:
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=tp_group)
    predicted = _target_logits(logits, target, vocab_start)
    exp = logits.sub_(top.unsqueeze(1)).exp_()
    sums = torch.stack([exp.sum(dim=-1), predicted])
    if tp_group is not None and dist.get_world_size(tp_group) > 1:
        dist.all_reduce(sums, group=tp_group)
    sumexp, predicted = sums.select(0, 0), sums.select(0, 1)  # tensor methods: fake-CUDA safe
    return exp, top + torch.log(sumexp), predicted, top, sumexp


def _chunk_stats(
    hidden, weight, target, vocab_start: int, tp_group, vocab_size=None, greedy: bool = False
):
    """(log-sum-exp, target logit, greedy id or None) ``[c]`` of one chunk (see _softmax_stats);
    ids >= ``vocab_size`` (megatron's padding rows) are left out when it is given. With
    ``greedy``: the smallest id holding the maximum logit over the whole vocabulary
    (``torch.argmax``'s and greedy decoding's tie rule): each TP rank's first maximum,
    MIN-reduced over the ranks that hold the global maximum (one more all-reduce)."""
    logits = _chunk_logits(hidden, weight)
    if vocab_size is not None and vocab_start + logits.shape[1] > vocab_size:
        keep = max(0, vocab_size - vocab_start)
        logits.narrow(1, keep, logits.shape[1] - keep).fill_(float("-inf"))
    # first maximum per row (torch's tie rule), before _softmax_stats overwrites the logits
    local_top, local_first = logits.max(dim=-1) if greedy else (None, None)
    _, lse, predicted, top, _ = _softmax_stats(logits, target, vocab_start, tp_group)
    if not greedy:
        return lse, predicted, None
    none = torch.iinfo(torch.long).max
    greedy = torch.where(local_top == top, local_first + vocab_start, none)
    if tp_group is not None and dist.get_world_size(tp_group) > 1:
        dist.all_reduce(greedy, op=dist.ReduceOp.MIN, group=tp_group)
    return lse, predicted, greedy


def _vocab_start(weight: torch.Tensor, tp_group) -> int:
    rank = dist.get_rank(tp_group) if tp_group is not None else 0
    return rank * weight.shape[0]


def _chunk_grad(probs, target, vocab_start, scale, dtype) -> torch.Tensor:
    """The logit gradient of one chunk, ``(softmax - onehot) * scale`` in ``dtype``, from its
    softmax ``probs`` (fp32, overwritten)."""
    local = target - vocab_start
    inside = (local >= 0) & (local < probs.shape[1])
    rows = torch.arange(probs.shape[0], device=probs.device)[inside]
    probs[rows, local[inside]] -= 1.0
    return probs.mul_(scale.float().unsqueeze(1)).to(dtype)


def _weight_grad_into(acc: torch.Tensor, g: torch.Tensor, h: torch.Tensor) -> None:
    """``acc += g.T @ h`` (acc fp32 when the activations are narrower)."""
    if g.dtype == acc.dtype:
        acc.addmm_(g.t(), h)
    else:
        acc.add_(torch.matmul(g.t(), h))


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Per-token loss ``[N]`` (fp32) of ``hidden [N, h] @ weight.T`` against ``target [N]``.

    Megatron's numerics: logits in the activation dtype, softmax in fp32, the logit gradient cast
    back to the activation dtype before the two backward matmuls. The output-weight gradient is
    accumulated over chunks in fp32 (in the weight's dtype when that is fp32) and returned as the
    weight's autograd gradient, so megatron's DDP hook adds it into ``main_grad`` as it does for
    ColumnParallelLinear with ``gradient_accumulation_fusion=False``; a tied embedding receives it
    through the shared parameter like megatron's output layer.

    Two backward modes. Given ``mask`` (the loss mask, when gradients are wanted) the gradients
    are formed in forward while each chunk's logits exist (Liger's fused linear cross entropy):
    the training loss is ``sum(mask * loss)``, so the upstream gradient is ``mask * c`` and
    backward only scales by ``c`` (three matmuls, as megatron; kept until backward: the fp32
    weight-gradient accumulator and the hidden-state gradient). Backward checks that the upstream
    gradient has that form; otherwise (and without ``mask``) it recomputes each chunk's logits
    from the saved log-sum-exp (four matmuls, nothing kept but the log-sum-exp).
    ``backward_modes`` counts which mode each backward took (tests, benchmarks).
    """

    backward_modes: Counter = Counter()

    @staticmethod
    def forward(ctx, hidden, weight, target, chunk_tokens: int, tp_group, mask=None):
        vocab_start = _vocab_start(weight, tp_group)
        num = hidden.shape[0]
        losses = torch.empty(num, dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(losses)
        early = mask is not None and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1])
        grad_hidden = grad_weight = None
        if early:
            grad_hidden = torch.empty_like(hidden)
            grad_weight = torch.zeros(weight.shape, dtype=_acc_dtype(weight), device=weight.device)
        for i in range(0, num, chunk_tokens):
            c = slice(i, i + chunk_tokens)
            if not early:
                lse[c], predicted, _ = _chunk_stats(
                    hidden[c], weight, target[c], vocab_start, tp_group
                )
                losses[c] = lse[c] - predicted
                continue
            exp, lse[c], predicted, _, sum_exp = _softmax_stats(
                _chunk_logits(hidden[c], weight), target[c], vocab_start, tp_group
            )
            losses[c] = lse[c] - predicted
            probs = exp.div_(sum_exp.unsqueeze(1))  # one fp32 [c, V / TP] buffer throughout
            g = _chunk_grad(probs, target[c], vocab_start, mask[c], hidden.dtype)
            del exp, probs
            torch.matmul(g, weight, out=grad_hidden[c])
            _weight_grad_into(grad_weight, g, hidden[c])
            del g  # before the next chunk's logits: one [c, V / TP] buffer at a time
        ctx.save_for_backward(hidden, weight, target, lse, mask, grad_hidden, grad_weight)
        ctx.chunk_tokens, ctx.vocab_start, ctx.early = chunk_tokens, vocab_start, early
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        hidden, weight, target, lse, mask, grad_hidden, grad_weight = ctx.saved_tensors
        if ctx.early:
            k = torch.argmax(mask)  # a loss token (if any): c = grad / mask there
            scale = torch.where(mask[k] != 0, grad_losses[k].float() / mask[k], 0.0)
            if torch.equal(grad_losses.float(), mask * scale):  # one host sync
                ChunkedLinearCrossEntropy.backward_modes["early"] += 1
                grad_hidden.mul_(scale.to(grad_hidden.dtype))
                gw = grad_weight.mul_(scale).to(weight.dtype)
                return grad_hidden, gw, None, None, None, None
        ChunkedLinearCrossEntropy.backward_modes["recompute"] += 1
        chunk, vocab_start = ctx.chunk_tokens, ctx.vocab_start
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        want_weight = ctx.needs_input_grad[1]
        grad_weight = torch.zeros(weight.shape, dtype=_acc_dtype(weight), device=weight.device)
        for i in range(0, hidden.shape[0], chunk):
            c = slice(i, i + chunk)
            h = hidden[c]
            # softmax recomputed from the saved log-sum-exp, minus one at the target
            probs = _chunk_logits(h, weight).sub_(lse[c].unsqueeze(1)).exp_()
            g = _chunk_grad(probs, target[c], vocab_start, grad_losses[c], hidden.dtype)
            del probs
            if grad_hidden is not None:
                torch.matmul(g, weight, out=grad_hidden[c])
            if want_weight:
                _weight_grad_into(grad_weight, g, h)
            del g
        grad_weight = grad_weight.to(weight.dtype) if want_weight else None
        return grad_hidden, grad_weight, None, None, None, None


def _acc_dtype(weight: torch.Tensor) -> torch.dtype:
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def _enter_output_layer(hidden: torch.Tensor, sequence_parallel: bool, tp_group) -> torch.Tensor:
    """The hidden states as megatron's ColumnParallelLinear output layer sees them: gathered
    over TP under sequence parallelism (gradient reduce-scattered), else copied (gradient
    all-reduced)."""
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
    loss_mask: torch.Tensor | None = None,
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
        loss_mask: ``[b, s]``, when the training loss is ``sum(loss_mask * losses)`` times a
            scalar: the gradients are then formed in forward (no recompute; see
            ChunkedLinearCrossEntropy). Any other use of the losses stays exact (recompute).
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    full = _enter_output_layer(hidden, sequence_parallel, tp_group)
    s, b, h = full.shape
    if labels.shape != (b, s):
        raise ValueError(f"labels {tuple(labels.shape)} do not match hidden [s={s}, b={b}, h]")
    target = labels.transpose(0, 1).reshape(s * b)
    mask = None if loss_mask is None else loss_mask.transpose(0, 1).reshape(s * b).float()
    losses = ChunkedLinearCrossEntropy.apply(
        full.reshape(s * b, h), weight, target, chunk_tokens, tp_group, mask
    )
    return losses.view(s, b).transpose(0, 1).contiguous()


@torch.no_grad()
def token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_tokens: int,
    tp_group=None,
    vocab_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores tokens without materialising the logits (evaluation; no gradients).

    Args:
        hidden: final-norm hidden states ``[N, h]`` (or ``[..., h]``), all of this rank's tokens
            (gather sequence-parallel shards first).
        weight: this TP rank's output weight ``[V / TP, h]``.
        targets: token ids ``[N]`` (or ``[...]``, the shape of ``hidden`` without ``h``).
        chunk_tokens: tokens per chunk.
        tp_group: the tensor-parallel group (None: no TP); every TP rank must call this.
        vocab_size: the tokenizer's vocabulary: the padding rows megatron adds beyond it are
            left out of the softmax and the argmax (as in the HF export, which drops them);
            None scores over the padded vocabulary (as training does).

    Returns:
        ``(log p(target) fp32, target is the greedy token)``, both of the shape of ``targets``.
        The greedy token is the smallest id holding the maximum (ties as ``torch.argmax`` and
        transformers' greedy decoding resolve them).
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    shape = targets.shape
    flat_h, flat_t = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    vocab_start = _vocab_start(weight, tp_group)
    logp, hit = [], []  # concatenated at the end: no in-place writes (fake-CUDA safe)
    for i in range(0, flat_t.numel(), chunk_tokens):
        n = min(chunk_tokens, flat_t.numel() - i)  # narrow, not slicing: no host-side indexing
        target = flat_t.narrow(0, i, n)
        lse, predicted, greedy = _chunk_stats(
            flat_h.narrow(0, i, n), weight, target, vocab_start, tp_group, vocab_size, greedy=True
        )
        logp.append(predicted - lse)
        hit.append(greedy == target)
    return torch.cat(logp).view(shape), torch.cat(hit).view(shape)
