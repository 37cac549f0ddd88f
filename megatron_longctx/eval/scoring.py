"""Token scoring from megatron's vocab-parallel output: log-probability and greedy correctness.

THE SEAM (issue 28): every in-process evaluation scores tokens through :func:`score_tokens` and
nothing else. Today it takes the model's vocab-parallel logits; when the chunked linear
cross-entropy lands (it never materialises ``[tokens x vocab]`` logits), swap this one function's
body (and ``eval/megatron_model.py``'s ``_forward_step``, which asks the model for logits) for it.

Shapes: ``logits [t, V_local]`` on TP rank r hold global vocabulary ids ``[r V_local, (r+1)
V_local)`` (megatron's ``parallel_output=True``); ids ``>= vocab_size`` are megatron's vocabulary
padding and are excluded, so the scores are those of the real vocabulary (what transformers sees
in an HF export). Greedy ties resolve to the smallest id, like ``torch.argmax`` / HF's greedy
decoding.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

#: tokens scored per block: bounds the fp32 temporaries to ``CHUNK x V_local``
CHUNK = 4096


def _reduce(tensor: torch.Tensor, op, group) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


@torch.no_grad()
def score_tokens(
    logits: torch.Tensor,
    targets: torch.Tensor,
    vocab_size: int,
    tp_group=None,
    chunk: int = CHUNK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each target and whether it is the greedy (argmax) token.

    Collective over ``tp_group`` (every TP rank calls it with its shard of the same tokens).

    Args:
        logits: ``[t, V_local]`` this TP rank's vocabulary shard (any float dtype; fp32 math).
        targets: ``[t]`` global token ids.
        vocab_size: the real vocabulary size (padding ids beyond it are never chosen).
        tp_group: the tensor-parallel group (None or size 1: the logits are the whole vocabulary).
        chunk: tokens per block.

    Returns:
        ``(logprob [t] float32, is_argmax [t] bool)``, identical on every TP rank.
    """
    tp_rank = dist.get_rank(tp_group) if tp_group is not None else 0
    v_local = logits.shape[-1]
    start = tp_rank * v_local
    # the ids of this shard, made from the logits (on their device, no host factory)
    ids = logits.new_ones(v_local, dtype=torch.long).cumsum(0) + (start - 1)
    padding = ids >= vocab_size
    out_lp, out_hit = [], []
    # tensor methods only (narrow / select / unsqueeze, no Python indexing): the fake-CUDA
    # NCCL-rule test runs this on tensors that Python indexing cannot touch
    for a in range(0, logits.shape[0], chunk):
        n = min(chunk, logits.shape[0] - a)
        x = logits.narrow(0, a, n).float().masked_fill(padding, float("-inf"))
        tgt = targets.narrow(0, a, n).long()
        local_max = x.max(dim=-1).values
        gmax = _reduce(local_max.clone(), dist.ReduceOp.MAX, tp_group)
        mine = (tgt >= start) & (tgt < start + v_local)
        picked = x.gather(1, (tgt - start).clamp(0, v_local - 1).unsqueeze(1)).squeeze(1)
        # [sum exp(x - max), target logit] reduced together: one collective
        sumexp = torch.exp(x - gmax.unsqueeze(1)).sum(-1)
        stats = _reduce(torch.stack([sumexp, torch.where(mine, picked, 0.0)]), dist.ReduceOp.SUM,
                        tp_group)
        # smallest id holding the maximum (ties like torch.argmax)
        big = torch.iinfo(torch.long).max
        at_max = x == gmax.unsqueeze(1)
        first = torch.where(at_max, ids, torch.full_like(ids, big)).min(dim=-1).values
        first = _reduce(first, dist.ReduceOp.MIN, tp_group)
        out_lp.append(stats.select(0, 1) - gmax - torch.log(stats.select(0, 0)))
        out_hit.append(first == tgt)
    if not out_lp:
        empty = logits.new_zeros(0, dtype=torch.float32)
        return empty, empty.bool()
    return torch.cat(out_lp), torch.cat(out_hit)
