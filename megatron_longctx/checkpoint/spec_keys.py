"""Checkpoints across megatron's local and Transformer Engine (TE) layer specs.

Both specs store the same tensors under the same keys: megatron's local spec maps its norms onto
TE's fused names (``sharded_state_dict_keys_map``: ``input_layernorm.`` ->
``self_attention.linear_qkv.layer_norm_``) and its linears store an empty ``_extra_state``
"for compatibility with the TE state dict". What differs is the set of ``_extra_state`` objects
(TE's FP8 / kernel metadata): TE's core attention (``TEDotProductAttention``) and other TE modules
have some that a local-spec checkpoint, e.g. ``tools/convert_checkpoint.py hf-to-mcore`` output,
lacks; loading it into the TE spec then fails on missing ``_extra_state`` keys (NVIDIA/cosmos#69).

Rules (``checkpoint.dist.load_checkpoint`` applies them):
* a requested ``_extra_state`` that the checkpoint lacks is dropped from the request and left at
  the module's fresh value (what a newly built TE model has: no FP8 history);
* every other missing tensor or object is still an error;
* an ``_extra_state`` the checkpoint has but the model does not request is ignored (TE -> local).
HF export reads tensors by name (checkpoint/hf/keymap.py) and never an ``_extra_state``, so a
TE-spec training checkpoint exports like a local-spec one.
"""

from __future__ import annotations

EXTRA_STATE = "_extra_state"


def checkpoint_keys(ckpt_dir: str) -> set[str]:
    """The sharded keys a megatron dist checkpoint holds: tensor keys, and each ShardedObject's
    ``unique_key`` (``<key>/shard_<offset>_<shape>``)."""
    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

    return set(load_sharded_metadata(str(ckpt_dir)).keys())


def drop_absent_extra_state(sharded_state_dict: dict, available: set[str]) -> list[str]:
    """Removes (in place) the ``_extra_state`` ShardedObjects whose key ``available`` lacks.

    Returns the state-dict names removed (to be allowed as missing in ``load_state_dict``).
    """
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    dropped = []
    for name, value in list(sharded_state_dict.items()):
        if (
            name.endswith(EXTRA_STATE)
            and isinstance(value, ShardedObject)
            and value.unique_key not in available  # objects are stored per shard
        ):
            del sharded_state_dict[name]
            dropped.append(name)
    return dropped


def load_model_state(module, state_dict: dict, allowed_missing: list[str], where: str) -> None:
    """``module.load_state_dict`` that tolerates exactly the dropped ``_extra_state`` names."""
    from megatron_longctx.checkpoint.dist import CheckpointError

    result = module.load_state_dict(state_dict, strict=False)
    allowed = set(allowed_missing)
    missing = [k for k in result.missing_keys if k not in allowed]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"{where}: the checkpoint does not match the model: missing {missing[:5]}, "
            f"unexpected {list(result.unexpected_keys)[:5]}; is it from another model or spec?"
        )
