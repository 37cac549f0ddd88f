"""The recipes' precision and optimizers, run as the recipes run them (bf16 / fp16 parameters,
megatron's Float16OptimizerWithFloat16Params and DistributedOptimizer, ``init_from`` a converted
HF model), on 2 gloo processes. Replaced to run on the CPU: the device (CPU instead of CUDA), NCCL
(gloo) and the fused Adam (megatron's own torch-AdamW fallback, which a GPU install without
Transformer Engine / apex also gets). Everything else is the trainer's own code: build_stage,
restore, run_stage, checkpoint/dist.py.

* init_from keeps the pretrained weights: the trainer's loss at steps 1-3 (LR ~0) equals the
  loss transformers computes in fp32 for the source HF model on the same packed documents, within
  bf16's tolerance; before the fix the optimizer's fp32 main copy (taken before init_from loaded)
  replaced the weights at the first step (loss = ln V from step 2 on);
* after build_stage every parameter is in the training dtype on the training device;
* optimizer state survives a layout change bitwise: saved at TP 1 x DP 2, loaded at TP 2 x DP 1,
  saved again: every tensor of the two checkpoints (weights, fp32 main copies, Adam moments) is
  equal, read back by torch's own DCP reader, for both megatron optimizers.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from megatron_longctx.testing.distributed import run_distributed

VOCAB, SEQ, STEPS = 512, 128, 3
#: (precision flag, distributed optimizer): the recipes' bf16 + DistributedOptimizer first.
VARIANTS = (("bf16", True), ("bf16", False), ("fp16", False))


def _hf_model(path: Path) -> None:
    """A tiny Llama whose loss on random tokens is far from ln V (large weights): random or
    re-initialised weights cannot pass for it."""
    from megatron_longctx.testing.hf_model import save_tiny_llama

    save_tiny_llama(path, vocab_size=VOCAB, initializer_range=0.5)


def _config(root: Path, data: dict, precision: str, distributed_optimizer: bool):
    from megatron_longctx.config.loading import from_dict
    from megatron_longctx.config.schema import ExperimentConfig

    raw = {
        "name": "precision",
        "seed": 3,
        "model": {"preset": "tiny", "num_layers": 2, "make_vocab_size_divisible_by": 128},
        "optimizer": {"use_distributed_optimizer": distributed_optimizer},
        "data": {"cache_dir": str(root / "cache")},
        "checkpoint": {"save_dir": str(root / f"ckpt_{precision}_{distributed_optimizer}")},
        "logging": {"run_dir": str(root), "wandb_mode": "disabled"},
        "training": {precision: True},
        "stages": [
            {
                "name": "s",
                "seq_length": SEQ,
                "global_batch_size": 4,
                "micro_batch_size": 1,
                "lr": 1e-9,  # Adam's first update is ~LR: far below bf16's resolution
                "steps": STEPS,
                "warmup_ratio": 0.0,
                "init_from": str(root / "mcore" / "iter_0000000"),
                "mixture": {
                    "seed": 1,
                    "components": [
                        {"name": "long", "prefixes": [data["long"]], "weight": 0.5},
                        {"name": "short", "prefixes": [data["short"]], "weight": 0.5},
                    ],
                },
            }
        ],
    }
    return from_dict(ExperimentConfig, raw)


def _train_variants(rank, world, root, data):
    from megatron_longctx.checkpoint.hf.hf_to_mcore import hf_to_mcore_collective
    from megatron_longctx.checkpoint.start import StartPoint, restore
    from megatron_longctx.training.callbacks import Callback
    from megatron_longctx.training.loop import run_stage
    from megatron_longctx.training.state import build_stage

    class Losses(Callback):
        def __init__(self):
            self.values = []

        def after_step(self, run, result):
            self.values.append(result.loss)

    root = Path(root)
    hf_to_mcore_collective(root / "hf", root / "mcore", 1, 1)
    device = torch.device("cpu")
    out = {}
    for precision, distributed_optimizer in VARIANTS:
        cfg = _config(root, data, precision, distributed_optimizer)
        run = build_stage(cfg, 0, device)
        placed = {
            name: (str(p.dtype), str(p.device))
            for chunk in run.chunks
            for name, p in chunk.named_parameters()
        }
        run.scheduler, run.step = restore(StartPoint(0), run)
        losses = Losses()
        assert run_stage(run, [losses]) == 0
        out[(precision, distributed_optimizer)] = (losses.values, placed)
    return out


def _reference_losses(root: Path, data: dict) -> list[float]:
    """transformers, fp32, each packed document on its own, token-averaged per global batch."""
    from transformers import LlamaForCausalLM

    from megatron_longctx.training.data import build_stage_loader

    cfg = _config(root, data, "bf16", False)
    loader = build_stage_loader(cfg, cfg.stages[0], dp_rank=0, dp_size=1)
    model = LlamaForCausalLM.from_pretrained(root / "hf", dtype=torch.float32).eval()
    losses = []
    for g in range(STEPS):
        total, count = 0.0, 0.0
        for s in range(g * 4, g * 4 + 4):
            sample = loader.packer.get(s)
            cu = sample["cu_seqlens"].tolist()
            tokens, labels = torch.as_tensor(sample["tokens"]), torch.as_tensor(sample["labels"])
            mask = torch.as_tensor(sample["loss_mask"]).double()
            for a, b in zip(cu[:-1], cu[1:]):
                with torch.no_grad():
                    logits = model(tokens[a:b][None].long()).logits[0].double()
                ce = torch.nn.functional.cross_entropy(logits, labels[a:b].long(), reduction="none")
                total += float((ce * mask[a:b]).sum())
                count += float(mask[a:b].sum())
        losses.append(total / count)
    return losses


@pytest.mark.timeout(420)
def test_init_from_keeps_pretrained_weights_in_bf16_fp16_and_distributed_optimizer(tmp_path):
    from megatron_longctx.testing.data import tiny_corpus

    data = tiny_corpus(tmp_path / "data", vocab=VOCAB)
    _hf_model(tmp_path / "hf")
    results = run_distributed(_train_variants, 2, args=(str(tmp_path), data), timeout=400)
    reference = _reference_losses(tmp_path, data)
    assert min(reference) > math.log(VOCAB) + 1.0  # far from what random weights give
    for variant, (losses, placed) in results[0].items():
        precision = variant[0]
        dtype = "torch.bfloat16" if precision == "bf16" else "torch.float16"
        assert placed and set(placed.values()) == {(dtype, "cpu")}, (variant, placed)
        assert len(losses) == STEPS
        for step, (got, want) in enumerate(zip(losses, reference), start=1):
            assert abs(got - want) <= 0.02 * want, (variant, step, losses, reference)
    for variant in VARIANTS:  # every rank reports the same global loss
        assert results[0][variant][0] == results[1][variant][0]


def _build(layout, precision_dtype, distributed_optimizer, seed):
    from megatron.core import tensor_parallel

    from megatron_longctx.config.schema import OptimizerSettings
    from megatron_longctx.model.build import build_gpt_model
    from megatron_longctx.model.config import get_preset
    from megatron_longctx.runtime.distributed import initialize_model_parallel
    from megatron_longctx.training.setup import build_optimizer, build_scheduler, wrap_ddp

    initialize_model_parallel(layout)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)
    settings = OptimizerSettings(lr=1e-3, use_distributed_optimizer=distributed_optimizer)
    model = build_gpt_model(get_preset("tiny"), layout, seq_length=32, params_dtype=precision_dtype)
    chunks = wrap_ddp([model], use_distributed_optimizer=distributed_optimizer)
    optimizer = build_optimizer(chunks, settings, params_dtype=precision_dtype)
    build_scheduler(optimizer, settings, total_steps=10, warmup_ratio=0.0)
    return chunks, optimizer


def _step(chunks, optimizer, step, rank):
    from megatron_longctx.training.step import forward_backward
    from tests.distributed.common import make_batches

    batches = make_batches(2, 1, 32, 512, seed=step + 10 * rank)
    forward_backward(chunks, batches, seq_length=32, micro_batch_size=1, optimizer=optimizer)
    optimizer.step()


def _save_resume_reshard(rank, world, root, distributed_optimizer):
    """TP 1 x DP 2: 2 steps, save A, step 3 -> weights W. Fresh model: load A, step 3 -> W again
    (exact resume). TP 2 x DP 1: load A, save B (A and B compared by the test)."""
    from megatron_longctx.checkpoint.dist import load_checkpoint, save_checkpoint
    from megatron_longctx.model.config import get_preset
    from megatron_longctx.model.full_state import gather_full
    from megatron_longctx.parallel.layout import ParallelLayout

    expect = get_preset("tiny").to_dict()
    bf16, dp2, tp2 = torch.bfloat16, ParallelLayout(1, 1, 1), ParallelLayout(2, 1, 1)
    chunks, opt = _build(dp2, bf16, distributed_optimizer, seed=2)
    for step in range(2):
        _step(chunks, opt, step, rank)
    save_checkpoint(f"{root}/a", 2, chunks, opt, state={"model": expect})
    _step(chunks, opt, 2, rank)
    straight = gather_full(chunks[0])
    chunks, opt = _build(dp2, bf16, distributed_optimizer, seed=9)  # another init
    load_checkpoint(f"{root}/a/iter_0000002", chunks, opt, None, expect_model=expect)
    _step(chunks, opt, 2, rank)
    resumed = gather_full(chunks[0])
    differ = [k for k in straight if not torch.equal(straight[k], resumed[k])]
    chunks, opt = _build(tp2, bf16, distributed_optimizer, seed=5)
    load_checkpoint(f"{root}/a/iter_0000002", chunks, opt, None, expect_model=expect)
    save_checkpoint(f"{root}/b", 2, chunks, opt, state={"model": expect})
    _step(chunks, opt, 2, rank)  # the resharded optimizer steps
    return differ, len(straight)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("distributed_optimizer", [True, False], ids=["distopt", "float16opt"])
def test_bf16_resume_is_exact_and_reshards_bitwise(tmp_path, distributed_optimizer):
    from tests.integration.run_utils import read_model_tensors

    for differ, num in run_distributed(
        _save_resume_reshard, 2, args=(str(tmp_path), distributed_optimizer), timeout=280
    ):
        assert num > 10 and differ == [], differ
    a = read_model_tensors(tmp_path / "a" / "iter_0000002", optimizer=True)
    b = read_model_tensors(tmp_path / "b" / "iter_0000002", optimizer=True)
    moments = [k for k in a if k.startswith("optimizer.state.exp_avg_sq.")]
    # the fp32 main copies: "fp32_param" (Float16Optimizer) / "param" (DistributedOptimizer)
    main_prefixes = ("optimizer.state.fp32_param.", "optimizer.state.param.")
    mains = [k for k in a if k.startswith(main_prefixes)]
    weights = [k for k in a if not k.startswith("optimizer.")]
    assert len(moments) == len(mains) == len(weights) >= 5, sorted(a)
    assert all(a[k].dtype == torch.float32 for k in moments + mains)
    assert all(a[k].dtype == torch.bfloat16 for k in weights)
    assert all(a[k].abs().sum() > 0 for k in moments)  # real second moments
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
