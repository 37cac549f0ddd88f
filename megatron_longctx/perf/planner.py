"""Enumerate parallel layouts for a cluster, reject what does not fit, rank the rest by step time.

Every candidate (TP, PP, CP, DP, micro batch, recompute, distributed optimizer) is first checked by
``ParallelLayout.validate`` (the project's one set of size rules), then costed:

* memory: perf.memory (fits when the worse pipeline stage's total <= ``usable_memory_fraction``
  of the GPU's memory);
* compute: Megatron model FLOPs per token (perf.flops, with the document-masked attention term),
  plus the recomputed forward (full: all of it, selective: attention), at ``compute_efficiency``
  of peak; the 1F1B pipeline bubble adds (PP - 1) / micro-batches of it;
* communication: perf.comm; TP, DP and PP exposed, CP ring traffic hidden behind attention compute.

Step time, tokens/s and MFU are estimates for ranking, not predictions to the percent.
Sequence parallelism is switched on whenever TP > 1 (GPU / Transformer Engine; it is what makes
TP split the h-sized activations). The best plans print as dotted recipe overrides.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from megatron_longctx.model.config import ModelConfig
from megatron_longctx.parallel.layout import LayoutError, ParallelLayout, samples_per_step
from megatron_longctx.perf.comm import CommEstimate, estimate_comm
from megatron_longctx.perf.flops import attention_flops_per_token, flops_per_token, mfu
from megatron_longctx.perf.hardware import HARDWARE, Hardware
from megatron_longctx.perf.memory import (
    DEFAULT_OVERHEAD_BYTES,
    MemoryEstimate,
    estimate_memory,
    model_state_bytes,
)

logger = logging.getLogger(__name__)

DEFAULT_GLOBAL_BATCH_TOKENS = 8_388_608  # ProLong stage 2: ~8M tokens per step
CHECKPOINT_EVERY_S = 1800.0  # a crash (not a preemption: that saves) loses at most ~30 min


def checkpoint_interval(step_time_s: float, every_s: float = CHECKPOINT_EVERY_S) -> int:
    """Steps between checkpoints that save about every ``every_s`` seconds at ``step_time_s``
    (a recipe's ``stages.N.checkpoint_interval``)."""
    if step_time_s <= 0:
        raise ValueError(f"step_time_s must be > 0, got {step_time_s}")
    return max(1, int(every_s // step_time_s))


@dataclass(frozen=True)
class PlanRequest:
    """What to plan for.

    Attributes:
        model: the model.
        seq_length: tokens per packed sample.
        num_gpus / gpus_per_node: the cluster.
        hardware: GPU preset (its memory may be overridden with Hardware.with_memory_gb).
        global_batch_tokens: tokens per optimizer step (a multiple of seq_length).
        doc_lengths: document lengths of a typical packed sample (attention FLOPs); None = one.
        loss_chunk_tokens: chunked loss block size; None = Megatron's unchunked loss (resolved:
            tools/plan.py turns a stage's ``loss_chunk_tokens`` setting into this with
            ``model.config.resolve_loss_chunk_tokens``, as the trainer does).
        micro_batch_sizes / recompute_options / distributed_optimizer_options: what to try.
        compute_efficiency: achieved fraction of peak FLOPs for the math (an assumption).
        overhead_bytes: fixed per-GPU allowance for the CUDA context and NCCL buffers.
        usable_memory_fraction: a plan fits when its estimate is at most this fraction of the
            GPU's memory (the caching allocator's fragmentation is not in the estimate).
    """

    model: ModelConfig
    seq_length: int
    num_gpus: int
    gpus_per_node: int = 8
    hardware: Hardware = HARDWARE["h100"]
    global_batch_tokens: int = DEFAULT_GLOBAL_BATCH_TOKENS
    doc_lengths: tuple[int, ...] | None = None
    loss_chunk_tokens: int | None = None
    micro_batch_sizes: tuple[int, ...] = (1, 2, 4, 8)
    recompute_options: tuple[str | None, ...] = (None, "selective", "full")
    distributed_optimizer_options: tuple[bool, ...] = (True, False)
    compute_efficiency: float = 0.6
    overhead_bytes: float = DEFAULT_OVERHEAD_BYTES
    usable_memory_fraction: float = 0.9

    def __post_init__(self):
        if self.num_gpus < 1 or self.gpus_per_node < 1:
            raise ValueError(
                f"num_gpus {self.num_gpus} and gpus_per_node {self.gpus_per_node} must be >= 1"
            )
        if self.num_gpus > self.gpus_per_node and self.num_gpus % self.gpus_per_node:
            raise ValueError(
                f"num_gpus {self.num_gpus} is not whole nodes of "
                f"{self.gpus_per_node}: {self.num_gpus} % {self.gpus_per_node} != 0"
            )
        samples_per_step(self.global_batch_tokens, self.seq_length)
        if not 0 < self.usable_memory_fraction <= 1:
            raise ValueError(
                f"usable_memory_fraction must be in (0, 1], got {self.usable_memory_fraction}"
            )
        if not 0 < self.compute_efficiency <= 1:
            raise ValueError(f"compute_efficiency must be in (0, 1], got {self.compute_efficiency}")

    @property
    def global_batch_size(self) -> int:
        return samples_per_step(self.global_batch_tokens, self.seq_length)


@dataclass
class Plan:
    """One costed candidate.

    Attributes:
        layout: TP / PP / CP / DP (DP filled in) and sequence parallelism.
        micro_batch_size / num_micro_batches: per DP rank and step.
        recompute / distributed_optimizer: memory-saving choices.
        memory / comm: the estimates; compute_s: math time per step incl. the pipeline bubble.
        step_time_s / tokens_per_s / mfu: the ranking figures.
        fits: memory.total <= usable GPU memory; reason says why not.
        loss_chunk_tokens: the request's chunked-loss block (None: megatron's unchunked loss),
            printed as ``stages.N.loss_chunk_tokens`` (0 for unchunked).
    """

    layout: ParallelLayout
    micro_batch_size: int
    num_micro_batches: int
    recompute: str | None
    distributed_optimizer: bool
    memory: MemoryEstimate
    comm: CommEstimate
    compute_s: float
    step_time_s: float
    tokens_per_s: float
    mfu: float
    fits: bool
    reason: str = field(default="")
    loss_chunk_tokens: int | None = None

    def overrides(self, stage: int = 0) -> list[str]:
        """Dotted ``a.b=value`` overrides for curriculum stage ``stage`` of a recipe."""
        p, lay = f"stages.{stage}", self.layout
        recompute = "null" if self.recompute is None else self.recompute
        return [
            f"{p}.parallel.tensor_model_parallel_size={lay.tensor_model_parallel_size}",
            f"{p}.parallel.pipeline_model_parallel_size={lay.pipeline_model_parallel_size}",
            f"{p}.parallel.context_parallel_size={lay.context_parallel_size}",
            f"{p}.parallel.sequence_parallel={'true' if lay.sequence_parallel else 'false'}",
            f"{p}.micro_batch_size={self.micro_batch_size}",
            f"{p}.recompute={recompute}",
            f"{p}.loss_chunk_tokens={self.loss_chunk_tokens or 0}",
        ]

    def describe(self) -> str:
        lay = self.layout
        return (
            f"TP {lay.tensor_model_parallel_size} PP {lay.pipeline_model_parallel_size} "
            f"CP {lay.context_parallel_size} DP {lay.data_parallel_size} | micro batch "
            f"{self.micro_batch_size} x {self.num_micro_batches} | "
            f"recompute {self.recompute} | "
            f"dist-opt {'on' if self.distributed_optimizer else 'off'} | "
            f"{self.memory.total / 1e9:.1f} GB | step {self.step_time_s:.1f} s | "
            f"{self.tokens_per_s:,.0f} tok/s | MFU {self.mfu:.1%}"
        )


def _powers_of_two(limit: int) -> list[int]:
    out, n = [], 1
    while n <= limit:
        out.append(n)
        n *= 2
    return out


def evaluate(
    req: PlanRequest,
    layout: ParallelLayout,
    micro_batch_size: int,
    recompute: str | None,
    distributed_optimizer: bool,
) -> Plan:
    """Costs one candidate; raises LayoutError when ParallelLayout.validate rejects it."""
    m_cfg = req.model
    dp = layout.validate(
        world_size=req.num_gpus,
        num_layers=m_cfg.num_layers,
        num_attention_heads=m_cfg.num_attention_heads,
        num_query_groups=m_cfg.num_query_groups,
        seq_length=req.seq_length,
        micro_batch_size=micro_batch_size,
        global_batch_size=req.global_batch_size,
    )
    layout = ParallelLayout(
        layout.tensor_model_parallel_size,
        layout.pipeline_model_parallel_size,
        layout.context_parallel_size,
        dp,
        sequence_parallel=layout.sequence_parallel,
    )
    t, pp, cp = (
        layout.tensor_model_parallel_size,
        layout.pipeline_model_parallel_size,
        layout.context_parallel_size,
    )
    m = layout.num_micro_batches(req.global_batch_size, micro_batch_size, dp)
    memory = estimate_memory(
        m_cfg,
        seq_length=req.seq_length,
        micro_batch_size=micro_batch_size,
        num_micro_batches=m,
        tensor_model_parallel_size=t,
        pipeline_model_parallel_size=pp,
        context_parallel_size=cp,
        data_parallel_size=dp,
        sequence_parallel=layout.sequence_parallel,
        recompute=recompute,
        distributed_optimizer=distributed_optimizer,
        loss_chunk_tokens=req.loss_chunk_tokens,
        overhead_bytes=req.overhead_bytes,
    )
    weights, _, _ = model_state_bytes(
        m_cfg, tensor_model_parallel_size=t, pipeline_model_parallel_size=pp
    )
    comm = estimate_comm(
        m_cfg,
        req.hardware,
        seq_length=req.seq_length,
        micro_batch_size=micro_batch_size,
        num_micro_batches=m,
        tensor_model_parallel_size=t,
        pipeline_model_parallel_size=pp,
        context_parallel_size=cp,
        data_parallel_size=dp,
        gpus_per_node=req.gpus_per_node,
        params_per_gpu=weights / 2,
        recompute=recompute,
        distributed_optimizer=distributed_optimizer,
    )
    docs = list(req.doc_lengths) if req.doc_lengths else None
    model_flops = flops_per_token(m_cfg, req.seq_length, docs)
    attn_flops = attention_flops_per_token(m_cfg, req.seq_length, docs)
    extra = {None: 0.0, "selective": attn_flops / 3, "full": model_flops / 3}[recompute]
    rate = req.hardware.peak_bf16_flops * req.compute_efficiency * req.num_gpus
    math_s = req.global_batch_tokens * (model_flops + extra) / rate
    compute_s = math_s * (1 + (pp - 1) / m)
    attn_s = req.global_batch_tokens * attn_flops / rate
    step_s = compute_s + comm.tp_s + max(0.0, comm.cp_s - attn_s) + comm.dp_s + comm.pp_s
    tokens_per_s = req.global_batch_tokens / step_s
    usable = req.hardware.memory_bytes * req.usable_memory_fraction
    fits = memory.total <= usable
    reason = (
        ""
        if fits
        else (
            f"needs {memory.total / 1e9:.1f} GB > {usable / 1e9:.0f} GB usable "
            f"of {req.hardware.memory_bytes / 1e9:.0f} GB: {memory.summary()}"
        )
    )
    return Plan(
        layout,
        micro_batch_size,
        m,
        recompute,
        distributed_optimizer,
        memory,
        comm,
        compute_s,
        step_s,
        tokens_per_s,
        mfu(tokens_per_s, model_flops, req.hardware.peak_bf16_flops * req.num_gpus),
        fits,
        reason,
        req.loss_chunk_tokens,
    )


def enumerate_plans(req: PlanRequest) -> list[Plan]:
    """Every candidate ParallelLayout.validate accepts, costed (fitting or not)."""
    m_cfg = req.model
    plans = []
    tps = _powers_of_two(min(req.gpus_per_node, req.num_gpus))
    pps = [p for p in range(1, m_cfg.num_layers + 1) if m_cfg.num_layers % p == 0]
    for t in tps:
        for pp in pps:
            for cp in _powers_of_two(req.num_gpus):
                if req.num_gpus % (t * pp * cp):
                    continue
                layout = ParallelLayout(t, pp, cp, sequence_parallel=t > 1)
                for mbs in req.micro_batch_sizes:
                    for recompute in req.recompute_options:
                        for dist_opt in req.distributed_optimizer_options:
                            if (
                                dist_opt
                                and req.num_gpus == t * pp
                                and False in req.distributed_optimizer_options
                            ):
                                continue  # DP x CP = 1: nothing to shard the optimizer over
                            try:
                                plans.append(evaluate(req, layout, mbs, recompute, dist_opt))
                            except LayoutError as err:
                                logger.debug("skip %s mbs %d: %s", layout.describe(), mbs, err)
    return plans


def plan(req: PlanRequest, top: int | None = None) -> list[Plan]:
    """The fitting candidates, fastest first (ties: less memory first)."""
    fitting = [p for p in enumerate_plans(req) if p.fits]
    fitting.sort(key=lambda p: (p.step_time_s, p.memory.total))
    return fitting[:top] if top else fitting
