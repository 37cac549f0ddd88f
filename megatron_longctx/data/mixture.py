"""Mixture spec: which indexed datasets feed a training stage, with what token share and length bucket.

A stage's mixture is a list of components. Each component names one or more megatron indexed-dataset
prefixes (``{prefix}.bin`` / ``{prefix}.idx``), the fraction of the stage's training tokens it must
supply, and the document-length bucket ``[min_tokens, max_tokens)`` its documents are drawn from.
ProLong's stage 2 uses two components over the same books files with different buckets.

Recipes live in ``examples/mixtures/*.yaml`` and are read with :func:`load_mixture_yaml`. Prefixes may
contain ``${ENV_VAR}`` placeholders; they are expanded and checked when the index is built, so a recipe
can be validated (weights, buckets) before the data exists.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_longctx.config.loading import check_keys

#: How far the weights may sum from 1 before it is an error (they are fractions written by hand).
WEIGHT_SUM_TOLERANCE = 1e-6


class MixtureError(ValueError):
    """A mixture spec or its data cannot be used; the message names the problem and the fix."""


@dataclass
class MixtureComponent:
    """One source of training tokens.

    Attributes:
        name: Unique name, used in reports and errors (e.g. ``"books_64k"``).
        prefixes: Indexed-dataset path prefixes (without ``.bin``/``.idx``); may hold ``${VAR}``.
        weight: Fraction of the stage's training tokens drawn from this component, in (0, 1].
        min_tokens: Smallest document length (tokens) kept, inclusive. Shorter documents are dropped
            (and counted); a long bucket with ``min_tokens = S`` is ProLong's "drop long documents
            shorter than the pack length".
        max_tokens: Largest document length kept, exclusive; ``None`` means no upper limit.
        mask_prefixes: Optional loss-mask datasets parallel to ``prefixes`` (SFT: written by
            ``tools/preprocess_sft.py`` as ``{prefix}_mask_document``), one per prefix with the
            same document sizes; the loss of a label token is kept only where its stored mask is 1.
    """

    name: str
    prefixes: list[str]
    weight: float
    min_tokens: int = 1
    max_tokens: int | None = None
    mask_prefixes: list[str] | None = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise MixtureError(f"component name must be a non-empty string, got {self.name!r}")
        if isinstance(self.prefixes, str):
            self.prefixes = [self.prefixes]
        if not self.prefixes or not all(isinstance(p, str) and p for p in self.prefixes):
            raise MixtureError(
                f"component {self.name!r}: prefixes must be a non-empty list of path prefixes "
                f"(without .bin/.idx), got {self.prefixes!r}"
            )
        self.prefixes = list(self.prefixes)
        if (
            isinstance(self.weight, bool)
            or not isinstance(self.weight, (int, float))
            or not math.isfinite(self.weight)
            or self.weight <= 0
        ):
            raise MixtureError(
                f"component {self.name!r}: weight must be a positive fraction of training tokens, "
                f"got {self.weight!r}; remove the component instead of giving it weight 0"
            )
        self.weight = float(self.weight)
        if not isinstance(self.min_tokens, int) or self.min_tokens < 1:
            raise MixtureError(
                f"component {self.name!r}: min_tokens must be an integer >= 1, "
                f"got {self.min_tokens!r}"
            )
        if self.max_tokens is not None and (
            not isinstance(self.max_tokens, int) or self.max_tokens <= self.min_tokens
        ):
            raise MixtureError(
                f"component {self.name!r}: bucket [min_tokens, max_tokens) = "
                f"[{self.min_tokens}, {self.max_tokens}) is empty; max_tokens must be an integer "
                f"> min_tokens, or null for no upper limit"
            )
        if self.mask_prefixes is not None:
            if isinstance(self.mask_prefixes, str):
                self.mask_prefixes = [self.mask_prefixes]
            if len(self.mask_prefixes) != len(self.prefixes) or not all(
                isinstance(p, str) and p for p in self.mask_prefixes
            ):
                raise MixtureError(
                    f"component {self.name!r}: mask_prefixes must list one loss-mask prefix per "
                    f"entry of prefixes ({len(self.prefixes)}), in the same order, got "
                    f"{self.mask_prefixes!r}"
                )
            self.mask_prefixes = list(self.mask_prefixes)

    def bucket_label(self) -> str:
        """Human-readable bucket, e.g. ``[65536, inf)``."""
        top = "inf" if self.max_tokens is None else str(self.max_tokens)
        return f"[{self.min_tokens}, {top})"


@dataclass
class MixtureSpec:
    """A stage's data mixture.

    Attributes:
        components: The sources; their weights must be positive and sum to 1 (no renormalisation).
        seed: Seed of the per-epoch document shuffles; the same seed gives the same sample order.

    There is no ``reset_position_ids``: megatron's packed (THD) RoPE takes each token's rotary
    position from ``cu_seqlens`` (restarting at every document), never from ``position_ids``, so
    such a knob could not change training (see ``packing.py``).
    """

    components: list[MixtureComponent]
    seed: int = 1234

    def __post_init__(self):
        self.components = [
            c if isinstance(c, MixtureComponent) else _component_from_dict(c, i)
            for i, c in enumerate(self.components or [])
        ]
        if not self.components:
            raise MixtureError("mixture has no components; add at least one under 'components:'")
        names = [c.name for c in self.components]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise MixtureError(f"component names must be unique; repeated: {dup}")
        total = math.fsum(c.weight for c in self.components)
        if abs(total - 1.0) > WEIGHT_SUM_TOLERANCE:
            listing = " + ".join(f"{c.name} {c.weight:g}" for c in self.components)
            raise MixtureError(
                f"mixture weights must sum to 1 (they are fractions of training tokens): {listing} "
                f"= {total:.6g}; fix the weights (they are not renormalised silently)"
            )
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise MixtureError(f"mixture seed must be a non-negative integer, got {self.seed!r}")

    @property
    def weights(self) -> list[float]:
        """Component weights in order."""
        return [c.weight for c in self.components]


def _component_from_dict(raw: Any, i: int) -> MixtureComponent:
    if not isinstance(raw, dict):
        raise MixtureError(
            f"each component must be a mapping with name/prefixes/weight, got {raw!r}"
        )
    check_keys(
        raw,
        {"name", "prefixes", "weight", "min_tokens", "max_tokens", "mask_prefixes"},
        f"mixture.components.{i}",
        noun="keys",
        error=MixtureError,
        where=f"component {raw.get('name')!r}",
        required=("name", "prefixes", "weight"),
    )
    return MixtureComponent(**raw)


def mixture_from_dict(raw: dict[str, Any]) -> MixtureSpec:
    """Builds a :class:`MixtureSpec` from a mapping (a YAML ``mixture:`` block or the whole file)."""
    if isinstance(raw, dict) and "mixture" in raw and isinstance(raw["mixture"], dict):
        raw = raw["mixture"]
    if not isinstance(raw, dict):
        raise MixtureError(
            f"a mixture must be a mapping with 'components:', got {type(raw).__name__}"
        )
    if "reset_position_ids" in raw:
        raise MixtureError(
            "mixture key 'reset_position_ids' was removed: it had no effect. megatron's packed "
            "(THD) RoPE restarts positions at every document from cu_seqlens, and attention is "
            "document-masked, so every document already sees positions 0..n-1; delete the key"
        )
    check_keys(raw, {"components", "seed"}, "mixture", noun="keys", error=MixtureError)
    return MixtureSpec(**raw)


def load_mixture_yaml(path: str | Path) -> MixtureSpec:
    """Reads a mixture recipe (see ``examples/mixtures/``).

    Args:
        path: YAML file holding either a top-level ``mixture:`` block or its contents
            (``components:`` and an optional ``seed:``).

    Returns:
        The validated spec. Prefix placeholders are checked later, when the index is built.

    Raises:
        MixtureError: the file is missing, not YAML, or describes an invalid mixture.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise MixtureError(
            f"mixture file {path} does not exist; see examples/mixtures/ for recipes"
        )
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise MixtureError(f"mixture file {path} is not valid YAML: {exc}") from exc
    try:
        return mixture_from_dict(raw)
    except MixtureError as exc:
        raise MixtureError(f"{path}: {exc}") from exc


__all__ = [
    "MixtureComponent",
    "MixtureError",
    "MixtureSpec",
    "load_mixture_yaml",
    "mixture_from_dict",
]
