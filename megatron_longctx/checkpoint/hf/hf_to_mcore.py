"""HF Llama dir -> the project's megatron dist checkpoint (``checkpoint.dist``, iteration 0).

How it runs: every rank of a TP x PP (x DP) job builds its own GPTModel chunk and fills each
parameter from a lazily read HF tensor (one full tensor in memory at a time: read, fuse / pad,
slice this rank's shard, copy, free), then all ranks call ``checkpoint.dist.save_checkpoint``.
``hf_to_mcore`` runs that collective directly when ``torch.distributed`` is already initialised
(e.g. under torchrun), and otherwise spawns TP x PP local gloo processes itself. Conversion runs
on CPU. Peak memory per process is its model shard plus one full HF tensor.

The checkpoint is written at the TP/PP asked for; megatron dist_checkpointing reshards on load, so
the trainer loads it at any TP/PP whose padded vocabulary (``ModelConfig.padded_vocab_size``)
is the same (Megatron's own rule: the vocabulary is padded to a multiple of divisible_by x TP).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import traceback
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from megatron_longctx.checkpoint.hf import keymap
from megatron_longctx.checkpoint.hf.config_map import ConversionError, model_config_from_hf
from megatron_longctx.checkpoint.hf.hf_io import HFReader
from megatron_longctx.model.config import ModelConfig
from megatron_longctx.runtime.spawn import init_local_rank, join_ranks, spawn_ranks

logger = logging.getLogger(__name__)

TOKENIZER_SUBDIR = "hf_tokenizer"
_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def open_hf_checkpoint(
    hf_dir: str | Path, make_vocab_size_divisible_by: int = 128
) -> tuple[HFReader, ModelConfig]:
    """Opens ``hf_dir`` and checks config and tensors (names, shapes) before anything is built.

    Raises:
        ConversionError: non-Llama config, missing shard or tensor, or a shape the config rules out.
    """
    reader = HFReader(hf_dir)
    cfg = model_config_from_hf(
        reader.config,
        source=str(Path(hf_dir) / "config.json"),
        make_vocab_size_divisible_by=make_vocab_size_divisible_by,
    )
    wanted = keymap.hf_names(cfg)
    missing = [n for n in wanted if n not in reader]
    if missing:
        raise ConversionError(
            f"{hf_dir}: {len(missing)} tensor(s) required by config.json are "
            f"missing, e.g. {missing[:3]}; the checkpoint is incomplete"
        )
    bad = [
        f"{n}: {reader.shape(n)} != {keymap.expected_hf_shape(n, cfg)}"
        for n in wanted
        if reader.shape(n) != keymap.expected_hf_shape(n, cfg)
    ]
    if bad:
        raise ConversionError(
            f"{hf_dir}: tensor shapes do not match config.json "
            f"(checkpoint vs config): {bad[:3]}; fix config.json or the weights"
        )
    return reader, cfg


def check_layout(cfg: ModelConfig, tp: int, pp: int, world_size: int | None = None) -> None:
    """Every size rule of writing ``cfg`` at TP x PP (``parallel/layout.py``), as a
    ConversionError naming the flag to change.

    Args:
        world_size: the processes that will run it (None: TP x PP, what the converter spawns).
    """
    from megatron_longctx.parallel.layout import LayoutError, ParallelLayout

    try:
        ParallelLayout(tp, pp, 1).validate(
            world_size=world_size or tp * pp,
            num_layers=cfg.num_layers,
            num_attention_heads=cfg.num_attention_heads,
            num_query_groups=cfg.num_query_groups,
        )
    except LayoutError as err:
        raise ConversionError(
            f"--tensor-model-parallel-size {tp} --pipeline-model-parallel-size {pp}: {err}; "
            "choose sizes that divide the model's heads, query groups and layers"
        ) from None


class _LazyFullTensors(Mapping):
    """megatron full name -> full tensor, built from HF tensors only when looked up."""

    def __init__(self, reader: HFReader, cfg: ModelConfig, padded_vocab: int, dtype: torch.dtype):
        self.reader, self.cfg, self.padded, self.dtype = reader, cfg, padded_vocab, dtype
        self.names = keymap.mcore_names(cfg)

    def __getitem__(self, name: str) -> torch.Tensor:
        parts = [self.reader.get(n).to(self.dtype) for n in keymap.hf_sources(name)]
        return keymap.to_mcore(name, parts, self.cfg, self.padded)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def hf_to_mcore_collective(
    hf_dir: str | Path,
    save_dir: str | Path,
    tensor_model_parallel_size: int,
    pipeline_model_parallel_size: int,
    *,
    params_dtype: torch.dtype = torch.float32,
    make_vocab_size_divisible_by: int = 128,
) -> Path:
    """Collective (every rank calls it; torch.distributed initialised). Returns the checkpoint dir.

    Sets up megatron's TP/PP groups for the given sizes (DP = world / (TP x PP)).
    """
    import torch.distributed as dist
    from megatron.core import tensor_parallel

    from megatron_longctx.checkpoint.dist import save_checkpoint
    from megatron_longctx.model.build import build_gpt_model
    from megatron_longctx.model.full_state import load_full
    from megatron_longctx.parallel.layout import ParallelLayout
    from megatron_longctx.runtime.distributed import initialize_model_parallel

    reader, cfg = open_hf_checkpoint(hf_dir, make_vocab_size_divisible_by)
    layout = ParallelLayout(tensor_model_parallel_size, pipeline_model_parallel_size, 1)
    check_layout(
        cfg, tensor_model_parallel_size, pipeline_model_parallel_size, dist.get_world_size()
    )
    initialize_model_parallel(layout)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    # Conversion needs no fused kernels; the local spec's checkpoint keys equal the TE spec's.
    model = build_gpt_model(cfg, layout, backend="local", params_dtype=params_dtype)
    padded = cfg.padded_vocab_size(tensor_model_parallel_size)
    load_full(model, _LazyFullTensors(reader, cfg, padded, params_dtype))
    copied = [None]
    if dist.get_rank() == 0:
        copied = [reader.copy_tokenizer(Path(save_dir) / TOKENIZER_SUBDIR)]
    dist.broadcast_object_list(copied, src=0)  # the common state must be identical on every rank
    hf_dtype = _SAFETENSORS_DTYPES.get(reader.dtype("model.embed_tokens.weight"), "float32")
    state = {
        "model": cfg.to_dict(),
        "source": "hf",
        "hf_dir": str(Path(hf_dir).resolve()),
        "hf_config": reader.config,
        "hf_dtype": hf_dtype,
        "tokenizer_files": copied[0],
        "tensor_model_parallel_size": tensor_model_parallel_size,
        "pipeline_model_parallel_size": pipeline_model_parallel_size,
    }
    return save_checkpoint(save_dir, 0, [model], state=state)


def _spawned_rank(rank: int, world: int, port: int, args: tuple, kwargs: dict, errors) -> None:
    try:
        torch.set_num_threads(1)
        init_local_rank(rank, world, port)
        hf_to_mcore_collective(*args, **kwargs)
    except BaseException:  # noqa: BLE001 - reported to the parent, which kills the other ranks
        errors.put((rank, traceback.format_exc()))
        raise SystemExit(1) from None


def hf_to_mcore(
    hf_dir: str | Path,
    save_dir: str | Path,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    *,
    params_dtype: torch.dtype = torch.float32,
    make_vocab_size_divisible_by: int = 128,
    overwrite: bool = False,
) -> Path:
    """Converts ``hf_dir`` to a megatron checkpoint under ``save_dir`` (see module docstring).

    Args:
        hf_dir: HF Llama directory (config.json + safetensors).
        save_dir: checkpoint root; the checkpoint lands in ``save_dir/iter_0000000``.
        tensor_model_parallel_size / pipeline_model_parallel_size: the layout it is written at.
        params_dtype: dtype of the stored parameters (fp32 keeps any HF dtype exactly).
        make_vocab_size_divisible_by: Megatron's vocabulary padding multiple (times TP).
        overwrite: replace checkpoints already present in ``save_dir``.

    Returns:
        The checkpoint directory.
    """
    from megatron_longctx.checkpoint.dist import iteration_dir, list_checkpoints

    kwargs = dict(
        params_dtype=params_dtype, make_vocab_size_divisible_by=make_vocab_size_divisible_by
    )
    args = (str(hf_dir), str(save_dir), tensor_model_parallel_size, pipeline_model_parallel_size)
    # fail fast, before any process: the HF files, then every size rule of the layout
    _, cfg = open_hf_checkpoint(hf_dir, make_vocab_size_divisible_by)
    launched = torch.distributed.is_initialized()  # under torchrun: TP x PP x DP processes
    world = torch.distributed.get_world_size() if launched else None
    check_layout(cfg, tensor_model_parallel_size, pipeline_model_parallel_size, world)
    existing = list_checkpoints(save_dir, complete_only=False)
    if existing and not overwrite:
        raise ConversionError(
            f"{save_dir} already holds checkpoint(s) at iterations {existing}; "
            "pass --overwrite to replace them, or choose another --save"
        )
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # every rank checked --save before any rank writes into it
        return hf_to_mcore_collective(*args, **kwargs)
    world = tensor_model_parallel_size * pipeline_model_parallel_size
    errors = mp.get_context("spawn").SimpleQueue()
    procs, _ = spawn_ranks(_spawned_rank, world, args, kwargs, errors)
    join_ranks(procs, fail_fast=True)  # one rank failed: the others are killed
    if any(p.exitcode != 0 for p in procs):
        details = "\n".join(f"--- rank {r}:\n{tb}" for r, tb in _drain(errors))
        raise RuntimeError(f"hf-to-mcore failed on a spawned rank:\n{details or '(no traceback)'}")
    return iteration_dir(save_dir, 0)


def _drain(queue) -> list:
    items = []
    while not queue.empty():
        items.append(queue.get())
    return items
