"""``make reproduce``'s stage 0 through the pipeline vs plain transformers, on the same work.

    python benchmarks/bench_stage0.py [--steps 60]

Stage 0 (S = 256, documents of 32-256 tokens, 8 samples per step, examples/reproduce_longctx.py)
is run by the trainer (torchrun, CPU, 1 thread per rank) on 1 rank with micro-batch 1 and 8 (all
8 samples packed into one THD micro-batch) and on 2 ranks with micro-batch 1 and 4; tok/s is the
median of metrics.jsonl's per-step figure after 5 warm-up steps. The baseline is
examples/reference_passkey_plain.py's stage-0 step (transformers LlamaForCausalLM, SDPA, torch
AdamW; one process, 1 thread against 1 rank, the faster of 1 and 2 threads against 2 ranks) on
the same documents per step (26 x 32 + 10 x 64 + 3 x 128 + 1 x 256 tokens, pre-generated), timed
in this process. Targets: packed micro-batches no slower per token than micro-batch 1; pipeline /
plain tok/s >= 0.8.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))


def pipeline_tok_s(steps: int, micro: int, nproc: int, root: Path) -> float:
    import reproduce_longctx as rep

    args = rep.parse_args(["--stage0-steps", str(steps), "--stage0-micro", str(micro),
                           "--nproc", str(nproc)])  # fmt: skip
    data_dir = root / "data"
    data = rep.write_data(data_dir, args) if not data_dir.exists() else _data(rep, data_dir, args)
    run = root / f"micro{micro}_nproc{nproc}"
    rep.launch(rep.recipe(args, "stage0", run, [rep.stage0(args, data)], 10**6), run, args)
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x]
    return statistics.median(r["tokens_per_s"] for r in records[5:])


def _data(rep, data_dir: Path, args):
    return rep.write_data(Path(tempfile.mkdtemp(dir=data_dir.parent)), args)


def plain_tok_s(steps: int, threads: int) -> float:
    """The reference's stage-0 step (forward, backward, AdamW) on pre-generated documents."""
    import numpy as np
    import reference_passkey_plain as plain
    import torch

    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    batches = [[plain.documents(rng, n, c) for n, c in plain.TOKEN_MIX] for _ in range(steps)]
    count = sum(c for _, c in plain.TOKEN_MIX)
    tokens = sum(n * c for n, c in plain.TOKEN_MIX)
    model = plain.build({"rope_theta": 1e4})
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.0)
    times = []
    for docs in batches:
        start = time.perf_counter()
        loss = sum(plain.answer_loss(model, d) * d.shape[0] for d in docs) / count
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
    return tokens / statistics.median(times[5:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=60)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        threads = {n: plain_tok_s(args.steps, n) for n in (1, 2)}
        best = max(threads.values())  # 2 threads can be slower on these tiny matmuls
        plain = {1: threads[1], 2: best}
        print(
            f"== stage 0, {args.steps} steps; baseline: plain transformers {threads[1]:.0f} tok/s "
            f"(1 thread), {threads[2]:.0f} tok/s (2 threads); 2-rank runs are compared with the "
            f"faster =="
        )
        base = {}
        for micro, nproc in ((1, 1), (8, 1), (1, 2), (4, 2)):
            tok_s = pipeline_tok_s(args.steps, micro, nproc, root)
            base.setdefault(nproc, tok_s)
            print(
                f"pipeline micro-batch {micro} ({nproc} rank(s), 1 thread each): {tok_s:8.0f} "
                f"tok/s, {tok_s / base[nproc]:.2f}x micro-batch 1, {tok_s / plain[nproc]:.2f}x "
                f"plain transformers",
                flush=True,
            )


if __name__ == "__main__":
    main()
