"""Megatron's GPTModel with the one seam of the chunked loss (model/loss.py).

``ChunkedLossGPTModel`` is megatron-core's ``GPTModel`` unchanged (same parameters, state dict,
checkpoints, schedule interface) except where the last pipeline stage turns hidden states into
per-token losses: with ``loss_chunk_tokens`` set and labels given, ``_postprocess`` hands the
final-norm hidden states straight to ``chunked_language_model_loss`` instead of writing the logits
(``output_layer``) and calling ``compute_language_model_loss``. Everything else (no labels: logits
for evaluation and inference; multi-token prediction; ``loss_chunk_tokens=None``) is megatron's own
``_postprocess``. The returned per-token losses ``[b, s]`` are what megatron returns, so the loss
mask, ``calculate_per_token_loss`` and the global token average downstream are untouched. Given
GPTModel.forward's ``loss_mask`` (training/step.py passes it), the gradients are formed in forward
(no logits recomputed; the loss function checks in backward that the loss was the masked sum).
"""

from __future__ import annotations

import torch
from megatron.core.models.gpt import GPTModel

from megatron_longctx.model.loss import chunked_language_model_loss, token_logprobs


class ChunkedLossGPTModel(GPTModel):
    """GPTModel whose loss runs chunk by chunk of ``loss_chunk_tokens`` tokens (None: megatron's).

    Args:
        loss_chunk_tokens: tokens per loss chunk on this rank, or None for megatron's unchunked
            output layer + vocab-parallel cross entropy.
        *args / **kwargs: megatron's GPTModel arguments.
    """

    def __init__(self, *args, loss_chunk_tokens: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if loss_chunk_tokens is not None and loss_chunk_tokens < 1:
            raise ValueError(f"loss_chunk_tokens must be >= 1 or None, got {loss_chunk_tokens}")
        self.loss_chunk_tokens = loss_chunk_tokens
        self._score_chunk_tokens: tuple[int, int | None] | None = None

    def output_weight(self) -> torch.Tensor:
        """This TP rank's output projection ``[V / TP, h]`` (the embedding's when tied)."""
        if self.share_embeddings_and_output_weights:
            return self.shared_embedding_or_output_weight()
        return self.output_layer.weight

    def _postprocess(self, hidden_states, labels=None, **kwargs):
        if (
            not self.post_process
            or labels is None
            or kwargs.get("mtp_in_postprocess")
            or self.config.mtp_num_layers is not None
            or kwargs.get("inference_context") is not None
        ):
            return super()._postprocess(hidden_states=hidden_states, labels=labels, **kwargs)
        tp_group = self.pg_collection.tp
        if self._score_chunk_tokens is not None:  # token_scores(): (log p, is argmax) per token
            full = hidden_states
            if self.output_layer.sequence_parallel:
                from megatron.core.tensor_parallel.mappings import (
                    gather_from_sequence_parallel_region,
                )

                full = gather_from_sequence_parallel_region(hidden_states, group=tp_group)
            chunk, vocab_size = self._score_chunk_tokens
            logp, hit = token_logprobs(
                full, self.output_weight(), labels.transpose(0, 1), chunk, tp_group, vocab_size
            )
            return logp.transpose(0, 1).contiguous(), hit.transpose(0, 1).contiguous()
        if self.loss_chunk_tokens is None:
            return super()._postprocess(hidden_states=hidden_states, labels=labels, **kwargs)
        return chunked_language_model_loss(
            hidden_states,
            self.output_weight(),
            labels,
            self.loss_chunk_tokens,
            tp_group=tp_group,
            sequence_parallel=self.output_layer.sequence_parallel,
            loss_mask=kwargs.get("loss_mask"),  # gradients formed in forward (model/loss.py)
        )

    @torch.no_grad()
    def token_scores(
        self,
        targets: torch.Tensor,
        chunk_tokens: int | None = None,
        vocab_size: int | None = None,
        **forward_kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token ``(log p(target), target is the argmax)`` ``[b, s]`` of one forward pass,
        without materialising the logits (last pipeline stage; every TP rank calls it).

        Args:
            targets: the token to score at each position ``[b, s]`` (the next token).
            chunk_tokens: tokens per chunk (default the model's loss_chunk_tokens, else 2048).
            vocab_size: leave megatron's padding rows out (see model.loss.token_logprobs).
            **forward_kwargs: GPTModel.forward's ``input_ids``, ``position_ids``,
                ``attention_mask``, ``packed_seq_params``.

        Call it on the GPTModel itself (under megatron DDP: ``chunk.module``; with bf16 also
        through megatron's Float16Module: ``chunk.module.module``).
        """
        self._score_chunk_tokens = (chunk_tokens or self.loss_chunk_tokens or 2048, vocab_size)
        try:
            return self(labels=targets, **forward_kwargs)
        finally:
            self._score_chunk_tokens = None
