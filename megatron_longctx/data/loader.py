"""Micro-batches for one data-parallel rank, resumable from the consumed-samples counter.

Sample order is a pure function of the index and the absolute sample number: global batch ``g``
is samples ``[g*G, (g+1)*G)``; inside it, micro-step ``m`` takes the next ``b*D`` samples and DP
rank ``r`` gets the ``b`` of them at ``[r*b, (r+1)*b)`` (megatron's ``MegatronPretrainingSampler``
layout; G = global batch, b = micro batch, D = DP size). With a ``work`` model (balanced
assignment, parallel/dp_assign.py ``assign_variable``) the same G samples are instead dealt to DP
ranks and micro-batches by their work, a pure function of global batch ``g``; ranks may then run
different numbers of micro-batches in a step (``num_micro_batches`` is this rank's count for the
coming step). The only state is ``consumed_samples`` (with balance it advances by G once this
rank has taken its last micro-batch of the global batch), so:

* restarting at any micro-step boundary replays exactly the batches that would have followed;
* changing D at a fixed G keeps each global batch's set of samples (hence the loss) unchanged;
* a second (third, ...) resume is no different from the first.

Micro-batch fields (S = seq_length, b = micro batch size):
``tokens``/``labels``/``position_ids`` int64 [b, S], ``loss_mask`` float32 [b, S],
``cu_seqlens`` int32 [num_docs + 1]: document boundaries over the flattened ``b * S`` tokens (THD
layout; sample i's boundaries are offset by ``i * S``), ``num_documents`` int64 [b] (documents per
sample, to split ``cu_seqlens`` back per sample), ``max_seqlen`` int, ``sample_index`` int64 [b]
(global sample numbers) and ``component`` int64 [b] (mixture component of each sample).
See ``packing.py`` for the packing rules and the loss-mask / position-id conventions; for SFT
components (``mask_prefixes``) ``loss_mask`` is also 0 wherever the label is not an assistant token.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import torch

from megatron_longctx.data.index import MixtureIndex
from megatron_longctx.data.mixture import MixtureError
from megatron_longctx.data.packing import SamplePacker, sample_doc_lengths
from megatron_longctx.parallel.dp_assign import (
    WorkModel,
    assign_variable,
    megatron_order,
    step_balance,
)
from megatron_longctx.parallel.layout import num_micro_batches

logger = logging.getLogger(__name__)


class MixtureLoader:
    """Yields this DP rank's micro-batches of a mixture index, starting at ``consumed_samples``."""

    def __init__(
        self,
        index: MixtureIndex,
        global_batch_size: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        consumed_samples: int = 0,
        packer: SamplePacker | None = None,
        work: WorkModel | None = None,
        balance: bool = True,
        min_micro_batches: int = 1,
    ):
        """Checks the batch arithmetic and positions the loader.

        Args:
            index: The stage's mixture index (``build_mixture_index``).
            global_batch_size: Samples per optimizer step over all DP ranks.
            micro_batch_size: Samples per forward pass on one rank.
            dp_rank: This rank's data-parallel rank.
            dp_size: Data-parallel size.
            consumed_samples: Global samples already trained on (from the checkpoint).
            packer: Sample materialiser; default opens the index's ``.bin`` files.
            work: per-sample work model (CP size and sharding); enables ``step_balance``.
            balance: with ``work``, deal each global batch to DP ranks and micro-batches by work
                (``assign_variable``); False keeps megatron's order.
            min_micro_batches: fewest micro-batches a rank runs per step with balance (the
                interleaved pipeline schedule needs >= PP).

        Raises:
            MixtureError: inconsistent sizes, with the arithmetic in the message.
        """
        for name, value in (
            ("global_batch_size", global_batch_size),
            ("micro_batch_size", micro_batch_size),
            ("dp_size", dp_size),
        ):
            if not isinstance(value, int) or value < 1:
                raise MixtureError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(dp_rank, int) or not 0 <= dp_rank < dp_size:
            raise MixtureError(f"dp_rank {dp_rank!r} must be in [0, dp_size={dp_size})")
        num_micro_batches(global_batch_size, micro_batch_size, dp_size, error=MixtureError)
        self.index = index
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.packer = packer or SamplePacker(index)
        self.work, self.balance = work, balance and work is not None
        self.min_micro_batches = min_micro_batches
        self._plan: tuple | None = None
        self._consumed, self._taken = 0, 0  # _taken: this rank's micro-batches of the batch
        self._set_consumed(consumed_samples)

    @property
    def consumed_samples(self) -> int:
        """Global samples consumed so far (over all DP ranks)."""
        return self._consumed

    @property
    def num_micro_batches(self) -> int:
        """Micro-batches this rank runs in the coming step (with balance: its share of the global
        batch the next micro-batch comes from, which may differ between ranks)."""
        if not self.balance:
            return num_micro_batches(self.global_batch_size, self.micro_batch_size, self.dp_size)
        return len(self._global_plan(*self._position())[1][self.dp_rank])

    def _position(self) -> tuple[int, int]:
        """(global batch, first sample of it not yet dealt) of the coming step."""
        return divmod(self._consumed, self.global_batch_size)

    def _set_consumed(self, consumed: int) -> None:
        step = self.micro_batch_size * self.dp_size
        if not isinstance(consumed, int) or consumed < 0 or consumed % step:
            raise MixtureError(
                f"consumed_samples {consumed!r} must be a non-negative multiple of micro_batch_size"
                f" {self.micro_batch_size} x DP {self.dp_size} = {step} (a micro-step boundary)"
            )
        if consumed > self.index.num_samples:
            raise MixtureError(
                f"consumed_samples {consumed} is past the index's "
                f"{self.index.num_samples} samples; rebuild it with more samples"
            )
        self._consumed, self._taken = consumed, 0

    def state_dict(self) -> dict:
        """The loader's state: consumed samples plus what identifies the index (for checks)."""
        return {
            "consumed_samples": self._consumed,
            "index_key": self.index.key,
            "index_digest": self.index.layout_digest(),
            "seq_length": self.index.seq_length,
            "global_batch_size": self.global_batch_size,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restores ``consumed_samples``; refuses a state saved for a different index."""
        if state.get("seq_length", self.index.seq_length) != self.index.seq_length:
            raise MixtureError(
                f"loader state is for seq_length {state['seq_length']}, this index "
                f"has {self.index.seq_length}"
            )
        digest = state.get("index_digest")
        key = state.get("index_key", "")
        if digest is not None:  # what each sample holds; moved or re-staged files keep it
            if digest != self.index.layout_digest():
                raise MixtureError(
                    f"the checkpoint's data loader was saved for another sample index (layout "
                    f"{digest}, this run builds {self.index.layout_digest()}): the stage's "
                    "mixture (components, weights, buckets, seed), its data files or its sample "
                    "count changed under an existing run, so resuming would not continue the "
                    "same data order; restore them, or start the run in a new checkpoint.save_dir"
                )
        elif key and self.index.key and key != self.index.key:
            raise MixtureError(
                f"loader state was saved for mixture index {key}, this one is "
                f"{self.index.key}: the mixture, data or num_samples changed; restore them, "
                "or start the run in a new checkpoint.save_dir"
            )
        if "global_batch_size" in state and state["global_batch_size"] != self.global_batch_size:
            logger.warning(
                "resuming with global batch %d (checkpoint: %d): samples stay in order, "
                "step boundaries move",
                self.global_batch_size,
                state["global_batch_size"],
            )
        self._set_consumed(int(state["consumed_samples"]))

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        step = self.micro_batch_size * self.dp_size
        if self._consumed + step > self.index.num_samples:
            raise StopIteration
        if self.work is None:
            first = self._consumed + self.dp_rank * self.micro_batch_size
            samples = range(first, first + self.micro_batch_size)
        elif not self.balance:
            g, within = self._position()
            order = self._global_plan(g, 0)[1]
            samples = (g * self.global_batch_size + order[self.dp_rank, within // step]).tolist()
        else:
            g, within = self._position()
            mine = self._global_plan(g, within)[1][self.dp_rank]
            samples = (g * self.global_batch_size + within + mine[self._taken]).tolist()
        batch = collate([self.packer.get(s) for s in samples])
        if not self.balance:
            self._consumed += step
        else:
            self._taken += 1
            if self._taken == len(mine):  # this rank's share of the step is done
                self._consumed, self._taken = (g + 1) * self.global_batch_size, 0
        return batch

    def _global_plan(self, g: int, within: int) -> tuple:
        """(key, assignment, balance figures) of samples [within, G) of global batch g (all of
        it unless a resume changed G mid-batch), computed once per step and cached: a pure
        function of the batch, the same on every rank."""
        if self._plan is None or self._plan[0] != (g, within):
            G = self.global_batch_size
            first = g * G + within
            if g * G + G > self.index.num_samples:
                raise MixtureError(
                    f"global batch {g} needs samples up to {g * G + G}, the index has "
                    f"{self.index.num_samples}; rebuild it with more samples"
                )
            lengths = [sample_doc_lengths(self.index, s) for s in range(first, g * G + G)]
            per = [self.work.sample(x) for x in lengths]
            cp_work = np.stack([w for w, _ in per])
            pads = np.array([p for _, p in per])
            cost = cp_work.max(axis=1)
            b, D = self.micro_batch_size, self.dp_size
            if self.balance:
                order = assign_variable(cost, D, b, self.min_micro_batches)
            else:
                order = megatron_order(G, D, b)
            stats = step_balance(cp_work, pads, [x.sum() for x in lengths], order)
            self._plan = ((g, within), order, stats)
        return self._plan

    def step_balance(self) -> dict[str, float]:
        """Balance figures of the step just taken (every rank agrees: the assignment is a pure
        function of the batch); empty without a work model or before the first step."""
        if self.work is None or self._plan is None:
            return {}
        return dict(self._plan[2])


def collate(samples: list[dict]) -> dict:
    """Stacks packed samples into a micro-batch (THD ``cu_seqlens`` over the flattened tokens)."""
    seq = len(samples[0]["tokens"])
    out = {
        k: torch.from_numpy(np.stack([s[k] for s in samples]))
        for k in ("tokens", "labels", "loss_mask", "position_ids")
    }
    cus = [samples[0]["cu_seqlens"][:1]]
    for i, s in enumerate(samples):
        cus.append(s["cu_seqlens"][1:] + i * seq)
    cu = np.concatenate(cus).astype(np.int32)
    out["cu_seqlens"] = torch.from_numpy(cu)
    out["num_documents"] = torch.tensor([len(s["cu_seqlens"]) - 1 for s in samples])
    out["max_seqlen"] = int(np.diff(cu).max())
    out["sample_index"] = torch.tensor([s["sample"] for s in samples])
    out["component"] = torch.tensor([s["component"] for s in samples])
    return out
