#!/usr/bin/env bash
# Multi-node launch with torchrun's c10d rendezvous. Run the same command on every node:
#   NNODES=4 NPROC=8 RDZV_HOST=node001 launchers/torchrun_multinode.sh train --config imp_b16
# MAX_RESTARTS=N lets torchrun restart the workers N times after a failure (default 0; each restart resumes from
# the newest checkpoint, train.resume). RDZV_PORT (29400) and RDZV_ID (mmpt) name the rendezvous.
set -euo pipefail
: "${NNODES:?set NNODES}" "${RDZV_HOST:?set RDZV_HOST (hostname of any one node)}"
NPROC=${NPROC:-$(python -c 'import torch; print(max(torch.cuda.device_count(), 1))')}
# shellcheck source=launchers/supervise.sh
source "$(dirname "${BASH_SOURCE[0]}")/supervise.sh"
supervise_torchrun --nnodes="$NNODES" --nproc_per_node="$NPROC" --rdzv_backend=c10d \
  --rdzv_endpoint="$RDZV_HOST:${RDZV_PORT:-29400}" --rdzv_id="${RDZV_ID:-mmpt}" \
  --max-restarts="${MAX_RESTARTS:-0}" -- "$@"
