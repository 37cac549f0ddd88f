"""Communication per training step and its time against link bandwidths.

Bytes are what one GPU sends (the ring algorithms' per-GPU volume): all-reduce 2 (n-1)/n x size,
reduce-scatter and all-gather (n-1)/n x size each. Megatron orders ranks TP fastest, then CP, then
DP, then PP, so a group of consecutive span ``span`` stays inside a node when span <= GPUs per
node and otherwise runs at the inter-node (InfiniBand) bandwidth of one GPU.

* TP: per layer and micro-batch, 2 all-reduces of ``[tokens, h]`` in the forward and 2 in the
  backward (sequence parallelism swaps each for a reduce-scatter + all-gather of the same volume);
  full recompute repeats the 2 forward ones.
* CP (ring / p2p): each of CP - 1 steps passes the local K and V block; the backward passes K, V
  and their gradients (2x); recompute repeats the forward. Overlapped with attention compute.
* DP over DP x CP: the distributed optimizer reduce-scatters fp32 gradients and all-gathers bf16
  parameters; without it one all-reduce of fp32 gradients.
* PP: each micro-batch sends its activations forward and their gradients backward.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_longctx.model.config import ModelConfig
from megatron_longctx.perf.hardware import Hardware


def allreduce_bytes(size: float, n: int) -> float:
    """Per-GPU bytes sent by a ring all-reduce of ``size`` bytes over ``n`` ranks."""
    return 2.0 * (n - 1) / n * size if n > 1 else 0.0


def reduce_scatter_bytes(size: float, n: int) -> float:
    """Per-GPU bytes sent by a ring reduce-scatter (or all-gather) of ``size`` bytes."""
    return (n - 1) / n * size if n > 1 else 0.0


def link_bandwidth(hardware: Hardware, span: int, gpus_per_node: int) -> float:
    """Bytes/s per GPU for a group spanning ``span`` consecutive ranks."""
    return hardware.nvlink_bytes_per_s if span <= gpus_per_node else hardware.internode_bytes_per_s


@dataclass
class CommEstimate:
    """Per-GPU bytes and seconds of one step, by kind.

    Attributes:
        tp_bytes / cp_bytes / dp_bytes / pp_bytes: bytes sent per GPU per step.
        tp_s / cp_s / dp_s / pp_s: those bytes over the group's link bandwidth.
    """

    tp_bytes: float
    cp_bytes: float
    dp_bytes: float
    pp_bytes: float
    tp_s: float
    cp_s: float
    dp_s: float
    pp_s: float


def estimate_comm(
    model: ModelConfig,
    hardware: Hardware,
    *,
    seq_length: int,
    micro_batch_size: int,
    num_micro_batches: int,
    tensor_model_parallel_size: int,
    pipeline_model_parallel_size: int,
    context_parallel_size: int,
    data_parallel_size: int,
    gpus_per_node: int,
    params_per_gpu: float,
    recompute: str | None = None,
    distributed_optimizer: bool = True,
    bytes_per_element: int = 2,
) -> CommEstimate:
    """Communication of one step on one GPU (see the module docstring for the accounting).

    Args:
        seq_length: tokens per sample before CP.
        params_per_gpu: parameters this GPU holds (its gradients are reduced over DP x CP).
        Others: the layout and step shape.
    """
    t, pp, cp, dp = (
        tensor_model_parallel_size,
        pipeline_model_parallel_size,
        context_parallel_size,
        data_parallel_size,
    )
    tokens = micro_batch_size * seq_length // cp  # per micro-batch on this rank
    layers = model.num_layers // pp
    m = num_micro_batches
    hidden = tokens * model.hidden_size * bytes_per_element
    collectives = 4 + (2 if recompute == "full" else 0)
    tp_bytes = m * layers * collectives * allreduce_bytes(hidden, t)
    kv_block = tokens * 2 * model.num_query_groups * model.head_dim / t * bytes_per_element
    passes = 3 + (1 if recompute in ("full", "selective") else 0)
    cp_bytes = m * layers * passes * (cp - 1) * kv_block if cp > 1 else 0.0
    n_dp = dp * cp
    if distributed_optimizer:
        dp_bytes = reduce_scatter_bytes(4.0 * params_per_gpu, n_dp) + reduce_scatter_bytes(
            2.0 * params_per_gpu, n_dp
        )
    else:
        dp_bytes = allreduce_bytes(4.0 * params_per_gpu, n_dp)
    pp_bytes = 2.0 * m * hidden if pp > 1 else 0.0
    bw_tp = link_bandwidth(hardware, t, gpus_per_node)
    bw_cp = link_bandwidth(hardware, t * cp, gpus_per_node)
    bw_dp = link_bandwidth(hardware, t * cp * dp, gpus_per_node)
    bw_pp = link_bandwidth(hardware, t * cp * dp * pp, gpus_per_node)
    return CommEstimate(
        tp_bytes,
        cp_bytes,
        dp_bytes,
        pp_bytes,
        tp_bytes / bw_tp,
        cp_bytes / bw_cp,
        dp_bytes / bw_dp,
        pp_bytes / bw_pp,
    )
