"""Ring-attention throughput at sequence length S over CP GPUs (GPU only; untested on GPU).

    torchrun --nproc-per-node 8 tools/bench_attention.py --seq-length 524288 [--heads 32] \
        [--kv-heads 8] [--head-dim 128] [--iters 5]

Each rank holds S / CP tokens (one document, zigzag chunks) of one layer's q, k, v in bf16 and
times forward + backward of the project's ring attention; reports per-layer time and attention
TFLOP/s per GPU (Megatron's causal count: 6 x S^2 / 2 x 2 x heads x head_dim per layer, / CP).
Exits with a message when CUDA is unavailable. Untested on GPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def main(argv: list[str] | None = None) -> int:
    """Runs the benchmark; returns the exit status."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-length", type=int, required=True)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--iters", type=int, default=5)
    args = p.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print(
            "bench_attention.py needs CUDA GPUs (run it under torchrun on a GPU node); "
            "no CUDA device found",
            file=sys.stderr,
        )
        return 2
    try:
        from megatron_longctx.model.attention.blocks import CPLayout
        from megatron_longctx.model.attention.ring import ring_attention
    except ImportError as err:
        print(f"the project's ring attention is not importable: {err}", file=sys.stderr)
        return 2
    import torch.distributed as dist

    dist.init_process_group("nccl")
    rank, cp = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    s = args.seq_length
    if s % (2 * cp):
        print(f"--seq-length {s} is not divisible by 2 x CP = {2 * cp}", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    cu = [0, s]
    layout = CPLayout(cu, cu, cp)
    t = s // cp
    q = torch.randn(
        t, args.heads, args.head_dim, device=dev, dtype=torch.bfloat16, requires_grad=True
    )
    k, v = (
        torch.randn(
            t, args.kv_heads, args.head_dim, device=dev, dtype=torch.bfloat16, requires_grad=True
        )
        for _ in range(2)
    )
    group = dist.group.WORLD if cp > 1 else None
    scale = args.head_dim**-0.5

    def step():
        out = ring_attention(q, k, v, layout, scale, group)
        out.float().sum().backward()

    step()  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.iters):
        step()
    torch.cuda.synchronize()
    per_iter = (time.perf_counter() - start) / args.iters
    flops = 6 * s * s / 2 * 2 * args.heads * args.head_dim / cp
    if rank == 0:
        print(
            f"S={s:,} CP={cp}: {per_iter * 1e3:.1f} ms per layer fwd+bwd, "
            f"{flops / per_iter / 1e12:.1f} attention TFLOP/s per GPU"
        )
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
