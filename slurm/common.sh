# shellcheck shell=bash
# Shared by the sbatch templates in slurm/: environment, preemption requeue, a Ray cluster over the
# allocation. Sourced from the repository root (the templates `cd "$SLURM_SUBMIT_DIR"` first).
# Settings come from the environment, so `sbatch --export=ALL,LDM_VENV=...` changes them per job:
#   LDM_VENV           a virtual environment to activate (default: use the submitting shell's python)
#   LDM_RAY_START_ARGS extra `ray start` arguments for every node, e.g. "--object-store-memory=10000000000"
#   LDM_RAY_WAIT_S     how long to wait for all Ray nodes to join (default 300)

ldm_setup_env() {
  if [[ -n "${LDM_VENV:-}" ]]; then
    # shellcheck disable=SC1091
    source "$LDM_VENV/bin/activate"
  fi
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

_ray_wait_for_nodes() {  # count; fails early when the head's job step has died
  python - "$1" "${LDM_RAY_WAIT_S:-300}" "${RAY_STEP_PIDS[0]}" <<'PY'
import os, sys, time
import ray
count, timeout_s, head_step = int(sys.argv[1]), float(sys.argv[2]), f"/proc/{sys.argv[3]}/stat"
deadline = time.monotonic() + timeout_s


def head_running() -> bool:  # its srun exited (is gone or a zombie): the head failed to start
    return os.path.exists(head_step) and open(head_step).read().rsplit(")", 1)[1].split()[0] != "Z"


def alive_nodes() -> int:
    try:
        if not ray.is_initialized():
            ray.init(log_to_driver=False)  # joins RAY_ADDRESS
        return sum(node["Alive"] for node in ray.nodes())
    except ConnectionError:  # the head's GCS does not answer yet
        return 0


while (alive := alive_nodes()) < count:
    if not head_running():
        sys.exit(f"ldm: the Ray head's job step exited; {alive} of {count} nodes had joined")
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
  _ray_wait_for_nodes 1
  ((${#nodes[@]} > 1)) || return 0
  local node
  for node in "${nodes[@]:1}"; do
    _ray_step "$node" --address="$RAY_ADDRESS"
  done
  _ray_wait_for_nodes "${#nodes[@]}"
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
