"""One-GPU check of the GPU path (issue 20): attention kernels, then a ~1B Llama through the
trainer's step. Untested on GPU so far: prepared to run on one H100/H200 with torch (CUDA) and
triton, no Transformer Engine and no flash-attn, in <= 8 minutes.

    python benchmarks/gpu_check.py --output gpu_check.json              # on the GPU machine
    python benchmarks/gpu_check.py --device cpu --quick --output /tmp/gpu_check.json  # rehearsal

1. Attention (``model/attention`` block kernels, ``auto`` kernel per dtype: CUDA flash varlen
   for bf16, the tiled kernel for fp32): output and q/k/v gradients against the dense fp32
   reference (``attention/reference.py``) on a packed mix, max error relative to the reference's
   max: bf16 <= 1e-2, fp32 <= 1e-5. Then forward+backward time and peak memory at 16K and 64K
   tokens, one document and a ProLong-like mix (one long document + short ones), each with its
   ratio to torch SDPA (is_causal, one call per document) measured in the same run.
2. Trainer: a Llama-3.2-1B-shaped model (local spec, the project's document-masked attention),
   megatron DDP + distributed optimizer, bf16, full recompute, on packed sequences of 8K and 64K
   through ``training.batch.to_model_batch`` + ``training.step.forward_backward`` + the optimizer
   step; tok/s, peak memory and MFU next to ``tools/plan.py``'s prediction for the same layout.

Writes JSON (``--output``) after every part, so a timeout (``--timeout``, default 470 s) leaves what
finished; exit code 0 when every correctness check passes.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from megatron_longctx.model.config import ModelConfig  # noqa: E402

LLAMA_1B = ModelConfig(  # Llama-3.2-1B's shape
    hidden_size=2048,
    ffn_hidden_size=8192,
    num_layers=16,
    num_attention_heads=32,
    num_query_groups=8,
    vocab_size=128256,
    rope_theta=500000.0,
    norm_eps=1e-5,
    max_position_embeddings=131072,
    tie_word_embeddings=True,
)
TOLERANCE = {torch.bfloat16: 1e-2, torch.float32: 1e-5}


class CheckTimeout(Exception):
    pass


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _reset_peak(dev):
    gc.collect()  # the previous run's model and optimizer
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(dev) -> float:
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    import psutil

    return psutil.Process().memory_info().rss / 2**30  # CPU rehearsal: process RSS


def doc_mix(total: int, one_doc: bool, seed: int = 0) -> list[int]:
    """One document, or a ProLong-like mix: half the tokens one long document, the rest short
    documents of 100-3,000 tokens (the last one takes what is left). Lengths are even (``total``
    a multiple of 4): the block layout at CP 1 takes documents padded to 2 x CP, as the batch path
    makes them."""
    if one_doc:
        return [total]
    rng = np.random.default_rng(seed)
    docs, left = [total // 2], total - total // 2
    while left > 0:
        n = min(left, 2 * int(rng.integers(50, 1500)))
        docs.append(n)
        left -= n
    return docs


def _block(docs: list[int]):
    from megatron_longctx.model.attention.blocks import CPLayout

    cu = np.concatenate([[0], np.cumsum(docs)]).tolist()
    return cu, CPLayout(cu, cu, 1).ring_block(0, 0)


def attention_correctness(dev, dtype, tokens, heads, seed=0) -> dict:
    from megatron_longctx.model.attention.kernels import block_attention, resolve_kernel
    from megatron_longctx.model.attention.reference import document_causal_attention

    hq, hk, d = heads
    docs = doc_mix(tokens, one_doc=False, seed=seed)
    cu, block = _block(docs)
    g = torch.Generator().manual_seed(seed)
    base = [torch.randn(tokens, h, d, generator=g) for h in (hq, hk, hk)]
    dout = torch.randn(tokens, hq, d, generator=g)
    scale = d**-0.5
    kernel = resolve_kernel("auto", dev, dtype)

    def run(fn, dt, device):
        q, k, v = (x.to(device, dt).clone().requires_grad_() for x in base)
        out = fn(q, k, v)
        out.backward(dout.to(device, out.dtype))
        return [t.detach().float().cpu().clone() for t in (out, q.grad, k.grad, v.grad)]

    got = run(lambda q, k, v: block_attention(q, k, v, block, scale, kernel), dtype, dev)
    ref = run(lambda q, k, v: document_causal_attention(q, k, v, cu, cu, scale), torch.float32, dev)
    errors = {
        name: float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))
        for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref)
    }
    return {
        "dtype": str(dtype).replace("torch.", ""),
        "kernel": kernel.name,
        "tokens": tokens,
        "num_documents": len(docs),
        "max_rel_error": errors,
        "tolerance": TOLERANCE[dtype],
        "passed": all(e <= TOLERANCE[dtype] for e in errors.values()),
    }


def _timed(fn, dev, repeats: int) -> tuple[float, float]:
    """(best fwd+bwd seconds after one warm-up, peak memory GiB) of ``fn``."""
    times = []
    _reset_peak(dev)
    for _ in range(repeats + 1):
        _sync(dev)
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        times.append(time.perf_counter() - t0)
    return min(times[1:]), _peak_gib(dev)


def _sdpa_forward(q, k, v, docs: list[int]):
    """torch SDPA (is_causal, GQA) once per document; the sum of the outputs."""
    total, start = 0, 0
    for n in docs:
        qd, kd, vd = (x.narrow(0, start, n).transpose(0, 1).unsqueeze(0) for x in (q, k, v))
        out = torch.nn.functional.scaled_dot_product_attention(
            qd, kd, vd, is_causal=True, enable_gqa=True
        )
        total, start = total + out.sum(), start + n
    return total


def _sdpa_per_document(q, k, v, docs: list[int]) -> None:
    """The baseline: torch SDPA per document, forward + backward."""
    _sdpa_forward(q, k, v, docs).backward()


def attention_timing(dev, dtype, tokens, heads, one_doc, repeats=3) -> dict:
    from megatron_longctx.model.attention.kernels import block_attention, resolve_kernel

    hq, hk, d = heads
    docs = doc_mix(tokens, one_doc)
    _, block = _block(docs)
    kernel = resolve_kernel("auto", dev, dtype)
    q = torch.randn(tokens, hq, d, device=dev, dtype=dtype, requires_grad=True)
    k = torch.randn(tokens, hk, d, device=dev, dtype=dtype, requires_grad=True)
    v = torch.randn(tokens, hk, d, device=dev, dtype=dtype, requires_grad=True)
    ours, ours_peak = _timed(
        lambda: block_attention(q, k, v, block, d**-0.5, kernel).sum().backward(), dev, repeats
    )
    sdpa, sdpa_peak = _timed(lambda: _sdpa_per_document(q, k, v, docs), dev, repeats)
    return {
        "dtype": str(dtype).replace("torch.", ""),
        "kernel": kernel.name,
        "tokens": tokens,
        "layout": "one document" if one_doc else f"mix of {len(docs)} documents",
        "fwd_bwd_ms": 1e3 * ours,
        "peak_memory_gib": ours_peak,
        "sdpa_fwd_bwd_ms": 1e3 * sdpa,
        "sdpa_peak_memory_gib": sdpa_peak,
        "time_vs_sdpa": ours / sdpa,
        "memory_vs_sdpa": ours_peak / sdpa_peak,
    }


def _micro(seq: int, vocab: int, seed: int) -> dict:
    docs = doc_mix(seq, one_doc=False, seed=seed)
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (1, seq + 1), generator=g)
    return {
        "tokens": tokens[:, :-1],
        "labels": tokens[:, 1:],
        "loss_mask": torch.ones(1, seq),
        "position_ids": torch.arange(seq)[None],
        "cu_seqlens": torch.tensor(np.concatenate([[0], np.cumsum(docs)])),
    }


def trainer_run(dev, model_cfg, seq, steps, hardware) -> dict:
    """The trainer's step on one device (see module docstring, part 2)."""
    from megatron.core import tensor_parallel

    from megatron_longctx.model.attention import core_attention_class
    from megatron_longctx.model.build import build_gpt_model
    from megatron_longctx.model.config import resolve_loss_chunk_tokens
    from megatron_longctx.parallel.layout import ParallelLayout
    from megatron_longctx.perf.flops import flops_per_token, mfu
    from megatron_longctx.runtime.distributed import initialize_model_parallel
    from megatron_longctx.training.batch import BatchSharding
    from megatron_longctx.training.setup import (
        OptimizerSettings,
        build_optimizer,
        wrap_ddp,
    )
    from megatron_longctx.training.step import forward_backward

    on_gpu = dev.type == "cuda"
    layout = ParallelLayout(1, 1, 1)
    initialize_model_parallel(layout)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    _reset_peak(dev)
    dtype = torch.bfloat16 if on_gpu else torch.float32
    loss_chunk = resolve_loss_chunk_tokens(None, seq)  # the trainer's default (stage field unset)
    model = build_gpt_model(
        model_cfg,
        layout,
        backend="local",
        core_attention=core_attention_class("local"),
        recompute="full",
        seq_length=seq,
        params_dtype=dtype,
        device=dev,
        loss_chunk_tokens=loss_chunk,
    )
    chunks = wrap_ddp([model], use_distributed_optimizer=on_gpu)
    optimizer = build_optimizer(
        chunks, OptimizerSettings(lr=1e-5), params_dtype=dtype, use_distributed_optimizer=on_gpu
    )
    times, losses = [], []
    for step in range(steps + 1):
        batch = [BatchSharding(device=dev)(_micro(seq, model_cfg.vocab_size, step))]
        _sync(dev)
        t0 = time.perf_counter()
        result = forward_backward(
            chunks, batch, seq_length=seq, micro_batch_size=1, optimizer=optimizer
        )
        optimizer.step()
        _sync(dev)
        times.append(time.perf_counter() - t0)
        losses.append(result.loss)
    step_s = min(times[1:])
    docs = doc_mix(seq, one_doc=False, seed=1)
    fpt = flops_per_token(model_cfg, seq, docs)
    peak_flops = hardware.peak_bf16_flops if on_gpu else 1e11
    tok_s = seq / step_s
    record = {
        "seq_length": seq,
        "dtype": str(dtype).replace("torch.", ""),
        "distributed_optimizer": on_gpu,
        "recompute": "full",
        "loss_chunk_tokens": loss_chunk,
        "step_s": step_s,
        "tokens_per_s": tok_s,
        "peak_memory_gib": _peak_gib(dev),
        "mfu": mfu(tok_s, fpt, peak_flops),
        "losses": losses,
        "finite": all(math.isfinite(x) for x in losses),
    }
    if on_gpu or seq >= 1024:
        pred = plan_trainer_leg(model_cfg, seq, hardware)
        record["planner"] = _plan_record(pred)
    del model, chunks, optimizer
    return record


def plan_trainer_leg(model_cfg, seq: int, hardware):
    """The planner's prediction (``perf/planner.py``) for the trainer leg: one GPU of
    ``hardware``, the layout, recompute, optimizer and loss chunking ``trainer_run`` uses on a
    GPU."""
    from megatron_longctx.model.config import resolve_loss_chunk_tokens
    from megatron_longctx.parallel.layout import ParallelLayout
    from megatron_longctx.perf.planner import PlanRequest, evaluate

    req = PlanRequest(
        model=model_cfg,
        seq_length=seq,
        num_gpus=1,
        gpus_per_node=1,
        hardware=hardware,
        global_batch_tokens=seq,
        doc_lengths=tuple(doc_mix(seq, one_doc=False, seed=1)),
        loss_chunk_tokens=resolve_loss_chunk_tokens(None, seq),  # the trainer's default
    )
    return evaluate(req, ParallelLayout(1, 1, 1), 1, "full", True)


def _plan_record(pred) -> dict:
    return {
        "tokens_per_s": pred.tokens_per_s,
        "memory_gib": pred.memory.total / 2**30,
        "mfu": pred.mfu,
        "fits": pred.fits,
    }


def trainer_legs(dev, model_cfg, seqs, steps: int, hardware, save) -> list[dict]:
    """The trainer leg per sequence length, each after asking the planner: a leg predicted not
    to fit in ``hardware``'s memory (on a GPU: the memory of the one found) is skipped with the
    planner's reason instead of running out of memory (point 3 of issue 27)."""
    records = []
    for seq in seqs:
        pred = plan_trainer_leg(model_cfg, seq, hardware)
        if dev.type == "cuda" and not pred.fits:
            record = {"seq_length": seq, "skipped": f"planner: {pred.reason}"}
            record["planner"] = _plan_record(pred)
        else:
            try:
                record = trainer_run(dev, model_cfg, seq, steps, hardware)
            except torch.OutOfMemoryError as err:  # recorded; the other length still runs
                record = {"seq_length": seq, "finite": False, "error": str(err)[:500]}
        records.append(record)
        save(records)
    return records


def gpu_hardware(dev, name: str):
    """``HARDWARE[name]`` with the memory of the GPU found (an H100 NVL has 94 GB, not 80)."""
    from megatron_longctx.perf.hardware import HARDWARE

    hardware = HARDWARE[name]
    if dev.type == "cuda":
        total = torch.cuda.get_device_properties(dev).total_memory
        hardware = hardware.with_memory_gb(total / 1e9)
    return hardware


NO_GPU = (
    "gpu_check: no CUDA GPU here (torch.cuda.is_available() is False); rehearse on CPU, the CUDA "
    "legs on fake CUDA tensors included: python benchmarks/gpu_check.py --device cpu --quick "
    "--output /tmp/gpu_check.json"
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--quick", action="store_true", help="tiny sizes (CPU rehearsal)")
    p.add_argument("--hardware", default="h100", choices=["h100", "h200"])
    p.add_argument("--output", default="gpu_check.json")
    p.add_argument("--timeout", type=int, default=470, help="seconds for the whole check")
    p.add_argument("--steps", type=int, default=3, help="timed trainer steps (after one warm-up)")
    args = p.parse_args(argv)

    def on_alarm(signum, frame):
        raise CheckTimeout(f"gpu_check: past its {args.timeout} s timeout")

    if args.device == "cuda" and not torch.cuda.is_available():
        print(NO_GPU, file=sys.stderr)
        return 2
    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(args.timeout)
    from megatron_longctx.runtime.distributed import DistEnv, init_process_group

    dev = init_process_group(
        DistEnv(0, 1, 0, "127.0.0.1", int(os.environ.get("MASTER_PORT", 29555))),
        device=args.device,
    )
    if args.quick:
        heads, check_tokens, sizes, seqs = (4, 2, 16), 256, (512, 1024), (256, 1024)
        model_cfg = LLAMA_1B.with_updates(
            hidden_size=64,
            ffn_hidden_size=128,
            num_layers=2,
            num_attention_heads=4,
            num_query_groups=2,
            vocab_size=512,
            tie_word_embeddings=False,
        )
    else:
        heads, check_tokens, sizes, seqs = (32, 8, 128), 4096, (16384, 65536), (8192, 65536)
        model_cfg = LLAMA_1B
    report = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "quick": args.quick,
        "attention_correctness": [],
        "attention_timing": [],
        "trainer": [],
    }
    out = Path(args.output)

    def save():
        out.write_text(json.dumps(report, indent=2))

    started = time.perf_counter()
    try:
        for dtype in (torch.bfloat16, torch.float32):
            if dev.type == "cpu" and dtype == torch.bfloat16:
                continue  # the CPU flash kernel's bf16 path is not what this check is for
            report["attention_correctness"].append(
                attention_correctness(dev, dtype, check_tokens, heads)
            )
            save()
        for tokens in sizes:
            for one_doc in (True, False):
                dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
                report["attention_timing"].append(
                    attention_timing(dev, dtype, tokens, heads, one_doc)
                )
                save()
        hardware = gpu_hardware(dev, args.hardware)
        trainer_legs(
            dev, model_cfg, seqs, args.steps, hardware, lambda r: (report.update(trainer=r), save())
        )
        if dev.type == "cpu":  # the CUDA legs at their full sizes, on fake CUDA tensors
            from gpu_rehearsal import fake_cuda_legs

            report["fake_cuda"] = fake_cuda_legs(hardware)
            save()
    except CheckTimeout as err:
        report["timeout"] = str(err)
    finally:
        signal.alarm(0)
        report["wall_s"] = time.perf_counter() - started
        save()
    passed = (
        all(c["passed"] for c in report["attention_correctness"])
        and all(t.get("finite", "skipped" in t) for t in report["trainer"])
        and all(leg["passed"] for leg in report.get("fake_cuda", []))
    )
    report["passed"] = passed and "timeout" not in report
    save()
    print(json.dumps(report, indent=2))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
