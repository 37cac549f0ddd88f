"""The main job, tiny, on CPU: ``make demo`` (or ``python tools/demo.py [--out demo_out] [--verbose]``).

What it shows: a model that learned passkey retrieval at <= 256 tokens cannot retrieve it at 1,024
tokens; after the curriculum's second stage (1,024 tokens, RoPE base frequency raised 1e4 -> 5e5,
context parallelism 2) it can. The whole pipeline, each step through the same CLI a user runs:
  1. tools/make_sample_corpus.py   local text -> code / books / web JSONL
  2. tools/train_tokenizer.py      sentencepiece BPE (vocab 512) trained on it
  3. tools/preprocess_data.py      JSONL -> Megatron .bin/.idx + length stats (per domain)
  4. tools/make_passkey_data.py    synthetic passkey documents (loss on the 5 answer digits) of
                                   32..256 tokens (stage 1) and 1,024 tokens (stage 2)
  5. megatron_longctx.train        examples/tiny_cpu.yaml on 2 gloo processes (torchrun): stage 1 at
                                   256 tokens (DP 2), stage 2 at 1,024 tokens (CP 2 ring attention,
                                   new RoPE theta), both on passkey + text; checkpoints, metrics,
                                   loss-curve PNG and, after each stage, an HF export + loss-by-
                                   position evaluation at 1,024 tokens on held-out books
  6. tools/eval_passkey.py         passkey accuracy of both stages' final checkpoints at 256 / 1,024
  7. tools/convert_checkpoint.py   final checkpoint -> Hugging Face Llama dir, loaded by
                                   transformers for a generation (tools/demo_generate.py)
Third-party warnings are filtered (megatron_longctx/logs.py); ``--verbose`` shows them. About
2-3 minutes on 2 idle CPU cores; the last two lines say what was shown and where everything is.
"""

from __future__ import annotations

import argparse
import json
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


# passkey documents per length: about one epoch of stage 1's / stage 2's share (examples/tiny_cpu.yaml)
PASSKEY_DOCS = {32: 6000, 64: 3000, 128: 1200, 256: 320, 1024: 160}
PASSKEY_DIGITS = 2  # what the tiny model learns in stage 1's few hundred steps (eval/passkey.py)
EVAL_LENGTHS = (256, 1024)
EVAL_SAMPLES = 40
# The key in the first 15% of the prompt: at 1,024 tokens the query reaches back >= 860 tokens,
# 3x any distance of stage 1 (<= 256). Nearer keys a stage-1 model partly still finds at 1,024
# tokens (RoPE extrapolates a little: 0.45 over depths 0-1 in one run, from keys within ~500
# tokens; 0.07 over depths 0-0.15).
MAX_DEPTH = 0.15


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="run the tiny end-to-end pipeline on CPU")
    p.add_argument("--out", default=str(ROOT / "demo_out"), help="output directory (recreated)")
    p.add_argument("--seed", type=int, default=None, help="override the recipe's seed")
    p.add_argument(
        "--verbose",
        action="store_true",
        help="show third-party warnings and log lines too (LONGCTX_LOG_LEVEL=debug)",
    )
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
    if args.verbose:
        env["LONGCTX_LOG_LEVEL"] = "debug"

    run([PY, "tools/make_sample_corpus.py", "--output-dir", corpus], env=env)
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
        ],
        env=env,
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
            ],
            env=env,
        )
    run(
        [PY, "tools/make_passkey_data.py", "--output-prefix", data / "passkey", "--vocab-size"]
        + ["512", "--lengths", *PASSKEY_DOCS, "--count", *PASSKEY_DOCS.values()]
        + ["--digits", PASSKEY_DIGITS]
        + ([] if args.seed is None else ["--seed", args.seed]),
        env=env,
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
            *([] if args.seed is None else [f"seed={args.seed}"]),
        ],
        env=env,
    )

    env["LONGCTX_FALLBACK_NOTED"] = "1"  # the trainer said it; the tools below need not repeat it
    from megatron_longctx.checkpoint.dist import find_latest, iteration_dir

    ckpts = run_dir / "checkpoints"
    stage1_steps = first_stage_steps(env)
    stage1, final = iteration_dir(ckpts, stage1_steps), iteration_dir(ckpts, find_latest(ckpts))
    passkey = out / "passkey.json"
    run(
        [PY, "tools/eval_passkey.py", "--checkpoint", f"stage 1 (256 tokens)={stage1}"]
        + ["--checkpoint", f"stage 2 (1,024 tokens)={final}", "--lengths", *EVAL_LENGTHS]
        + ["--samples", EVAL_SAMPLES, "--digits", PASSKEY_DIGITS, "--max-depth", MAX_DEPTH]
        + ["--out", passkey],
        env=env,
    )
    hf = out / "hf"
    run([PY, "tools/convert_checkpoint.py", "mcore-to-hf", "--load", final, "--save", hf], env=env)
    shutil.copy(tok / "spm.model", hf / "tokenizer.model")
    run(
        [PY, "tools/demo_generate.py", "--hf-dir", hf, "--tokenizer-model", tok / "spm.model"]
        + ["--prompt", "The "],
        env=env,
    )
    artifacts = {
        "corpus": corpus,
        "tokenizer": tok / "spm.model",
        "indexed datasets": data,
        "checkpoints": ckpts,
        "metrics": run_dir / "metrics.jsonl",
        "loss curve": run_dir / "loss_curve.png",
        "wandb (offline)": run_dir / "wandb",
        "passkey accuracy": passkey,
        "HF export": hf,
    }
    for report in sorted((run_dir / "eval").glob("*/report.md"), key=lambda p: p.stat().st_mtime):
        artifacts[f"eval {report.parent.name}"] = report
    print("\n== demo artifacts")
    for name, path in artifacts.items():
        print(f"  {name:<18} {path}")
    acc = {k: v["accuracy"] for k, v in json.loads(passkey.read_text()).items()}
    (s1, a1), (s2, a2) = list(acc.items())
    long = str(EVAL_LENGTHS[-1])
    print(
        f"\nShown: passkey retrieval at 1,024 tokens: {a1[long]:.2f} for the model trained at "
        f"<= 256 tokens (stage 1), {a2[long]:.2f} after stage 2 (1,024 tokens, RoPE theta 1e4 -> "
        "5e5, CP 2)."
    )
    print(
        f"Everything is under {out}: corpus/ tokenizer/ data/ run/ (checkpoints, metrics, "
        "loss curve, eval/<stage>/report.md) passkey.json hf/ (paths above)."
    )
    return 0


def first_stage_steps(env: dict) -> int:
    """Stage 1's step count from the recipe (its final checkpoint is kept: a stage end)."""
    from megatron_longctx.config.schema import ExperimentConfig

    saved = dict(os.environ)
    os.environ.update(env)  # the recipe's ${LONGCTX_*} paths
    try:
        cfg = ExperimentConfig.load(str(ROOT / "examples" / "tiny_cpu.yaml"), [])
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return cfg.stages[0].num_steps


if __name__ == "__main__":
    sys.exit(main())
