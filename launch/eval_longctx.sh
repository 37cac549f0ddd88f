#!/bin/bash
# Long-context evaluation of one training checkpoint as its own job (tools/eval_longctx.py --load:
# HF export, needle / RULER / loss by position). The training scripts submit it with
# --dependency=afterok:<training job> when LONGCTX_EVAL_JOB=1, so a slow or failing evaluation
# cannot fail the training job or hold up the 64K -> 512K afterok chain. By hand, from the
# repository root:
#
#   LONGCTX_EVAL_CHECKPOINT=runs/prolong/checkpoints/iter_0007500 \
#   LONGCTX_EVAL_ARGS="--tokenizer-type HuggingFaceTokenizer --context-lengths 65536 131072" \
#       sbatch -p gpu launch/eval_longctx.sh
#
# LONGCTX_EVAL_CHECKPOINT: a checkpoint (iter_*) or a checkpoint root (its newest complete one);
# default $LONGCTX_RUN/checkpoints. Results: LONGCTX_EVAL_OUTPUT (default
# $LONGCTX_RUN/eval/<iter dir>). LONGCTX_EVAL_ARGS: tools/eval_longctx.py flags; LONGCTX_PYTHON and
# the container settings as for training (launch/README.md).
#SBATCH --job-name=longctx_eval
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gpus-per-node=1
#SBATCH --time=4:00:00
#SBATCH --no-requeue
#SBATCH --output=%x-%j.out

source "${LONGCTX_HOME:-${SLURM_SUBMIT_DIR:-.}}/launch/common.sh"
longctx_eval
