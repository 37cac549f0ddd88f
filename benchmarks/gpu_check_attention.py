"""One-GPU check of the attention block kernels: correctness, then time and memory at 16K / 64K.

    python benchmarks/gpu_check_attention.py --out gpu_attention.json      # on one CUDA GPU
    python benchmarks/gpu_check_attention.py --device cpu --quick          # rehearsal on CPU

Prepared for a lent H100/H200 with torch (CUDA) and no flash-attn / Transformer Engine; it has not
run on a GPU yet. Stops itself after ``--timeout`` seconds (default 300).

1. Correctness (ring attention at CP 1 over a packed batch with padding, 1-token documents and
   GQA 8/2 heads; forward and dq/dk/dv) vs the dense per-document reference computed in fp32
   (fp64 on CPU): every kernel available for the device in bf16 (<= 1e-2 relative) and in fp32
   (<= 1e-5; on CUDA only the ``tiled`` kernel runs fp32, flash-attention has none).
2. Time (fwd + bwd) and peak memory of the ``auto`` kernel at 16K and 64K tokens, one causal
   document and a ProLong-like packed mix (lognormal short documents), 32/8 heads, head dim 128,
   bf16 on CUDA, against torch SDPA (is_causal, one call per document) in the same run.

Writes JSON (``--out``) and prints one line per measurement.
"""

from __future__ import annotations

import argparse
import faulthandler
import functools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_longctx.model.attention.blocks import CPLayout  # noqa: E402
from megatron_longctx.model.attention.kernels import resolve_kernel  # noqa: E402
from megatron_longctx.model.attention.reference import document_causal_attention  # noqa: E402
from megatron_longctx.model.attention.ring import ring_attention  # noqa: E402


def _cu(lengths, multiple=2):
    cu_p, cu_r = [0], [0]
    for n in lengths:
        cu_p.append(cu_p[-1] + n + (-n) % multiple)
        cu_r.append(cu_r[-1] + n)
    return cu_p, cu_r


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


def correctness(device, kernels, dtypes) -> list[dict]:
    lengths = [1, 300, 1, 77, 1024, 5, 513]
    cu_p, cu_r = _cu(lengths)
    g = torch.Generator().manual_seed(0)
    ref_dtype = torch.float32 if device.type == "cuda" else torch.float64
    hq, hk, d = 8, 2, 64
    base = [torch.randn(cu_p[-1], h, d, generator=g) for h in (hq, hk, hk, hq)]
    q, k, v, w = (x.to(device, ref_dtype) for x in base)
    qr, kr, vr = (x.clone().requires_grad_() for x in (q, k, v))
    ref = document_causal_attention(qr, kr, vr, cu_p, cu_r, d**-0.5)
    (ref * w).sum().backward()
    refs = [ref.detach(), qr.grad, kr.grad, vr.grad]
    rows = []
    for name in kernels:
        for dtype in dtypes:
            try:
                kernel = resolve_kernel(name, device, dtype)
            except ValueError as err:
                rows.append({"kernel": name, "dtype": str(dtype), "skipped": str(err)})
                continue
            x = [t.to(dtype).requires_grad_() for t in (q, k, v)]
            out = ring_attention(*x, CPLayout(cu_p, cu_r, 1), d**-0.5, kernel=kernel)
            (out.float() * w.float()).sum().backward()
            errs = [_rel(a.detach(), b) for a, b in zip([out] + [t.grad for t in x], refs)]
            tol = 1e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-5
            rows.append({"kernel": name, "dtype": str(dtype), "max_rel_err": max(errs),
                         "tolerance": tol, "ok": max(errs) <= tol})  # fmt: skip
    return rows


def _timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return time.perf_counter() - start, peak


def _ours(q, k, v, layout):
    ring_attention(q, k, v, layout, q.shape[-1] ** -0.5).sum().backward()


def _sdpa(q, k, v, cu_p, lengths):
    import torch.nn.functional as F

    total = 0
    for a, m in zip(cu_p, lengths):
        qd, kd, vd = (x[a : a + m].transpose(0, 1).unsqueeze(0) for x in (q, k, v))
        total = (
            total
            + F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, enable_gqa=True).sum()
        )
    total.backward()


def performance(device, dtype, sizes, heads) -> list[dict]:
    hq, hk, d = heads
    rows = []
    rng = np.random.default_rng(0)
    for n in sizes:
        mixes = {"one_doc": [n], "prolong_mix": []}
        while sum(mixes["prolong_mix"]) < n:
            mixes["prolong_mix"].append(int(min(max(rng.lognormal(6.7, 1.0), 16), 16384)))
        mixes["prolong_mix"][-1] -= sum(mixes["prolong_mix"]) - n
        for mix, lengths in mixes.items():
            cu_p, cu_r = _cu(lengths)
            s = cu_p[-1]
            q, k, v = (torch.randn(s, h, d, device=device, dtype=dtype, requires_grad=True)
                       for h in (hq, hk, hk))  # fmt: skip
            layout = CPLayout(cu_p, cu_r, 1)
            ours = functools.partial(_ours, q, k, v, layout)
            sdpa = functools.partial(_sdpa, q, k, v, cu_p, lengths)
            for label, fn in (("ours", ours), ("sdpa", sdpa)):
                fn()  # warm-up
                seconds, peak = _timed(fn, device)
                rows.append({"tokens": n, "mix": mix, "docs": len(lengths), "impl": label,
                             "seconds": seconds, "peak_gib": peak})  # fmt: skip
                print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="small sizes (a CPU rehearsal)")
    p.add_argument("--out", default="gpu_check_attention.json")
    p.add_argument("--timeout", type=int, default=300)
    args = p.parse_args()
    faulthandler.dump_traceback_later(args.timeout, exit=True)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --device cpu for a rehearsal", file=sys.stderr)
        return 2
    cuda = device.type == "cuda"
    kernels = ["torch_flash", "flash_attn", "tiled"] if cuda else ["cpu_flash", "tiled"]
    result = {"device": torch.cuda.get_device_name() if cuda else "cpu",
              "torch": torch.__version__}  # fmt: skip
    result["correctness"] = correctness(device, kernels, [torch.bfloat16, torch.float32])
    for row in result["correctness"]:
        print(json.dumps(row), flush=True)
    sizes = [2048, 4096] if args.quick else [16384, 65536]
    heads = (8, 2, 64) if args.quick else (32, 8, 128)
    dtype = torch.bfloat16 if cuda else torch.float32
    result["performance"] = performance(device, dtype, sizes, heads)
    Path(args.out).write_text(json.dumps(result, indent=1))
    ok = all(r.get("ok", True) for r in result["correctness"])
    print(f"correctness {'ok' if ok else 'FAILED'}; wrote {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
