"""Export parity gate: the HF export must compute what the trained megatron model computes.

Converters elsewhere have shipped exports whose ``config.json`` silently changed the model (RoPE
theta or scaling dropped or rewritten, the trained length lost), so ``mcore-to-hf`` checks, by
default, the directory it just wrote:

1. **RoPE** (cheap, always): transformers' ``LlamaRotaryEmbedding`` built from the exported
   ``config.json`` vs the rotary embedding the trained model used (``model.rope.megatron_rotary``,
   the same construction ``model.build.build_gpt_model`` uses, with YaRN's attention factor), on
   positions sampled up to the trained length, its last position included.
2. **Logits** (``verify="full"``): a short probe through megatron's GPTModel, loaded from the
   checkpoint by ``checkpoint.dist.load_checkpoint`` at TP = PP = 1 in a spawned single-rank gloo
   process (the caller's process groups are left alone), vs transformers'
   ``LlamaForCausalLM.from_pretrained`` on the export. The megatron weights are first rounded to
   the export dtype, so the comparison isolates mapping errors from bf16 rounding. Memory: one
   fp32 copy of the model in each of the two processes.

A mismatch raises :class:`ExportParityError` naming what differs (the CLI exits 2).
"""

from __future__ import annotations

import logging
import os
import tempfile
import traceback
from pathlib import Path

import torch

from megatron_longctx.checkpoint.hf.config_map import ConversionError
from megatron_longctx.model.config import ModelConfig
from megatron_longctx.model.rope import megatron_cos_sin, megatron_rotary, rope_inv_freq

logger = logging.getLogger(__name__)

VERIFY_MODES = ("full", "rope", "none")
NUM_ROPE_POSITIONS = 257
ROPE_ATOL = 1e-3  # cos / sin are in [-1, 1]; a wrong theta or scaling differs by O(1)
PROBE_TOKENS = 32
LOGITS_RTOL = 1e-3  # max |diff| / max |logit|, weights identical on both sides


class ExportParityError(ConversionError):
    """The exported HF model does not reproduce the trained megatron model."""


def sample_positions(trained_length: int, num: int = NUM_ROPE_POSITIONS) -> torch.Tensor:
    """Sorted positions in [0, trained_length): evenly spread plus seeded random ones; the first
    and last positions always included."""
    last = trained_length - 1
    even = torch.linspace(0, last, min(num, trained_length)).round().long()
    rand = torch.randint(0, trained_length, (num,), generator=torch.Generator().manual_seed(0))
    return torch.unique(torch.cat([even, rand, torch.tensor([0, last])]))


def _hf_rotary(hf_dir: Path):
    from transformers import AutoConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = AutoConfig.from_pretrained(str(hf_dir), local_files_only=True)
    return config, LlamaRotaryEmbedding(config)


def verify_rope(cfg: ModelConfig, hf_dir: str | Path) -> dict:
    """Check 1 of the module docstring. Returns a summary; raises ExportParityError."""
    config, hf = _hf_rotary(Path(hf_dir))
    positions = sample_positions(cfg.max_position_embeddings)
    inv_freq, attention = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    cos, sin = megatron_cos_sin(
        megatron_rotary(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling), positions, attention
    )
    x = torch.zeros(1, positions.numel(), cfg.head_dim)
    hf_cos, hf_sin = (t[0].float() for t in hf(x, positions[None]))
    diff = torch.maximum((cos - hf_cos).abs().amax(-1), (sin - hf_sin).abs().amax(-1))
    worst = int(diff.argmax())
    summary = {
        "positions_checked": int(positions.numel()),
        "last_position": int(positions[-1]),
        "max_abs_diff": float(diff.max()),
    }
    problems = []
    hf_len = int(getattr(config, "max_position_embeddings", 0))
    if hf_len != cfg.max_position_embeddings:
        problems.append(
            f"max_position_embeddings: exported {hf_len}, trained {cfg.max_position_embeddings}"
        )
    if float(diff.max()) > ROPE_ATOL:
        rel = ((hf.inv_freq.float() - inv_freq).abs() / inv_freq).max()
        problems.append(
            f"RoPE cos/sin differ by up to {float(diff.max()):.3g} (at position "
            f"{int(positions[worst])} of {cfg.max_position_embeddings}); inv_freq max rel diff "
            f"{float(rel):.3g}, attention factor HF {float(hf.attention_scaling):.6g} vs trained "
            f"{attention:.6g}; exported rope_parameters {dict(config.rope_parameters or {})} vs "
            f"trained rope_theta {cfg.rope_theta:g}, rope_scaling {cfg.rope_scaling}"
        )
    if problems:
        raise ExportParityError(
            f"{hf_dir}: export does not match the trained model: " + "; ".join(problems)
        )
    return summary


def probe_tokens(cfg: ModelConfig, num: int = PROBE_TOKENS) -> torch.Tensor:
    """A seeded probe ``[1, min(num, trained length)]`` of ids in the real vocabulary."""
    n = min(num, cfg.max_position_embeddings)
    return torch.randint(0, cfg.vocab_size, (1, n), generator=torch.Generator().manual_seed(1))


def _megatron_rank(rank, world, port, ckpt: str, tokens, dtype: torch.dtype, result: str) -> None:
    """The spawned single rank: megatron logits of the checkpoint on ``tokens`` -> ``result``."""
    try:
        torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
        from megatron.core import tensor_parallel

        from megatron_longctx.checkpoint.dist import load_checkpoint, read_state
        from megatron_longctx.checkpoint.hf.config_map import model_config_from_dict
        from megatron_longctx.model.build import build_gpt_model
        from megatron_longctx.parallel.layout import ParallelLayout
        from megatron_longctx.runtime.distributed import initialize_model_parallel
        from megatron_longctx.runtime.spawn import init_local_rank

        init_local_rank(rank, world, port)
        layout = ParallelLayout(1, 1, 1)
        initialize_model_parallel(layout)
        tensor_parallel.model_parallel_cuda_manual_seed(0)
        cfg = model_config_from_dict(read_state(ckpt)["state"]["model"])
        model = build_gpt_model(cfg, layout, backend="local").eval()
        load_checkpoint(ckpt, [model], expect_model=cfg.to_dict())
        with torch.no_grad():
            for p in model.parameters():  # the weights the export holds, computed in fp32
                p.copy_(p.to(dtype).float())
            b, s = tokens.shape
            logits = model(tokens, torch.arange(s).expand(b, s), None)
        torch.save({"logits": logits[..., : cfg.vocab_size].float()}, result)
    except BaseException:  # noqa: BLE001 - reported to the parent
        torch.save({"error": traceback.format_exc()}, result)
    os._exit(0)  # no gloo teardown (it can hang); nothing else runs in this process


def megatron_probe_logits(ckpt: str | Path, tokens: torch.Tensor, dtype: torch.dtype, timeout=900):
    """Logits ``[b, s, vocab]`` of the checkpoint's megatron model (spawned single rank)."""
    from megatron_longctx.runtime.spawn import join_ranks, spawn_ranks

    with tempfile.TemporaryDirectory(prefix="longctx-verify-") as tmp:
        result = os.path.join(tmp, "logits.pt")
        (proc,), _ = spawn_ranks(_megatron_rank, 1, str(ckpt), tokens, dtype, result)
        if join_ranks([proc], timeout):
            raise ExportParityError(f"the megatron probe of {ckpt} did not finish in {timeout}s")
        if not os.path.exists(result):
            raise ExportParityError(f"the megatron probe of {ckpt} died (exit {proc.exitcode})")
        out = torch.load(result, weights_only=False)
    if "error" in out:
        raise ExportParityError(f"the megatron probe of {ckpt} failed:\n{out['error']}")
    return out["logits"]


def verify_logits(ckpt: str | Path, cfg: ModelConfig, hf_dir: str | Path, dtype) -> dict:
    """Check 2 of the module docstring. Returns a summary; raises ExportParityError."""
    from transformers import LlamaForCausalLM

    tokens = probe_tokens(cfg)
    ref = megatron_probe_logits(ckpt, tokens, dtype)
    hf = LlamaForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32, local_files_only=True)
    with torch.no_grad():
        logits = hf.eval()(tokens).logits.float()
    del hf
    diff = float((logits - ref).abs().max())
    scale = float(ref.abs().max()) or 1.0
    same_argmax = float((logits.argmax(-1) == ref.argmax(-1)).float().mean())
    summary = {"probe_tokens": int(tokens.shape[1]), "max_abs_diff": diff, "rel_diff": diff / scale}
    if diff / scale > LOGITS_RTOL:
        raise ExportParityError(
            f"{hf_dir}: logits of the export differ from the trained megatron model on a "
            f"{tokens.shape[1]}-token probe: max |diff| {diff:.4g} (max |logit| {scale:.4g}, "
            f"relative {diff / scale:.3g} > {LOGITS_RTOL}); argmax agrees on "
            f"{100 * same_argmax:.0f}% of positions. The weights or the config were mis-mapped"
        )
    return summary


def verify_export(
    ckpt: str | Path, cfg: ModelConfig, hf_dir: str | Path, dtype, mode: str = "full"
) -> dict:
    """Runs the checks of ``mode`` ("full": RoPE + logits, "rope", "none"); returns summaries."""
    if mode not in VERIFY_MODES:
        raise ConversionError(f"verify mode {mode!r}: choose one of {VERIFY_MODES}")
    report: dict = {"mode": mode}
    if mode in ("full", "rope"):
        report["rope"] = verify_rope(cfg, hf_dir)
    if mode == "full":
        report["logits"] = verify_logits(ckpt, cfg, hf_dir, dtype)
    logger.info("export parity (%s): %s", mode, report)
    return report
