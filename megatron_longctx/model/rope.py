"""RoPE: the one translator between recipe, megatron-core's rotary embedding and transformers.

Every RoPE setting crosses three boundaries: the recipe (``model.rope_theta`` / ``rope_scaling``,
per stage), megatron's ``RotaryEmbedding`` that trains, and the HF ``config.json``
(``rope_parameters``; 4.x: ``rope_theta`` + ``rope_scaling``) that ships. All three go through this
module: ``validate_rope_scaling`` at config load, ``install_megatron_rope`` /
``megatron_attention_factor`` when the model is built (``model/build.py``), and
``to_hf_rope_parameters`` / ``from_hf_rope_parameters`` for export and import
(``checkpoint/hf/config_map.py``). An unknown ``rope_type`` or field is refused with the reason.

Variants (``scaling`` uses transformers' ``rope_parameters`` keys):

* default / ABF ("adjusted base frequency", Llama 2 Long, ProLong): only ``rope_theta`` changes;
* ``{"rope_type": "linear", "factor": f}``: position interpolation, positions / f;
* ``{"rope_type": "yarn", "factor": f, "original_max_position_embeddings": n, ...}``: YaRN
  (NTK-by-parts interpolation + an attention factor on cos/sin);
* ``{"rope_type": "llama3", "factor": f, "low_freq_factor": l, "high_freq_factor": h,
  "original_max_position_embeddings": n}``: Llama 3.1 scaling.

How megatron gets them: the GPTModel is built with plain ``position_embedding_type="rope"`` and
``rotary_base = rope_theta``; ``install_megatron_rope`` then replaces its ``inv_freq`` with the
exact frequencies computed here (megatron's own llama3 path hard-codes low/high factors 1/4 and an
original length of 8,192; its linear path scales positions instead of frequencies). YaRN's
attention factor ``a`` multiplies cos and sin; megatron's ``SelfAttention`` applies such a factor
to q and k (its ``mscale``) when the TransformerConfig carries ``yarn_*`` attributes, which
``megatron_attention_factor`` sets so that megatron's formula yields exactly ``a``.

Implemented here from the papers' formulas (not by calling transformers) so the tests can check
them against transformers' own rotary implementation. Under CP, a rank's rotary positions are the
in-document positions of its tokens (``rank_rope_positions``; the zigzag-within-documents layout),
the same rows megatron's THD RoPE picks (``_get_thd_freqs_on_this_cp_rank``).

Shapes: inv_freq ``[d/2]``; positions ``[t]``; cos / sin ``[t, d]`` (halves concatenated, HF and
megatron's non-interleaved layout).
"""

from __future__ import annotations

import math

import torch

ROPE_TYPES = ("default", "linear", "yarn", "llama3")

#: rope_type -> (required fields, optional fields), in transformers' names.
ROPE_FIELDS = {
    "default": ((), ()),
    "linear": (("factor",), ()),
    "llama3": (
        ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
        (),
    ),
    "yarn": (
        ("factor", "original_max_position_embeddings"),
        ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate"),
    ),
}
_WHY_NOT = {
    "dynamic": "dynamic NTK rescales frequencies with the input length at inference time; "
    "training has no fixed-length equivalent",
    "longrope": "LongRoPE needs per-dimension short/long factor lists megatron's GPTModel lacks",
    "ntk": "use 'yarn' (NTK-by-parts) or raise rope_theta (ABF) instead",
}
_INT_FIELDS = ("original_max_position_embeddings",)


class RopeConfigError(ValueError):
    """A RoPE setting this project cannot train and export faithfully (the message says why)."""


def validate_rope_scaling(scaling: dict | None, where: str = "rope_scaling") -> dict | None:
    """The normalised scaling dict (None for default RoPE), or RopeConfigError with the reason.

    Accepts transformers' layouts: ``rope_type`` (or 4.x's ``type``), the fields of ROPE_FIELDS,
    ``rope_theta`` (ignored here: it is ``model.rope_theta``) and ``partial_rotary_factor`` 1.0.
    """
    if scaling is None:
        return None
    if not isinstance(scaling, dict):
        raise RopeConfigError(f"{where} must be a mapping or null, got {scaling!r}")
    s = dict(scaling)
    s.pop("rope_theta", None)
    legacy = s.pop("type", None)
    rope_type = s.pop("rope_type", legacy) or "default"
    if rope_type not in ROPE_FIELDS:
        reason = _WHY_NOT.get(rope_type, "")
        raise RopeConfigError(
            f"{where}.rope_type {rope_type!r} is not supported (choose one of {ROPE_TYPES})"
            + (f": {reason}" if reason else "")
        )
    partial = s.pop("partial_rotary_factor", 1.0)
    if partial is not None and float(partial) != 1.0:
        raise RopeConfigError(
            f"{where}.partial_rotary_factor {partial}: the model rotates the whole head "
            "(megatron rotary_percent 1.0); only 1.0 is supported"
        )
    required, optional = ROPE_FIELDS[rope_type]
    unknown = sorted(set(s) - set(required) - set(optional))
    if unknown:
        raise RopeConfigError(
            f"{where}: field(s) {unknown} are not used by rope_type {rope_type!r} "
            f"(required: {list(required)}, optional: {list(optional)}); remove them"
        )
    missing = [k for k in required if s.get(k) is None]
    if missing:
        raise RopeConfigError(f"{where}: rope_type {rope_type!r} needs {missing}")
    out: dict = {"rope_type": rope_type}
    for key in (*required, *optional):
        value = s.get(key)
        if value is None:
            continue
        if key == "truncate":
            out[key] = bool(value)
            continue
        try:
            out[key] = int(value) if key in _INT_FIELDS else float(value)
        except (TypeError, ValueError):
            raise RopeConfigError(f"{where}.{key} must be a number, got {value!r}") from None
    if rope_type == "default":
        return None
    if out["factor"] < 1:
        raise RopeConfigError(f"{where}: rope scaling factor must be >= 1, got {out['factor']}")
    if out.get("original_max_position_embeddings", 1) < 1:
        raise RopeConfigError(f"{where}.original_max_position_embeddings must be >= 1")
    if rope_type == "llama3" and not 0 < out["low_freq_factor"] < out["high_freq_factor"]:
        raise RopeConfigError(
            f"{where}: llama3 needs 0 < low_freq_factor < high_freq_factor, got "
            f"{out['low_freq_factor']} and {out['high_freq_factor']}"
        )
    return out


def to_hf_rope_parameters(rope_theta: float, scaling: dict | None) -> dict:
    """transformers' ``rope_parameters`` for a model trained with ``rope_theta`` / ``scaling``."""
    scaling = validate_rope_scaling(scaling)
    return dict(scaling or {"rope_type": "default"}, rope_theta=float(rope_theta))


def from_hf_rope_parameters(rope: dict, where: str = "config.json") -> tuple[float, dict | None]:
    """(rope_theta, scaling) of transformers' ``rope_parameters`` (or ``rope_scaling``)."""
    rope = dict(rope or {})
    theta = float(rope.pop("rope_theta", None) or 10000.0)
    return theta, validate_rope_scaling(rope, where=f"{where} rope_parameters")


def _base_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    return 1.0 / (theta**exponents)


def _yarn(
    inv_freq: torch.Tensor, head_dim: int, theta: float, s: dict
) -> tuple[torch.Tensor, float]:
    factor = float(s["factor"])
    original = float(s["original_max_position_embeddings"])
    beta_fast, beta_slow = float(s.get("beta_fast") or 32), float(s.get("beta_slow") or 1)

    def dim_for(rotations: float) -> float:  # dimension whose wavelength fits `rotations` turns
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_for(beta_fast), dim_for(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp  # 1: keep the original frequency (high frequencies)
    scaled = inv_freq / factor * (1 - extrapolate) + inv_freq * extrapolate
    attention = s.get("attention_factor")
    if attention is None:

        def mscale(scale: float, m: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        if s.get("mscale") and s.get("mscale_all_dim"):
            attention = mscale(factor, s["mscale"]) / mscale(factor, s["mscale_all_dim"])
        else:
            attention = mscale(factor)
    return scaled, float(attention)


def _llama3(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    factor = float(s["factor"])
    low, high = float(s["low_freq_factor"]), float(s["high_freq_factor"])
    original = float(s["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    smooth = (original / wavelen - low) / (high - low)
    mid = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    out = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
    is_mid = (wavelen >= original / high) & (wavelen <= original / low)
    return torch.where(is_mid, mid, out)


def rope_inv_freq(
    head_dim: int, rope_theta: float, scaling: dict | None = None
) -> tuple[torch.Tensor, float]:
    """Inverse frequencies ``[head_dim / 2]`` (fp32) and the attention factor for cos / sin.

    Args:
        head_dim: rotary dimension (even).
        rope_theta: base frequency (ABF raises it: 1e4 -> 5e5 -> 8e6 -> 1.28e8).
        scaling: None or a dict with ``rope_type`` in ROPE_TYPES (see module docstring).
    """
    if head_dim % 2:
        raise ValueError(f"rotary head_dim must be even, got {head_dim}")
    if rope_theta <= 0:
        raise ValueError(f"rope_theta must be > 0, got {rope_theta}")
    inv_freq = _base_inv_freq(head_dim, rope_theta)
    scaling = validate_rope_scaling(scaling)
    rope_type = (scaling or {}).get("rope_type", "default")
    if rope_type == "linear":
        return inv_freq / float(scaling["factor"]), 1.0
    if rope_type == "yarn":
        return _yarn(inv_freq, head_dim, rope_theta, scaling)
    if rope_type == "llama3":
        return _llama3(inv_freq, scaling), 1.0
    return inv_freq, 1.0


def rope_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, attention_factor: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin ``[t, d]`` for integer positions ``[t]`` (computed in fp32)."""
    angles = positions.float()[:, None] * inv_freq[None, :].float()
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos() * attention_factor, emb.sin() * attention_factor


def rank_rope_positions(
    cu_seqlens_padded, cu_seqlens_unpadded, cp_size: int, cp_rank: int
) -> torch.Tensor:
    """In-document rotary positions ``[t]`` of a CP rank's tokens (zigzag within documents)."""
    from megatron_longctx.parallel.cp_split import rank_token_layout

    return rank_token_layout(cu_seqlens_padded, cu_seqlens_unpadded, cp_size, cp_rank).pos


def megatron_attention_factor(config, rope_theta: float, scaling: dict | None) -> float:
    """Makes megatron's attention multiply cos/sin by YaRN's attention factor; returns the factor.

    megatron's ``SelfAttention`` passes ``mscale = _yarn_get_concentration_factor(
    config.yarn_rotary_scaling_factor, config.yarn_mscale, config.yarn_mscale_all_dim)`` to its
    RoPE whenever the config has ``yarn_rotary_scaling_factor``; with ``mscale_all_dim`` 0 that is
    ``0.1 * mscale * ln(factor) + 1``. The values set here (factor e, mscale 10 (a - 1)) make it
    exactly ``a`` for any attention factor, including an explicit ``attention_factor``. Nothing else
    in the Llama path reads these attributes. A factor of 1 sets nothing.
    """
    _, attention = rope_inv_freq(config.kv_channels, rope_theta, scaling)
    if abs(attention - 1.0) > 1e-12:
        config.yarn_rotary_scaling_factor = math.e
        config.yarn_mscale = 10.0 * (attention - 1.0)
        config.yarn_mscale_all_dim = 0.0
    return attention


def install_megatron_rope(rotary, head_dim: int, rope_theta: float, scaling: dict | None) -> None:
    """Makes a megatron ``RotaryEmbedding`` produce ``rope_inv_freq``'s frequencies exactly.

    Call before the first forward (megatron caches the embedding per length).
    """
    inv_freq, _ = rope_inv_freq(head_dim, rope_theta, scaling)
    rotary.inv_freq = inv_freq.to(rotary.inv_freq.device)
    rotary.seq_len_interpolation_factor = None
    rotary.forward.cache_clear()


def megatron_rotary(head_dim: int, rope_theta: float, scaling: dict | None):
    """A standalone megatron ``RotaryEmbedding``, set up exactly as ``build_gpt_model`` does."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    rotary = RotaryEmbedding(
        kv_channels=head_dim,
        rotary_percent=1.0,
        rotary_base=rope_theta,
        use_cpu_initialization=True,
    )
    install_megatron_rope(rotary, head_dim, rope_theta, scaling)
    return rotary


def megatron_cos_sin(rotary, positions: torch.Tensor, mscale: float = 1.0):
    """cos, sin ``[t, d]`` (times ``mscale``) that megatron applies at ``positions``: the angles
    megatron's ``get_emb`` builds (``get_freqs_non_repeated``, halves concatenated), without its
    move of ``inv_freq`` to the GPU."""
    freqs = rotary.get_freqs_non_repeated(int(positions.max()) + 1)  # [s, d/2]
    emb = torch.cat([freqs, freqs], dim=-1)[positions.long()]
    return emb.cos() * mscale, emb.sin() * mscale
