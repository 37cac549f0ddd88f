#!/bin/bash
# ProLong stage 2: 512K tokens, continuing from the 64K stage (recipe examples/prolong_512k.yaml,
# whose stages are the 64K stage followed by the 512K stage). Submit from the repository root:
#
#   sbatch launch/prolong_512k.sh                       # after prolong_64k.sh, same LONGCTX_RUN
#   sbatch --dependency=afterok:<64k job id> launch/prolong_512k.sh
#   LONGCTX_EVAL_JOB=1 LONGCTX_EVAL_ARGS="--tokenizer-type ... --context-lengths 65536 524288" \
#       LONGCTX_EVAL_SBATCH_ARGS="-p gpu --time=8:00:00" sbatch launch/prolong_512k.sh
#
# Continuation: the 512K recipe repeats the 64K stage (same name, same checkpoint dir), so the
# trainer finds the 64K run's final checkpoint in LONGCTX_RUN, skips the finished stage, carries the
# weights and Adam moments over, restarts the LR schedule and switches RoPE and data. Run alone, this
# script trains both stages. LONGCTX_EVAL_JOB=1: the final checkpoint is evaluated by a separate job
# (launch/eval_longctx.sh) submitted when training ends OK. Settings: launch/README.md.
#SBATCH --job-name=prolong_512k
#SBATCH --nodes=16
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@600
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append

export LONGCTX_CONFIG=${LONGCTX_CONFIG:-examples/prolong_512k.yaml}
source "${LONGCTX_HOME:-${SLURM_SUBMIT_DIR:-.}}/launch/common.sh"
longctx_launch
