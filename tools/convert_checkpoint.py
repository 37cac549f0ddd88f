#!/usr/bin/env python3
"""Convert between Hugging Face Llama checkpoints and the project's megatron-core checkpoints.

    # HF -> megatron, written at TP 2 x PP 2 (spawns 4 local CPU processes itself; under torchrun
    # with WORLD_SIZE = TP x PP x DP it runs in the launched processes instead)
    python tools/convert_checkpoint.py hf-to-mcore --hf-dir Llama-3-8B-Instruct --save ckpt/llama3 \
        --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2

    # megatron (hf-to-mcore output or a training checkpoint, any TP/PP) -> HF
    python tools/convert_checkpoint.py mcore-to-hf --load ckpt/run1 --save hf_out --dtype bf16

The megatron checkpoint is ``checkpoint.dist``'s format (``<save>/iter_0000000`` + COMPLETE.json);
tokenizer files of the HF dir are kept in ``<save>/hf_tokenizer`` and copied back on export. A
recipe names ``<save>`` itself as ``stages.0.init_from`` and ``model: {from_checkpoint: <save>}``.
TP / PP sizes that do not divide the model's heads, query groups or layers are refused before any
process starts.
The exported config.json carries the trained rope_theta / rope_scaling and max_position_embeddings.
mcore-to-hf then checks the export against the trained model (``--verify full``, the default:
transformers' RoPE from the exported config at sampled positions up to the trained length, and
logits on a short probe; ``--verify rope`` / ``none``); a mismatch says what differs and exits 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("hf-to-mcore", help="HF Llama dir -> megatron dist checkpoint")
    a.add_argument("--hf-dir", required=True, help="HF model dir (config.json + safetensors)")
    a.add_argument("--save", required=True, help="checkpoint root to write (iter_0000000 inside)")
    a.add_argument("--tensor-model-parallel-size", type=int, default=1)
    a.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    a.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    a.add_argument(
        "--params-dtype",
        choices=sorted(DTYPES),
        default="fp32",
        help="dtype of the stored parameters (fp32 keeps bf16/fp16 weights exactly)",
    )
    a.add_argument("--overwrite", action="store_true", help="replace checkpoints in --save")
    b = sub.add_parser("mcore-to-hf", help="megatron dist checkpoint -> HF Llama dir")
    b.add_argument("--load", required=True, help="checkpoint root (latest complete) or iter_* dir")
    b.add_argument("--save", required=True, help="HF output directory")
    b.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default=None,
        help="default: the dtype of the HF model it came from, else the stored dtype",
    )
    b.add_argument("--max-shard-size", default="5GB", help="e.g. 5GB, 200MB; shards + index above")
    b.add_argument(
        "--tokenizer-dir",
        default=None,
        help="copy tokenizer files from here (default: <load>/hf_tokenizer if present)",
    )
    b.add_argument("--overwrite", action="store_true", help="replace a model already in --save")
    b.add_argument(
        "--verify",
        choices=("full", "rope", "none"),
        default="full",
        help="export parity gate: full = transformers' RoPE from the exported config vs the "
        "trained model's at sampled positions up to the trained length, then logits on a short "
        "probe (megatron vs transformers; one fp32 model copy in each of two processes); "
        "rope = the RoPE check only; none = skip. A mismatch exits 2 and says what differs",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import torch

    from megatron_longctx.checkpoint.hf import ConversionError, hf_to_mcore, mcore_to_hf

    try:
        if args.command == "hf-to-mcore":
            if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
                from megatron_longctx.runtime.distributed import init_process_group

                init_process_group(device="cpu")  # under torchrun: run in these processes
            path = hf_to_mcore(
                args.hf_dir,
                args.save,
                args.tensor_model_parallel_size,
                args.pipeline_model_parallel_size,
                params_dtype=getattr(torch, DTYPES[args.params_dtype]),
                make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
                overwrite=args.overwrite,
            )
            print(json.dumps({"checkpoint": str(path)}))
        else:
            summary = mcore_to_hf(
                args.load,
                args.save,
                dtype=args.dtype,
                overwrite=args.overwrite,
                max_shard_size=args.max_shard_size,
                tokenizer_dir=args.tokenizer_dir,
                verify=args.verify,
            )
            print(json.dumps(summary))
    except ConversionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
