"""gpu_check's CUDA legs at their full sizes on fake CUDA tensors (``--device cpu``), on CPU.

What stands in for the GPU: ``megatron_longctx.testing.fake_cuda`` (FakeTensor, device cuda:0,
no data). What this rehearses: every device rule of the CUDA legs (a host tensor mixed into a
CUDA op raises, as on a GPU), the shapes and dtypes the kernels get and return, the block layouts
and batch path at 16K-64K tokens, the torch flash-attention varlen ops' schemas, and the planner's
decision per trainer leg. What it cannot: numbers, autograd on CUDA (kernels' backward is called
directly), megatron's model forward.
"""

from __future__ import annotations

import torch

from megatron_longctx.testing.fake_cuda import CUDA, fake_cuda


def _expect(t: torch.Tensor, shape, dtype=None) -> None:
    if t.device != CUDA or tuple(t.shape) != tuple(shape) or (dtype and t.dtype != dtype):
        raise AssertionError(f"got {tuple(t.shape)} {t.dtype} on {t.device}, want {shape} {dtype}")


def _attention(fake, tokens: int, heads, one_doc: bool, reference: bool, dtype=torch.bfloat16):
    from gpu_check import _block, _sdpa_forward, doc_mix

    from megatron_longctx.model.attention.kernels import resolve_kernel
    from megatron_longctx.model.attention.reference import document_causal_attention

    hq, hk, d = heads
    docs = doc_mix(tokens, one_doc)
    cu, block = _block(docs)
    kernel = resolve_kernel("auto", CUDA, dtype)  # bf16: torch / flash-attn varlen; fp32: tiled
    q, k, v, dout = (fake((tokens, h, d), dtype) for h in (hq, hk, hk, hq))
    out, lse = kernel.forward(q, k, v, block, d**-0.5)
    _expect(out, (tokens, hq, d), torch.float32)
    _expect(lse, (tokens, hq), torch.float32)
    grads = kernel.backward(q, k, v, dout, out.to(q.dtype), lse, block, d**-0.5)
    for g, x in zip(grads, (q, k, v)):
        _expect(g, x.shape, torch.float32)
    if reference:
        ref = document_causal_attention(q.float(), k.float(), v.float(), cu, cu, d**-0.5)
        _expect(ref, (tokens, hq, d), torch.float32)
    else:  # the SDPA baseline's device rules are the same per document: two suffice
        _sdpa_forward(q, k, v, docs[:2])


def _trainer_batch(fake, host: dict, seq: int) -> None:
    from megatron_longctx.training.batch import BatchSharding
    from megatron_longctx.training.step import loss_func

    batch = BatchSharding(device=CUDA).to_device(host)
    for key in ("tokens", "labels", "loss_mask", "position_ids"):
        _expect(batch[key], (1, seq))
    loss_sum, _, report = loss_func(batch["loss_mask"], fake((1, seq)))
    _expect(loss_sum, ())
    _expect(report["lm loss"], (2,))


def fake_cuda_legs(hardware, model_cfg=None, heads=(32, 8, 128)) -> list[dict]:
    """Every CUDA leg of gpu_check (full sizes) on fake CUDA tensors; one record per leg."""
    from gpu_check import LLAMA_1B, _micro, plan_trainer_leg

    from megatron_longctx.training.batch import BatchSharding

    model_cfg = model_cfg or LLAMA_1B
    legs = [
        ("attention correctness bf16 4096", lambda f: _attention(f, 4096, heads, False, True)),
        (
            "attention correctness fp32 4096",
            lambda f: _attention(f, 4096, heads, False, True, torch.float32),
        ),
    ]
    for tokens in (16384, 65536):
        for one_doc in (True, False):
            name = f"attention timing {tokens} {'one document' if one_doc else 'mix'}"
            legs.append((name, lambda f, t=tokens, o=one_doc: _attention(f, t, heads, o, False)))
    for seq in (8192, 65536):
        # the host half on real tensors, as the prefetch thread runs it (fake mode would fake them)
        host = BatchSharding(device=CUDA).host(_micro(seq, model_cfg.vocab_size, 0))
        legs.append((f"trainer batch {seq}", lambda f, s=seq, h=host: _trainer_batch(f, h, s)))
    records = []
    for name, leg in legs:
        record = {"leg": name, "passed": True}
        try:
            with fake_cuda() as fake:
                leg(fake)
        except Exception as err:  # recorded: the rehearsal reports every leg
            record.update(passed=False, error=f"{type(err).__name__}: {str(err)[:300]}")
        if name.startswith("trainer"):
            pred = plan_trainer_leg(model_cfg, int(name.split()[-1]), hardware)
            skipped = f"skipped on {hardware.name}: {pred.reason}"
            record["planner"] = "fits" if pred.fits else skipped
        records.append(record)
    return records
