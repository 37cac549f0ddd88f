"""Model FLOPs per token by Megatron-LM's formula, with the document-masked attention term.

Megatron (megatron/training/training.py ``num_floating_point_operations``) counts, per token and for
forward + backward (x3 of the forward's 2 FLOPs per multiply-add):

    6 * N_matmul + 6 * L * d_q * S          (causal attention over one sequence of S tokens)

where ``N_matmul`` are the weights that multiply activations (Q, K, V, O projections with GQA's
smaller K/V, the three SwiGLU matrices, the output layer; not the input embedding or norms) and
``d_q = heads x head_dim``. Causal attention computes S^2/2 query-key pairs per sequence, each
costing 2 x 2 x d_q forward FLOPs (scores and weighted values), so S/2 pairs per token x 12 d_q
= 6 d_q S.

With document masks attention never crosses documents: a sequence packing documents of lengths L_i
has sum(L_i^2)/2 pairs, so the attention term per token becomes ``6 * L * d_q * sum(L_i^2) / S``.

These are *model* FLOPs: activation recompute is not counted (MFU convention). Published check
(LONGCTX_FACTS.md): Llama-3-8B gives 51.5 GFLOP/token at 8K, 96.6 at 64K, 457 at 512K.
"""

from __future__ import annotations

from collections.abc import Sequence

from megatron_longctx.model.config import ModelConfig


def matmul_parameters(model: ModelConfig, padded_vocab_size: int | None = None) -> int:
    """Weights that multiply activations once per token (Megatron's N_matmul).

    Args:
        model: the model.
        padded_vocab_size: the output layer's rows; default Megatron's padding at TP 1.

    Returns:
        Q/K/V/O projections (GQA) + SwiGLU gate/up/down per layer, times layers, plus the output
        layer (counted even when tied: the logits are still computed).
    """
    h, f = model.hidden_size, model.ffn_hidden_size
    d_q = model.num_attention_heads * model.head_dim
    d_kv = model.num_query_groups * model.head_dim
    vocab = padded_vocab_size or model.padded_vocab_size(1)
    per_layer = h * (d_q + 2 * d_kv) + d_q * h + 3 * h * f
    return model.num_layers * per_layer + vocab * h


def linear_pairs_per_token(model: ModelConfig) -> float:
    """One token's matmul work in attention score pairs: 6 N_matmul / (12 L d_q) (~28,600 for
    Llama-3-8B); the weight of linear against attention work in the balance model
    (parallel/units.py)."""
    return matmul_parameters(model) / (
        2.0 * model.num_layers * model.num_attention_heads * model.head_dim
    )


def attention_pairs_per_token(seq_length: int, doc_lengths: Sequence[int] | None = None) -> float:
    """Causal query-key pairs per token, Megatron's S/2 (or sum(L_i^2) / (2 S) with documents).

    Args:
        seq_length: tokens in the packed sequence S.
        doc_lengths: lengths of the documents packed into it (must sum to S); None = one document.

    Raises:
        ValueError: lengths that are not positive or do not sum to ``seq_length``.
    """
    if seq_length < 1:
        raise ValueError(f"seq_length must be >= 1, got {seq_length}")
    if doc_lengths is None:
        return seq_length / 2
    lengths = [int(n) for n in doc_lengths]
    if any(n < 1 for n in lengths):
        raise ValueError(f"document lengths must be >= 1, got {lengths[:8]}...")
    if sum(lengths) != seq_length:
        raise ValueError(
            f"document lengths sum to {sum(lengths)} but seq_length is {seq_length}: "
            "pass the lengths of every document (and padding) in the packed sequence"
        )
    return sum(n * n for n in lengths) / (2 * seq_length)


def flops_per_token(
    model: ModelConfig,
    seq_length: int,
    doc_lengths: list[int] | None = None,
    *,
    padded_vocab_size: int | None = None,
) -> float:
    """Model FLOPs (forward + backward) per trained token, Megatron's formula.

    Args:
        model: the model (GQA and SwiGLU sizes are read from it).
        seq_length: tokens per packed sequence S.
        doc_lengths: document lengths in the sequence for the document-masked attention term
            (sum must equal ``seq_length``); None = causal attention over the whole sequence.
        padded_vocab_size: output-layer rows; default ``model.padded_vocab_size(1)``.

    Returns:
        ``6 * N_matmul + 12 * L * d_q * pairs_per_token``, i.e. ``6 N + 6 L d_q S`` without
        documents and ``6 N + 6 L d_q sum(L_i^2) / S`` with them.
    """
    d_q = model.num_attention_heads * model.head_dim
    pairs = attention_pairs_per_token(seq_length, doc_lengths)
    return 6.0 * matmul_parameters(model, padded_vocab_size) + 12.0 * model.num_layers * d_q * pairs


def attention_flops_per_token(
    model: ModelConfig, seq_length: int, doc_lengths: list[int] | None = None
) -> float:
    """The attention (score and value) part of ``flops_per_token`` alone."""
    d_q = model.num_attention_heads * model.head_dim
    return 12.0 * model.num_layers * d_q * attention_pairs_per_token(seq_length, doc_lengths)


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops_total: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak of all GPUs used.

    Args:
        tokens_per_s: trained tokens per second for the whole job.
        flops_per_token: from ``flops_per_token`` (model FLOPs; recompute not counted).
        peak_flops_total: peak dense FLOP/s of one GPU x number of GPUs.

    Returns:
        A fraction in [0, 1] for a plausible measurement.
    """
    if peak_flops_total <= 0:
        raise ValueError(f"peak_flops_total must be > 0, got {peak_flops_total}")
    if tokens_per_s < 0 or flops_per_token < 0:
        raise ValueError(
            f"tokens_per_s {tokens_per_s} and flops_per_token {flops_per_token} must be >= 0"
        )
    return tokens_per_s * flops_per_token / peak_flops_total
