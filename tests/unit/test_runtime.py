"""Rank discovery from torchrun's and SLURM's environments; device choice; model presets."""

import pytest
import torch

from megatron_longctx.model.config import PRESETS, get_preset
from megatron_longctx.runtime.device import backend_for, choose_device
from megatron_longctx.runtime.distributed import dist_env, first_slurm_host


@pytest.mark.parametrize(
    "nodelist,first",
    [
        ("node7", "node7"),
        ("gpu[003-005,9]", "gpu003"),
        ("gpu[12,14],cpu1", "gpu12"),
        ("a-b[01-02],c", "a-b01"),
        ("n1,n2", "n1"),
    ],
)
def test_first_slurm_host(nodelist, first):
    assert first_slurm_host(nodelist) == first


def test_torchrun_env_wins():
    env = dict(
        RANK="3",
        WORLD_SIZE="8",
        LOCAL_RANK="1",
        MASTER_ADDR="h0",
        MASTER_PORT="1234",
        SLURM_PROCID="0",
        SLURM_NTASKS="2",
    )
    e = dist_env(env)
    assert (e.rank, e.world_size, e.local_rank, e.master_addr, e.master_port) == (
        3,
        8,
        1,
        "h0",
        1234,
    )


def test_slurm_env():
    env = dict(
        SLURM_PROCID="5", SLURM_NTASKS="16", SLURM_LOCALID="1", SLURM_JOB_NODELIST="gpu[010-011]"
    )
    e = dist_env(env)
    assert (e.rank, e.world_size, e.local_rank, e.master_addr) == (5, 16, 1, "gpu010")


def test_single_process_default():
    e = dist_env({})
    assert (e.rank, e.world_size) == (0, 1)


def test_device_choice_on_cpu_machine():
    assert choose_device("cpu").type == "cpu"
    assert backend_for(torch.device("cpu")) == "gloo"
    assert backend_for(torch.device("cuda", 0)) == "nccl"
    if not torch.cuda.is_available():
        assert choose_device("auto").type == "cpu"
        with pytest.raises(RuntimeError, match="set device=cpu"):
            choose_device("cuda")
    with pytest.raises(ValueError, match="device must be"):
        choose_device("tpu")


def test_llama3_8b_preset_parameter_count():
    # Llama-3-8B has 8.03B parameters (Meta's model card).
    assert PRESETS["llama3-8b"].num_parameters() == pytest.approx(8.03e9, rel=0.005)
    assert PRESETS["llama2-7b"].num_parameters() == pytest.approx(6.74e9, rel=0.005)


def test_vocab_padding_rule():
    cfg = get_preset("llama3-8b")
    assert cfg.padded_vocab_size(1) == 128256  # already a multiple of 128
    assert cfg.padded_vocab_size(8) == 129024  # multiple of 1024
    with pytest.raises(KeyError, match="unknown model preset"):
        get_preset("gpt5")


def test_fallback_kernel_warnings_are_one_line_once(tmp_path):
    """megatron's per-module "Transformer Engine and Apex are not installed" warnings (4-6 per
    process) become one line on rank 0, however often the process group is initialised."""
    import subprocess
    import sys

    from megatron_longctx.runtime.spawn import free_port

    code = (
        "from megatron_longctx.runtime.distributed import DistEnv, init_process_group\n"
        f"env = DistEnv(0, 1, 0, '127.0.0.1', {free_port()})\n"
        "init_process_group(env, device='cpu'); init_process_group(env, device='cpu')\n"
        "import megatron.core.optimizer, megatron.core.models.gpt, megatron.core.distributed\n"
        "import megatron_longctx.training.setup, megatron_longctx.model.build\n"
    )
    p = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert p.returncode == 0, p.stderr[-2000:]
    lines = [x for x in p.stderr.splitlines() if "not installed" in x]
    assert len(lines) == 1 and "torch fallbacks" in lines[0], p.stderr[-2000:]
