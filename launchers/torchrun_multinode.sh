#!/usr/bin/env bash
# Multi-node launch with torchrun's c10d rendezvous. Run the same command on every node:
#   NNODES=4 NPROC=8 RDZV_HOST=node001 launchers/torchrun_multinode.sh train --config imp_b16
set -euo pipefail
: "${NNODES:?set NNODES}" "${RDZV_HOST:?set RDZV_HOST (hostname of any one node)}"
NPROC=${NPROC:-$(python -c 'import torch; print(max(torch.cuda.device_count(), 1))')}
exec torchrun --nnodes="$NNODES" --nproc_per_node="$NPROC" --rdzv_backend=c10d \
  --rdzv_endpoint="$RDZV_HOST:${RDZV_PORT:-29400}" --rdzv_id="${RDZV_ID:-mmpt}" -m mmpt.cli "$@"
