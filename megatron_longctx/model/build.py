"""Build a megatron-core GPTModel (Llama flavour) for this rank's pipeline stage."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_longctx.model import rope_thd
from megatron_longctx.model.config import ModelConfig
from megatron_longctx.model.rope import (
    install_megatron_rope,
    megatron_attention_factor,
    rope_inv_freq,
)
from megatron_longctx.model.specs import block_spec, resolve_backend
from megatron_longctx.parallel.layout import ParallelLayout


def transformer_config(
    model: ModelConfig,
    layout: ParallelLayout,
    *,
    params_dtype: torch.dtype = torch.float32,
    recompute: str | None = None,
    calculate_per_token_loss: bool = True,
    apply_rope_fusion: bool = False,
    device: torch.device | None = None,
):
    """Megatron's TransformerConfig for a Llama model under ``layout``.

    Fusions that need apex/TE/CUDA are turned off; they are kernels, not semantics. The one
    exception is ``apply_rope_fusion`` (TE's fused RoPE), which build_gpt_model turns on with the
    TE backend: megatron's unfused THD RoPE syncs with the host per document (model/rope_thd.py).
    ``calculate_per_token_loss`` makes the schedule sum token counts so the loss is averaged over
    all tokens of the global batch (finalize_model_grads divides by the global count).
    ``device`` is the training device (runtime/device.py ``choose_device``): CPU initialisation
    and unbatched p2p follow it, not the machine (``LONGCTX_DEVICE=cpu`` on a GPU node trains on
    the CPU); None means the CPU.
    """
    from megatron.core.transformer import TransformerConfig

    on_gpu = device is not None and device.type == "cuda"
    kwargs = dict(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model.init_method_std,
        tensor_model_parallel_size=layout.tensor_model_parallel_size,
        pipeline_model_parallel_size=layout.pipeline_model_parallel_size,
        context_parallel_size=layout.context_parallel_size,
        virtual_pipeline_model_parallel_size=layout.virtual_pipeline_model_parallel_size,
        sequence_parallel=layout.sequence_parallel,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=apply_rope_fusion,  # TE's fused RoPE (THD included): no host syncs
        gradient_accumulation_fusion=False,
        use_cpu_initialization=not on_gpu,
        calculate_per_token_loss=calculate_per_token_loss,
        # gloo matches batched send/recv to the same peer in the wrong order (MEGATRON_ON_CPU.md).
        batch_p2p_comm=on_gpu,
        deallocate_pipeline_outputs=False,
    )
    if recompute:
        kwargs.update(recompute_granularity=recompute)
        if recompute == "full":
            kwargs.update(recompute_method="uniform", recompute_num_layers=1)
    config = TransformerConfig(**kwargs)
    megatron_attention_factor(config, model.rope_theta, model.rope_scaling)  # YaRN's cos/sin factor
    return config


def fused_rope(model: ModelConfig, backend: str, allowed: bool = True) -> bool:
    """Whether TE's fused RoPE runs: only with the TE backend, when the CP sharding allows it
    (``allowed``), and never with a YaRN attention factor: megatron's THD path calls TE's fused
    kernel without ``mscale``, so the factor would be dropped on GPU while the CPU path and the
    HF export apply it."""
    _, attention_factor = rope_inv_freq(model.head_dim, model.rope_theta, model.rope_scaling)
    return allowed and backend == "te" and abs(attention_factor - 1.0) < 1e-12


def build_gpt_model(
    model: ModelConfig,
    layout: ParallelLayout,
    *,
    backend: str = "auto",
    core_attention: type | str | None = None,
    params_dtype: torch.dtype = torch.float32,
    recompute: str | None = None,
    pre_process: bool | None = None,
    post_process: bool | None = None,
    seq_length: int | None = None,
    rope_fusion: bool = True,
    device: torch.device | None = None,
    loss_chunk_tokens: int | None = None,
):
    """The GPTModel chunk of this rank's pipeline stage (parallel_state must be initialised),
    every parameter in ``params_dtype`` on ``device`` (None: the CPU).

    ``rope_fusion=False`` keeps megatron's unfused THD RoPE (model/rope_thd.py) under the TE
    backend too: TE's fused RoPE reads positions off the unit boundaries (equal chunks only), so
    the "balanced" CP sharding needs the unfused one. TE's fused RoPE has no YaRN attention
    factor (megatron's THD path calls it without ``mscale``), so a YaRN model is never fused.
    ``loss_chunk_tokens``: the chunked loss (model/gpt.py, model/loss.py) with chunks of this many
    tokens; None keeps megatron's.

    Megatron-LM's ``get_model`` does the same placement: ``model.cuda()`` and, for bf16 / fp16,
    ``Float16Module`` (``module.bfloat16()``). Here only the parameters are cast (the norms
    megatron's local spec builds with torch's default fp32): RoPE's fp32 frequencies stay
    exact, and no wrapper changes the module tree the checkpoints are keyed by. The loss is fp32
    either way (megatron's cross entropy upcasts the logits).
    """
    from megatron.core import parallel_state

    from megatron_longctx.model.gpt import ChunkedLossGPTModel

    device = device or torch.device("cpu")
    backend = resolve_backend(backend, device)  # once; the specs get the concrete name
    fused = fused_rope(model, backend, rope_fusion)
    if not fused:
        rope_thd.install()  # megatron's unfused THD RoPE without host syncs (model/rope_thd.py)
    config = transformer_config(
        model,
        layout,
        params_dtype=params_dtype,
        recompute=recompute,
        apply_rope_fusion=fused,
        device=device,
    )
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage()
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage()
    gpt = ChunkedLossGPTModel(
        loss_chunk_tokens=loss_chunk_tokens,
        config=config,
        transformer_layer_spec=block_spec(
            config, backend, core_attention, layout.sequence_parallel
        ),
        vocab_size=model.padded_vocab_size(layout.tensor_model_parallel_size),
        max_sequence_length=seq_length or model.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=model.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=model.rope_theta,
    )
    # Every RoPE variant (default / linear / llama3 / yarn): the exact frequencies of model/rope.py.
    install_megatron_rope(gpt.rotary_pos_emb, model.head_dim, model.rope_theta, model.rope_scaling)
    return place_parameters(gpt, params_dtype, device)


def place_parameters(module: torch.nn.Module, dtype: torch.dtype, device: torch.device):
    """``module`` on ``device`` (``Module.to``: parameters and buffers) with every floating-point
    parameter in ``dtype`` (buffers keep their dtype: RoPE's fp32 frequencies). Returns it."""
    module.to(device=device)
    for param in module.parameters():
        if param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype=dtype)
    return module
