"""Train the tiny Llama on synthetic tokens with megatron-core (a smoke test of the model stack).

    torchrun --standalone --nproc-per-node 2 tools/train_synthetic.py --tensor-model-parallel-size 2

Synthetic data: a fixed random "language" where token t+1 = (a * t + b) mod V for a few (a, b)
rules chosen per sequence, so the loss falls quickly when the model learns.
"""

from __future__ import annotations

import argparse
import logging

import torch


def synthetic_batch(g: torch.Generator, micro: int, seq: int, vocab: int) -> dict:
    rules = torch.tensor([[3, 1], [5, 7], [7, 3]])
    pick = rules[torch.randint(0, len(rules), (micro,), generator=g)]
    start = torch.randint(0, vocab, (micro, 1), generator=g)
    toks = [start]
    for _ in range(seq):
        toks.append((toks[-1] * pick[:, :1] + pick[:, 1:]) % vocab)
    t = torch.cat(toks, dim=1)
    return dict(
        tokens=t[:, :-1],
        labels=t[:, 1:],
        loss_mask=torch.ones(micro, seq),
        position_ids=torch.arange(seq).expand(micro, seq),
    )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--seq-length", type=int, default=64)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--num-micro-batches", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-3)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from megatron_longctx.model.build import build_gpt_model
    from megatron_longctx.model.config import get_preset
    from megatron_longctx.parallel.layout import ParallelLayout
    from megatron_longctx.runtime.distributed import initialize
    from megatron_longctx.training.setup import (
        OptimizerSettings,
        build_optimizer,
        build_scheduler,
        wrap_ddp,
    )
    from megatron_longctx.training.step import forward_backward

    layout = ParallelLayout(args.tensor_model_parallel_size, args.pipeline_model_parallel_size)
    cfg = get_preset("tiny")
    initialize(layout)  # process group (gloo on CPU) + megatron groups + seeds
    world = torch.distributed.get_world_size()
    dp = layout.validate(
        world_size=world,
        num_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups,
        seq_length=args.seq_length,
    )
    chunks = wrap_ddp([build_gpt_model(cfg, layout, seq_length=args.seq_length)])
    settings = OptimizerSettings(lr=args.lr, min_lr=args.lr / 10)
    opt = build_optimizer(chunks, settings)
    sched = build_scheduler(opt, settings, total_steps=args.steps, warmup_ratio=0.1)
    from megatron.core import parallel_state

    g = torch.Generator().manual_seed(1000 + parallel_state.get_data_parallel_rank())
    rank = torch.distributed.get_rank()
    for step in range(1, args.steps + 1):
        batches = [
            synthetic_batch(g, args.micro_batch_size, args.seq_length, cfg.vocab_size)
            for _ in range(args.num_micro_batches)
        ]
        res = forward_backward(
            chunks,
            batches,
            seq_length=args.seq_length,
            micro_batch_size=args.micro_batch_size,
            optimizer=opt,
        )
        _, grad_norm, _ = opt.step()
        sched.step(1)
        if rank == world - 1:
            print(
                f"step {step:3d}  loss {res.loss:.4f}  grad_norm {grad_norm:.3f}  "
                f"lr {opt.param_groups[0]['lr']:.2e}  (TP {layout.tensor_model_parallel_size}, "
                f"DP {dp}, tokens {res.num_tokens})",
                flush=True,
            )
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
