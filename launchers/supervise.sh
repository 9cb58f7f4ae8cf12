# Sourced by the torchrun launchers. `supervise_torchrun TORCHRUN_ARGS... -- MMPT_ARGS...` runs
# `torchrun TORCHRUN_ARGS... -m mmpt.cli MMPT_ARGS...` so that SIGTERM (scancel, Kubernetes eviction, a spot
# reclaim) ends in a checkpoint at the next step boundary, RUN/preempted and exit 0, whether it reaches this
# script alone or every process of the job at once.
# SIGTERM to this script goes on to torchrun's workers, not to torchrun: torchrun treats its own SIGTERM as a
# failure (it shuts the workers down, then exits 1), whereas workers that checkpoint and exit 0 end torchrun
# with 0. When torchrun was signalled too, it exits 1 after its workers: a preempted marker written during
# this launch then tells a clean preemption from a crash. A run whose last Hub push failed (train.hub) exits 0
# from every worker and writes RUN/hub_incomplete; this script then exits 3.
supervise_torchrun() {
  local torchrun_args=() pid rc=0 started
  while [[ $# -gt 0 && $1 != -- ]]; do torchrun_args+=("$1"); shift; done
  shift
  started=$(date +%s)
  torchrun "${torchrun_args[@]}" -m mmpt.cli "$@" &
  pid=$!
  # shellcheck disable=SC2064  # the pid is fixed now
  trap "echo 'mmpt: SIGTERM: the workers checkpoint at the next step and stop' >&2; pkill -TERM -P $pid || true" TERM
  trap ':' INT  # Ctrl-C reaches torchrun from the terminal; wait while it shuts its workers down
  while true; do  # a trapped signal interrupts `wait`; wait again until torchrun has really ended
    rc=0
    wait "$pid" || rc=$?
    kill -0 "$pid" 2>/dev/null || break
  done
  trap - TERM INT
  local run
  run=$(python -m mmpt.launch out-dir -- "$@" 2>/dev/null) || run=""
  if (( rc == 0 )) && [[ -n $run && -f $run/hub_incomplete ]] && (( $(stat -c %Y "$run/hub_incomplete") >= started )); then
    echo "mmpt: training finished, but the Hub lacks its last push: $(cat "$run/hub_incomplete")" >&2
    return 3
  fi
  if (( rc != 0 )); then
    if [[ -n $run && -f $run/preempted ]] && (( $(stat -c %Y "$run/preempted") >= started )); then
      echo "mmpt: torchrun was signalled too (exit $rc), but the run checkpointed and stopped ($run/preempted)" >&2
      return 0
    fi
  fi
  return "$rc"
}
