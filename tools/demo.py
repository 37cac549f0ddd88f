"""The main job, tiny, on CPU: `make demo` (or `python tools/demo.py`).

Today: builds the tiny Llama on megatron-core, trains a few steps with TP=2 on 2 gloo processes
(torchrun) on synthetic tokens and prints the losses. Each stage of the pipeline is added here as it
lands (sample corpus -> tokenizer -> preprocess -> mixture -> curriculum -> HF export -> evaluation).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    env = dict(os.environ, OMP_NUM_THREADS="1", LONGCTX_DEVICE="cpu")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(ROOT / "tools" / "train_synthetic.py"), "--tensor-model-parallel-size", "2",
           "--steps", "8"]
    print("+", " ".join(cmd), flush=True)
    return subprocess.call(cmd, env=env, cwd=ROOT)


if __name__ == "__main__":
    sys.exit(main())
