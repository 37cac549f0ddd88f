#!/bin/bash
# ProLong stage 1: continued pretraining at 64K tokens (recipe examples/prolong_64k.yaml), one task
# per GPU on H100 nodes. Submit from the repository root:
#
#   sbatch launch/prolong_64k.sh
#   LONGCTX_RUN=/scratch/$USER/prolong LONGCTX_DATA=/data/prolong sbatch -p gpu -A myproj \
#       --dependency=singleton launch/prolong_64k.sh
#
# Settings are environment variables (launch/README.md); `sbatch` options on the command line
# override the #SBATCH lines below. The trainer checkpoints LONGCTX_EXIT_MARGIN_S (15 min) before
# the time limit and the job requeues itself (the USR1 600 s before the limit is the backstop);
# re-submitting the same command also resumes. One live job per LONGCTX_RUN (a second is refused).
# Then run launch/prolong_512k.sh with the same LONGCTX_RUN to continue at 512K.
#SBATCH --job-name=prolong_64k
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@600
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append

export LONGCTX_CONFIG=${LONGCTX_CONFIG:-examples/prolong_64k.yaml}
source "${LONGCTX_HOME:-${SLURM_SUBMIT_DIR:-.}}/launch/common.sh"
longctx_launch
