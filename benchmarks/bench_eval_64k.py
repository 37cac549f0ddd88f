"""The stage-end in-process evaluation at 64K tokens: the tiny curriculum on 2 CPU processes.

    python benchmarks/bench_eval_64k.py [--seq-length 65536] [--cp 2]

Runs the user's command (``python -m torch.distributed.run ... -m megatron_longctx.train``) for one
training step at ``--seq-length`` with CP 2 (ring), tiny model (2 layers), ``eval: true``; the stage
end evaluates in-process at the full length (needle at depth 0.5, JSON KV and one held-out 64K
document for loss by position), then the HF route at 256 tokens. Prints the in-process
evaluation's cost line and scores (from the trainer's log and ``eval/long/in_process/``), the
training step's tok/s, the evaluation's measured time against its estimate, and the peak RSS of
every rank (psutil, sampled every 0.2 s). The baseline in the same run is the training step.
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
name: bench_eval
seed: 3
model: {{preset: tiny, vocab_size: 512, num_layers: 2}}
data: {{cache_dir: "{run}/cache", tokenizer_type: SentencePieceTokenizer,
        tokenizer_model: "{tok}"}}
checkpoint: {{save_dir: "{run}/checkpoints", interval: 1000, keep_last: 1}}
logging: {{run_dir: "{run}", interval: 1, wandb_mode: disabled}}
stages:
  - name: long
    seq_length: {seq}
    rope_theta: 8.0e6
    global_batch_size: 1
    micro_batch_size: 1
    lr: 1.0e-4
    steps: 1
    parallel:
      tensor_model_parallel_size: 1
      pipeline_model_parallel_size: 1
      context_parallel_size: {cp}
    eval: true
    eval_settings:
      context_lengths: [256]
      depths: [0.5]
      num_samples: 1
      tasks: [needle]
      in_process:
        context_lengths: [{seq}]
        depths: [0.5]
        num_samples: 1
        tasks: [needle, json_kv, loss]
        loss_data: ["{data}/long"]
        loss_num_documents: 1
    mixture:
      seed: 1
      components:
        - {{name: long, prefixes: ["{data}/long"], weight: 0.5, min_tokens: {seq}}}
        - {{name: short, prefixes: ["{data}/short"], weight: 0.5}}
"""


def _inputs(root: Path, seq: int) -> Path:
    import numpy as np

    from megatron_longctx.data.preprocess.sample_corpus import make_sample_corpus
    from megatron_longctx.data.preprocess.train_spm import train_sentencepiece
    from megatron_longctx.testing.data import write_indexed

    rng = np.random.default_rng(0)
    write_indexed(root / "data" / "long", rng.integers(seq + 1, seq + seq // 2, 4).tolist(), 512)
    write_indexed(root / "data" / "short", rng.integers(20, 2000, 400).tolist(), 512, 1)
    make_sample_corpus(str(root / "corpus"), scale=0.1)
    return Path(
        train_sentencepiece(str(root / "corpus"), str(root / "spm"), vocab_size=512, num_threads=1)
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-length", type=int, default=65536)
    p.add_argument("--cp", type=int, default=2)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tok = _inputs(root, args.seq_length)
        run = root / "run"
        run.mkdir()
        cfg = run / "config.yaml"
        cfg.write_text(
            CONFIG.format(run=run, data=root / "data", tok=tok, seq=args.seq_length, cp=args.cp)
        )
        env = dict(os.environ, OMP_NUM_THREADS="1", LONGCTX_DEVICE="cpu", WANDB_MODE="disabled")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={args.cp}", "-m", "megatron_longctx.train", "--config",
               str(cfg)]  # fmt: skip
        peaks: dict[int, float] = {}
        with open(run / "out.log", "w") as log:
            proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
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
        text = (run / "out.log").read_text()
        if proc.returncode:
            raise SystemExit(f"run failed (rc {proc.returncode}):\n{text[-4000:]}")
        step = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
        res = json.loads((run / "eval" / "long" / "in_process" / "eval_results.json").read_text())
        ranks = sorted(peaks.values(), reverse=True)[: args.cp]
        print(f"== stage-end in-process evaluation, tiny model, S={args.seq_length}, CP {args.cp}")
        for line in text.splitlines():
            if "in-process evaluation" in line:
                print(line.strip())
        cost = res["cost"]
        print(
            f"training step: {step['tokens_per_s']:.0f} tok/s ({step['step_time_s']:.1f} s); "
            f"evaluation: {cost['forward_tokens']} forward tokens in {res['seconds']} s "
            f"(estimated {cost['estimated_seconds']:.0f} s; measured/estimate "
            f"{res['seconds'] / cost['estimated_seconds']:.2f}); evaluated lengths "
            f"{res['lengths']['evaluated']}, loss window {res['loss_by_position']['length']}"
        )
        print(
            f"peak RSS per rank {', '.join(f'{x:.2f}' for x in ranks)} GiB; wall {wall:.0f} s",
            flush=True,
        )


if __name__ == "__main__":
    main()
