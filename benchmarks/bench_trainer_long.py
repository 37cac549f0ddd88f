"""The trainer at 64K tokens per sequence on CPU: CP 1 (one process) and CP 2 ring (two processes).

    python benchmarks/bench_trainer_long.py [--seq-length 65536] [--steps 2] [--cp 1 2] \
        [--vocab 512] [--loss-chunk-tokens N]  # issue 28: --vocab 128256, 0 = megatron's loss
        [--precision fp32 bf16]  # issue 26: the recipes' bf16 vs fp32, ratio in the same run

Runs ``python -m torch.distributed.run ... -m megatron_longctx.train`` (the user's command) with
the tiny model (examples/tiny_test.yaml's model) on a generated corpus: long documents of 64K-96K
tokens (ProLong's long bucket, min_tokens = the sequence length) and short ones of 20-2,000 tokens,
mixed 50/50, one sequence per step. Prints tok/s (rank 0's metrics.jsonl, the steps after the
first) and the peak RSS of every rank (psutil, sampled every 0.2 s; target <= 3 GiB per rank).
Baseline for scale: the dense kernel this replaced could not allocate past ~8K tokens
(issue 19's table: 10.6 GB at 8K). With ``--precision fp32 bf16`` each configuration runs in both
(bf16: megatron's Float16OptimizerWithFloat16Params, fp32 main copies) and the bf16 / fp32 tok/s
and peak-RSS ratios are printed (CPU bf16 matmuls are not the GPU's: a report, no target).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIG = """
name: bench_long
seed: 3
model: {{preset: tiny, vocab_size: {vocab}, num_layers: 2}}
data: {{cache_dir: "{run}/cache"}}
checkpoint: {{save_dir: "{run}/checkpoints", interval: 1000, keep_last: 1}}
logging: {{run_dir: "{run}", interval: 1, wandb_mode: disabled}}
training: {{bf16: {bf16}}}
stages:
  - name: long
    seq_length: {seq}
    rope_theta: 8.0e6
    global_batch_size: 1
    micro_batch_size: 1
    lr: 1.0e-4
    steps: {steps}
    loss_chunk_tokens: {chunk}
    parallel:
      tensor_model_parallel_size: 1
      pipeline_model_parallel_size: 1
      context_parallel_size: {cp}
    mixture:
      seed: 1
      components:
        - {{name: long, prefixes: ["{data}/long"], weight: 0.5, min_tokens: {seq}}}
        - {{name: short, prefixes: ["{data}/short"], weight: 0.5}}
"""


def _corpus(root: Path, seq: int, vocab: int = 512) -> None:
    import numpy as np

    from megatron_longctx.testing.data import write_indexed

    rng = np.random.default_rng(0)
    write_indexed(root / "long", rng.integers(seq, seq + seq // 2, 6).tolist(), vocab, 0)
    write_indexed(root / "short", rng.integers(20, 2000, 400).tolist(), vocab, 1)


def _run(
    cp: int, seq: int, steps: int, root: Path, vocab: int = 512, chunk=None, bf16: bool = False
) -> dict:
    run = root / f"cp{cp}_chunk{chunk}_{'bf16' if bf16 else 'fp32'}"
    cfg = run / "config.yaml"
    run.mkdir(parents=True)
    chunk = "null" if chunk is None else chunk
    cfg.write_text(
        CONFIG.format(run=run, data=root / "data", seq=seq, steps=steps, cp=cp, vocab=vocab,
                      chunk=chunk, bf16=str(bf16).lower())  # fmt: skip
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", LONGCTX_DEVICE="cpu", WANDB_MODE="disabled")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={cp}", "-m", "megatron_longctx.train", "--config",
           str(cfg)]  # fmt: skip
    with open(run / "out.log", "w") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        peaks: dict[int, float] = {}
        start = time.perf_counter()
        while proc.poll() is None:
            try:
                for child in psutil.Process(proc.pid).children(recursive=True):
                    rss = child.memory_info().rss / 2**30
                    peaks[child.pid] = max(peaks.get(child.pid, 0.0), rss)
            except psutil.Error:
                pass
            time.sleep(0.2)
        wall = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"CP {cp} run failed; see {run / 'out.log'}:\n"
                           + (run / "out.log").read_text()[-3000:])  # fmt: skip
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x]
    later = records[1:] or records
    ranks = sorted(peaks.values(), reverse=True)[:cp]  # the trainer ranks are the largest
    return {
        "tok_s": sum(r["tokens_per_s"] for r in later) / len(later),
        "steps": len(records),
        "loss": [round(r["loss"], 4) for r in records],
        "peak_rss_gib": ranks,
        "wall_s": wall,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-length", type=int, default=65536)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--cp", type=int, nargs="+", default=[1, 2])
    p.add_argument("--vocab", type=int, default=512, help="model vocabulary (Llama 3: 128256)")
    p.add_argument(
        "--loss-chunk-tokens", type=int, nargs="+", default=[None],
        help="stages.0.loss_chunk_tokens values to run (0: megatron's loss; default the rule's)",
    )  # fmt: skip
    p.add_argument("--precision", nargs="+", choices=("fp32", "bf16"), default=["fp32"])
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _corpus(root / "data", args.seq_length, args.vocab)
        print(
            f"== trainer, tiny model (2 layers), seq_length {args.seq_length}, vocab "
            f"{args.vocab:,}, CPU, 1 thread per rank =="
        )
        for cp, chunk in [(cp, c) for cp in args.cp for c in args.loss_chunk_tokens]:
            results = {}
            for precision in args.precision:
                r = results[precision] = _run(
                    cp, args.seq_length, args.steps, root, args.vocab, chunk, precision == "bf16"
                )
                _report(cp, chunk, precision, r)
            if len(results) == 2:
                bf16, fp32 = results["bf16"], results["fp32"]
                print(
                    f"CP {cp}: bf16 / fp32 tok/s {bf16['tok_s'] / fp32['tok_s']:.2f}x, peak RSS "
                    f"{max(bf16['peak_rss_gib']) / max(fp32['peak_rss_gib']):.2f}x",
                    flush=True,
                )


def _report(cp: int, chunk, precision: str, r: dict) -> None:
    worst = max(r["peak_rss_gib"])
    loss_path = f"loss_chunk_tokens {'auto' if chunk is None else chunk}"
    print(
        f"CP {cp} {precision} {loss_path}: {r['steps']} steps, {r['tok_s']:.0f} tok/s, "
        f"losses {r['loss']}, "
        f"peak RSS per rank {', '.join(f'{x:.2f}' for x in r['peak_rss_gib'])} GiB "
        f"(target <= 3: {'ok' if worst <= 3 else 'OVER'}), wall {r['wall_s']:.0f} s",
        flush=True,
    )


if __name__ == "__main__":
    main()
