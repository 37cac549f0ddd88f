"""The third-party warning / log-line filters of megatron_longctx/logs.py: applied in a fresh
process by ``import megatron_longctx``, narrow (a same-module warning with another message still
shows), and all restored by ``LONGCTX_LOG_LEVEL=debug``. The lines are the real ones: megatron's
Megatron-FSDP INFO at import and transformers' ``past_key_values`` FutureWarning from a real
forward; the megatron/torch deprecation texts are checked against the installed sources."""

import importlib.util
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from megatron_longctx import logs

ROOT = Path(__file__).resolve().parents[2]

# (category, real message, module the warning is attributed to) as the libraries emit them
EMITTED = [
    (UserWarning, "Transformer Engine and Apex are not installed. Falling back to Torch optimizers.",
     "megatron.core.optimizer.optimizer"),
    (FutureWarning, "Please use DTensor instead and we are deprecating ShardedTensor.",
     "megatron_longctx.runtime.cpu_shim"),
    (FutureWarning, "`load_state_dict` is deprecated and will be removed in future versions. "
     "Please use `load` instead.", "megatron.core.dist_checkpointing.strategies.torch"),
    (UserWarning, "full scope is deprecated. Use empty cuda_graph_scope to capture the whole layer.",
     "megatron.core.transformer.transformer_config"),
]

FSDP_LOGGER = "megatron.core.distributed.fsdp.src.megatron_fsdp.mixed_precision"
FSDP_INFO = "Using Megatron-FSDP without Transformer Engine."
PKV = (
    "`past_key_values` is deprecated and will be removed in version 5.40.0 for "
    "`LlamaForCausalLM.forward`. Use `cache` instead."
)
EMITTED.append((FutureWarning, PKV, "torch.nn.modules.module"))

CHILD = f"""
import logging, sys, warnings
import megatron_longctx  # applies the filters (or not, with LONGCTX_LOG_LEVEL=debug)
from megatron_longctx.logs import setup_logging

def emit(tag):
    print("== " + tag, file=sys.stderr, flush=True)
    logging.getLogger({FSDP_LOGGER!r}).info({FSDP_INFO!r})
    for n, (cat, msg, mod) in enumerate({[(c.__name__, m, mod) for c, m, mod in EMITTED]!r}):
        cat = getattr(__builtins__, cat)
        warnings.warn_explicit(msg, cat, mod + ".py", 1, module=mod)
        warnings.warn_explicit("CONTROL other message", cat, mod + ".py", 2 + n, module=mod)
    logging.getLogger("megatron_longctx.train").info("PROJECT line")

setup_logging(fmt="LOG %(name)s: %(message)s")
emit("default")
setup_logging(verbose=True)  # what a tool's --verbose does
emit("verbose")
"""


def _run(env_extra: dict) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (logs.ENV, "PYTHONWARNINGS")}
    env.update(env_extra, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, default, verbose = proc.stderr.split("== ")
    return {"default": default, "verbose": verbose}


NOISY = [FSDP_INFO] + [msg for _, msg, _ in EMITTED]


@pytest.mark.timeout(300)
def test_filters_applied_in_a_fresh_process_and_restored_by_verbose_or_env():
    out, env_debug = _run({}), _run({logs.ENV: "debug"})
    for line in NOISY:
        assert line not in out["default"], (line, out["default"])
        assert line in out["verbose"], (line, out["verbose"])
        assert line in env_debug["default"], (line, env_debug["default"])
    for text in (out["default"], out["verbose"], env_debug["default"]):
        assert "PROJECT line" in text  # the project's own lines always stay
    # narrow: another message from the same module and category still shows
    assert out["default"].count("CONTROL other message") == len(EMITTED), out["default"]


def _source(package: str, relpath: str) -> str:
    """A file of an installed package, located without importing the package."""
    root = Path(importlib.util.find_spec(package).submodule_search_locations[0])
    return (root / relpath).read_text()


def test_patterns_match_the_installed_sources():
    """Each filtered message is the text the installed library really emits."""
    sources = {
        "deprecating ShardedTensor": ("torch", "distributed/_shard/_utils.py"),
        "`load_state_dict` is deprecated": ("torch", "distributed/checkpoint/state_dict_loader.py"),
        "full scope is deprecated": ("megatron", "core/transformer/transformer_config.py"),
        "Apex (are|is) not installed": ("megatron", "core/optimizer/optimizer.py"),
        "`past_key_values` is deprecated": ("transformers", "utils/deprecation.py"),
    }
    for f in logs.WARNING_FILTERS:
        key = next(k for k in sources if k in f.message)
        text = _source(*sources[key])
        if key.startswith("`past"):  # formatted there as "`{name}` is deprecated and will be ..."
            assert "`{name}` is deprecated and will be removed in version" in text
        else:
            assert re.search(f.message, text, re.I), (f.message, sources[key])
    fsdp = _source("megatron", "core/distributed/fsdp/src/megatron_fsdp/mixed_precision.py")
    assert f'logger.info("{FSDP_INFO}")' in fsdp
    for name in logs.QUIET_LOGGERS:
        assert FSDP_LOGGER.startswith(name)


def test_apply_filters_is_idempotent_and_verbose_removes_them():
    saved = list(warnings.filters)
    try:
        logs.apply_filters(verbose=False)
        logs.apply_filters(verbose=False)
        ours = [e for e in warnings.filters if getattr(e[1], "pattern", None) in
                {f.message for f in logs.WARNING_FILTERS}]
        assert len(ours) == len(logs.WARNING_FILTERS)
        logs.apply_filters(verbose=True)
        assert not [e for e in warnings.filters if getattr(e[1], "pattern", None) in
                    {f.message for f in logs.WARNING_FILTERS}]
    finally:
        warnings.filters[:] = saved
        logs.apply_filters()
