"""Defect 7 (issue 20): the CUDA ordinal under node binding and task binding (one GPU per task).

What it proves: the index choose_device hands to ``torch.device("cuda", i)`` is valid for the GPUs
the process sees, for both bindings, and impossible setups fail with the fix in the message. What
it cannot prove: that a real driver enumerates GPUs as CUDA_VISIBLE_DEVICES says (untested on GPU).
"""

import pytest
import torch

from megatron_longctx.runtime import device as device_mod
from megatron_longctx.runtime.device import choose_device, cuda_index


@pytest.mark.parametrize(
    "env,count,expected",
    [
        ({"LOCAL_RANK": "3"}, 8, 3),  # node binding: every task sees the node's 8 GPUs
        ({"SLURM_LOCALID": "5"}, 8, 5),
        ({"LOCAL_RANK": "3", "CUDA_VISIBLE_DEVICES": "3"}, 1, 0),  # task binding, unset mode
        ({"LOCAL_RANK": "3", "LONGCTX_GPU_BINDING": "task"}, 1, 0),
        ({"LOCAL_RANK": "0", "LONGCTX_GPU_BINDING": "node"}, 1, 0),
        ({}, 4, 0),
    ],
)
def test_cuda_index(env, count, expected):
    assert cuda_index(env, count) == expected


@pytest.mark.parametrize(
    "env,count,needle",
    [
        ({"LOCAL_RANK": "3", "LONGCTX_GPU_BINDING": "node"}, 1, "gpus-per-task"),
        ({"LOCAL_RANK": "9"}, 8, "sees 8 GPU"),
        ({"LONGCTX_GPU_BINDING": "task"}, 8, "sees 8 GPUs"),
        ({"LONGCTX_GPU_BINDING": "socket"}, 8, "'node' or 'task'"),
        ({}, 0, "no CUDA device"),
    ],
)
def test_cuda_index_errors(env, count, needle):
    with pytest.raises((RuntimeError, ValueError), match=needle):
        cuda_index(env, count)


def test_choose_device_task_binding(monkeypatch):
    """One GPU visible and LOCAL_RANK 3 (srun --gpus-per-task=1 on a node's 4th task): cuda:0,
    where ``cuda:LOCAL_RANK`` would be an invalid ordinal."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.delenv("LONGCTX_GPU_BINDING", raising=False)
    monkeypatch.delenv("LONGCTX_DEVICE", raising=False)
    assert choose_device("auto") == torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert choose_device("cuda") == torch.device("cuda", 3)
    assert device_mod.backend_for(choose_device("cuda")) == "nccl"
