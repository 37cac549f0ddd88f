"""Per-GPU memory: weights, gradients, optimizer state, activations, logits / loss.

Model state (Megatron's mixed-precision accounting, docs of the distributed optimizer): bf16 weights
2 B/param, fp32 main gradients 4 B/param, fp32 master weights + Adam moments 12 B/param; the
distributed optimizer shards the 12 B over the data-parallel x context-parallel group (Megatron
reduces gradients over DP x CP, so that is the group it shards over).

Activations follow Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
Models"): count, per token and layer, every tensor a layer saves for backward. Their GPT count
(34 h bytes + 5 a s bytes) is adapted to Llama layers and to the two kernel sets Megatron uses:

* ``"te"`` (GPU: Transformer Engine fused norm+linear, flash attention, fused SwiGLU; untested on
  GPU): per norm its input and output (2 h), attention q (h), k (kv), v (a view that keeps the
  whole fused QKV output, h + 2 kv, alive), output (h) and the fp32 log-sum-exp (a), SwiGLU its
  input (2 f) and the down projection's input (f). In all ``7 h + 3 kv + 3 f`` elements + ``a``
  fp32 (Llama-3-8B: 146 KB/token/layer in bf16 at TP 1): no s^2 term (flash attention keeps none).
* ``"local"`` (megatron-core's own modules, the CPU path): torch RMSNorm also keeps the normalised
  input (3 h + 1 per norm incl. rstd); the unfused attention keeps K and V repeated to all heads
  (GQA), the softmax output (a s) and the bool mask (s^2 bytes); the unfused SwiGLU keeps 5 f.
  Measured against the real GPTModel on CPU in tests/unit/test_activation_memory.py.

Tensors inside the tensor-parallel region are divided by TP; the h-sized ones outside it only with
sequence parallelism. Full recompute (uniform, one layer per checkpoint) keeps each layer's input
(h) plus, while one layer is recomputed, that layer's full activations. Selective recompute
recomputes the core attention: it keeps q, k, v instead of the attention internals.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_longctx.model.config import ModelConfig

KERNELS = ("te", "local")
RECOMPUTE = (None, "selective", "full")
FP32 = 4


def _check(kernels: str, recompute: str | None) -> None:
    if kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {KERNELS}, got {kernels!r}")
    if recompute not in RECOMPUTE:
        raise ValueError(f"recompute must be one of {RECOMPUTE}, got {recompute!r}")


def norm_elements(model: ModelConfig, kernels: str) -> int:
    """Elements per token one RMSNorm keeps, including its output (the next linear's input)."""
    return (3 if kernels == "local" else 2) * model.hidden_size + 1


def layer_activation_bytes(
    model: ModelConfig,
    seq_length: int,
    *,
    micro_batch_size: int = 1,
    tensor_model_parallel_size: int = 1,
    sequence_parallel: bool = False,
    recompute: str | None = None,
    kernels: str = "te",
    bytes_per_element: int = 2,
) -> float:
    """Bytes one transformer layer keeps for backward for one micro-batch on one rank.

    Args:
        model: the model.
        seq_length: tokens of one sample on this rank (the sequence divided by CP).
        micro_batch_size: samples per micro-batch.
        tensor_model_parallel_size: TP.
        sequence_parallel: h-sized tensors outside the TP region are also split over TP.
        recompute: None, "selective" (core attention) or "full" (the layer's input only).
        kernels: "te" (GPU) or "local" (megatron-core local modules); see the module docstring.
        bytes_per_element: activation dtype size (2 for bf16, 4 for fp32).

    Returns:
        Bytes for ``micro_batch_size x seq_length`` tokens.
    """
    _check(kernels, recompute)
    h, f, a, d = model.hidden_size, model.ffn_hidden_size, model.num_attention_heads, model.head_dim
    kv = model.num_query_groups * d
    t = tensor_model_parallel_size
    sh = t if sequence_parallel else 1
    tokens = micro_batch_size * seq_length
    if recompute == "full":
        return tokens * h / sh * bytes_per_element
    norms = 2 * norm_elements(model, kernels) / sh
    rope = (4 if kernels == "local" else 2) * d / micro_batch_size  # cos/sin [s, 1, 1, d]
    raw_bytes = 0.0  # bytes not in the activation dtype
    # V is a view of the fused QKV output, so keeping V keeps all h + 2 kv of it alive; RoPE makes
    # q and k new tensors. The unfused local attention repeats K and V to every head under GQA.
    qkv_view = h + 2 * kv
    if recompute == "selective":
        # the checkpoint's inputs q, k, v and the output projection's input
        attention = (h + kv + qkv_view + h) / t
    elif kernels == "te":
        attention = (h + kv + qkv_view + h) / t  # flash attention keeps q, k, v, output
        raw_bytes = a / t * FP32  # log-sum-exp
    else:
        # q, K repeated, V repeated (or the QKV view without GQA), softmax over s keys, output
        v_kept = h if model.num_query_groups < model.num_attention_heads else qkv_view
        attention = (3 * h + v_kept) / t + a / t * seq_length
        raw_bytes = seq_length / micro_batch_size  # s x s bool mask, per token
    mlp = (5 if kernels == "local" else 3) * f / t
    per_token = (norms + rope + attention + mlp) * bytes_per_element + raw_bytes
    return tokens * per_token


def outside_layers_bytes(
    model: ModelConfig,
    seq_length: int,
    *,
    micro_batch_size: int = 1,
    tensor_model_parallel_size: int = 1,
    sequence_parallel: bool = False,
    kernels: str = "te",
    bytes_per_element: int = 2,
    first_stage: bool = True,
    last_stage: bool = True,
    recompute: str | None = None,
) -> float:
    """Bytes kept outside the layers: token ids (first stage), final norm + output-layer input
    (last stage), and with full recompute the rotary table each checkpoint keeps."""
    tokens = micro_batch_size * seq_length
    sh = tensor_model_parallel_size if sequence_parallel else 1
    total = 8.0 * tokens if first_stage else 0.0  # int64 ids kept by the embedding lookup
    if last_stage:
        total += tokens * norm_elements(model, kernels) / sh * bytes_per_element
    if recompute == "full":
        total += seq_length * model.head_dim * bytes_per_element
    return total


def loss_bytes(
    model: ModelConfig,
    seq_length: int,
    *,
    micro_batch_size: int = 1,
    tensor_model_parallel_size: int = 1,
    loss_chunk_tokens: int | None = None,
    bytes_per_element: int = 2,
) -> tuple[float, float]:
    """(bytes kept for backward, extra transient peak) of the logits and vocab-parallel loss.

    Unchunked (Megatron's vocab-parallel cross entropy): the fp32 softmax ``[tokens, V / TP]`` is
    kept for backward (4 B) and the output layer's logits (activation dtype) exist transiently
    while the fp32 copy is made. Chunked (model/loss.py as the trainer runs it: gradients formed
    in forward, chunk by chunk): kept until backward are the fp32 log-sum-exp and int64 target per
    token, the hidden-state gradient ``[tokens, h]`` and the fp32 output-weight gradient
    ``[V / TP, h]``; one chunk's logits (activation dtype) and one fp32 buffer (logits, then
    softmax, then gradient, in place) are transient.

    Args:
        loss_chunk_tokens: tokens per loss chunk; None = unchunked.
    """
    tokens = micro_batch_size * seq_length
    vocab = model.padded_vocab_size(tensor_model_parallel_size) / tensor_model_parallel_size
    if loss_chunk_tokens is None:
        kept = tokens * (vocab * FP32 + 9)  # softmax + bool mask + int64 target
        return kept, tokens * vocab * bytes_per_element
    chunk = min(loss_chunk_tokens, tokens)
    h = model.hidden_size
    kept = tokens * (12.0 + h * bytes_per_element) + vocab * h * FP32
    return kept, chunk * vocab * (bytes_per_element + FP32)


def model_state_bytes(
    model: ModelConfig,
    *,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    data_parallel_size_with_cp: int = 1,
    distributed_optimizer: bool = True,
    first_stage: bool = True,
    last_stage: bool = True,
) -> tuple[float, float, float]:
    """(weights, gradients, optimizer state) bytes on one rank of a pipeline stage.

    Args:
        data_parallel_size_with_cp: DP x CP, the group the distributed optimizer shards over.
        first_stage / last_stage: whether the stage holds the embedding / the output layer.
    """
    h, L = model.hidden_size, model.num_layers
    t, pp = tensor_model_parallel_size, pipeline_model_parallel_size
    emb = model.padded_vocab_size(t) * h
    unpadded = model.vocab_size * h * (1 if model.tie_word_embeddings else 2)
    per_layer = (model.num_parameters() - unpadded - h) / L
    params = per_layer * L / pp / t
    if first_stage:
        params += emb / t
    if last_stage and (not model.tie_word_embeddings or not first_stage):
        params += emb / t + h
    optimizer = 12.0 * params / (data_parallel_size_with_cp if distributed_optimizer else 1)
    return 2.0 * params, 4.0 * params, optimizer


DEFAULT_OVERHEAD_BYTES = 3e9  # CUDA context, NCCL buffers, allocator fragmentation (assumed)


@dataclass
class MemoryEstimate:
    """Bytes on the fullest GPU (the worse of the first and last pipeline stage).

    Attributes:
        weights / gradients / optimizer: model state (see model_state_bytes).
        activations: kept for backward by the micro-batches in flight (1F1B: PP on the first stage,
            1 on the last), plus one layer's full activations while it is recomputed.
        loss: logits and loss (kept + transient), last stage only.
        overhead: fixed allowance for context, communication buffers and fragmentation.
        stage: "first" or "last": which stage these numbers are for.
    """

    weights: float
    gradients: float
    optimizer: float
    activations: float
    loss: float
    overhead: float
    stage: str = "first"

    @property
    def total(self) -> float:
        return (
            self.weights
            + self.gradients
            + self.optimizer
            + self.activations
            + self.loss
            + self.overhead
        )

    def summary(self) -> str:
        gb = 1e9
        return (
            f"{self.total / gb:.1f} GB ({self.stage} stage: weights {self.weights / gb:.1f}, "
            f"grads {self.gradients / gb:.1f}, optimizer {self.optimizer / gb:.1f}, "
            f"activations {self.activations / gb:.1f}, loss {self.loss / gb:.1f}, "
            f"overhead {self.overhead / gb:.1f})"
        )


def estimate_memory(
    model: ModelConfig,
    *,
    seq_length: int,
    micro_batch_size: int,
    num_micro_batches: int,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    context_parallel_size: int = 1,
    data_parallel_size: int = 1,
    sequence_parallel: bool = False,
    recompute: str | None = None,
    distributed_optimizer: bool = True,
    kernels: str = "te",
    loss_chunk_tokens: int | None = None,
    bytes_per_element: int = 2,
    overhead_bytes: float = DEFAULT_OVERHEAD_BYTES,
) -> MemoryEstimate:
    """Peak bytes per GPU for one training step under a layout (the worse pipeline stage).

    Args:
        seq_length: tokens per sample before CP splits it.
        num_micro_batches: micro-batches per step per DP rank (bounds the 1F1B in-flight count).
        Other arguments: see layer_activation_bytes, loss_bytes, model_state_bytes.
    """
    t, pp, cp = tensor_model_parallel_size, pipeline_model_parallel_size, context_parallel_size
    s_rank = seq_length // cp
    common = dict(
        micro_batch_size=micro_batch_size,
        tensor_model_parallel_size=t,
        sequence_parallel=sequence_parallel,
        kernels=kernels,
        bytes_per_element=bytes_per_element,
    )
    per_layer = layer_activation_bytes(model, s_rank, recompute=recompute, **common)
    working = (
        layer_activation_bytes(model, s_rank, recompute=None, **common)
        if recompute == "full"
        else 0.0
    )
    stages = [("first", True, pp == 1, min(pp, num_micro_batches))]
    if pp > 1:
        stages.append(("last", False, True, 1))
    worst: MemoryEstimate | None = None
    for name, first, last, in_flight in stages:
        outside = outside_layers_bytes(
            model, s_rank, first_stage=first, last_stage=last, recompute=recompute, **common
        )
        activations = in_flight * (model.num_layers // pp * per_layer + outside) + working
        loss = 0.0
        if last:
            kept, transient = loss_bytes(
                model,
                s_rank,
                micro_batch_size=micro_batch_size,
                tensor_model_parallel_size=t,
                loss_chunk_tokens=loss_chunk_tokens,
                bytes_per_element=bytes_per_element,
            )
            loss = kept + transient
        weights, grads, optimizer = model_state_bytes(
            model,
            tensor_model_parallel_size=t,
            pipeline_model_parallel_size=pp,
            data_parallel_size_with_cp=data_parallel_size * cp,
            distributed_optimizer=distributed_optimizer,
            first_stage=first,
            last_stage=last,
        )
        est = MemoryEstimate(weights, grads, optimizer, activations, loss, overhead_bytes, name)
        if worst is None or est.total > worst.total:
            worst = est
    return worst
