"""One training step in Megatron's calling convention, with a loss averaged over all tokens of the
global batch.

``forward_step(data_iterator, model) -> (output, loss_func)`` is driven by megatron's
``get_forward_backward_func``. ``loss_func`` returns ``(sum of token losses, number of tokens, ...)``
and the model config has ``calculate_per_token_loss=True``, so the schedule sums token counts over
micro-batches and ``finalize_model_grads`` all-reduces the count over DP x CP and divides the
gradients by it: the gradient is exactly that of the mean over every loss token of the global batch,
whatever the split into micro-batches, DP ranks and CP ranks.

Batch legend (one micro-batch, as the loader yields it): ``tokens``, ``labels``, ``loss_mask``,
``position_ids`` are ``[b, s]``; megatron activations inside the model are ``[s, b, h]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Per-token losses ``[b, s]`` -> (sum over loss tokens, token count, reporting tensor)."""
    losses = output_tensor.float().reshape(-1)
    mask = loss_mask.float().reshape(-1)
    loss_sum = torch.sum(losses * mask)
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach(), mask.sum().detach()])
    return loss_sum, num_tokens, {"lm loss": report}


def forward_step(data_iterator, model):
    """Megatron's forward_step: one micro-batch through the model chunk."""
    batch = next(data_iterator) if data_iterator is not None else {}
    output = model(
        input_ids=batch.get("tokens"),
        position_ids=batch.get("position_ids"),
        attention_mask=None,
        labels=batch.get("labels"),
        packed_seq_params=batch.get("packed_seq_params"),
        loss_mask=batch.get("loss_mask"),  # the chunked loss forms its gradients in forward
    )
    return output, partial(loss_func, batch.get("loss_mask"))


@dataclass
class StepResult:
    """One step's outcome. ``loss`` is the global token-averaged loss (the same on every rank)
    over ``num_tokens`` loss tokens; the loop fills in the rest: the optimizer's gradient norm
    (NaN for a skipped step) and the first micro-batch's document lengths (the MFU estimate's
    attention term)."""

    loss: float
    num_tokens: int
    grad_norm: float | None = None
    skipped: bool = False
    doc_lengths: list[int] = field(default_factory=list)


def sum_over_replicas(tensor: torch.Tensor) -> torch.Tensor:
    """In place: ``tensor`` summed over the DP x CP replicas, then the last pipeline stage's sum
    on every stage (only it computed one). Collective; ``tensor`` on the training device."""
    from megatron.core import parallel_state

    torch.distributed.all_reduce(
        tensor, group=parallel_state.get_data_parallel_group(with_context_parallel=True)
    )
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        torch.distributed.broadcast(
            tensor,
            src=parallel_state.get_pipeline_model_parallel_last_rank(),
            group=parallel_state.get_pipeline_model_parallel_group(),
        )
    return tensor


def reduce_loss(losses_reduced: list, device: torch.device | str = "cpu") -> tuple[float, int]:
    """Global token-averaged loss, known on every rank: sums the per-micro-batch [loss_sum, tokens]
    reports, all-reduces over DP x CP, then broadcasts from the last pipeline stage.

    ``device`` is the training device: NCCL only reduces CUDA tensors, and ranks that are not the
    last pipeline stage have no report to take the device from. One host sync per step.
    """

    total = torch.zeros(2, dtype=torch.float64, device=device)
    if losses_reduced:
        total = torch.stack([d["lm loss"] for d in losses_reduced]).sum(dim=0).double()
        total = total.to(device)
    loss_sum, count = sum_over_replicas(total).tolist()  # the step's one host sync
    return loss_sum / max(count, 1.0), int(count)


def forward_backward(
    model_chunks: list,
    batches: list[dict],
    *,
    seq_length: int,
    micro_batch_size: int,
    forward_only: bool = False,
    optimizer=None,
) -> StepResult:
    """Runs all micro-batches of one step through megatron's schedule (grads are finalised).

    Pass the ``optimizer`` when training: like Megatron-LM's train_step, its ``zero_grad()`` must run
    every step, because megatron's optimizer leaves ``param.grad`` aliased to the DDP ``main_grad``
    buffer after a step and the next backward would otherwise accumulate twice into it.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if not forward_only:
        for chunk in model_chunks:
            chunk.zero_grad_buffer()
        if optimizer is not None:
            optimizer.zero_grad()
    fb = get_forward_backward_func()
    losses = fb(
        forward_step_func=forward_step,
        data_iterator=iter(batches),
        model=model_chunks if len(model_chunks) > 1 else model_chunks[0],
        num_microbatches=len(batches),
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )
    device = next(model_chunks[0].parameters()).device
    loss, tokens = reduce_loss(losses, device)
    return StepResult(loss=loss, num_tokens=tokens)
