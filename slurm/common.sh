# shellcheck shell=bash
# Shared by the sbatch templates in slurm/: environment, preemption requeue, torchrun per node,
# job-array inputs, a Ray cluster over the allocation. Sourced from the repository root (the
# templates `cd "$SLURM_SUBMIT_DIR"` first). Settings come from the environment, so
# `sbatch --export=ALL,LDM_VENV=...` changes them per job:
#   LDM_VENV               a virtual environment to activate (default: the submitting shell's python)
#   LDM_NPROC_PER_NODE     training processes per node (default: the GPUs SLURM gave the node)
#   LDM_SHUTDOWN_TIMEOUT_S how long torchrun lets its workers checkpoint after a signal (default 300)
#   LDM_RAY_START_ARGS     extra `ray start` arguments for every node, e.g. "--object-store-memory=10000000000"
#   LDM_RAY_WAIT_S         how long to wait for all Ray nodes to join (default 300)

ldm_setup_env() {
  if [[ -n "${LDM_VENV:-}" ]]; then
    # shellcheck disable=SC1091
    source "$LDM_VENV/bin/activate"
  fi
  # sbatch exports the submitting shell's environment: rank variables left there (a torchrun or an
  # in-process job in that shell) would make every task of this job "rank 0 of 1" on a stale port.
  # Ranks come from this allocation (srun, or torchrun_env below).
  unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE GROUP_RANK MASTER_ADDR MASTER_PORT
  export HYDRA_FULL_ERROR=1 NO_ALBUMENTATIONS_UPDATE=1
  export RAY_USAGE_STATS_ENABLED="${RAY_USAGE_STATS_ENABLED:-0}"
  # Without this Ray 2.60 writes an auth token under ~/.ray, shared by every job of the user.
  export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}"
}

# --- Preemption: `sbatch --signal=B:USR1@SECONDS` sends USR1 to this batch shell before the time
# limit (or at preemption); the handler puts the job back in the queue with the same job id, and
# SLURM then stops this run (SIGTERM, then SIGKILL after KillWait). The next run sees
# SLURM_RESTART_COUNT > 0; stages resume from their outputs (ingest skips finished shards).

_ldm_requeue() {
  echo "ldm: got $1 in job ${SLURM_JOB_ID} (run ${SLURM_RESTART_COUNT:-0}): requeueing" >&2
  scontrol requeue "$SLURM_JOB_ID"
}

requeue_on_signal() {  # signal name, e.g. USR1
  # shellcheck disable=SC2064  # expand $1 now: the handler must name the signal it got
  trap "_ldm_requeue $1" "$1"
}

# Runs the stage in the background and waits for it: bash runs a trap only between commands,
# and `wait` is the one command a signal interrupts, so the requeue handler runs at once.
run_stage() {
  "$@" &
  local pid=$!
  wait "$pid"
}

# --- Training under preemption. Requeueing at once (as above) would leave the trainer only
# KillWait seconds to save; instead the batch shell forwards the signal to the training step, waits
# until jobs.train has checkpointed and exited, and requeues then. The requeued run resumes with
# checkpoint.resume=auto.

PREEMPTED_EXIT_CODE=75  # jobs.train: "checkpointed after a signal, requeue me" (jobs/checkpointing.py)
LDM_STEP_PID=""
LDM_FORWARDED=""        # the signal to forward to the step, once one came
LDM_DELIVERED=""        # ... and sent

_ldm_forward() {  # signal name
  if [[ -n $LDM_FORWARDED ]]; then  # a second one would cut torchrun's wait for its workers short
    echo "ldm: got $1 again in job ${SLURM_JOB_ID}: the training step is already stopping" >&2
    return
  fi
  LDM_FORWARDED=$1
  echo "ldm: got $1 in job ${SLURM_JOB_ID} (run ${SLURM_RESTART_COUNT:-0}): forwarding it to the training step" >&2
  _ldm_deliver
}

_ldm_deliver() {
  if [[ -n $LDM_STEP_PID && -z $LDM_DELIVERED ]]; then
    LDM_DELIVERED=1
    kill -"$LDM_FORWARDED" "$LDM_STEP_PID" 2>/dev/null || true  # srun passes it on to every task of the step
  fi
}

forward_signal() {  # signal name, e.g. USR1
  # shellcheck disable=SC2064  # expand $1 now: the handler must name the signal it got
  trap "_ldm_forward $1" "$1"
}

# Runs the step in the background and returns its exit code. A forwarded signal interrupts `wait`,
# so it waits again until the step has really ended (bash keeps a finished child's exit status).
run_step() {
  if [[ -n $LDM_FORWARDED ]]; then  # the signal came before the step started: nothing to save
    return "$PREEMPTED_EXIT_CODE"
  fi
  "$@" &
  LDM_STEP_PID=$!
  if [[ -n $LDM_FORWARDED ]]; then  # it came between the two lines above
    _ldm_deliver
  fi
  while kill -0 "$LDM_STEP_PID" 2>/dev/null; do
    wait "$LDM_STEP_PID" || true
  done
  wait "$LDM_STEP_PID"
}

# Ends the batch script: requeues when the step exited 75, or failed after a forwarded signal (a
# worker signalled before its handler was installed dies; the rerun resumes from the checkpoint before).
# A step that finished (0) is not requeued, even when the signal came during its last step.
exit_or_requeue() {  # the step's exit code
  if (($1 == PREEMPTED_EXIT_CODE)) || [[ -n $LDM_FORWARDED && $1 != 0 ]]; then
    echo "ldm: the training step exited with code $1${LDM_FORWARDED:+ after $LDM_FORWARDED}: requeueing job" \
      "${SLURM_JOB_ID} (it resumes from its newest checkpoint)" >&2
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
  fi
  exit "$1"
}

# Exports what torchrun on every node needs: the rendezvous on the first node of the allocation and
# the processes per node.
torchrun_env() {
  local nodes
  mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
  export MASTER_ADDR=${nodes[0]}
  # One port per job (as jobs/distributed.py derives it for srun): jobs may share a node.
  export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))
  export LDM_NPROC_PER_NODE=${LDM_NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}
  if [[ -z $LDM_NPROC_PER_NODE ]]; then
    echo "ldm: no GPUs in this allocation: ask for them (--gpus-per-node=8) or set the processes per" \
      "node (sbatch --export=ALL,LDM_NPROC_PER_NODE=2 for CPU ranks)" >&2
    return 2
  fi
}

# One torchrun per node as one job step, run as jobs.launch (torchrun that exits 75 when its workers
# checkpointed for preemption); its workers run `python -m MODULE ARGS...`. torchrun
# forwards USR1 (as it does TERM) to its workers and gives them LDM_SHUTDOWN_TIMEOUT_S to exit.
# `exec`: under run_step this runs in a background subshell, which becomes srun itself, so the
# signal that _ldm_forward sends reaches srun (a subshell would die of it, leaving srun running).
torchrun_step() {  # module, its arguments...
  # shellcheck disable=SC2016  # single quotes: SLURM_NODEID & co. expand on each node, in the step
  exec srun --nodes="$SLURM_NNODES" --ntasks-per-node=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" \
    --kill-on-bad-exit=1 \
    bash -c 'exec python -m jobs.launch --nnodes="$SLURM_NNODES" --node-rank="$SLURM_NODEID" \
      --nproc-per-node="$LDM_NPROC_PER_NODE" --master-addr="$MASTER_ADDR" --master-port="$MASTER_PORT" \
      --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 \
      --shutdown-timeout="${LDM_SHUTDOWN_TIMEOUT_S:-300}" -m "$@"' torchrun_step "$@"
}

# --- Job arrays: task N of `sbatch --array=...` takes the N-th file of a sorted glob.

array_input() {  # glob pattern; prints the file of this array task
  local files
  if [[ -z ${SLURM_ARRAY_TASK_ID:-} ]]; then
    echo "ldm: not an array task: submit with sbatch --array=0-N" >&2
    return 2
  fi
  mapfile -t files < <(LC_ALL=C compgen -G "$1" | LC_ALL=C sort)
  if ((${#files[@]} == 0)); then
    echo "ldm: '$1' matches no files (relative paths start at the submit folder)" >&2
    return 2
  fi
  if ((SLURM_ARRAY_TASK_ID >= ${#files[@]})); then
    echo "ldm: array task $SLURM_ARRAY_TASK_ID but '$1' matches ${#files[@]} files: submit with" \
      "--array=0-$((${#files[@]} - 1))" >&2
    return 2
  fi
  echo "${files[SLURM_ARRAY_TASK_ID]}"
}

# --- Ray over the allocation: one `ray start --block` job step per node, head on the first node
# (where this batch script runs).

RAY_STEP_PIDS=()

_ray_step() {  # node, `ray start` arguments...
  local node=$1
  shift
  # shellcheck disable=SC2086  # LDM_RAY_START_ARGS is a list of arguments
  srun --nodes=1 --ntasks=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" --nodelist="$node" \
    ray start --block --disable-usage-stats --num-cpus="${SLURM_CPUS_PER_TASK:-1}" \
    ${LDM_RAY_START_ARGS:-} "$@" &
  RAY_STEP_PIDS+=($!)
}

_ray_wait_for_nodes() {  # count; exits 3 at once when the head's job step has died
  python - "$1" "${LDM_RAY_WAIT_S:-300}" "${RAY_STEP_PIDS[0]}" <<'PY'
import os, socket, sys, time
import ray
count, timeout_s, head_step = int(sys.argv[1]), float(sys.argv[2]), f"/proc/{sys.argv[3]}/stat"
deadline = time.monotonic() + timeout_s
gcs_host, gcs_port = os.environ["RAY_ADDRESS"].rsplit(":", 1)


def head_running() -> bool:  # its srun exited (is gone or a zombie): the head failed to start
    return os.path.exists(head_step) and open(head_step).read().rsplit(")", 1)[1].split()[0] != "Z"


def gcs_listening() -> bool:
    try:
        socket.create_connection((gcs_host, int(gcs_port)), timeout=1).close()
        return True
    except OSError:
        return False


def alive_nodes() -> int:
    # ray.init blocks for minutes, retrying, while nothing listens at RAY_ADDRESS (seen: a head whose
    # `ray start` failed kept the job waiting until its time limit): connect only once the port is open.
    if not ray.is_initialized():
        if not gcs_listening():
            return 0
        try:
            ray.init(log_to_driver=False)  # joins RAY_ADDRESS
        except ConnectionError:  # the port is open but the GCS does not answer yet
            return 0
    return sum(node["Alive"] for node in ray.nodes())


while (alive := alive_nodes()) < count:
    if not head_running():
        print(f"ldm: the Ray head's job step exited; {alive} of {count} nodes had joined", file=sys.stderr)
        sys.exit(3)
    if time.monotonic() > deadline:
        sys.exit(f"ldm: only {alive} of {count} Ray nodes joined within {timeout_s:.0f} s")
    time.sleep(1)
print(f"ldm: Ray cluster of {alive} nodes at {os.environ['RAY_ADDRESS']}", file=sys.stderr)
PY
}

ray_cluster_start() {
  local nodes head_ip port
  mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
  # The first non-loopback address: what the other nodes reach the head at.
  head_ip=$(hostname -I | awk '{print $1}')
  head_ip=${head_ip:-127.0.0.1}
  # One port per job, above Ray's worker port range (10002-19999): jobs may share a node.
  port=$((20000 + SLURM_JOB_ID % 20000))
  export RAY_ADDRESS="$head_ip:$port"
  _ray_step "${nodes[0]}" --head --node-ip-address="$head_ip" --port="$port" \
    --ray-client-server-port=$((port + 1)) --include-dashboard=false
  _ray_wait_for_nodes 1 || _ray_head_failed "${nodes[0]}"
  ((${#nodes[@]} > 1)) || return 0
  local node
  for node in "${nodes[@]:1}"; do
    _ray_step "$node" --address="$RAY_ADDRESS"
  done
  _ray_wait_for_nodes "${#nodes[@]}"
}

_ray_head_failed() {  # node; when the head's step died, says so with its exit code
  local code=0
  if kill -0 "${RAY_STEP_PIDS[0]}" 2>/dev/null; then
    return 1  # it runs but did not answer in time: the wait said so
  fi
  wait "${RAY_STEP_PIDS[0]}" || code=$?
  echo "ldm: 'ray start --head' on $1 exited with code $code before the cluster came up; its error is" \
    "above (LDM_RAY_START_ARGS='${LDM_RAY_START_ARGS:-}')" >&2
  return 1
}

ray_cluster_stop() {  # workers first, then the head
  # SIGTERM to a step's srun cancels the step: SLURM signals every process of the node's Ray
  # (TERM, then KILL after KillWait) and the step ends in seconds. A graceful `ray start --block`
  # shutdown is no better here: its GCS gets the same TERM and the drain call waits 30 s for it.
  # Nothing is lost: the stage has ended, and stage outputs are only renamed into place complete.
  local i
  for ((i = ${#RAY_STEP_PIDS[@]} - 1; i >= 0; i--)); do
    kill -TERM "${RAY_STEP_PIDS[i]}" 2>/dev/null || true
    wait "${RAY_STEP_PIDS[i]}" 2>/dev/null || true
  done
  RAY_STEP_PIDS=()
}
