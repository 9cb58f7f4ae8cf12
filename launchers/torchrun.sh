#!/usr/bin/env bash
# Single-node launch: one process per GPU (or NPROC CPU processes on gloo).
#   NPROC=2 launchers/torchrun.sh train --config demo train.steps=100
# Extra arguments go to `mmpt`. On CPU-only machines DeepSpeed uses gloo. MAX_RESTARTS=N: when a worker dies,
# torchrun restarts the group up to N times and training resumes from the latest complete checkpoint.
# SIGTERM (to this script, or to every process of the job) checkpoints at the next step, writes RUN/preempted
# and exits 0; the same command resumes.
set -euo pipefail
NPROC=${NPROC:-$(python -c 'import torch; print(max(torch.cuda.device_count(), 1))')}
PORT=${MASTER_PORT:-$((29500 + RANDOM % 1000))}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}
export DS_ACCELERATOR=${DS_ACCELERATOR:-$(python -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')}
# shellcheck source=launchers/supervise.sh
source "$(dirname "${BASH_SOURCE[0]}")/supervise.sh"
supervise_torchrun --standalone --nproc_per_node="$NPROC" --master_port="$PORT" --max-restarts="${MAX_RESTARTS:-0}" \
  -- "$@"
