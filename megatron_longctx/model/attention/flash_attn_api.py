"""flash-attn's varlen forward/backward, called per supported version (no signature guessing).

The private ``flash_attn.flash_attn_interface._flash_attn_varlen_forward/_backward`` are the only
flash-attn entry points that take and return the log-sum-exp, which the ring / a2a merge needs.
Their calling conventions, read from the tagged sources (Dao-AILab/flash-attention):

* 2.6.0 - 2.6.3: plain functions; ``window_size`` is a tuple, then ``softcap, alibi_slopes,
  return_softmax, block_table``; the forward returns ``(out, q, k, v, out_padded, softmax_lse,
  S_dmask, rng_state)``.
* 2.7.0 - 2.8.3: ``torch.library.custom_op`` objects (their Python signature reads ``(*args,
  **kwargs)``, so nothing can be matched by name); ``window_size_left, window_size_right`` are
  ints; the forward returns ``(out, softmax_lse, S_dmask, rng_state)``; the backward writes
  dq / dk / dv in place (``mutates_args``) and returns ``softmax_d``.

In both, the varlen ``softmax_lse`` is ``[num_heads, total_q]`` fp32 (2.5.x used ``[batch,
num_heads, max_seqlen_q]`` and another positional list: refused). Arguments are passed positionally
in the order above. ``SUPPORTED`` is the range checked; the ``gpu`` extra pins it. Untested on GPU:
checked on CPU against ops with 2.8's exact schema (tests/unit/test_flash_attn_api.py).
"""

from __future__ import annotations

import importlib

SUPPORTED = ((2, 6), (2, 9))  # [2.6.0, 2.9)
FIX = (
    "pip install 'flash-attn>=2.6,<2.9' --no-build-isolation (after torch; README 'GPU install'), "
    "or set the attention kernel to 'torch_flash'"
)


class FlashAttnUnavailable(RuntimeError):
    """flash-attn is missing, half-installed or of an unsupported version (one-line message)."""


def _version_tuple(text: str) -> tuple[int, int]:
    parts = text.split("+")[0].split(".")
    return int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)


def load() -> tuple[tuple[int, int], object, object]:
    """((major, minor), varlen forward, varlen backward) of the installed flash-attn.

    Raises:
        FlashAttnUnavailable: not importable (missing, or a build for another torch / CUDA: the
            compiled extension fails to load), or a version outside ``SUPPORTED``.
    """
    try:
        package = importlib.import_module("flash_attn")
        interface = importlib.import_module("flash_attn.flash_attn_interface")
        fwd = interface._flash_attn_varlen_forward
        bwd = interface._flash_attn_varlen_backward
    except Exception as err:  # ImportError, or the extension's undefined-symbol OSError
        raise FlashAttnUnavailable(
            f"flash-attn does not import ({type(err).__name__}: {str(err)[:160]}): {FIX}"
        ) from None
    version = str(getattr(package, "__version__", "0.0"))
    try:
        parsed = _version_tuple(version)
    except (ValueError, IndexError):
        parsed = (0, 0)
    if not SUPPORTED[0] <= parsed < SUPPORTED[1]:
        raise FlashAttnUnavailable(
            f"flash-attn {version} is not supported (this code calls the varlen API of 2.6.x - "
            f"2.8.x): {FIX}"
        )
    return parsed, fwd, bwd


def varlen_forward(q, k, v, cu_q, cu_k, max_q: int, max_k: int, scale: float, causal: bool):
    """``(out [nq, hq, d], lse [hq, nq] fp32)`` through the installed version's interface."""
    version, fwd, _ = load()
    if version < (2, 7):
        res = fwd(q, k, v, cu_q, cu_k, max_q, max_k, 0.0, scale, causal, (-1, -1), 0.0, None,
                  False, None)  # fmt: skip
        return res[0], res[5]
    res = fwd(q, k, v, cu_q, cu_k, max_q, max_k, 0.0, scale, causal, -1, -1, 0.0, None, False)
    return res[0], res[1]


def varlen_backward(dout, q, k, v, out, lse, dq, dk, dv, cu_q, cu_k, max_q, max_k, scale, causal):
    """Writes the gradients into ``dq, dk, dv`` (preallocated like q, k, v); lse ``[hq, nq]``."""
    version, _, bwd = load()
    if version < (2, 7):
        bwd(dout, q, k, v, out, lse, dq, dk, dv, cu_q, cu_k, max_q, max_k, 0.0, scale, causal,
            (-1, -1), 0.0, None, False, None)  # fmt: skip
    else:
        bwd(dout, q, k, v, out, lse, dq, dk, dv, cu_q, cu_k, max_q, max_k, 0.0, scale, causal,
            -1, -1, 0.0, None, False, None)  # fmt: skip
