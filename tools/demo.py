"""The main job, tiny, on CPU: ``make demo`` (or ``python tools/demo.py [--out demo_out]``).

The whole pipeline, each step through the same CLI a user runs:
  1. tools/make_sample_corpus.py   local text -> code / books / web JSONL
  2. tools/train_tokenizer.py      sentencepiece BPE (vocab 512) trained on it
  3. tools/preprocess_data.py      JSONL -> Megatron .bin/.idx + length stats (per domain)
  4. megatron_longctx.train        examples/tiny_cpu.yaml on 2 gloo processes (torchrun): stage 1 at
                                   256 tokens (DP 2), stage 2 at 1,024 tokens (CP 2 ring attention,
                                   new RoPE theta), checkpoints, metrics, loss-curve PNG
                                   and, after each stage, an HF export + long-context evaluation
                                   (needle grid, RULER-style tasks, loss by position) of that stage
  5. tools/convert_checkpoint.py   final checkpoint -> Hugging Face Llama dir, loaded by
                                   transformers for a generation (tools/demo_generate.py)
Every artifact's path is printed at the end.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


def run(cmd: list[str], env: dict | None = None) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, cwd=ROOT, env=env)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="run the tiny end-to-end pipeline on CPU")
    p.add_argument("--out", default=str(ROOT / "demo_out"), help="output directory (recreated)")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    corpus, tok, data, run_dir = out / "corpus", out / "tokenizer", out / "data", out / "run"
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        LONGCTX_DEVICE="cpu",
        LONGCTX_DATA=str(data),
        LONGCTX_RUN=str(run_dir),
        LONGCTX_TOKENIZER=str(tok / "spm.model"),
        WANDB_MODE=os.environ.get("WANDB_MODE", "offline"),
    )

    run([PY, "tools/make_sample_corpus.py", "--output-dir", corpus])
    run(
        [
            PY,
            "tools/train_tokenizer.py",
            "--input",
            corpus,
            "--model-prefix",
            tok / "spm",
            "--vocab-size",
            "512",
        ]
    )
    for domain in ("code", "books", "web"):
        run(
            [
                PY,
                "tools/preprocess_data.py",
                "--input",
                corpus / f"{domain}.jsonl",
                "--output-prefix",
                data / domain,
                "--tokenizer-type",
                "SentencePieceTokenizer",
                "--tokenizer-model",
                tok / "spm.model",
                "--append-eod",
                "--workers",
                "2",
                "--plot",
            ]
        )
    run(
        [
            PY,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "megatron_longctx.train",
            "--config",
            "examples/tiny_cpu.yaml",
        ],
        env=env,
    )

    artifacts = {
        "corpus": corpus,
        "tokenizer": tok / "spm.model",
        "indexed datasets": data,
        "checkpoints": run_dir / "checkpoints",
        "metrics": run_dir / "metrics.jsonl",
        "loss curve": run_dir / "loss_curve.png",
        "wandb (offline)": run_dir / "wandb",
    }
    from megatron_longctx.checkpoint.dist import find_latest, iteration_dir

    final = iteration_dir(run_dir / "checkpoints", find_latest(run_dir / "checkpoints"))
    hf = out / "hf"
    run([PY, "tools/convert_checkpoint.py", "mcore-to-hf", "--load", final, "--save", hf])
    shutil.copy(tok / "spm.model", hf / "tokenizer.model")
    run(
        [
            PY,
            "tools/demo_generate.py",
            "--hf-dir",
            hf,
            "--tokenizer-model",
            tok / "spm.model",
            "--prompt",
            "The ",
        ]
    )
    artifacts["HF export"] = hf
    for stage_eval in sorted(
        (run_dir / "eval").glob("*/report.md"), key=lambda p: p.stat().st_mtime
    ):
        artifacts[f"eval {stage_eval.parent.name}"] = stage_eval
        print(f"\n== evaluation after stage {stage_eval.parent.name} ({stage_eval})\n")
        print(stage_eval.read_text())
    print("\n== demo artifacts")
    for name, path in artifacts.items():
        print(f"  {name:<18} {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
