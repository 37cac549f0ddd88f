# Shared body of the SLURM batch scripts (launch/prolong_*.sh source this; it is not run on its own).
#
# What it does, in order, inside one allocation (and again after every requeue, same job id):
#   1. settings from the environment, each with a default (table in launch/README.md);
#   2. rendezvous from SLURM: MASTER_ADDR = first host of SLURM_JOB_NODELIST, MASTER_PORT derived from
#      the job id; every task reads its rank from SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID;
#   3. a fail-fast config check (`--dry-run` in the batch shell, one process): a bad recipe or override
#      exits 2 here with the message in the job log, and is not requeued;
#   4. `srun` one task per GPU running the trainer, in the background, with SIGUSR1/SIGTERM trapped:
#      the pre-timeout signal (`#SBATCH --signal=B:USR1@300`) or a SIGTERM reaches this shell and is
#      forwarded as SIGUSR1 to the trainer processes only (pids the tasks record under
#      $LONGCTX_RUN/launch/<job id>/); the trainer then saves a checkpoint and exits 75;
#   5. exit code of the step: 0 -> done; 75 (EXIT_PREEMPTED) -> `scontrol requeue $SLURM_JOB_ID`; any
#      other code -> no requeue, the job fails with that code.
# Resume needs nothing here: the requeued job runs this same script, and the trainer continues from
# the newest complete checkpoint in the recipe's checkpoint.save_dir.

set -euo pipefail

readonly LONGCTX_EXIT_PREEMPTED=75  # megatron_longctx/training/callbacks.py

_log() { echo "[launch $(date '+%F %T')] $*"; }

# 1. settings ---------------------------------------------------------------------------------------
longctx_settings() {
    : "${LONGCTX_CONFIG:?the batch script sets a default recipe}"
    : "${SLURM_JOB_ID:?run this through sbatch (or salloc), not directly}"
    LONGCTX_HOME=${LONGCTX_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}  # the repository checkout
    cd "$LONGCTX_HOME"
    export LONGCTX_RUN=${LONGCTX_RUN:-$LONGCTX_HOME/runs/prolong}   # checkpoints, metrics, cache
    export LONGCTX_DATA=${LONGCTX_DATA:-$LONGCTX_HOME/data}         # indexed-dataset prefixes
    export LONGCTX_DEVICE=${LONGCTX_DEVICE:-cuda}                    # cuda | cpu (testing) | auto
    LONGCTX_PYTHON=${LONGCTX_PYTHON:-python}
    LONGCTX_OVERRIDES=${LONGCTX_OVERRIDES:-}      # extra dotted overrides, space separated
    LONGCTX_INIT_FROM=${LONGCTX_INIT_FROM:-}      # optional: stages.0.init_from (converted HF ckpt)
    LONGCTX_TASK_GRACE_S=${LONGCTX_TASK_GRACE_S:-120}  # after one task ends, how long the others get
    LONGCTX_REQUEUE=${LONGCTX_REQUEUE:-1}         # 0: exit 75 on preemption instead of requeueing
    LONGCTX_SRUN_ARGS=${LONGCTX_SRUN_ARGS:-}      # extra srun options (container, binding), split
    mkdir -p "$LONGCTX_RUN"

    # 2. rendezvous. torchrun variables left in the environment would win over SLURM's: drop them.
    unset RANK WORLD_SIZE LOCAL_RANK GROUP_RANK LOCAL_WORLD_SIZE
    MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
    # A port per job id: two jobs sharing a node (or a requeue while the old socket lingers) differ.
    MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
    export MASTER_ADDR MASTER_PORT

    # NCCL / CUDA defaults (ignored on CPU). Network selection (NCCL_SOCKET_IFNAME, NCCL_IB_HCA) is
    # site-specific and left to NCCL's autodetection unless set in the environment.
    export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}  # megatron TP/SP overlap order
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}  # fail, don't hang
    export TORCH_NCCL_AVOID_RECORD_STREAMS=${TORCH_NCCL_AVOID_RECORD_STREAMS:-1}
    export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
    export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}  # ~17 s per IB retry instead of ~4 ms x retries
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

    # Test hook: LONGCTX_FAULT (see training/callbacks.py FaultInjector) applies to the first run of
    # a job only; a requeued run (SLURM_RESTART_COUNT >= 1) must not inject the fault again.
    if [[ ${SLURM_RESTART_COUNT:-0} -gt 0 && -n ${LONGCTX_FAULT:-} ]]; then
        _log "restart ${SLURM_RESTART_COUNT}: dropping test hook LONGCTX_FAULT=${LONGCTX_FAULT}"
        unset LONGCTX_FAULT
    fi

    read -r -a LONGCTX_ARGS <<<"$LONGCTX_OVERRIDES"
    LONGCTX_ARGS=("training.device=$LONGCTX_DEVICE" "${LONGCTX_ARGS[@]}")
    if [[ -n $LONGCTX_INIT_FROM ]]; then
        LONGCTX_ARGS+=("stages.0.init_from=$LONGCTX_INIT_FROM")
    fi
}

# 4. signal forwarding ------------------------------------------------------------------------------
LONGCTX_SIGNALLED=""
LONGCTX_SRUN_PID=""
LONGCTX_PID_DIR=""

_forward_signal() {
    local sig=$1
    LONGCTX_SIGNALLED=$sig
    _log "received SIG$sig: asking the trainer (all tasks) to checkpoint and exit $LONGCTX_EXIT_PREEMPTED"
    # Only the trainer processes get SIGUSR1 (by the pids the tasks recorded), through a small step
    # on every node. `scancel --signal` / srun's forwarding signal every process of the step, and
    # (seen in tests) kill a helper the checkpoint writer is spawning at that moment: save crashes.
    srun --overlap --nodes="$SLURM_NNODES" --ntasks="$SLURM_NNODES" --ntasks-per-node=1 \
        bash -c 'for f in "$1"/"$(hostname)".*.pid; do kill -USR1 "$(cat "$f")"; done' signal \
        "$LONGCTX_PID_DIR" && return 0
    _log "could not signal the trainer processes; signalling the whole step instead"
    scancel --signal=USR1 "$SLURM_JOB_ID" || true
}

# The whole job: settings, config check, trainer, requeue decision.
longctx_launch() {
    longctx_settings
    local trainer=("$LONGCTX_PYTHON" -m megatron_longctx.train --config "$LONGCTX_CONFIG")
    _log "job $SLURM_JOB_ID ($SLURM_JOB_NAME) restart ${SLURM_RESTART_COUNT:-0}:" \
        "$SLURM_NNODES node(s) [$SLURM_JOB_NODELIST], $SLURM_NTASKS tasks," \
        "master $MASTER_ADDR:$MASTER_PORT, device $LONGCTX_DEVICE"
    _log "config $LONGCTX_CONFIG, run dir $LONGCTX_RUN, data $LONGCTX_DATA, overrides: ${LONGCTX_ARGS[*]}"

    # 3. fail fast: resolve and validate the config for this world size before any task starts.
    local rc=0
    "${trainer[@]}" --dry-run --world-size "$SLURM_NTASKS" "${LONGCTX_ARGS[@]}" || rc=$?
    if [[ $rc -ne 0 ]]; then
        _log "config check failed (exit $rc): fix the recipe or LONGCTX_OVERRIDES; not requeueing"
        exit "$rc"
    fi

    # `|| true`: under `set -e` a failing trap action would end this shell, and the job with it.
    trap '_forward_signal USR1 || true' USR1
    trap '_forward_signal TERM || true' TERM
    # Each task records its pid for _forward_signal (exec: the trainer keeps it) and sets
    # LOCAL_RANK, which picks this task's GPU (runtime/device.py), from SLURM_LOCALID.
    LONGCTX_PID_DIR=$LONGCTX_RUN/launch/$SLURM_JOB_ID
    rm -rf "$LONGCTX_PID_DIR" && mkdir -p "$LONGCTX_PID_DIR"
    # setsid (defensive): where a SLURM version delivers a batch-shell signal (--signal=B:...,
    # scancel --batch) to the shell's whole process group, srun must not get it: it would forward
    # it to every process of the step. (22.05 signals the shell only.)
    local srun_extra
    read -r -a srun_extra <<<"$LONGCTX_SRUN_ARGS"
    setsid srun --label --kill-on-bad-exit=0 --wait="$LONGCTX_TASK_GRACE_S" "${srun_extra[@]}" \
        bash -c 'echo $$ >"$0/$(hostname).$SLURM_PROCID.pid"; export LOCAL_RANK=$SLURM_LOCALID
                 exec "$@"' "$LONGCTX_PID_DIR" "${trainer[@]}" "${LONGCTX_ARGS[@]}" &
    LONGCTX_SRUN_PID=$!
    # `wait` returns early when a trapped signal arrives; keep waiting until srun itself has ended.
    while true; do
        rc=0
        wait "$LONGCTX_SRUN_PID" || rc=$?
        kill -0 "$LONGCTX_SRUN_PID" 2>/dev/null || break
    done
    trap - USR1 TERM

    # 5. what the exit code means
    case $rc in
        0)
            _log "trainer finished (exit 0)"
            exit 0 ;;
        "$LONGCTX_EXIT_PREEMPTED")
            _log "trainer checkpointed and exited $rc (preempted${LONGCTX_SIGNALLED:+ by SIG$LONGCTX_SIGNALLED})"
            if [[ $LONGCTX_REQUEUE == 1 ]]; then
                _log "requeueing job $SLURM_JOB_ID; it resumes from the newest complete checkpoint"
                scontrol requeue "$SLURM_JOB_ID" ||
                    _log "scontrol requeue failed (job cancelled?): resubmit the same command to resume"
            fi
            exit "$rc" ;;
        *)
            _log "trainer failed (exit $rc): not requeueing; see the task output above"
            exit "$rc" ;;
    esac
}
