"""Readable logs: third-party warnings and log lines that tell a user nothing, filtered at source.

Every process the project starts imports ``megatron_longctx`` (trainer ranks, tools, spawned
workers, evaluation), and the package's ``__init__`` calls :func:`apply_filters`, so the filters
hold everywhere without each entry point remembering them. Each entry of :data:`WARNING_FILTERS` is
narrow: one category, one message pattern and the module the warning is attributed to (what
``warnings.filterwarnings(module=...)`` matches), so any other warning from the same library still
shows. :data:`QUIET_LOGGERS` raises single third-party loggers to WARNING (their INFO lines only).

Restore everything with ``LONGCTX_LOG_LEVEL=debug`` (inherited by child processes) or a tool's
``--verbose`` flag (which sets that variable for the processes it starts: :func:`setup_logging`).
The project's own lines are never filtered; megatron-core's Transformer Engine / Apex fallback
warnings are replaced by the one project line ``runtime.distributed`` logs on rank 0.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass

ENV = "LONGCTX_LOG_LEVEL"


@dataclass(frozen=True)
class WarningFilter:
    """One filtered ``warnings.warn``: category, message regex, attributed module regex, why."""

    category: type[Warning]
    message: str
    module: str
    why: str


WARNING_FILTERS: tuple[WarningFilter, ...] = (
    WarningFilter(
        UserWarning,
        r"(Transformer Engine and )?Apex (are|is) not installed",
        r"megatron\.core\.",
        "one per fused-kernel import; runtime.distributed says it once on rank 0",
    ),
    WarningFilter(
        FutureWarning,
        r"Please use DTensor instead and we are deprecating ShardedTensor",
        r"(torch\.distributed\._shard\.|megatron\.core\.|megatron_longctx\.runtime\.cpu_shim)",
        "megatron-core 0.16 dist_checkpointing builds ShardedTensors at every load; not ours to fix",
    ),
    WarningFilter(
        FutureWarning,
        r"`load_state_dict` is deprecated",
        r"(megatron\.core\.dist_checkpointing\.|torch\.distributed\.checkpoint\.)",
        "megatron-core 0.16's torch strategy calls torch DCP's old name at every load",
    ),
    WarningFilter(
        UserWarning,
        r"full scope is deprecated",
        r"megatron\.core\.transformer\.transformer_config",
        "megatron-core 0.16 warns on its own default cuda_graph_scope (no CUDA graphs on CPU)",
    ),
    WarningFilter(
        FutureWarning,
        r"`past_key_values` is deprecated",
        r"(torch\.nn\.modules\.module|transformers\.)",
        "transformers 5 renamed the KV-cache keyword; eval/model.py passes the new one, this "
        "keeps third-party callers (e.g. generate() of older code) quiet",
    ),
)

# logger name -> why its INFO lines are hidden (WARNING and above still show)
QUIET_LOGGERS: dict[str, str] = {
    "megatron.core.distributed.fsdp": (
        "'Using Megatron-FSDP without Transformer Engine' / 'Detected Megatron Core' at every "
        "export; the project does not use Megatron-FSDP"
    ),
}


def verbose_requested() -> bool:
    """True when ``LONGCTX_LOG_LEVEL`` asks for everything (``debug``)."""
    return os.environ.get(ENV, "").strip().lower() == "debug"


def apply_filters(verbose: bool | None = None) -> None:
    """Installs :data:`WARNING_FILTERS` and :data:`QUIET_LOGGERS` (or, verbose, removes them).

    Args:
        verbose: restore every third-party warning and log line; ``None``: from ``LONGCTX_LOG_LEVEL``.
    """
    verbose = verbose_requested() if verbose is None else verbose
    for f in WARNING_FILTERS:
        entry = ("ignore", f.message, f.category, f.module)
        _remove_filter(f)
        if not verbose:
            warnings.filterwarnings(*entry)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET if verbose else logging.WARNING)
    if not verbose:
        # transformers' "Loading weights" bar at every from_pretrained (read at its import)
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    elif os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") == "1":
        os.environ.pop("HF_HUB_DISABLE_PROGRESS_BARS")


def _remove_filter(f: WarningFilter) -> None:
    """Drops this filter's entries from ``warnings.filters`` (idempotent re-application)."""
    keep = []
    for entry in warnings.filters:
        action, msg, cat, mod, _ = entry
        same = (
            action == "ignore"
            and cat is f.category
            and getattr(msg, "pattern", None) == f.message
            and getattr(mod, "pattern", None) == f.module
        )
        if not same:
            keep.append(entry)
    warnings.filters[:] = keep
    if hasattr(warnings, "_filters_mutated"):  # invalidates the per-module "already warned" cache
        warnings._filters_mutated()


def setup_logging(verbose: bool = False, fmt: str = "%(levelname)s %(message)s") -> None:
    """An entry point's logging: INFO for the project, filters applied; ``verbose`` shows all.

    ``verbose`` also sets ``LONGCTX_LOG_LEVEL=debug`` so processes this one starts show all too.
    """
    if verbose:
        os.environ[ENV] = "debug"
    logging.basicConfig(level=logging.INFO, format=fmt)
    apply_filters()
