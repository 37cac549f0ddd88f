"""Launch the trainer as users do (torchrun, 2 CPU processes) and read what it wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def launch(
    config: str | Path,
    run_dir: Path,
    data: dict,
    *overrides: str,
    fault: str = "",
    nproc: int = 2,
    timeout: int = 240,
    env: dict | None = None,
) -> subprocess.CompletedProcess:
    extra = env or {}
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        LONGCTX_DEVICE="cpu",
        WANDB_MODE="offline",
        LONGCTX_RUN=str(run_dir),
        LONGCTX_DATA=str(Path(data["long"]).parent),
        LONGCTX_FAULT=fault,
        TORCHELASTIC_ERROR_FILE="",
        **extra,
    )
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "megatron_longctx.train",
        "--config",
        str(config),
        *overrides,
    ]
    # Output goes through files, not pipes: a killed rank's orphaned children (e.g. a wandb service)
    # must not keep the test waiting for EOF.
    run_dir.mkdir(parents=True, exist_ok=True)
    out_path, err_path = run_dir / "launch.out", run_dir / "launch.err"
    with open(out_path, "w") as out, open(err_path, "w") as err:
        proc = subprocess.run(cmd, env=env, cwd=ROOT, stdout=out, stderr=err, timeout=timeout)
    return subprocess.CompletedProcess(
        cmd, proc.returncode, out_path.read_text(), err_path.read_text()
    )


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def read_model_tensors(ckpt_dir: Path, optimizer: bool = False) -> dict[str, torch.Tensor]:
    """Every model tensor (keys not under ``optimizer.``, unless ``optimizer``) of a
    dist_checkpointing (torch_dist) checkpoint, read with PyTorch's own DCP reader in this process
    (no process group) — independent of the project's loader."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(ckpt_dir))
    meta = reader.read_metadata().state_dict_metadata
    out = {
        k: torch.empty(m.size, dtype=m.properties.dtype)
        for k, m in meta.items()
        if isinstance(m, TensorStorageMetadata)
        and (optimizer or not k.startswith("optimizer."))
        and "_extra_state" not in k
    }
    dcp.load(out, storage_reader=reader, no_dist=True)
    return out
