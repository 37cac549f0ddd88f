"""Passkey retrieval at tiny scale: the synthetic domain and the greedy exact-match accuracy grid.

A passkey document of ``n`` tokens (``n >= 13``)::

    filler[:depth]  KEY  d1 d2 d3 d4 d5  filler[depth:]  QUERY  d1 d2 d3 d4 d5

(5 digits by default, ``num_digits`` otherwise: ``make demo`` uses 2, which its tiny model learns
in a few hundred steps; with 5, the digits after the first need an induction circuit that takes
~1,000 steps, docs/REPRODUCE_RESULTS.md).

Filler tokens are uniform over ``[FILLER_LOW, vocab_size)``; the 5 digits are ids ``DIGIT0 ..
DIGIT0 + 9``; the key block sits at a uniformly random depth. The stored loss mask is 1 only on the
5 answer digits, so training (through ``mask_prefixes`` of a mixture component) puts the loss only
on the answer, like the plain-PyTorch reference of issue 11.

Documents are written with megatron-core's own ``IndexedDatasetBuilder`` as ``{prefix}.bin/.idx``
(tokens) and ``{prefix}_mask.bin/.idx`` (the parallel 0/1 mask). A component whose documents all
have one length ``L`` dividing the pack length ``S`` tiles its samples exactly (packing lays the
shuffled documents back to back), so no passkey is ever cut across two samples.

Evaluation runs in one process (world size 1) on the project's GPTModel with the full weights of a
checkpoint, built with the RoPE (theta / scaling) stored in the checkpoint's ``state["model"]``.
Greedy decoding of the 5 digits equals teacher forcing here: the greedy output matches all 5 digits
iff the argmax at each answer position (given the correct earlier digits) is the right digit, so
one forward pass per prompt scores it exactly.

Scoring goes through the chunked loss path (``ChunkedLossGPTModel.token_scores``, model/loss.py):
per position, whether the next token is the argmax over the real vocabulary, without writing the
``[b, L, V]`` logits. Shapes: tokens ``[b, L]``; hits ``[b, L]``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

DIGIT0 = 1  # digit k is token DIGIT0 + k
KEY = 11
QUERY = 12
FILLER_LOW = 13
NUM_DIGITS = 5
MIN_LENGTH = 2 * NUM_DIGITS + 3


def passkey_document(
    rng: np.random.Generator,
    length: int,
    vocab_size: int,
    depth: float | None = None,
    num_digits: int = NUM_DIGITS,
) -> tuple[np.ndarray, np.ndarray]:
    """One passkey document and its loss mask.

    Args:
        rng: numpy generator.
        length: total tokens (>= MIN_LENGTH).
        vocab_size: filler ids are drawn from ``[FILLER_LOW, vocab_size)``.
        depth: key position as a fraction of the filler, or None for uniform.
        num_digits: digits of the passkey.

    Returns:
        ``(tokens int64 [length], mask uint16 [length])`` with mask 1 on the answer digits.
    """
    if length < 2 * num_digits + 3:
        raise ValueError(f"a passkey document needs >= {2 * num_digits + 3} tokens, got {length}")
    num_filler = length - 2 * num_digits - 2
    filler = rng.integers(FILLER_LOW, vocab_size, num_filler)
    digits = rng.integers(0, 10, num_digits) + DIGIT0
    at = int(rng.integers(0, num_filler + 1)) if depth is None else round(depth * num_filler)
    tokens = np.concatenate([filler[:at], [KEY], digits, filler[at:], [QUERY], digits])
    mask = np.zeros(length, dtype=np.uint16)
    mask[-num_digits:] = 1
    return tokens.astype(np.int64), mask


def write_passkey_dataset(
    prefix: str | Path, lengths: list[int], vocab_size: int, seed: int, num_digits: int = NUM_DIGITS
) -> tuple[str, str]:
    """Writes passkey documents of the given lengths as indexed datasets (megatron's builder).

    Returns:
        ``(token_prefix, mask_prefix)`` for a mixture component's ``prefixes`` / ``mask_prefixes``.
    """
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = str(prefix)
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    mask_prefix = prefix + "_mask"
    rng = np.random.default_rng(seed)
    tok_b = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    mask_b = IndexedDatasetBuilder(mask_prefix + ".bin", dtype=np.uint16)
    for n in lengths:
        tokens, mask = passkey_document(rng, int(n), vocab_size, num_digits=num_digits)
        tok_b.add_document(torch.from_numpy(tokens), [int(n)])
        mask_b.add_document(torch.from_numpy(mask.astype(np.int64)), [int(n)])
    tok_b.finalize(prefix + ".idx")
    mask_b.finalize(mask_prefix + ".idx")
    return prefix, mask_prefix


def eval_prompts(
    length: int,
    num_samples: int,
    vocab_size: int,
    seed: int,
    num_digits: int = NUM_DIGITS,
    max_depth: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``num_samples`` documents of ``length`` tokens with depths evenly spread over
    ``[0, max_depth]`` (``max_depth`` 0.25: the key is in the first quarter, so the query must reach
    back at least three quarters of the context).

    Returns:
        ``(tokens int64 [n, length], answers int64 [n, num_digits])``.
    """
    rng = np.random.default_rng([seed, length])
    depths = max_depth * (np.arange(num_samples) + 0.5) / num_samples
    docs = [passkey_document(rng, length, vocab_size, float(d), num_digits)[0] for d in depths]
    tokens = torch.from_numpy(np.stack(docs))
    return tokens, tokens[:, -num_digits:].clone()


def init_single_process() -> None:
    """torch.distributed (gloo, world 1) + megatron groups for TP = PP = CP = 1. Idempotent."""
    from megatron.core import parallel_state, tensor_parallel

    from megatron_longctx.parallel.layout import ParallelLayout
    from megatron_longctx.runtime.distributed import initialize_model_parallel
    from megatron_longctx.runtime.spawn import free_port, init_local_rank

    init_local_rank(0, 1, free_port())
    if not parallel_state.model_parallel_is_initialized():
        initialize_model_parallel(ParallelLayout())
        tensor_parallel.model_parallel_cuda_manual_seed(0)  # megatron's attention forks this RNG


def load_model(ckpt_dir: str | Path, attention: str = "megatron"):
    """The checkpoint's model on one process, with the checkpoint's own RoPE settings.

    Args:
        ckpt_dir: a complete checkpoint (``iter_NNNNNNN``) in the project format.
        attention: "megatron" (megatron's DotProductAttention: batched causal softmax) or "local"
            (the project's document-masked kernel, which flattens a batch into one sequence).

    Returns:
        ``(model in eval mode, ModelConfig)``.
    """
    from megatron_longctx.checkpoint.dist import load_checkpoint, read_state
    from megatron_longctx.model.build import build_gpt_model
    from megatron_longctx.model.config import ModelConfig
    from megatron_longctx.parallel.layout import ParallelLayout

    init_single_process()
    raw = dict(read_state(ckpt_dir)["state"]["model"])
    cfg = ModelConfig(**raw)
    model = build_gpt_model(
        cfg,
        ParallelLayout(),
        backend="local",
        core_attention=None if attention == "megatron" else "local",
        seq_length=cfg.max_position_embeddings,
    )
    load_checkpoint(ckpt_dir, [model], expect_model=cfg.to_dict())
    return model.eval(), cfg


@torch.no_grad()
def passkey_accuracy(
    model,
    vocab_size: int,
    length: int,
    num_samples: int,
    seed: int = 0,
    batch_size: int = 8,
    num_digits: int = NUM_DIGITS,
    max_depth: float = 1.0,
) -> float:
    """Greedy exact-match accuracy of the digits over ``num_samples`` prompts of ``length``
    (key depths in ``[0, max_depth]``, see :func:`eval_prompts`)."""
    tokens, _ = eval_prompts(length, num_samples, vocab_size, seed, num_digits, max_depth)
    correct = 0
    for start in range(0, num_samples, batch_size):
        x = tokens[start : start + batch_size]
        b = x.shape[0]
        pos = torch.arange(length).expand(b, length)
        # the prediction of answer digit i sits one position before it: score each position's
        # next token through the chunked loss path (model/loss.py), never writing [b, L, V] logits
        targets = torch.roll(x, -1, dims=1)
        _, hit = model.token_scores(
            targets, vocab_size=vocab_size, input_ids=x, position_ids=pos, attention_mask=None
        )
        correct += int(hit[:, length - num_digits - 1 : length - 1].all(dim=1).sum())
    return correct / num_samples


def accuracy_grid(
    ckpt_dir: str | Path,
    lengths: list[int],
    num_samples: int,
    seed: int = 0,
    batch_size: int = 8,
    num_digits: int = NUM_DIGITS,
    max_depth: float = 1.0,
) -> dict:
    """Accuracy per length for one checkpoint, plus the RoPE it was evaluated with."""
    model, cfg = load_model(ckpt_dir)
    acc = {
        int(n): passkey_accuracy(
            model, cfg.vocab_size, int(n), num_samples, seed, batch_size, num_digits, max_depth
        )
        for n in lengths
    }
    return {
        "checkpoint": str(ckpt_dir),
        "rope_theta": cfg.rope_theta,
        "rope_scaling": cfg.rope_scaling,
        "accuracy": acc,
    }
