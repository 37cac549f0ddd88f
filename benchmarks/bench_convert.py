"""Time and peak memory of checkpoint conversion, each way, against a naive baseline (same run).

    python benchmarks/bench_convert.py                  # ~0.9B parameters (h2048, 16 layers)
    python benchmarks/bench_convert.py --layers 4       # smaller, for a quick look

A synthetic bf16 HF Llama checkpoint (random weights, written shard by shard) is converted with the
real CLI: hf-to-mcore (TP 1, PP 1; one spawned rank) and mcore-to-hf. Each command runs in its own
process tree; peak memory is the largest sum of PSS (proportional set size: shared pages
counted once) over the tree, sampled every 50 ms. The baseline
is the naive route: ``LlamaForCausalLM.from_pretrained`` + ``save_pretrained`` (whole model in
memory). Peak RSS is reported in GB and as a multiple of the largest HF shard.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import psutil
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

BASELINE = """
import sys, torch
from transformers import LlamaForCausalLM
m = LlamaForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
sd = m.state_dict()
m.save_pretrained(sys.argv[2], max_shard_size=sys.argv[3])
"""


def measure(cmd: list[str]) -> tuple[float, float]:
    """Runs ``cmd``; returns (seconds, peak PSS of the process tree in bytes)."""
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONPATH=REPO)
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    root, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
            # PSS: pages shared by forked dist_checkpointing writers are counted once, not per child
            peak = max(peak, sum(p.memory_full_info().pss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.05)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:4]} failed:\n{proc.stderr.read()[-3000:]}")
    return seconds, peak


def write_synthetic_hf(path: str, cfg, shard_bytes: int) -> int:
    """A random bf16 HF Llama checkpoint written tensor by tensor; returns the largest shard."""
    from megatron_longctx.checkpoint.hf import keymap
    from megatron_longctx.checkpoint.hf.config_map import hf_config_from_model
    from megatron_longctx.checkpoint.hf.hf_io import ShardWriter

    os.makedirs(path)
    writer = ShardWriter(path, shard_bytes)
    g = torch.Generator().manual_seed(0)
    for name in keymap.hf_names(cfg):
        shape = keymap.expected_hf_shape(name, cfg)
        writer.add(name, (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16))
    files = writer.finish()
    hf_config_from_model(cfg, "bfloat16").save_pretrained(path)
    return max(os.path.getsize(os.path.join(path, f)) for f in files if f.endswith("safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--shard-size", default="500MB")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    from megatron_longctx.checkpoint.hf.hf_io import parse_size
    from megatron_longctx.model.config import ModelConfig

    cfg = ModelConfig(
        hidden_size=args.hidden,
        ffn_hidden_size=args.hidden * 11 // 4,
        num_layers=args.layers,
        num_attention_heads=args.hidden // 128,
        num_query_groups=max(1, args.hidden // 256),
        vocab_size=32000,
        rope_theta=1.28e8,
        max_position_embeddings=65536,
    )
    work = args.workdir or tempfile.mkdtemp(prefix="bench_convert_")
    hf_dir, ckpt, out, base_out = (os.path.join(work, d) for d in ("hf", "ckpt", "out", "base"))
    shard = write_synthetic_hf(hf_dir, cfg, parse_size(args.shard_size))
    print(
        f"model: {cfg.num_parameters() / 1e9:.2f}B parameters (bf16 HF, largest shard "
        f"{shard / 1e9:.2f} GB), workdir {work}"
    )
    tool = [sys.executable, os.path.join(REPO, "tools", "convert_checkpoint.py")]
    rows = [
        (
            "baseline from_pretrained+save",
            measure([sys.executable, "-c", BASELINE, hf_dir, base_out, args.shard_size]),
        ),
        (
            "hf-to-mcore (TP1 PP1, fp32)",
            measure([*tool, "hf-to-mcore", "--hf-dir", hf_dir, "--save", ckpt]),
        ),
        (
            "mcore-to-hf (bf16)",
            measure(
                [
                    *tool,
                    "mcore-to-hf",
                    "--load",
                    ckpt,
                    "--save",
                    out,
                    "--dtype",
                    "bf16",
                    "--max-shard-size",
                    args.shard_size,
                ]
            ),
        ),
    ]
    base_t, base_rss = rows[0][1]
    print(
        f"{'conversion':32s} {'time s':>8s} {'x base':>7s} {'peak PSS GB':>12s} "
        f"{'x shard':>8s} {'x base':>7s}"
    )
    for name, (t, rss) in rows:
        print(
            f"{name:32s} {t:8.1f} {t / base_t:7.2f} {rss / 1e9:12.2f} {rss / shard:8.2f} "
            f"{rss / base_rss:7.2f}"
        )


if __name__ == "__main__":
    main()
