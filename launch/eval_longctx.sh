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
_base_settings  # checkout, run directory, interpreter, container (launch/common.sh)
load=${LONGCTX_EVAL_CHECKPOINT:-$LONGCTX_RUN/checkpoints}
out=${LONGCTX_EVAL_OUTPUT:-$LONGCTX_RUN/eval/${load##*/}}
read -r -a args <<<"${LONGCTX_EVAL_ARGS:-}"
_log "job $SLURM_JOB_ID: evaluating $load -> $out (tools/eval_longctx.py ${args[*]})"
srun --nodes=1 --ntasks=1 "${LONGCTX_CONTAINER[@]}" \
    "$LONGCTX_PYTHON" tools/eval_longctx.py --load "$load" --output-dir "$out" "${args[@]}"
