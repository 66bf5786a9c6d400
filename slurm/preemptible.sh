# shellcheck shell=bash
# Sourced by the sbatch scripts in slurm/ (after `cd` to the repository): settings from the
# environment, and run_preemptible, which runs a launcher so that preemption ends it with a
# checkpoint and requeues the job.
#
# Settings (environment variables, with defaults):
#   PYTHON      python with moe_dist installed                  (python)
#   CONFIG      config file                                     (configs/synthetic/s1_moe_nonlinear.yaml)
#   OVERRIDES   key=value overrides, space-separated; the script's arguments come after them
#   EP_SIZE     parallel.ep_size                                (the config's)
#   CPU=1       train on CPU with gloo (train.device=cpu)       (0: GPU with NCCL when there is one)
#   OMP_NUM_THREADS                                             (SLURM_CPUS_PER_TASK, else 1)
#
# Signals. `#SBATCH --signal=B:USR1@120` sends SIGUSR1 to this batch shell only, 120 s before
# the time limit (SLURM checks about once a minute, so it may come up to 60 s earlier) and, with
# SlurmctldParameters=preempt_send_user_signal, at preemption. bash runs a trap only between
# commands, so the launcher runs in the background while the shell waits on it. The trap
# passes the signal to the launcher: srun hands it to every task of its step on every node;
# torchrun to its workers (--signals-to-handle); `moe-dist sweep` to its training
# process. The ranks finish their step, agree, write a checkpoint and exit with 75. After a
# SIGUSR1, a launcher that did not succeed gets the job requeued: the same script runs again
# and the trainer resumes from the checkpoint. SIGTERM (scancel, time limit, preemption
# without the signal; SLURM sends it to every process of the job) is passed on as well, but
# requeues nothing: preemption with PreemptMode=REQUEUE requeues by itself, scancel means stop.

PYTHON=${PYTHON:-python}
CONFIG=${CONFIG:-configs/synthetic/s1_moe_nonlinear.yaml}
read -r -a OVERRIDE_ARGS <<< "${OVERRIDES:-}"
if [ -n "${EP_SIZE:-}" ]; then OVERRIDE_ARGS+=("parallel.ep_size=$EP_SIZE"); fi
if [ "${CPU:-0}" = 1 ]; then OVERRIDE_ARGS+=(train.device=cpu); fi
TRAIN_ARGS=(--config "$CONFIG" "${OVERRIDE_ARGS[@]}")
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}

_preemptible_pid=
_preemptible_requeue=0

_preemptible_forward() {
  if [ "$1" = USR1 ]; then _preemptible_requeue=1; fi
  echo "moe-dist: SIG$1 at $(date +%T), passed on to PID ${_preemptible_pid:-none}" >&2
  if [ -n "$_preemptible_pid" ]; then kill -s "$1" "$_preemptible_pid" 2>/dev/null || true; fi
}

# run_preemptible COMMAND...: run COMMAND, pass SIGUSR1/SIGTERM on to it, requeue after SIGUSR1.
run_preemptible() {
  trap '_preemptible_forward USR1' USR1
  trap '_preemptible_forward TERM' TERM
  "$@" &
  _preemptible_pid=$!
  # A trapped signal interrupts `wait`; keep waiting until the launcher has exited.
  while kill -0 "$_preemptible_pid" 2>/dev/null; do wait "$_preemptible_pid" || true; done
  local rc=0
  wait "$_preemptible_pid" || rc=$?  # bash keeps the exit status of a reaped child
  trap - USR1 TERM
  if [ "$_preemptible_requeue" = 1 ] && [ "$rc" != 0 ]; then
    echo "moe-dist: launcher exited with $rc after SIGUSR1: requeueing job $SLURM_JOB_ID" >&2
    if scontrol requeue "$SLURM_JOB_ID"; then exit 0; fi
  fi
  return "$rc"
}
