"""Hot-path host syncs (issue 20, defect 9): THD RoPE and the CP split of a 512K ShortMix batch.

    python benchmarks/bench_rope_thd.py [--tokens 524288] [--heads 1] [--repeats 3]

Baseline and candidate are timed in the same run. A 512K packed sequence of ShortMix-like
documents (lengths 50-2,000 tokens, ~500 documents).
Per call of RoPE on one of q / k (megatron calls it twice per layer): time and the number of
device-to-host reads (``.tolist()`` / ``.item()`` / a tensor in an ``if``, counted with a
TorchFunctionMode; each one is a GPU sync) of megatron-core 0.16.1's unfused THD RoPE against
model/rope_thd.py's, at CP 1 and CP 8, with the ratio measured in the same run. Then the host time
of training.batch.to_model_batch (pad every document, zigzag split) for the same micro-batch.
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.overrides import TorchFunctionMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SYNCS = {torch.Tensor.tolist, torch.Tensor.item, torch.Tensor.__bool__}


class CountSyncs(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.count = 0
        self.ops = 0  # torch calls: a proxy for kernel launches on a GPU

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        if func in SYNCS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def short_mix(tokens: int, seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    docs, left = [], tokens
    while left > 0:
        n = min(left, int(rng.integers(50, 2000)))
        docs.append(n)
        left -= n
    return docs


def timed(fn, repeats):
    best, counter = float("inf"), CountSyncs()
    for i in range(repeats):
        t0 = time.perf_counter()
        if i == 0:
            with counter:
                fn()
        else:
            fn()
        best = min(best, time.perf_counter() - t0)
    return best, counter


def main() -> None:
    from megatron.core.models.common.embeddings import rope_utils

    from megatron_longctx.model import rope_thd
    from megatron_longctx.testing.distributed import FakeGroup
    from megatron_longctx.training.batch import to_model_batch

    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=524288)
    p.add_argument("--heads", type=int, default=1)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(1)
    megatron_thd = rope_thd.ORIGINAL or rope_utils._apply_rotary_pos_emb_thd
    docs = short_mix(args.tokens)
    print(f"{args.tokens} tokens, {len(docs)} documents, heads {args.heads}, dim {args.dim}")
    for cp in (1, 8):
        padded = [n + (-n) % (2 * cp) for n in docs]
        cu = torch.tensor(np.concatenate([[0], np.cumsum(padded)]), dtype=torch.int32)
        freqs = torch.randn(max(padded), 1, 1, args.dim)
        t = torch.randn(int(cu[-1]) // cp, args.heads, args.dim)
        group = FakeGroup(cp, cp // 2)
        ref = partial(megatron_thd, t, cu, freqs, cp_group=group)
        new = partial(rope_thd.apply_rotary_pos_emb_thd, t, cu, freqs, cp_group=group)
        ref_s, ref_syncs = timed(ref, args.repeats)
        new_s, new_syncs = timed(new, args.repeats)
        same = torch.equal(ref(), new())
        print(
            f"CP {cp}: megatron {1e3 * ref_s:.1f} ms, {ref_syncs.count} host syncs and "
            f"{ref_syncs.ops} torch calls per call; rope_thd {1e3 * new_s:.1f} ms, "
            f"{new_syncs.count} syncs, {new_syncs.ops} torch calls; ratio {ref_s / new_s:.1f}x; "
            f"identical {same}"
        )
    micro = {
        "tokens": torch.zeros(1, args.tokens, dtype=torch.long),
        "labels": torch.zeros(1, args.tokens, dtype=torch.long),
        "loss_mask": torch.ones(1, args.tokens),
        "position_ids": torch.arange(args.tokens)[None],
        "cu_seqlens": torch.tensor(np.concatenate([[0], np.cumsum(docs)])),
    }
    for cp in (1, 8):
        s, _ = timed(partial(to_model_batch, micro, cp, 0), args.repeats)
        print(f"to_model_batch (host, before the copy to the GPU) CP {cp}: {1e3 * s:.1f} ms")


if __name__ == "__main__":
    main()
