"""Reproduce the papers' context-extension findings at tiny scale through the project's pipeline.

    make reproduce                                   # = python examples/reproduce_longctx.py
    python examples/reproduce_longctx.py --seed 1 --out results/reproduce_seed1

Issue 11. On 2 idle CPU cores in about 14.5 minutes (846-866 s measured, seeds 0 and 1):

1. data: synthetic passkey documents (``megatron_longctx/eval/passkey.py``) written as indexed
   datasets with a parallel loss mask (1 on the 5 answer digits; the mixture's ``mask_prefixes``);
   one component per document length (32 / 64 / 128 / 256 for stage 0, 1,024 for the extension),
   so every packed sample holds whole documents of one length (the per-step length mix);
2. stage 0 (the curriculum trainer, torchrun, 2 processes, DP 2): S = 256, RoPE theta 1e4,
   documents of 32..256 tokens packed with document masking;
3. one extension stage per arm, each a curriculum ``[stage0, ext]`` whose save_dir starts as a copy
   of the stage-0 checkpoint (stage transition: weights + Adam moments, LR restarts), S = 1,024,
   context parallelism 2 (ring attention with document masking):
   theta unchanged | position interpolation x4 | ABF theta 5e5 | ABF + 50% short documents;
4. greedy exact-match accuracy of every final model at 256 / 512 / 1,024 / 2,048 tokens, and of
   the intermediate extension checkpoints at 1,024, each model with the RoPE of its checkpoint;
5. ``results.md`` (table + conclusion), ``results.json`` and ``accuracy.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STAGE0_LENGTHS = (32, 64, 128, 256)
EVAL_LENGTHS = (256, 512, 1024, 2048)
EXT_LENGTH = 1024
VOCAB = 128
MODEL = {
    "preset": "tiny",
    "hidden_size": 128,
    "ffn_hidden_size": 344,
    "num_layers": 2,
    "num_attention_heads": 4,
    "num_query_groups": 4,
    "vocab_size": VOCAB,
    "make_vocab_size_divisible_by": 16,
    "rope_theta": 1e4,
}
# name -> (label, stage overrides, long-document token share)
ARMS = {
    "unchanged": ("extended, theta unchanged", {"rope_theta": 1e4}, 1.0),
    "pi4": (
        "extended, position interpolation x4",
        {"rope_theta": 1e4, "rope_scaling": {"rope_type": "linear", "factor": 4.0}},
        1.0,
    ),
    "abf": ("extended, ABF theta 5e5", {"rope_theta": 5e5}, 1.0),
    "abf_short": ("extended, ABF + 50% short documents", {"rope_theta": 5e5}, 0.5),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="results/reproduce", help="results directory (recreated)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stage0-steps", type=int, default=1500)
    p.add_argument("--stage0-batch", type=int, default=8, help="samples of 256 tokens per step")
    p.add_argument(
        "--stage0-micro",
        type=int,
        default=4,
        help="micro-batch size per rank (4 = each rank's samples packed into one THD sequence; "
        "1.7x the tok/s of micro-batch 1, benchmarks/bench_stage0.py: attention work follows "
        "the documents, not the packed length)",
    )
    p.add_argument(
        "--stage0-weights",
        default="0.4,0.3,0.2,0.1",
        help="token shares of the 32/64/128/256-token documents in stage 0",
    )
    p.add_argument("--stage0-lr", type=float, default=2e-3)
    p.add_argument("--ext-steps", type=int, default=100)
    p.add_argument("--ext-batch", type=int, default=8, help="samples of 1,024 tokens per step")
    p.add_argument(
        "--ext-lr",
        type=float,
        default=3e-4,
        help="peak LR of each extension (1e-3 measured noisy: ABF .34 at 1,024 after 25 steps)",
    )
    p.add_argument("--clip-grad", type=float, default=0.0, help="0 disables clipping")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument(
        "--eval-interval",
        type=int,
        default=25,
        help="extension checkpoints every N steps are evaluated at 1,024",
    )
    p.add_argument("--eval-samples", type=int, default=100, help="prompts per (model, length)")
    p.add_argument("--curve-samples", type=int, default=50, help="prompts per intermediate point")
    p.add_argument(
        "--arms", default=",".join(ARMS), help="comma-separated subset of " + ",".join(ARMS)
    )
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--timeout", type=int, default=1800, help="seconds per training launch")
    return p.parse_args(argv)


# ---------------------------------------------------------------- data


def write_data(data_dir: Path, args) -> dict[str, tuple[str, str]]:
    """Passkey datasets: one per stage-0 length (also the short domain) and one at 1,024."""
    from megatron_longctx.eval.passkey import write_passkey_dataset

    stage0_tokens = args.stage0_steps * args.stage0_batch * 256
    ext_tokens = args.ext_steps * args.ext_batch * EXT_LENGTH
    out = {}
    for i, (n, w) in enumerate(zip(STAGE0_LENGTHS, weights(args))):  # its share (+ margin)
        count = max(8, int(1.1 * max(stage0_tokens * w, ext_tokens / 8) / n) + 8)
        out[f"p{n}"] = write_passkey_dataset(
            data_dir / f"passkey_{n}", [n] * count, VOCAB, seed=1000 * args.seed + i
        )
    count = int(1.1 * ext_tokens / EXT_LENGTH) + 8
    out["p1024"] = write_passkey_dataset(
        data_dir / f"passkey_{EXT_LENGTH}", [EXT_LENGTH] * count, VOCAB, seed=1000 * args.seed + 99
    )
    return out


def _component(name, data, weight):
    tok, mask = data[name]
    return {"name": name, "prefixes": [tok], "mask_prefixes": [mask], "weight": weight}


# ---------------------------------------------------------------- recipes


def weights(args) -> list[float]:
    w = [float(x) for x in args.stage0_weights.split(",")]
    if len(w) != len(STAGE0_LENGTHS):
        raise SystemExit(f"--stage0-weights needs {len(STAGE0_LENGTHS)} values, got {w}")
    return w


def stage0(args, data) -> dict:
    return {
        "name": "s0",
        "seq_length": 256,
        "rope_theta": 1e4,
        "global_batch_size": args.stage0_batch,
        "micro_batch_size": args.stage0_micro,
        "lr": args.stage0_lr,
        "steps": args.stage0_steps,
        "warmup_ratio": 0.05,
        "min_lr_ratio": 0.1,
        "parallel": {
            "tensor_model_parallel_size": 1,
            "pipeline_model_parallel_size": 1,
            "context_parallel_size": 1,
        },
        "mixture": {
            "seed": args.seed,
            "components": [
                _component(f"p{n}", data, w) for n, w in zip(STAGE0_LENGTHS, weights(args))
            ],
        },
    }


def extension(args, data, arm: str) -> dict:
    _, rope, long_share = ARMS[arm]
    comps = [_component("p1024", data, long_share)]
    if long_share < 1:
        short = (1 - long_share) / len(STAGE0_LENGTHS)
        comps += [_component(f"p{n}", data, short) for n in STAGE0_LENGTHS]
    return {
        "name": f"ext_{arm}",
        "seq_length": EXT_LENGTH,
        **rope,
        "global_batch_size": args.ext_batch,
        "micro_batch_size": 1,
        "lr": args.ext_lr,
        "steps": args.ext_steps,
        "warmup_ratio": 0.1,
        "min_lr_ratio": 0.1,
        "parallel": {
            "tensor_model_parallel_size": 1,
            "pipeline_model_parallel_size": 1,
            "context_parallel_size": 2,
        },
        "mixture": {"seed": args.seed + 1, "components": comps},
    }


def recipe(args, name: str, run_dir: Path, stages: list[dict], interval: int) -> dict:
    return {
        "name": name,
        "seed": args.seed,
        "model": MODEL,
        # Like the plain-PyTorch reference: no gradient clipping and no weight decay. With the
        # loss on 5 answer digits per document, gradient norms are 30-60 and a clip at 1.0 shrinks
        # every update ~40x (measured: the extension then barely moves).
        "optimizer": {"clip_grad": args.clip_grad, "weight_decay": args.weight_decay},
        "data": {"cache_dir": str(run_dir / "cache"), "vocab_size": VOCAB},
        "checkpoint": {
            "save_dir": str(run_dir / "checkpoints"),
            "interval": interval,
            "keep_last": 1000,
        },
        "logging": {"run_dir": str(run_dir), "interval": 10, "wandb_mode": "disabled"},
        "training": {"device": "cpu", "backend": "local", "nan_policy": "halt"},
        "stages": stages,
    }


def launch(cfg: dict, run_dir: Path, args) -> float:
    """Writes the recipe and runs the trainer (torchrun); returns seconds."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "recipe.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        LONGCTX_DEVICE="cpu",
        WANDB_MODE="disabled",
        TORCHELASTIC_ERROR_FILE="",
    )
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={args.nproc}",
        "-m",
        "megatron_longctx.train",
        "--config",
        str(path),
    ]
    t0 = time.perf_counter()
    with open(run_dir / "train.log", "w") as log:
        rc = subprocess.run(
            cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=args.timeout
        ).returncode
    if rc:
        tail = (run_dir / "train.log").read_text()[-3000:]
        raise SystemExit(f"training {run_dir.name} failed (exit {rc}); log tail:\n{tail}")
    return time.perf_counter() - t0


def checkpoints(save_dir: Path) -> list[tuple[int, Path]]:
    from megatron_longctx.checkpoint.dist import is_complete

    out = []
    for d in sorted(save_dir.glob("iter_*")):
        if is_complete(d):
            out.append((int(d.name.split("_")[1]), d))
    return out


def copy_checkpoint(src: Path, save_dir: Path) -> None:
    """Seeds an arm's save_dir with the stage-0 checkpoint (the curriculum then transitions)."""
    from megatron_longctx.checkpoint.dist import LATEST

    save_dir.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src, save_dir / src.name)
    (save_dir / LATEST).write_text(str(int(src.name.split("_")[1])))


# ---------------------------------------------------------------- report


def final_loss(run_dir: Path) -> float | None:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return None
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return rows[-1]["loss"] if rows else None


def conclusion(grid: dict) -> list[str]:
    def acc(model, n):
        return grid.get(model, {}).get("accuracy", {}).get(n, float("nan"))

    lines = []
    abf, same, s0, pi = "abf", "unchanged", "stage0", "pi4"
    if abf in grid and same in grid:
        ok = acc(abf, 1024) >= 0.9 and acc(abf, 2048) >= 0.8
        extends = acc(abf, 2048) > max(acc(same, 2048), acc(s0, 2048)) + 0.1
        lines.append(
            f"- ABF (theta 1e4 -> 5e5) {'reaches' if ok else 'does not reach'} the issue's bar "
            f"(>= 0.9 at 1,024 and >= 0.8 at 2,048): {acc(abf, 1024):.2f} / {acc(abf, 2048):.2f}."
        )
        lines.append(
            f"- Generalisation beyond the training length (2,048 = 2x the extension length): ABF "
            f"{acc(abf, 2048):.2f} vs theta unchanged {acc(same, 2048):.2f} and stage 0 "
            f"{acc(s0, 2048):.2f}; the Llama 2 Long claim that raising the base frequency "
            f"extends the usable context is "
            f"{'supported in direction' if extends else 'not supported'} at this scale."
        )
    if same in grid and s0 in grid:
        learned = acc(same, 1024) >= 0.5
        lines.append(
            f"- Theta unchanged: {acc(same, 1024):.2f} at 1,024 and {acc(same, 256):.2f} at 256 "
            f"(stage 0: {acc(s0, 256):.2f}); continued training at 1,024 with the original base "
            + (
                "frequency learned the longer context."
                if learned
                else "frequency did not learn the longer context in these steps (compare the "
                "plain-PyTorch reference, examples/reference_passkey_plain.py, and "
                "docs/REPRODUCE_RESULTS.md)."
            )
        )
    if pi in grid and abf in grid:
        better = acc(abf, 1024) > acc(pi, 1024)
        lines.append(
            f"- ABF vs position interpolation x4 at 1,024: {acc(abf, 1024):.2f} vs "
            f"{acc(pi, 1024):.2f}; the claim that ABF beats PI is "
            f"{'supported' if better else 'not supported'} at this scale."
        )
    if "abf_short" in grid and abf in grid:
        d = [acc("abf_short", n) - acc(abf, n) for n in EVAL_LENGTHS]
        lines.append(
            f"- ABF + 50% short documents vs ABF: differences {', '.join(f'{x:+.2f}' for x in d)} "
            f"at {', '.join(str(n) for n in EVAL_LENGTHS)}; ProLong's claim that long data must "
            "be mixed with short data is "
            + ("supported here" if min(d) > 0.05 else "not separated from ABF alone here")
            + "."
        )
    if s0 in grid:
        lines.append(
            f"- Stage 0 (trained at <= 256) scores {acc(s0, 256):.2f} at 256 and "
            f"{acc(s0, 2048):.2f} at 2,048: RoPE at theta 1e4 does not extrapolate without "
            "training."
        )
    return lines


def write_report(out: Path, results: dict) -> None:
    grid, labels = results["final"], results["labels"]
    head = (
        f"| model (seed {results['seed']}) | "
        + " | ".join(f"@{n}" for n in EVAL_LENGTHS)
        + " | RoPE |"
    )
    rows = [head, "|---|" + "---|" * (len(EVAL_LENGTHS) + 1)]
    for name, r in grid.items():
        scaling = r["rope_scaling"]
        rope = f"theta {r['rope_theta']:g}" + (f", {scaling}" if scaling else "")
        rows.append(
            f"| {labels[name]} | "
            + " | ".join(f"{r['accuracy'][n]:.2f}" for n in EVAL_LENGTHS)
            + f" | {rope} |"
        )
    curve = [
        "",
        f"Accuracy at {EXT_LENGTH} vs extension step "
        f"({results['settings']['curve_samples']} prompts per point):",
        "",
        "| arm | "
        + " | ".join(str(s) for s, _ in next(iter(results["curves"].values()), []))
        + " |",
    ]
    curve.append("|---|" + "---|" * len(next(iter(results["curves"].values()), [])))
    for name, pts in results["curves"].items():
        curve.append(f"| {labels[name]} | " + " | ".join(f"{a:.2f}" for _, a in pts) + " |")
    text = [
        "# Passkey retrieval after context extension (issue 11)",
        "",
        f"Seed {results['seed']}; {results['settings']['eval_samples']} prompts per cell, "
        "greedy exact match of the 5 digits. Times: "
        + ", ".join(f"{k} {v:.0f}s" for k, v in results["seconds"].items())
        + ".",
        "",
        *rows,
        *curve,
        "",
        "## Conclusion",
        "",
        *conclusion(grid),
        "",
    ]
    (out / "results.md").write_text("\n".join(text))


def plot(out: Path, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in results["final"].items():
        a.plot(
            EVAL_LENGTHS,
            [r["accuracy"][n] for n in EVAL_LENGTHS],
            marker="o",
            label=results["labels"][name],
        )
    a.set_xscale("log", base=2)
    a.set_xticks(EVAL_LENGTHS, [str(n) for n in EVAL_LENGTHS])
    a.axvline(EXT_LENGTH, color="grey", ls=":", lw=1)
    a.set(
        xlabel="context length (tokens)",
        ylabel="passkey accuracy",
        ylim=(-0.03, 1.03),
        title=f"accuracy vs length (seed {results['seed']})",
    )
    a.legend(fontsize=8)
    for name, pts in results["curves"].items():
        color = f"C{list(results['final']).index(name)}"  # the same colour as on the left
        b.plot(
            [s for s, _ in pts],
            [x for _, x in pts],
            marker="o",
            color=color,
            label=results["labels"][name],
        )
    b.set(
        xlabel="extension step",
        ylabel=f"accuracy at {EXT_LENGTH}",
        ylim=(-0.03, 1.03),
        title="learning speed at the extension length",
    )
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- main


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = (ROOT / args.out) if not Path(args.out).is_absolute() else Path(args.out)
    arms = [a for a in args.arms.split(",") if a]
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        raise SystemExit(f"unknown arm(s) {unknown}; choose from {list(ARMS)}")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    seconds: dict[str, float] = {}
    t_start = time.perf_counter()

    t0 = time.perf_counter()
    data = write_data(out / "data", args)
    seconds["data"] = time.perf_counter() - t0
    print(f"[reproduce] data written in {seconds['data']:.1f}s", flush=True)

    s0 = stage0(args, data)
    run0 = out / "stage0"
    seconds["stage0"] = launch(recipe(args, "stage0", run0, [s0], args.stage0_steps), run0, args)
    ckpt0 = checkpoints(run0 / "checkpoints")[-1][1]
    print(
        f"[reproduce] stage 0: {args.stage0_steps} steps in {seconds['stage0']:.0f}s, "
        f"loss {final_loss(run0):.3f}",
        flush=True,
    )

    for arm in arms:
        run = out / arm
        copy_checkpoint(ckpt0, run / "checkpoints")
        cfg = recipe(args, arm, run, [s0, extension(args, data, arm)], args.eval_interval)
        seconds[arm] = launch(cfg, run, args)
        print(
            f"[reproduce] {arm}: {args.ext_steps} steps in {seconds[arm]:.0f}s, "
            f"loss {final_loss(run):.3f}",
            flush=True,
        )

    from megatron_longctx.eval.passkey import accuracy_grid

    t0 = time.perf_counter()
    final = {"stage0": accuracy_grid(ckpt0, EVAL_LENGTHS, args.eval_samples, args.seed)}
    curves = {}
    step0 = int(ckpt0.name.split("_")[1])
    for arm in arms:
        ckpts = checkpoints(out / arm / "checkpoints")
        final[arm] = accuracy_grid(ckpts[-1][1], EVAL_LENGTHS, args.eval_samples, args.seed)
        curves[arm] = [(0, final["stage0"]["accuracy"][EXT_LENGTH])]
        for it, d in ckpts[1:-1]:
            r = accuracy_grid(d, [EXT_LENGTH], args.curve_samples, args.seed)
            curves[arm].append((it - step0, r["accuracy"][EXT_LENGTH]))
        curves[arm].append((ckpts[-1][0] - step0, final[arm]["accuracy"][EXT_LENGTH]))
        print(
            f"[reproduce] {arm}: "
            + ", ".join(f"@{n} {a:.2f}" for n, a in final[arm]["accuracy"].items()),
            flush=True,
        )
    seconds["eval"] = time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - t_start

    labels = {"stage0": "stage 0", **{a: ARMS[a][0] for a in arms}}
    results = {
        "seed": args.seed,
        "settings": vars(args),
        "model": MODEL,
        "labels": labels,
        "final": final,
        "curves": curves,
        "seconds": seconds,
        "losses": {k: final_loss(out / k) for k in ["stage0", *arms]},
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    write_report(out, results)
    plot(out, results)
    print((out / "results.md").read_text(), flush=True)
    print(f"[reproduce] total {seconds['total']:.0f}s; results in {out}", flush=True)
    return results


if __name__ == "__main__":
    main()
