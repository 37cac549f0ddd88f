"""The project's megatron dist checkpoint -> HF Llama dir (config.json, safetensors, tokenizer).

Works on any checkpoint written by ``checkpoint.dist.save_checkpoint`` whose common state carries
``state["model"] = ModelConfig.to_dict()`` (hf-to-mcore output or a training checkpoint, at any
TP/PP; optimizer state in it is never read). No process group and no model are built: tensors are
read one at a time (one layer of a layer-stacked tensor) straight from the torch_dist (PyTorch DCP)
files (``dcp_reader``), split / trimmed to HF names (``keymap``), and written shard by shard
(``hf_io.ShardWriter``), so peak memory stays near one output shard.

The exported ``config.json`` is written by transformers' ``LlamaConfig`` from the checkpoint's
``ModelConfig``: ``rope_theta`` and ``rope_scaling`` as trained, ``max_position_embeddings`` = the
longest context trained or pretrained (``max_context``, checkpoint/lineage.py) and the source
model's special-token ids (bos, eos, pad, unk). The tokenizer files kept beside the checkpoint
(``<root>/hf_tokenizer``: the converter's copy of the source's, or the training run's) are copied,
with the source's ``generation_config.json`` (else one made from the config's token ids). The
export is then checked against the trained model (``verify.py``: RoPE and a logits probe); a
mismatch raises ``ExportParityError`` naming what differs.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from megatron_longctx.checkpoint.hf import keymap
from megatron_longctx.checkpoint.hf.config_map import (
    ConversionError,
    hf_config_from_model,
    model_config_from_dict,
)
from megatron_longctx.checkpoint.hf.dcp_reader import DcpTensorReader
from megatron_longctx.checkpoint.hf.hf_io import (
    ShardWriter,
    copy_tokenizer_files,
    parse_size,
    prepare_output_dir,
)
from megatron_longctx.checkpoint.hf.hf_to_mcore import TOKENIZER_SUBDIR
from megatron_longctx.checkpoint.hf.verify import verify_export
from megatron_longctx.model.config import ModelConfig

logger = logging.getLogger(__name__)

DTYPES = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
}
_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


def resolve_checkpoint(load: str | Path) -> Path:
    """``load`` itself when it is a complete checkpoint, else the latest complete one under it."""
    from megatron_longctx.checkpoint.init_from import InitFromError
    from megatron_longctx.checkpoint.init_from import resolve_checkpoint as resolve

    try:
        return resolve(load, "--load")
    except InitFromError as err:
        raise ConversionError(str(err)) from None


def _expected_stacked_shape(name: str, cfg: ModelConfig, key_shape: tuple) -> tuple:
    """The global dist-checkpoint shape of ``name`` (vocab rows: as padded in the file)."""
    h, f = cfg.hidden_size, cfg.ffn_hidden_size
    hn, nh, ng = cfg.head_dim, cfg.num_attention_heads, cfg.num_query_groups
    if name in (keymap.EMBEDDING, keymap.OUTPUT):
        return (max(key_shape[0], cfg.vocab_size), h)
    suffix = name.split(".", 3)[-1] if name.startswith("decoder.layers.") else name
    per_layer = {
        "input_layernorm.weight": (h,),
        "pre_mlp_layernorm.weight": (h,),
        "self_attention.linear_qkv.weight": ((nh + 2 * ng) * hn, h),
        "self_attention.linear_proj.weight": (h, nh * hn),
        "mlp.linear_fc1.weight": (2 * f, h),
        "mlp.linear_fc2.weight": (h, f),
    }
    if suffix in per_layer:
        return (cfg.num_layers, *per_layer[suffix])
    return (h,)  # final norm


def mcore_to_hf(
    load: str | Path,
    save: str | Path,
    *,
    dtype: str | None = None,
    overwrite: bool = False,
    max_shard_size: str | int = "5GB",
    tokenizer_dir: str | Path | None = None,
    verify: str = "full",
) -> dict:
    """Exports a megatron checkpoint as an HF Llama directory (see module docstring).

    Args:
        load: checkpoint root (latest complete checkpoint is used) or one ``iter_*`` directory.
        save: output HF directory.
        dtype: "bf16" | "fp16" | "fp32"; None: the dtype of the HF model it was imported from,
            else the dtype the checkpoint stores.
        overwrite: replace a model already in ``save``.
        max_shard_size: safetensors shard limit ("5GB", "200KB" or bytes); above it the export is
            sharded with a ``model.safetensors.index.json``.
        tokenizer_dir: copy tokenizer files from here; default: ``<root>/hf_tokenizer`` recorded
            by hf-to-mcore, when present.
        verify: the export parity gate (``checkpoint.hf.verify``): "full" (RoPE at sampled
            positions up to the trained length + logits on a short probe, the default), "rope",
            or "none".

    Returns:
        A summary: checkpoint, files written, tokenizer files, dtype, rope_theta, max positions.
    """
    ckpt = resolve_checkpoint(load)
    from megatron_longctx.checkpoint.dist import read_state

    state = read_state(ckpt).get("state", {})
    if not isinstance(state.get("model"), dict):
        raise ConversionError(
            f"{ckpt}: common state has no 'model' config "
            "(ModelConfig.to_dict()); "
            "only checkpoints written by checkpoint.dist.save_checkpoint export"
        )
    cfg = model_config_from_dict(state["model"])
    # the longest context trained or pretrained (checkpoint/lineage.py), not the last stage's
    longest = max(cfg.max_position_embeddings, int(state.get("max_context") or 0))
    cfg = cfg.with_updates(max_position_embeddings=longest)
    reader = DcpTensorReader(ckpt)
    if dtype is None:
        dtype = state.get("hf_dtype") or _DTYPE_NAMES.get(reader.dtype(keymap.EMBEDDING), "float32")
    if dtype not in DTYPES:
        raise ConversionError(f"--dtype {dtype!r}: choose bf16, fp16 or fp32")
    torch_dtype = DTYPES[dtype]
    hf_config = hf_config_from_model(cfg, _DTYPE_NAMES[torch_dtype], state.get("hf_config"))
    out = prepare_output_dir(save, hf_config.to_dict(), overwrite)
    writer = ShardWriter(out, parse_size(max_shard_size))
    for name in keymap.mcore_names(cfg):
        key, layer = keymap.dcp_key(name)
        if key not in reader:
            raise ConversionError(
                f"{ckpt}: tensor {key!r} is missing although the model config "
                "needs it; the checkpoint is incomplete or of another model"
            )
        shape = reader.shape(key)
        want = _expected_stacked_shape(name, cfg, shape)
        if shape != want:
            raise ConversionError(
                f"{ckpt}: {key} has shape {shape} but the stored model config "
                f"implies {want}; the checkpoint does not match its config"
            )
        for hf_name, tensor in keymap.to_hf(name, reader.read(key, layer), cfg).items():
            writer.add(hf_name, tensor.to(torch_dtype))
    files = writer.finish()
    hf_config.save_pretrained(out)
    tok_src = Path(tokenizer_dir) if tokenizer_dir else ckpt.parent / TOKENIZER_SUBDIR
    tokenizer = copy_tokenizer_files(tok_src, out) if tok_src.is_dir() else []
    if tokenizer_dir and not tokenizer:
        raise ConversionError(f"--tokenizer-dir {tokenizer_dir} holds no tokenizer files")
    if not (out / "generation_config.json").is_file():  # the source's is copied with the tokenizer
        from transformers import GenerationConfig

        GenerationConfig.from_model_config(hf_config).save_pretrained(out)
    if not tokenizer:
        logger.warning(
            "%s: no tokenizer files (none beside the checkpoint in %s); pass --tokenizer-dir",
            out,
            tok_src,
        )
    logger.info("exported %s -> %s (%d files, %s)", ckpt, out, len(files), dtype)
    parity = verify_export(ckpt, cfg, out, torch_dtype, verify)
    return {
        "verify": parity,
        "checkpoint": str(ckpt),
        "files": files,
        "tokenizer_files": tokenizer,
        "dtype": _DTYPE_NAMES[torch_dtype],
        "rope_theta": cfg.rope_theta,
        "rope_scaling": cfg.rope_scaling,
        "max_position_embeddings": cfg.max_position_embeddings,
        "total_bytes": writer.total_bytes,
    }
