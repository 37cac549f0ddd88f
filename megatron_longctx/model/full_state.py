"""Gather / scatter a GPTModel's TP- and PP-sharded tensors as full (unsharded) tensors.

The layout rules, the same ones megatron's sharded_state_dict encodes:
  * a parameter with ``tensor_model_parallel=True`` is split over TP along ``partition_dim``
    (column-parallel: dim 0, row-parallel: dim 1, vocab-parallel embedding / output layer: dim 0);
  * SwiGLU's fused ``mlp.linear_fc1.weight`` holds ``[gate_r; up_r]`` on TP rank r, so the full tensor
    is ``[gate_0 .. gate_{tp-1}; up_0 .. up_{tp-1}]``;
  * everything else (RMSNorm weights) is replicated over TP;
  * with PP, stage p holds layers ``p * L/PP ..`` under local names ``decoder.layers.0..``; full names
    use global layer numbers; the embedding lives on the first stage, the output layer on the last.
The result keys are megatron's own parameter names with global layer numbers. Used by the tests
(compare a sharded model with an unsharded reference) and by checkpoint conversion.
"""

from __future__ import annotations

import re

import torch
import torch.distributed as dist

_LAYER = re.compile(r"^(.*?decoder\.layers\.)(\d+)(\..*)$")


def _is_glu_fc1(name: str, model) -> bool:
    return name.endswith("mlp.linear_fc1.weight") and model.config.gated_linear_unit


def _global_name(name: str, layer_offset: int) -> str:
    m = _LAYER.match(name)
    return f"{m.group(1)}{int(m.group(2)) + layer_offset}{m.group(3)}" if m else name


def _layer_offset(model) -> int:
    from megatron.core import parallel_state

    pp = parallel_state.get_pipeline_model_parallel_world_size()
    return parallel_state.get_pipeline_model_parallel_rank() * (model.config.num_layers // pp)


def _unwrap(model):
    while hasattr(model, "module"):
        model = model.module
    return model


def _skip(name: str, model) -> bool:
    # With tied embeddings and PP > 1 the last stage keeps a synchronised copy of the embedding.
    return (
        name.startswith("output_layer")
        and model.share_embeddings_and_output_weights
        and not model.pre_process
    )


def _tp_gather(tensor: torch.Tensor, param, name: str, model) -> torch.Tensor:
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp == 1 or not getattr(param, "tensor_model_parallel", False):
        return tensor.detach().clone()
    group = parallel_state.get_tensor_model_parallel_group()
    parts = [torch.empty_like(tensor) for _ in range(tp)]
    dist.all_gather(parts, tensor.detach().contiguous(), group=group)
    if _is_glu_fc1(name, model):
        halves = [p.chunk(2, dim=0) for p in parts]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(parts, dim=param.partition_dim)


def gather_full(model, kind: str = "param", optimizer=None) -> dict[str, torch.Tensor]:
    """Full tensors of every parameter (``kind='param'``), gradient (``'grad'``: ``main_grad`` under
    megatron DDP, else ``.grad``) or Adam moment (``'exp_avg'`` / ``'exp_avg_sq'`` of megatron's
    ``optimizer``), identical on every rank of the TP and PP groups."""
    from megatron.core import parallel_state

    module = _unwrap(model)
    offset = _layer_offset(module)
    local: dict[str, torch.Tensor] = {}
    for name, param in module.named_parameters():
        if _skip(name, module):
            continue
        if kind == "param":
            tensor = param.data
        elif kind in ("exp_avg", "exp_avg_sq"):
            tensor = optimizer.optimizer.state[getattr(param, "main_param", param)][kind]
        else:
            tensor = getattr(param, "main_grad", None)
            if tensor is None:
                tensor = param.grad
            if tensor is None:
                tensor = torch.zeros_like(param.data)
        local[_global_name(name, offset)] = _tp_gather(tensor, param, name, module)
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return local
    gathered: list = [None] * parallel_state.get_pipeline_model_parallel_world_size()
    dist.all_gather_object(
        gathered, local, group=parallel_state.get_pipeline_model_parallel_group()
    )
    full: dict[str, torch.Tensor] = {}
    for part in gathered:
        full.update(part)
    return full


def shard_for_rank(full: torch.Tensor, param, name: str, model) -> torch.Tensor:
    """This TP rank's slice of a full tensor (inverse of the gather rules)."""
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    if tp == 1 or not getattr(param, "tensor_model_parallel", False):
        return full
    if _is_glu_fc1(name, model):
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp, dim=0)[rank], up.chunk(tp, dim=0)[rank]], dim=0)
    return full.chunk(tp, dim=param.partition_dim)[rank]


def load_full(model, full: dict[str, torch.Tensor], strict: bool = True) -> None:
    """Copies full tensors into this rank's shards. Missing or mis-shaped tensors raise."""
    module = _unwrap(model)
    offset = _layer_offset(module)
    for name, param in module.named_parameters():
        key = _global_name(name, offset)
        if _skip(name, module):
            key = "embedding.word_embeddings.weight"
        if key not in full:
            if strict:
                raise KeyError(f"no tensor for parameter {key!r}")
            continue
        shard = shard_for_rank(full[key], param, name, module)
        if shard.shape != param.shape:
            raise ValueError(
                f"{key}: shard shape {tuple(shard.shape)} != parameter shape {tuple(param.shape)}"
            )
        with torch.no_grad():
            param.data.copy_(shard)
