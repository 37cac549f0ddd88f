"""GPU-only kernels behind the same interfaces as the pure-torch path. Untested on GPU.

The flash-attention block kernels live in kernel_cuda.py (chosen through kernels.resolve_kernel).

* ``te_core_attention()``: Transformer Engine's own CP attention (``TEDotProductAttention``), which
  consumes the same THD layout (per-document zigzag, ``cu_seqlens_*_padded``) with its own ring /
  a2a communication (``cp_comm_type``). Untested on GPU.

Known TE bugs with this exact layout (every document padded at its end to a multiple of 2 x CP):

* TE#3331: TE infers ``pad_between_seqs`` by comparing ``cu_seqlens_padded[:-1]`` with
  ``cu_seqlens[:-1]`` (TE <= 2.17), blind to padding of the *last* document; the CP p2p fast path
  it then takes computes wrong attention. Fix here: ``pad_between_seqs=True`` is always passed
  (``THDPackedSeqParams`` carries it, ``with_pad_between_seqs`` makes megatron hand it to TE; the
  argument exists since TE 2.2, hence the ``gpu`` extra's ``transformer-engine>=2.2``).
* TE#2186: NaN dK/dV when one of a rank's chunks of a document is all padding (short documents:
  at CP 8 a 5-token document is 11/16 padding). Padding cannot avoid it (TE needs every document
  padded to 2 x CP). Not worked around inside TE's attention; the project's own ring / a2a
  attention (``stages.N.core_attention=ring``) never hands an empty segment to a kernel
  (``VarlenBlock`` drops them), so it is the fallback if NaNs appear with ``te``.

Import-guarded: importing this module never requires Transformer Engine.
``check_transformer_engine`` turns a missing, half-installed (the package is there, its compiled
``transformer_engine.pytorch`` does not load: built for another torch / CUDA) or out-of-range TE
into one line naming the fix.
Shape legend (THD): q ``[t, hq, d]``, k / v ``[t, hk, d]``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch
from megatron.core.packed_seq_params import PackedSeqParams


@dataclass
class THDPackedSeqParams(PackedSeqParams):
    """megatron's PackedSeqParams plus TE's ``pad_between_seqs`` (True: documents are padded)."""

    pad_between_seqs: bool = True


def with_pad_between_seqs(base: type) -> type:
    """``base`` (megatron's TEDotProductAttention) forwarding ``pad_between_seqs`` to TE.

    megatron builds TE's keyword arguments as ``{k: getattr(packed_seq_params, k) for k in
    self.kept_packed_seq_params}``; adding the key makes it pass THDPackedSeqParams' field.
    """

    class TEThdAttention(base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.kept_packed_seq_params.add("pad_between_seqs")

    TEThdAttention.__name__ = f"{base.__name__}PadBetweenSeqs"
    return TEThdAttention


TE_SUPPORTED = ((2, 2), (3, 0))  # pad_between_seqs (TE#3331) .. the 2.x API of megatron-core 0.16.1
TE_FIX = (
    "pip install --no-build-isolation 'transformer-engine[pytorch]>=2.2,<3' after torch "
    "(README 'GPU install'), or use backend 'local' with core attention 'ring'"
)


class TransformerEngineUnavailable(RuntimeError):
    """Transformer Engine is missing, half-installed or of an unsupported version."""


def check_transformer_engine() -> None:
    """Raises ``TransformerEngineUnavailable`` (one line naming the fix) unless Transformer
    Engine's PyTorch extension imports and its version is in ``TE_SUPPORTED``."""
    try:
        te = importlib.import_module("transformer_engine")
        importlib.import_module("transformer_engine.pytorch")
    except Exception as err:  # ImportError, or the extension's OSError (undefined symbol)
        first = str(err).splitlines()[0][:160] if str(err) else ""
        raise TransformerEngineUnavailable(
            f"Transformer Engine does not import ({type(err).__name__}: {first}): {TE_FIX}"
        ) from None
    version = str(getattr(te, "__version__", "0.0"))
    try:
        parsed = tuple(int(x) for x in version.split("+")[0].split(".")[:2])
    except ValueError:
        parsed = (0, 0)
    if not TE_SUPPORTED[0] <= parsed < TE_SUPPORTED[1]:
        raise TransformerEngineUnavailable(
            f"Transformer Engine {version} is not supported (this code needs 2.2 <= TE < 3): "
            f"{TE_FIX}"
        )


def te_core_attention() -> type:
    """Transformer Engine's ``TEDotProductAttention`` with ``pad_between_seqs`` (see module
    docstring). Untested on GPU."""
    if not torch.cuda.is_available():
        raise RuntimeError("core attention 'te' needs CUDA; on CPU use 'ring' or 'a2a'")
    check_transformer_engine()
    from megatron.core.extensions.transformer_engine import TEDotProductAttention

    return with_pad_between_seqs(TEDotProductAttention)
