# Shared body of the SLURM batch scripts (launch/prolong_*.sh and launch/eval_longctx.sh source this;
# it is not run on its own).
#
# What longctx_launch does, in order, inside one allocation (and again after every requeue, same id):
#   1. settings from the environment, each with a default (table in launch/README.md); rendezvous:
#      MASTER_ADDR = first host of SLURM_JOB_NODELIST (never one inherited from the submitting
#      shell), MASTER_PORT below the ephemeral port range, different on every restart; CPUs per
#      task passed to srun explicitly (srun of SLURM 22.05-23.02 ignores sbatch's -c);
#   2. the run directory is locked with the job id: a second live job on the same LONGCTX_RUN is
#      refused (it would resume from, or delete, this job's checkpoints);
#   3. a fail-fast config check (`--dry-run`, one process; in the container when one is set): a bad
#      recipe or override exits 2 here with the message in the job log, and is not requeued;
#   4. `srun` one task per GPU running the trainer, in the background. The trainer saves and exits
#      75 on its own LONGCTX_EXIT_MARGIN_S before the job's end time (read from SLURM, passed as
#      LONGCTX_JOB_END_TIME); SIGUSR1 (`#SBATCH --signal=B:USR1@600`, the backstop) or SIGTERM to
#      this shell is forwarded as SIGUSR1 to the trainer processes only (pids the tasks record under
#      $LONGCTX_RUN/launch/<job id>/), by a bounded helper step;
#   5. exit code of the step: 0 -> done (and, with LONGCTX_EVAL_JOB=1, the evaluation is submitted
#      as a dependent job); 75 -> `scontrol requeue $SLURM_JOB_ID`, unless this shell got SIGTERM
#      (scancel, the time limit, SLURM's own preemption) or the job has been restarted
#      LONGCTX_MAX_RESTARTS times; any other code -> no requeue, the job fails with that code.
# Resume needs nothing here: the requeued job runs this same script, and the trainer continues from
# the newest complete checkpoint in the recipe's checkpoint.save_dir.

set -euo pipefail

readonly LONGCTX_EXIT_PREEMPTED=75  # megatron_longctx/training/signals.py
readonly LONGCTX_EXIT_HUNG=76       # training/watchdog.py: a rank hung or a peer is gone; no save
readonly LONGCTX_EXIT_CONFIG=2
readonly LONGCTX_EXIT_BUSY=4        # the run directory belongs to another live job

_log() { echo "[launch $(date '+%F %T')] $*"; }

# 1. settings ---------------------------------------------------------------------------------------
# What every job of this directory needs (training and evaluation).
_base_settings() {
    : "${SLURM_JOB_ID:?run this through sbatch (or salloc), not directly}"
    LONGCTX_HOME=${LONGCTX_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}  # the repository checkout
    cd "$LONGCTX_HOME"
    export LONGCTX_RUN=${LONGCTX_RUN:-$LONGCTX_HOME/runs/prolong}   # checkpoints, metrics, cache
    export LONGCTX_DATA=${LONGCTX_DATA:-$LONGCTX_HOME/data}         # indexed-dataset prefixes
    export LONGCTX_DEVICE=${LONGCTX_DEVICE:-cuda}                    # cuda | cpu (testing) | auto
    LONGCTX_PYTHON=${LONGCTX_PYTHON:-python}
    # Container (pyxis/enroot): every step of the job runs in it, in the checkout.
    LONGCTX_CONTAINER=()
    if [[ -n ${LONGCTX_CONTAINER_IMAGE:-} ]]; then
        LONGCTX_CONTAINER=(--container-image="$LONGCTX_CONTAINER_IMAGE"
                           --container-workdir="$LONGCTX_HOME")
        if [[ -n ${LONGCTX_CONTAINER_MOUNTS:-} ]]; then
            LONGCTX_CONTAINER+=(--container-mounts="$LONGCTX_CONTAINER_MOUNTS")
        fi
        local extra
        read -r -a extra <<<"${LONGCTX_CONTAINER_ARGS:-}"
        LONGCTX_CONTAINER+=("${extra[@]}")
    fi
    mkdir -p "$LONGCTX_RUN"
}

longctx_settings() {
    : "${LONGCTX_CONFIG:?the batch script sets a default recipe}"
    _base_settings
    LONGCTX_OVERRIDES=${LONGCTX_OVERRIDES:-}      # extra dotted overrides, space separated
    LONGCTX_INIT_FROM=${LONGCTX_INIT_FROM:-}      # optional: stages.0.init_from (converted HF ckpt)
    LONGCTX_TASK_GRACE_S=${LONGCTX_TASK_GRACE_S:-120}  # after one task ends, how long the others get
    LONGCTX_REQUEUE=${LONGCTX_REQUEUE:-1}         # 0: exit 75 on preemption instead of requeueing
    LONGCTX_MAX_RESTARTS=${LONGCTX_MAX_RESTARTS:-20}   # requeue while SLURM_RESTART_COUNT < this
    export LONGCTX_EXIT_MARGIN_S=${LONGCTX_EXIT_MARGIN_S:-900}  # trainer's exit before the end time
    LONGCTX_SIGNAL_TIMEOUT_S=${LONGCTX_SIGNAL_TIMEOUT_S:-60}   # bound on the signalling step
    LONGCTX_GPU_BINDING=${LONGCTX_GPU_BINDING:-node}   # node: tasks see all GPUs; task: one each
    LONGCTX_SRUN_ARGS=${LONGCTX_SRUN_ARGS:-}      # extra srun options for the trainer, split
    LONGCTX_EVAL_JOB=${LONGCTX_EVAL_JOB:-0}       # 1: evaluation as a dependent job (not in training)
    if [[ $LONGCTX_GPU_BINDING != node && $LONGCTX_GPU_BINDING != task ]]; then
        _log "LONGCTX_GPU_BINDING must be node or task, got '$LONGCTX_GPU_BINDING'"
        exit "$LONGCTX_EXIT_CONFIG"
    fi

    # Rendezvous. torchrun variables left in the environment would win over SLURM's: drop them. An
    # inherited MASTER_ADDR / MASTER_PORT (an salloc shell, a previous job) is replaced as well.
    unset RANK WORLD_SIZE LOCAL_RANK GROUP_RANK LOCAL_WORLD_SIZE
    local first_host
    # (no `| head`: under pipefail, scontrol killed by SIGPIPE would end the job)
    first_host=$(scontrol show hostnames "$SLURM_JOB_NODELIST")
    first_host=${first_host%%$'\n'*}
    if [[ -n ${MASTER_ADDR:-} && -z ${LONGCTX_MASTER_ADDR:-} && $MASTER_ADDR != "$first_host" ]]; then
        _log "ignoring MASTER_ADDR=$MASTER_ADDR from the environment: the job's first node is $first_host"
    fi
    MASTER_ADDR=${LONGCTX_MASTER_ADDR:-$first_host}
    MASTER_PORT=${LONGCTX_MASTER_PORT:-$(_rendezvous_port)}
    export MASTER_ADDR MASTER_PORT

    # CPUs per task: sbatch's -c, else the node's CPUs shared by its tasks (--exclusive: all).
    local per_node=${SLURM_NTASKS_PER_NODE:-$((SLURM_NTASKS / SLURM_NNODES))}
    per_node=${per_node%%(*}
    local shared=$((${SLURM_CPUS_ON_NODE:-$per_node} / per_node))
    LONGCTX_CPUS_PER_TASK=${LONGCTX_CPUS_PER_TASK:-${SLURM_CPUS_PER_TASK:-$shared}}
    ((LONGCTX_CPUS_PER_TASK >= 1)) || LONGCTX_CPUS_PER_TASK=1
    export SRUN_CPUS_PER_TASK=$LONGCTX_CPUS_PER_TASK  # for any other srun in this allocation
    # Helper steps (config check, signalling): one CPU, no memory taken from the trainer, and no GPUs
    # where the job has any (`--gres=none` is refused where SLURM has no GRES configured).
    LONGCTX_HELPER_STEP=(--cpus-per-task=1 --mem=0)
    if [[ -n ${SLURM_JOB_GPUS:-} || ${SLURM_GPUS_ON_NODE:-0} != 0 ]]; then
        LONGCTX_HELPER_STEP+=(--gres=none)
    fi

    # NCCL / CUDA defaults (ignored on CPU). Interfaces: LONGCTX_IFNAME sets both NCCL's and gloo's
    # (megatron creates gloo groups too) unless they are set; IB settings are left to the site.
    if [[ -n ${LONGCTX_IFNAME:-} ]]; then
        export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-$LONGCTX_IFNAME}
        export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-$LONGCTX_IFNAME}
    fi
    export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}  # megatron TP/SP overlap order
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}  # fail, don't hang
    export TORCH_NCCL_AVOID_RECORD_STREAMS=${TORCH_NCCL_AVOID_RECORD_STREAMS:-1}
    export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
    export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}  # ~17 s per IB retry instead of ~4 ms x retries
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

    # The trainer's wall-clock exit needs the job's end time (after a requeue: this run's).
    LONGCTX_JOB_END_TIME=$(_job_end_time)
    export LONGCTX_JOB_END_TIME

    # Test hook: LONGCTX_FAULT (see training/signals.py FaultInjector) applies to the first run of
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

# A port below the kernel's ephemeral range (where connect() takes its source ports, 32768-60999 by
# default; this shell runs on the first node, the rendezvous host) and different on each restart of
# the same job id, so a socket of the previous run in TIME_WAIT cannot be in the way.
_rendezvous_port() {
    local low=32768 high=60999
    read -r low high </proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || true
    local key=$((SLURM_JOB_ID * 32 + ${SLURM_RESTART_COUNT:-0} % 32))
    if ((low > 12000)); then
        echo $((10000 + key % (low - 10000)))
    else
        echo $((high + 1 + key % (65535 - high)))
    fi
}

# The job's end time in seconds since the epoch; empty without a time limit.
_job_end_time() {
    if [[ -n ${SLURM_JOB_END_TIME:-} ]]; then  # newer SLURM sets it
        echo "$SLURM_JOB_END_TIME"
        return
    fi
    local end
    end=$(squeue -h -j "$SLURM_JOB_ID" -o %e 2>/dev/null) || true
    end=${end%%$'\n'*}
    if [[ $end =~ ^[0-9]{4}-[0-9]{2}-[0-9]{2}T ]]; then
        date -d "$end" +%s 2>/dev/null || true
    fi
}

# 2. one live job per run directory -----------------------------------------------------------------
# SLURM's state of job $1: empty when it is unknown (long gone), UNKNOWN when squeue cannot tell.
_job_state() {
    local out
    if out=$(squeue -h -j "$1" -o %T 2>&1); then
        echo "${out%%$'\n'*}"
    elif [[ $out == *"Invalid job id"* ]]; then
        echo ""
    else
        echo UNKNOWN
    fi
}

_job_is_live() {
    case $1 in
        "" | COMPLETED | FAILED | CANCELLED | TIMEOUT | NODE_FAIL | OUT_OF_MEMORY | BOOT_FAIL | \
            DEADLINE | PREEMPTED) return 1 ;;
        *) return 0 ;;
    esac
}

LONGCTX_LOCK=""

_lock_run_dir() {
    local lock=$LONGCTX_RUN/launch/lock holder state
    mkdir -p "$LONGCTX_RUN/launch"
    for _ in 1 2 3; do
        # noclobber: an O_EXCL create, atomic on local and network file systems
        if (set -o noclobber; echo "$SLURM_JOB_ID $(hostname) $(date +%s)" >"$lock") 2>/dev/null; then
            LONGCTX_LOCK=$lock
            return 0
        fi
        holder=""
        read -r holder _ <"$lock" 2>/dev/null || true
        if [[ $holder == "$SLURM_JOB_ID" ]]; then  # this job, requeued
            LONGCTX_LOCK=$lock
            return 0
        fi
        state=$([[ -n $holder ]] && _job_state "$holder" || true)
        if _job_is_live "$state"; then
            _log "run directory $LONGCTX_RUN is in use by job $holder ($state): not starting, as" \
                "a second job would resume from or delete its checkpoints. Wait for it, set another" \
                "LONGCTX_RUN, or submit with --dependency=singleton (one job of that name at a time)."
            exit "$LONGCTX_EXIT_BUSY"
        fi
        _log "run directory $LONGCTX_RUN: taking over the lock of job ${holder:-?} (${state:-gone})"
        rm -f "$lock"
    done
    _log "could not lock run directory $LONGCTX_RUN ($lock): remove it if no job uses the directory"
    exit "$LONGCTX_EXIT_BUSY"
}

_unlock_run_dir() {
    local holder=""
    [[ -n $LONGCTX_LOCK ]] || return 0
    read -r holder _ <"$LONGCTX_LOCK" 2>/dev/null || true
    if [[ $holder == "$SLURM_JOB_ID" ]]; then
        rm -f "$LONGCTX_LOCK"
    fi
    LONGCTX_LOCK=""
}

# 4. signal forwarding ------------------------------------------------------------------------------
LONGCTX_SIGNALLED=""   # the first signal forwarded
LONGCTX_GOT_TERM=""    # this shell got SIGTERM: the job is ending (cancel, time limit, preemption)
LONGCTX_SRUN_PID=""
LONGCTX_PID_DIR=""

_forward_signal() {
    local sig=$1
    if [[ $sig == TERM ]]; then LONGCTX_GOT_TERM=1; fi
    if [[ -n $LONGCTX_SIGNALLED ]]; then
        _log "received SIG$sig (the trainer was asked to checkpoint on SIG$LONGCTX_SIGNALLED already)"
        return 0
    fi
    LONGCTX_SIGNALLED=$sig
    _log "received SIG$sig: asking the trainer (all tasks) to checkpoint and exit $LONGCTX_EXIT_PREEMPTED"
    # Only the trainer processes get SIGUSR1 (by the pids the tasks recorded), through a small step
    # on every node: no GPUs, no memory of its own (a step that waits for the trainer's resources
    # would wait forever on some SLURM versions), and a time limit in any case.
    timeout --kill-after=5 "$LONGCTX_SIGNAL_TIMEOUT_S" \
        srun --overlap --nodes="$SLURM_NNODES" --ntasks="$SLURM_NNODES" --ntasks-per-node=1 \
        "${LONGCTX_HELPER_STEP[@]}" "${LONGCTX_CONTAINER[@]}" \
        bash -c 'for f in "$1"/"$(hostname)".*.pid; do kill -USR1 "$(cat "$f")"; done' signal \
        "$LONGCTX_PID_DIR" && return 0
    # Every process of the job's steps (not --full: on SLURM 22.05 that reaches the batch shell and
    # its srun clients, not the trainers). The trainer starts megatron's checkpoint helper with
    # these signals ignored, so this does not break a save.
    _log "the signalling step failed or took over ${LONGCTX_SIGNAL_TIMEOUT_S} s;" \
        "signalling every step instead (scancel --signal=USR1)"
    scancel --signal=USR1 "$SLURM_JOB_ID" || true
}

# Waits for process $1 and sets LONGCTX_STEP_RC to its exit code. `wait` returns 128 + n when a
# trapped signal arrives; if the process ended while the trap ran, its status is still waiting to be
# collected: wait once more (a second wait on a collected process answers 127).
_wait_step() {
    local pid=$1 rc again
    while true; do
        rc=0
        wait "$pid" || rc=$?
        if ((rc > 128)) && kill -0 "$pid" 2>/dev/null; then
            continue
        fi
        break
    done
    if ((rc > 128)); then
        again=0
        wait "$pid" 2>/dev/null || again=$?
        ((again == 127)) || rc=$again
    fi
    LONGCTX_STEP_RC=$rc
}

# srun answers the highest exit code of its tasks. After a hang that is the SIGKILL of the rank
# that hung (137), not the EXIT_HUNG of the ranks that found it: those record their code in
# $LONGCTX_PID_DIR/restart<N>/<host>.<rank>.exit (LONGCTX_STATUS_DIR), which decides then.
_trainer_rc() {
    local rc=$1 f code reason
    if ((rc != 0 && rc != LONGCTX_EXIT_PREEMPTED)); then
        for f in "$LONGCTX_STATUS_DIR"/*.exit; do
            [[ -e $f ]] || continue
            read -r code reason <"$f" || true
            if [[ $code == "$LONGCTX_EXIT_HUNG" ]]; then
                _log "srun exit $rc; ${f##*/}: $code ($reason)" >&2
                rc=$LONGCTX_EXIT_HUNG
            fi
        done
    fi
    echo "$rc"
}

# 5. what the exit code means -----------------------------------------------------------------------
_after_trainer() {
    local rc=$1
    case $rc in
        0)
            _log "trainer finished (exit 0)"
            _submit_eval
            _unlock_run_dir
            exit 0 ;;
        "$LONGCTX_EXIT_PREEMPTED" | "$LONGCTX_EXIT_HUNG")
            if ((rc == LONGCTX_EXIT_HUNG)); then
                _log "trainer exited $rc (a rank made no progress within the hang bound: stacks in" \
                    "the run directory's hang/; or a collective failed because a peer is gone);" \
                    "the requeued run resumes from the newest complete checkpoint"
            else
                _log "trainer checkpointed and exited $rc (preempted${LONGCTX_SIGNALLED:+ by SIG$LONGCTX_SIGNALLED})"
            fi
            local restarts=${SLURM_RESTART_COUNT:-0}
            if [[ -n $LONGCTX_GOT_TERM ]]; then
                _log "not requeueing: this job got SIGTERM (scancel, its time limit, or SLURM" \
                    "preempting it, which requeues by itself where PreemptMode=REQUEUE);" \
                    "resubmit the same command to resume"
            elif [[ $LONGCTX_REQUEUE != 1 ]]; then
                _log "LONGCTX_REQUEUE=$LONGCTX_REQUEUE: not requeueing"
            elif ((restarts >= LONGCTX_MAX_RESTARTS)); then
                _log "restart cap reached ($restarts restarts, LONGCTX_MAX_RESTARTS=$LONGCTX_MAX_RESTARTS):" \
                    "not requeueing; resubmit the same command to resume"
            else
                _log "requeueing job $SLURM_JOB_ID; it resumes from the newest complete checkpoint"
                if scontrol requeue "$SLURM_JOB_ID"; then
                    exit "$rc"  # the lock stays with this job id
                fi
                _log "scontrol requeue failed; job state now '$(_job_state "$SLURM_JOB_ID")'" \
                    "(PENDING: SLURM requeued it itself, e.g. after a node failure). Otherwise" \
                    "(cancelled?) resubmit the same command to resume"
            fi
            _unlock_run_dir
            exit "$rc" ;;
        *)
            _log "trainer failed (exit $rc): not requeueing; see the task output above"
            _unlock_run_dir
            exit "$rc" ;;
    esac
}

# The whole job: settings, lock, config check, trainer, requeue decision.
longctx_launch() {
    longctx_settings
    local trainer=("$LONGCTX_PYTHON" -m megatron_longctx.train --config "$LONGCTX_CONFIG")
    _log "job $SLURM_JOB_ID ($SLURM_JOB_NAME) restart ${SLURM_RESTART_COUNT:-0}:" \
        "$SLURM_NNODES node(s) [$SLURM_JOB_NODELIST], $SLURM_NTASKS tasks," \
        "master $MASTER_ADDR:$MASTER_PORT, device $LONGCTX_DEVICE, $LONGCTX_CPUS_PER_TASK CPUs/task"
    _log "config $LONGCTX_CONFIG, run dir $LONGCTX_RUN, data $LONGCTX_DATA, overrides: ${LONGCTX_ARGS[*]}"
    if [[ -n $LONGCTX_JOB_END_TIME ]]; then
        local left=$((LONGCTX_JOB_END_TIME - $(date +%s)))
        _log "time limit: the job ends $(date -d "@$LONGCTX_JOB_END_TIME" '+%F %T') (${left} s" \
            "left); the trainer checkpoints and exits $LONGCTX_EXIT_MARGIN_S s before" \
            "(LONGCTX_EXIT_MARGIN_S)"
        if ((left <= LONGCTX_EXIT_MARGIN_S)); then
            _log "the time left is not more than LONGCTX_EXIT_MARGIN_S: every run would stop after" \
                "one step; raise --time or lower LONGCTX_EXIT_MARGIN_S. Not starting."
            exit "$LONGCTX_EXIT_CONFIG"
        fi
    fi
    _lock_run_dir
    LONGCTX_PID_DIR=$LONGCTX_RUN/launch/$SLURM_JOB_ID
    rm -rf "$LONGCTX_PID_DIR" && mkdir -p "$LONGCTX_PID_DIR"

    # 3. fail fast: resolve and validate the config for this world size before any task starts.
    local rc=0 check=("${trainer[@]}" --dry-run --world-size "$SLURM_NTASKS" "${LONGCTX_ARGS[@]}")
    if ((${#LONGCTX_CONTAINER[@]})); then
        check=(srun --nodes=1 --ntasks=1 "${LONGCTX_HELPER_STEP[@]}" "${LONGCTX_CONTAINER[@]}"
               "${check[@]}")
    fi
    "${check[@]}" 2>&1 | tee "$LONGCTX_PID_DIR/config_check.txt" || rc=$?
    if [[ $rc -ne 0 ]]; then
        _log "config check failed (exit $rc): fix the recipe or LONGCTX_OVERRIDES; not requeueing"
        _unlock_run_dir
        exit "$rc"
    fi
    if [[ $LONGCTX_EVAL_JOB == 1 ]]; then  # the evaluation runs in its own job, not in training
        local n
        n=$(grep -cE '^stage [^ ]+: world ' "$LONGCTX_PID_DIR/config_check.txt" || true)
        for ((i = 0; i < n; i++)); do LONGCTX_ARGS+=("stages.$i.eval=false"); done
        _log "LONGCTX_EVAL_JOB=1: stage-end evaluation off in training; a dependent job evaluates"
    fi

    # `|| true`: under `set -e` a failing trap action would end this shell, and the job with it.
    trap '_forward_signal USR1 || true' USR1
    trap '_forward_signal TERM || true' TERM
    # Each task records its pid for _forward_signal (exec: the trainer keeps it) and sets
    # LOCAL_RANK, which picks this task's GPU (runtime/device.py): its index among the GPUs the
    # task sees, i.e. SLURM_LOCALID when it sees the node's GPUs, 0 when SLURM bound it to one.
    # setsid (defensive): where a SLURM version delivers a batch-shell signal (--signal=B:...,
    # scancel --batch) to the shell's whole process group, srun must not get it: it would forward
    # it to every process of the step. (22.05 signals the shell only.)
    # The trainer's EXIT_HUNG records (_trainer_rc), per run: a rank of an earlier run of this job
    # cut off from the network may still write its record when the link returns.
    export LONGCTX_STATUS_DIR=$LONGCTX_PID_DIR/restart${SLURM_RESTART_COUNT:-0}
    mkdir -p "$LONGCTX_STATUS_DIR"
    local srun_cmd=(srun --label --kill-on-bad-exit=0 --wait="$LONGCTX_TASK_GRACE_S"
                    --ntasks="$SLURM_NTASKS" --cpus-per-task="$LONGCTX_CPUS_PER_TASK")
    if [[ $LONGCTX_GPU_BINDING == task ]]; then srun_cmd+=(--gpus-per-task=1); fi
    local srun_extra
    read -r -a srun_extra <<<"$LONGCTX_SRUN_ARGS"
    srun_cmd+=("${LONGCTX_CONTAINER[@]}" "${srun_extra[@]}")
    setsid "${srun_cmd[@]}" bash -c 'echo $$ >"$0/$(hostname).$SLURM_PROCID.pid"
        if [[ -n ${CUDA_VISIBLE_DEVICES:-} && $CUDA_VISIBLE_DEVICES != *,* ]]; then
            export LOCAL_RANK=0
        else
            export LOCAL_RANK=$SLURM_LOCALID
        fi
        exec "$@"' "$LONGCTX_PID_DIR" "${trainer[@]}" "${LONGCTX_ARGS[@]}" &
    LONGCTX_SRUN_PID=$!
    _wait_step "$LONGCTX_SRUN_PID"
    trap - USR1 TERM
    _after_trainer "$(_trainer_rc "$LONGCTX_STEP_RC")"
}

# 10. evaluation as its own job ---------------------------------------------------------------------
# Submitted when training ends with exit 0 (LONGCTX_EVAL_JOB=1), after this job (afterok): a slow
# or failing evaluation cannot fail the training job or hold up a job that depends on it.
_submit_eval() {
    [[ $LONGCTX_EVAL_JOB == 1 ]] || return 0
    local ckpts=${LONGCTX_EVAL_LOAD:-$LONGCTX_RUN/checkpoints} it="" load out id sb clean=()
    read -r it <"$ckpts/latest_checkpointed_iteration.txt" 2>/dev/null || true
    if [[ ! $it =~ ^[0-9]+$ ]]; then
        _log "no checkpoint in $ckpts to evaluate (LONGCTX_EVAL_LOAD): no evaluation job"
        return 0
    fi
    load=$ckpts/$(printf 'iter_%07d' "$((10#$it))")
    out=$LONGCTX_RUN/eval/${load##*/}
    read -r -a sb <<<"${LONGCTX_EVAL_SBATCH_ARGS:-}"
    # This job's SLURM_* / SRUN_* variables must not configure the new job (SLURM_CONF may).
    for v in $(compgen -e); do
        if [[ ($v == SLURM_* || $v == SRUN_*) && $v != SLURM_CONF ]]; then clean+=(-u "$v"); fi
    done
    if id=$(env "${clean[@]}" LONGCTX_EVAL_CHECKPOINT="$load" LONGCTX_EVAL_OUTPUT="$out" \
        LONGCTX_HOME="$LONGCTX_HOME" sbatch --parsable --dependency=afterok:"$SLURM_JOB_ID" \
        --job-name="${SLURM_JOB_NAME}_eval" "${sb[@]}" "$LONGCTX_HOME/launch/eval_longctx.sh"); then
        _log "evaluation of $load submitted as job ${id%%;*} (starts when this job has ended" \
            "OK); results in $out"
    else
        _log "submitting the evaluation job failed (training is done): submit" \
            "launch/eval_longctx.sh with LONGCTX_EVAL_CHECKPOINT=$load by hand"
    fi
}
