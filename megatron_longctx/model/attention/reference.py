"""The tests' oracle: plain causal attention per document, straight from the document boundaries.

Shares no code with the kernels or the block descriptions: it loops over documents of the
whole (pre-CP) padded sequence, takes each document's real tokens, and runs textbook softmax
attention with a lower-triangular mask (GQA by repeating K/V heads). Padding rows get output 0.
Differentiable; use fp64 inputs for a reference. Runs on q's device (the mask is made there), and
only with ops that fake CUDA tensors support (``narrow``, no indexing), so gpu_check can rehearse
its CUDA legs on CPU. O(document length^2) memory per document: tests
and small benchmarks only.

Shape legend (THD): q ``[s, hq, d]``, k / v ``[s, hk, d]`` in the padded layout
(``cu_padded[-1] == s``), output ``[s, hq, d]``.
"""

from __future__ import annotations

import torch


def document_causal_attention(q, k, v, cu_padded, cu_real, scale: float) -> torch.Tensor:
    """Causal attention within each document's real tokens; padding rows are 0.

    Args:
        q, k, v: the whole padded sequence, ``[s, hq, d]`` / ``[s, hk, d]``.
        cu_padded: cumulative padded document lengths (list or tensor), ending at s.
        cu_real: cumulative real lengths; document i's real tokens are the first
            ``cu_real[i + 1] - cu_real[i]`` of its padded span.
        scale: softmax scale.
    """
    cu_p = [int(x) for x in cu_padded]
    cu_r = [int(x) for x in cu_real]
    group = q.shape[1] // k.shape[1]
    pieces = []
    for i in range(len(cu_p) - 1):
        start, padded, real = cu_p[i], cu_p[i + 1] - cu_p[i], cu_r[i + 1] - cu_r[i]
        qi = q.narrow(0, start, real).transpose(0, 1)  # [hq, n, d]
        ki = k.narrow(0, start, real).repeat_interleave(group, dim=1).transpose(0, 1)
        vi = v.narrow(0, start, real).repeat_interleave(group, dim=1).transpose(0, 1)
        scores = qi @ ki.transpose(1, 2) * scale  # [hq, n, n]
        future = torch.ones(real, real, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
        pieces.append((torch.softmax(scores, dim=-1) @ vi).transpose(0, 1))
        pieces.append(q.new_zeros(padded - real, q.shape[1], v.shape[2]))
    return torch.cat(pieces) if pieces else q.new_zeros(0, q.shape[1], v.shape[2])
