"""Defect 4 (issue 20): checkpoints across the local and the Transformer Engine key sets.

TE cannot be built on CPU, so the TE key set is emulated exactly where it differs: a TE-spec model
has the local spec's tensors under the same keys (megatron maps the local norms to TE's fused
names) plus ``_extra_state`` objects a local-spec checkpoint lacks, e.g. TE's core attention's.
``TELikeCoreAttention`` is the project's core attention with a TE-style ``get/set_extra_state``,
so megatron's own sharded_state_dict machinery adds ``...core_attention._extra_state`` objects
exactly as for TE modules. What this cannot prove: the contents of real TE extra state (FP8 meta).
"""

import torch

from megatron_longctx.testing.distributed import run_distributed


def _worker(rank, world, tmp):
    from megatron.core import tensor_parallel
    from torch.distributed.checkpoint.api import CheckpointException

    from megatron_longctx.checkpoint.dist import CheckpointError, load_checkpoint, save_checkpoint
    from megatron_longctx.checkpoint.hf.mcore_to_hf import mcore_to_hf
    from megatron_longctx.model.attention import LocalCoreAttention
    from megatron_longctx.model.build import build_gpt_model
    from megatron_longctx.model.config import get_preset
    from megatron_longctx.parallel.layout import ParallelLayout
    from megatron_longctx.runtime.distributed import initialize_model_parallel

    class TELikeCoreAttention(LocalCoreAttention):
        def get_extra_state(self):
            return torch.tensor([float(getattr(self, "_fp8_meta", 7.0))])

        def set_extra_state(self, state):
            self._fp8_meta = None if state is None else float(state[0])

    cfg = get_preset("tiny")
    layout = ParallelLayout(1, 1, 1)
    initialize_model_parallel(layout)

    def build(core, seed):
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
        torch.manual_seed(seed)
        return build_gpt_model(cfg, layout, backend="local", core_attention=core, seq_length=64)

    def weights(m):
        return {k: v.clone() for k, v in m.state_dict().items() if "_extra_state" not in k}

    out = {}
    local, te_like = build(LocalCoreAttention, 1), build(TELikeCoreAttention, 2)
    state = {"model": cfg.to_dict()}
    local_ckpt = save_checkpoint(f"{tmp}/local", 0, [local], state=state)
    te_ckpt = save_checkpoint(f"{tmp}/te", 0, [te_like], state=state)
    sd_keys = [k for k in te_like.sharded_state_dict() if k.endswith("core_attention._extra_state")]
    out["te_extra_keys"] = len(sd_keys)
    # local-spec (hf-to-mcore-like) checkpoint -> TE key set
    target = build(TELikeCoreAttention, 3)
    load_checkpoint(local_ckpt, [target], expect_model=cfg.to_dict())
    out["local_to_te_equal"] = all(
        torch.equal(a, weights(target)[k]) for k, a in weights(local).items()
    )
    # TE checkpoint -> TE: the extra state itself is restored
    target2 = build(TELikeCoreAttention, 4)
    for m in target2.modules():
        if isinstance(m, TELikeCoreAttention):
            m._fp8_meta = 0.0
    for m in te_like.modules():
        if isinstance(m, TELikeCoreAttention):
            m._fp8_meta = 5.0
    te_ckpt = save_checkpoint(f"{tmp}/te", 1, [te_like], state=state)
    load_checkpoint(te_ckpt, [target2])
    out["te_extra_restored"] = sorted(
        {m._fp8_meta for m in target2.modules() if isinstance(m, TELikeCoreAttention)}
    )
    # TE checkpoint -> local key set
    target3 = build(LocalCoreAttention, 5)
    load_checkpoint(te_ckpt, [target3])
    out["te_to_local_equal"] = all(
        torch.equal(a, weights(target3)[k]) for k, a in weights(te_like).items()
    )
    # a missing *tensor* is still an error
    broken = build(LocalCoreAttention, 6)
    broken.register_buffer("extra_weight_not_in_ckpt", torch.zeros(1))
    try:
        load_checkpoint(local_ckpt, [broken])
        out["missing_tensor_error"] = None
    except (CheckpointError, RuntimeError, KeyError, CheckpointException) as err:
        out["missing_tensor_error"] = type(err).__name__
    # TE-spec checkpoint -> HF equals the HF export of the same weights from the local key set
    same = build(LocalCoreAttention, 2)  # seed 2: te_like's weights
    local_same = save_checkpoint(f"{tmp}/local_same", 0, [same], state=state)
    mcore_to_hf(te_ckpt, f"{tmp}/hf_te")
    mcore_to_hf(local_same, f"{tmp}/hf_local")
    from safetensors.torch import load_file

    a, b = (
        load_file(f"{tmp}/hf_te/model.safetensors"),
        load_file(f"{tmp}/hf_local/model.safetensors"),
    )
    out["hf_equal"] = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return out


def test_checkpoints_cross_local_and_te_key_sets(tmp_path):
    out = run_distributed(_worker, 1, args=(str(tmp_path),), timeout=150)[0]
    assert out["te_extra_keys"] == 4  # one per layer of the tiny model
    assert out["local_to_te_equal"]
    assert out["te_extra_restored"] == [5.0]
    assert out["te_to_local_equal"]
    assert out["missing_tensor_error"] is not None
    assert out["hf_equal"]
