"""Teacher-forced scoring on the trainer's own megatron model chunks, in the stage's layout.

Every rank runs :meth:`MegatronScorer.score` with the same requests (it is collective):

    requests ──packing.pack_requests (documents masked from each other)──> packs
    packs ──dealt to DP replicas (equal counts: filler packs even them out)──> this replica's
    pack ──training/batch.py (CP zigzag, SP padding, onto the device)──> model inputs
    model chunks ──megatron's schedule, forward only (PP p2p as in training)──> final hidden states
    hidden ──model/loss.py token_logprobs (chunked, vocab-parallel over TP; no logits)──> logprob,
                                                                        is_greedy per token
    per token ──index_add by (request, slot), on the device──> per-request / per-position sums
    sums ──all_reduce(DP x CP) + broadcast(PP, from the last stage)──> the same result everywhere

NCCL-safe: every collective takes device tensors, every rank enters the same collectives in the
same order (each DP replica runs the same number of packs), and no rank works alone while the
others wait. Nothing is read back to the host until the final reduction. The model runs in the
precision it was built with (the recipe's: bf16 or fp32); scores are computed in fp32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from megatron_longctx.eval.packing import Pack, ScoreRequest, filler_pack, pack_requests
from megatron_longctx.training.batch import BatchSharding, batch_to_device, to_model_batch
from megatron_longctx.training.step import sum_over_replicas

FILLER_TOKENS = 8


@dataclass
class ScoreResult:
    """Sums over the scored tokens of each request (numpy, identical on every rank).

    Attributes:
        logprob_sum: ``[R]`` sum of the scored tokens' log-probabilities (nats).
        num_wrong: ``[R]`` scored tokens that are not the greedy (argmax) token.
        num_scored: ``[R]`` scored tokens.
        position_nll_sum: ``[L]`` NLL summed over ``per_position`` requests, by slot.
        position_count: ``[L]`` how many requests scored each slot.
    """

    logprob_sum: np.ndarray
    num_wrong: np.ndarray
    num_scored: np.ndarray
    position_nll_sum: np.ndarray
    position_count: np.ndarray

    @property
    def correct(self) -> np.ndarray:
        """Teacher-forced exact: every scored token is the argmax (= greedy decoding starts
        with exactly these tokens)."""
        return (self.num_wrong == 0) & (self.num_scored > 0)

    @property
    def mean_logprob(self) -> np.ndarray:
        return self.logprob_sum / np.maximum(self.num_scored, 1)


def _unwrap(chunk):
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


class MegatronScorer:
    """Scores requests with megatron model chunks (every rank, collectively).

    Args:
        chunks: this rank's model chunks (megatron DDP-wrapped or bare GPTModels).
        shard: this rank's batch path (the stage's ``BatchSharding``).
        vocab_size: the real vocabulary size (megatron's padding ids are excluded).
        seq_length: the longest packed sequence (the stage's sequence length).
    """

    def __init__(self, chunks: list, shard: BatchSharding, vocab_size: int, seq_length: int):
        self.chunks = list(chunks)
        self.shard = shard
        self.vocab_size = int(vocab_size)
        self.seq_length = int(seq_length)
        self._ref = next(self.chunks[0].parameters())  # results are allocated like it
        self.device = self._ref.device
        self.last_num_forward_tokens = 0

    # -- the batch path --------------------------------------------------------------------------
    def _model_batch(self, pack: Pack, num_requests: int, num_slots: int) -> dict:
        s = self.shard
        host = to_model_batch(
            pack.micro, s.cp_size, s.cp_rank, s.cp_group, s.sharding, sp_size=s.sp_size
        )
        index = host["position_ids"][0].long()  # packed index of each local token
        valid = (host["loss_mask"][0] > 0) & (index >= 0) & (index < pack.num_tokens)
        at = torch.where(valid, index, 0).numpy()
        req = np.where(valid.numpy(), pack.request[at], -1)
        slot = np.where(valid.numpy(), pack.slot[at], -1)
        # out-of-range ids land in a trash entry (index num_*): no boolean indexing, no host sync
        host["eval_request"] = torch.from_numpy(np.where(req >= 0, req, num_requests))
        host["eval_slot"] = torch.from_numpy(np.where(slot >= 0, slot, num_slots))
        batch = batch_to_device(host, self.device)
        for key in ("eval_request", "eval_slot"):
            batch[key] = host[key].to(self.device, non_blocking=True)
        return batch

    # -- megatron's calling convention ----------------------------------------------------------
    def _forward_step(self, data_iterator, model):
        batch = next(data_iterator)
        inputs = dict(
            input_ids=batch["tokens"],
            position_ids=batch["position_ids"],
            attention_mask=None,
            packed_seq_params=batch["packed_seq_params"],
        )
        gpt = _unwrap(model)
        if not gpt.post_process:  # an earlier pipeline stage: hidden states for the next one
            return model(**inputs), partial(self._score, batch)
        # the last stage scores through the chunked output layer (model/loss.py token_logprobs):
        # [b, s] (log p, is greedy) per token, never the [tokens x vocab] logits
        scores = gpt.token_scores(batch["labels"], vocab_size=self.vocab_size, **inputs)
        logp, hit = scores
        return torch.stack([logp, hit.float()]), partial(self._score, batch)

    def _score(self, batch: dict, scores: torch.Tensor):
        # [2, b=1, s] -> [s] each (tensor methods only: the fake-CUDA NCCL-rule test runs this)
        lp, hit = scores.select(0, 0).select(0, 0), scores.select(0, 1).select(0, 0).bool()
        req, slot = batch["eval_request"], batch["eval_slot"]
        acc = self._acc
        acc["logprob"].index_add_(0, req, lp.double())
        acc["wrong"].index_add_(0, req, hit.logical_not().double())
        acc["count"].index_add_(0, req, torch.ones_like(lp, dtype=torch.float64))
        acc["pos_nll"].index_add_(0, slot, -lp.double())
        acc["pos_count"].index_add_(0, slot, torch.ones_like(lp, dtype=torch.float64))
        return scores.new_zeros(()), scores.new_zeros((), dtype=torch.int), {}

    # -- the whole evaluation -------------------------------------------------------------------
    @torch.no_grad()
    def score(self, requests: list[ScoreRequest]) -> ScoreResult:
        """Scores ``requests`` (collective: every rank passes the same list)."""
        from megatron.core import parallel_state

        num_req = len(requests)
        num_slots = max([r.num_scored for r in requests if r.per_position] or [0])
        packs = pack_requests(requests, self.seq_length)
        dp, dp_rank = (
            parallel_state.get_data_parallel_world_size(),
            parallel_state.get_data_parallel_rank(),
        )
        rounds = math.ceil(len(packs) / dp)
        mine = packs[dp_rank::dp]
        mine += [filler_pack(FILLER_TOKENS)] * (rounds - len(mine))
        self.last_num_forward_tokens = sum(p.num_tokens for p in packs)
        f64 = dict(dtype=torch.float64)
        self._acc = {
            "logprob": self._ref.new_zeros(num_req + 1, **f64),
            "wrong": self._ref.new_zeros(num_req + 1, **f64),
            "count": self._ref.new_zeros(num_req + 1, **f64),
            "pos_nll": self._ref.new_zeros(num_slots + 1, **f64),
            "pos_count": self._ref.new_zeros(num_slots + 1, **f64),
        }
        if mine:
            self._run([self._model_batch(p, num_req, num_slots) for p in mine])
        flat = torch.cat([v.narrow(0, 0, v.shape[0] - 1) for v in self._acc.values()])
        out = sum_over_replicas(flat).cpu().numpy()  # training/step.py: as the step's loss
        r, s = num_req, num_slots
        return ScoreResult(
            logprob_sum=out[:r],
            num_wrong=out[r : 2 * r].round().astype(np.int64),
            num_scored=out[2 * r : 3 * r].round().astype(np.int64),
            position_nll_sum=out[3 * r : 3 * r + s],
            position_count=out[3 * r + s :].round().astype(np.int64),
        )

    def _run(self, batches: list[dict]) -> None:
        from megatron.core import parallel_state
        from megatron.core.pipeline_parallel import get_forward_backward_func

        models = [_unwrap(c) for c in self.chunks]
        config = models[0].config
        was_training = [m.training for m in models]
        saved_variable = config.variable_seq_lengths
        # Megatron-LM's evaluate(): the distributed optimizer's overlapped parameter all-gather
        # hooks are synchronised and turned off for forward-only passes (collective, every rank)
        hooked = [
            c
            for c in self.chunks
            if getattr(getattr(c, "ddp_config", None), "overlap_param_gather", False)
        ]
        for c in hooked:
            c.disable_forward_pre_hook()
        try:
            for m in models:
                m.eval()
            if parallel_state.get_pipeline_model_parallel_world_size() > 1:
                config.variable_seq_lengths = True  # packs differ in length
            get_forward_backward_func()(
                forward_step_func=self._forward_step,
                data_iterator=iter(batches),
                model=self.chunks if len(self.chunks) > 1 else self.chunks[0],
                num_microbatches=len(batches),
                seq_length=max(int(b["tokens"].shape[1]) for b in batches),
                micro_batch_size=1,
                forward_only=True,
            )
        finally:
            config.variable_seq_lengths = saved_variable
            for m, t in zip(models, was_training):
                m.train(t)
            for c in hooked:
                c.enable_forward_pre_hook()
