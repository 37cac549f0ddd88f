"""The passkey study of ``reproduce_longctx.py`` in plain PyTorch: the side-by-side reference.

    python examples/reference_passkey_plain.py                 # ~2.5 min on 2 CPU cores
    python examples/reference_passkey_plain.py --mix per-step --seed 1

Issue 11 asks that a difference between the project's pipeline and a plain reference be treated as
a bug to find. This script is that reference, outside the pipeline: transformers'
``LlamaForCausalLM`` (SDPA attention), one process, ``torch.optim.AdamW``, no Megatron, no packing,
no context parallelism. It shares only the task definition (``passkey_document`` /
``eval_prompts``) and the settings of ``reproduce_longctx.py`` (model shape, arms, lengths, stage-0
token shares, imported from it so the two cannot drift apart), so the two runs differ only in the
training machinery:

- stage 0 at RoPE theta 1e4 with documents of 32/64/128/256 tokens (``--mix tokens``: each step
  holds the pipeline's 26/10/3/1 documents, its 0.4/0.3/0.2/0.1 token shares; ``--mix per-step``:
  one length per step, 16 documents), 1,500 steps, LR 2e-3, warm-up then cosine to 10%;
- one extension per RoPE arm from the same weights: 100 steps of 8 documents of 1,024 tokens,
  LR 3e-4 constant (the pipeline warms up and decays), Adam betas (0.9, 0.95), no weight decay;
- greedy exact-match accuracy of the 5 digits at 256 / 512 / 1,024 / 2,048 tokens.

Prints one table row per model, like ``results.md``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from reproduce_longctx import (  # noqa: E402
    ARMS,
    EVAL_LENGTHS,
    EXT_LENGTH,
    MODEL,
    STAGE0_LENGTHS,
    VOCAB,
    parse_args,
    weights,
)

from megatron_longctx.eval.passkey import NUM_DIGITS, eval_prompts, passkey_document  # noqa: E402

# the pipeline's defaults: stage-0 samples of 256 tokens, token shares per document length
_DEFAULTS = parse_args([])
STAGE0_TOKENS = _DEFAULTS.stage0_batch * STAGE0_LENGTHS[-1]
# (length, documents per step) with the pipeline's token shares: 26/10/3/1 at the defaults
TOKEN_MIX = tuple(
    (n, max(1, round(w * STAGE0_TOKENS / n))) for n, w in zip(STAGE0_LENGTHS, weights(_DEFAULTS))
)
# the long-only arms (the short-mix arm needs packing, which this reference leaves out)
PLAIN_ARMS = {name: rope for name, (_, rope, share) in ARMS.items() if share == 1.0}


def build(rope: dict):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=MODEL["vocab_size"],
        hidden_size=MODEL["hidden_size"],
        intermediate_size=MODEL["ffn_hidden_size"],
        num_hidden_layers=MODEL["num_layers"],
        num_attention_heads=MODEL["num_attention_heads"],
        num_key_value_heads=MODEL["num_query_groups"],
        max_position_embeddings=2 * EVAL_LENGTHS[-1],
        tie_word_embeddings=False,
        attn_implementation="sdpa",
        **rope,
    )
    return LlamaForCausalLM(cfg)


def answer_loss(model, tokens: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the 5 answer digits (predicted one position earlier)."""
    logits = model(input_ids=tokens).logits[:, -NUM_DIGITS - 1 : -1, :]
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), tokens[:, -NUM_DIGITS:].reshape(-1)
    )


@torch.no_grad()
def accuracy(model, length: int, samples: int, seed: int = 0) -> float:
    model.eval()
    tokens, answers = eval_prompts(length, samples, VOCAB, seed)
    correct = 0
    for i in range(0, samples, 10):
        pred = model(input_ids=tokens[i : i + 10]).logits[:, -NUM_DIGITS - 1 : -1].argmax(-1)
        correct += int((pred == answers[i : i + 10]).all(dim=1).sum())
    model.train()
    return correct / samples


def documents(rng, length: int, count: int) -> torch.Tensor:
    return torch.from_numpy(
        np.stack([passkey_document(rng, length, VOCAB)[0] for _ in range(count)])
    )


def stage0(args, rng):
    model = build({"rope_theta": 1e4})
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    for step in range(args.stage0_steps):
        warm = min(1.0, (step + 1) / max(1, args.stage0_steps // 20))
        cos = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / args.stage0_steps))
        for g in opt.param_groups:
            g["lr"] = args.lr * warm * cos
        if args.mix == "per-step":
            loss = answer_loss(model, documents(rng, int(rng.choice(STAGE0_LENGTHS)), 16))
        else:
            n = sum(c for _, c in TOKEN_MIX)
            loss = sum(answer_loss(model, documents(rng, n_, c)) * c for n_, c in TOKEN_MIX) / n
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def extend(args, rng, state: dict, rope: dict):
    model = build(rope)
    model.load_state_dict(state)
    opt = torch.optim.AdamW(model.parameters(), lr=args.ext_lr, betas=(0.9, 0.95), weight_decay=0.0)
    for _ in range(args.ext_steps):
        loss = answer_loss(model, documents(rng, EXT_LENGTH, args.ext_batch))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mix", choices=("tokens", "per-step"), default="tokens")
    p.add_argument("--stage0-steps", type=int, default=_DEFAULTS.stage0_steps)
    p.add_argument("--lr", type=float, default=_DEFAULTS.stage0_lr)
    p.add_argument("--ext-steps", type=int, default=_DEFAULTS.ext_steps)
    p.add_argument("--ext-batch", type=int, default=_DEFAULTS.ext_batch)
    p.add_argument("--ext-lr", type=float, default=_DEFAULTS.ext_lr)
    p.add_argument("--eval-samples", type=int, default=_DEFAULTS.eval_samples)
    p.add_argument("--arms", default=",".join(PLAIN_ARMS))
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    model = stage0(args, rng)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    table = {"stage0": {n: accuracy(model, n, args.eval_samples) for n in EVAL_LENGTHS}}
    for arm in [a for a in args.arms.split(",") if a]:
        ext = extend(args, rng, state, PLAIN_ARMS[arm])
        table[arm] = {n: accuracy(ext, n, args.eval_samples) for n in EVAL_LENGTHS}
    print(
        f"| plain reference (seed {args.seed}, mix {args.mix}) | "
        + " | ".join(f"@{n}" for n in EVAL_LENGTHS)
        + " |"
    )
    for name, row in table.items():
        print(f"| {name} | " + " | ".join(f"{row[n]:.2f}" for n in EVAL_LENGTHS) + " |")
    print(f"[reference] {time.perf_counter() - t0:.0f}s", flush=True)
    return table


if __name__ == "__main__":
    main()
