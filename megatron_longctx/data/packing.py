"""Packing: materialise one sample of S + 1 tokens with its document boundaries.

Trade-off (stated once, here). Each component is one token stream: its eligible documents,
shuffled per epoch and laid back to back. Sample ``j`` of a component is stream tokens
``[j*S, j*S + S + 1)``: inputs are the first S, labels the last S, so consecutive samples share one
token (the label of one is the first input of the next) and every stream token is trained on as an
input once and as a target once. Consequences, all counted in ``MixtureIndex.stats``:

* **kept**: documents inside the component's bucket ``[min_tokens, max_tokens)``.
* **dropped**: documents outside the bucket (``docs_dropped_below_min/above_max``). A long bucket
  with ``min_tokens = S`` is ProLong's rule: long documents shorter than the pack length are dropped.
* **cut**: a document longer than what is left of the sample continues in the component's next
  sample. Long-bucket documents (>= S) are therefore cut into S-token pieces; short-bucket documents
  are packed whole, back to back, except the one straddling a sample boundary.
* **carried**: that straddling piece's rest opens the next sample of the same component
  (``docs_carried_across_samples``). Nothing is padded, so no compute is spent on padding.
* **unused**: the tokens of the last epoch after the final sample (``tokens_left_in_last_epoch``)
  are not trained on in this stage; they are not part of any sample.

Fields of a sample (S = seq_length):

* ``tokens``/``labels`` int64 [S]: ``labels[i] = tokens[i + 1]``.
* ``cu_seqlens`` int32 [num_docs + 1]: document boundaries over the S inputs, ``0 ... S``.
* ``loss_mask`` float32 [S]: 1 except where the label is the first token of the next document. The
  last token of a document (its EOD when preprocessing appends one) *is* a target, predicted from
  inside its document; the EOD -> next-document transition is not, because attention never crosses
  the boundary and the next document's first token is unpredictable from it.
* ``position_ids`` int64 [S]: ``0..S-1`` across the sample. The model does not read them on the
  packed path: megatron's THD RoPE (``_apply_rotary_pos_emb_thd``) takes each token's rotary
  position from ``cu_seqlens``, restarting at 0 at every document (a document carried in from the
  previous sample too), and attention is document-masked; so positions never run across documents
  and there is no ``reset_position_ids`` knob (it could not change training).

SFT: a component with ``mask_prefixes`` has a stored 0/1 mask per token (1 on assistant tokens).
The label at position t is token t + 1, so ``loss_mask[t]`` is further multiplied by the stored
mask of token t + 1 (the sample's S + 1 mask values, shifted by one).
"""

from __future__ import annotations

import numpy as np

from megatron_longctx.data.index import MixtureIndex
from megatron_longctx.data.sources import TokenReader


def sample_pieces(index: MixtureIndex, sample: int) -> tuple[int, list[tuple[int, int, int, int]]]:
    """Locates a sample's S + 1 tokens.

    Args:
        index: The mixture index.
        sample: Global sample number.

    Returns:
        ``(component, pieces)``; each piece is ``(eligible_doc, dataset, token_offset, length)``:
        a contiguous run of one document, in order, lengths summing to S + 1.
    """
    if not 0 <= sample < index.num_samples:
        raise IndexError(
            f"sample {sample} is outside the index (0..{index.num_samples - 1}); "
            f"build the index with more num_samples"
        )
    c = int(index.sample_component[sample])
    comp = index.components[c]
    start = int(index.sample_local[sample]) * index.seq_length
    end = start + index.seq_length + 1
    i = int(np.searchsorted(comp.stream_cum, start, side="right")) - 1
    pieces = []
    pos = start
    while pos < end:
        doc = int(comp.stream_doc[i])
        doc_start = int(comp.stream_cum[i])
        within = pos - doc_start
        take = min(int(comp.doc_length[doc]) - within, end - pos)
        pieces.append((doc, int(comp.doc_dataset[doc]), int(comp.doc_offset[doc]) + within, take))
        pos += take
        i += 1
    return c, pieces


def sample_doc_lengths(index: MixtureIndex, sample: int) -> np.ndarray:
    """Lengths of the documents (pieces) among a sample's S inputs, from the index alone.

    The same boundaries as ``sample_fields``' ``cu_seqlens``; no token is read.
    """
    _, pieces = sample_pieces(index, sample)
    lengths = np.array([p[3] for p in pieces], dtype=np.int64)
    lengths[-1] -= 1  # the extra label token
    return lengths[lengths > 0]


def sample_fields(
    tokens: np.ndarray,
    piece_lengths: list[int],
    token_mask: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Builds the training fields of one sample from its S + 1 tokens and document pieces.

    Args:
        tokens: [S + 1] token ids.
        piece_lengths: Lengths of the document pieces covering ``tokens`` (sum S + 1).
        token_mask: Optional [S + 1] stored 0/1 loss mask of the tokens (SFT); label t keeps its
            loss only where ``token_mask[t + 1]`` is 1.
    """
    seq = len(tokens) - 1
    starts = np.cumsum([0] + list(piece_lengths[:-1]))  # piece starts within S + 1 tokens
    inner = starts[(starts > 0) & (starts < seq)]  # document starts among the S inputs
    cu_seqlens = np.concatenate([[0], inner, [seq]]).astype(np.int32)
    loss_mask = np.ones(seq, dtype=np.float32)
    label_starts = starts[starts > 0] - 1  # label position whose target opens a new document
    loss_mask[label_starts] = 0.0
    if token_mask is not None:
        loss_mask *= np.asarray(token_mask[1:], dtype=np.float32)
    position_ids = np.arange(seq, dtype=np.int64)
    tokens = tokens.astype(np.int64)
    return {
        "tokens": tokens[:-1],
        "labels": tokens[1:],
        "loss_mask": loss_mask,
        "position_ids": position_ids,
        "cu_seqlens": cu_seqlens,
    }


class SamplePacker:
    """Materialises samples of an index from the component's ``.bin`` files."""

    def __init__(self, index: MixtureIndex, readers: list[TokenReader] | None = None):
        """Opens (lazily, memory-mapped) the ``.bin`` files of every component.

        Args:
            index: The mixture index.
            readers: Per-component token readers; default: from the index's prefixes.
        """
        self.index = index
        self.readers = readers or [TokenReader(p) for p in index.prefixes]
        self.mask_readers = [
            TokenReader(c.mask_prefixes) if c.mask_prefixes else None for c in index.spec.components
        ]

    def get(self, sample: int) -> dict[str, np.ndarray | int]:
        """Returns the sample's fields (see module docstring) plus ``component`` and ``sample``."""
        c, pieces = sample_pieces(self.index, sample)
        reader = self.readers[c]
        tokens = np.concatenate([reader.read(ds, off, n) for _, ds, off, n in pieces])
        masks = self.mask_readers[c] if c < len(self.mask_readers) else None
        token_mask = (
            None
            if masks is None
            else np.concatenate([masks.read(ds, off, n) for _, ds, off, n in pieces])
        )
        out = sample_fields(tokens, [p[3] for p in pieces], token_mask)
        out["component"] = c
        out["sample"] = sample
        return out
