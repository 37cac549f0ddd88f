"""Device- and dtype-dependent choices follow the training configuration, not the machine.

Replaced to run on the CPU: ``torch.cuda.is_available`` (faked True, as on a GPU node) and the
Transformer Engine install (faked present); nothing is built on a GPU. What is proven: the choices
megatron's config and the spec get (CPU initialisation, batched p2p, backend, TE's fused RoPE) are
functions of the training device / RoPE settings alone, and ``place_parameters`` leaves no
parameter in another dtype or on another device.
"""

import pytest
import torch

from megatron_longctx.model import specs
from megatron_longctx.model.build import fused_rope, place_parameters, transformer_config
from megatron_longctx.model.config import get_preset
from megatron_longctx.parallel.layout import ParallelLayout

CUDA = torch.device("cuda", 0)


@pytest.fixture
def gpu_node(monkeypatch):
    """A machine that has CUDA and Transformer Engine (both faked)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(specs, "transformer_engine_available", lambda: True)


def test_cpu_training_on_a_gpu_node_builds_for_the_cpu(gpu_node):
    cfg, layout = get_preset("tiny"), ParallelLayout(1, 1, 1)
    on_cpu = transformer_config(cfg, layout, device=torch.device("cpu"))
    assert on_cpu.use_cpu_initialization and not on_cpu.batch_p2p_comm
    assert specs.resolve_backend("auto", torch.device("cpu")) == "local"
    assert specs.resolve_backend("auto", None) == "local"
    on_gpu = transformer_config(cfg, layout, device=CUDA)
    assert not on_gpu.use_cpu_initialization and on_gpu.batch_p2p_comm
    assert specs.resolve_backend("auto", CUDA) == "te"
    assert specs.resolve_backend("local", CUDA) == "local"  # an explicit choice is kept


def test_yarn_is_never_fused():
    base = get_preset("tiny")
    yarn = base.with_updates(
        rope_scaling={
            "rope_type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 256,
        }
    )
    assert fused_rope(base, "te") and not fused_rope(base, "te", allowed=False)
    assert not fused_rope(base, "local")
    assert not fused_rope(yarn, "te")  # its attention factor is ~1.139, which TE's kernel drops


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_place_parameters(dtype):
    """An fp32 norm (what megatron's local spec builds whatever params_dtype is) and a linear
    built in another dtype end in ``dtype`` on the target device (meta stands in for CUDA);
    buffers move but keep their dtype (RoPE's fp32 frequencies)."""
    module = torch.nn.Sequential(torch.nn.RMSNorm(8), torch.nn.Linear(8, 4, dtype=torch.float64))
    module.register_buffer("inv_freq", torch.ones(3, dtype=torch.float32))
    place_parameters(module, dtype, torch.device("meta"))
    assert {(p.dtype, p.device.type) for p in module.parameters()} == {(dtype, "meta")}
    assert module.inv_freq.dtype == torch.float32 and module.inv_freq.device.type == "meta"


def test_cpu_shim_on_a_gpu_node():
    """The shim applied on a machine that has CUDA (faked) makes the process a CPU process for
    megatron too: no GPU reported, buffers placed on the CPU (a fresh interpreter: the shim is
    process-wide)."""
    import subprocess
    import sys

    code = (
        "import torch\n"
        "torch.cuda.is_available = lambda: True\n"
        "from megatron_longctx.runtime import cpu_shim\n"
        "assert cpu_shim.apply()\n"
        "assert not torch.cuda.is_available() and torch.cuda.device_count() == 0\n"
        "assert torch.cuda.current_device() == torch.device('cpu')\n"
        "assert torch.zeros(1, device='cuda').device.type == 'cpu'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
