#!/usr/bin/env bash
# `accelerate launch` with its DeepSpeed plugin (launchers/accelerate_deepspeed.yaml): processes only; mmpt builds
# the DeepSpeed engine from its run config (a disagreeing plugin setting is named in one warning; the run config wins).
#   This node:   NPROC=2 launchers/accelerate.sh train --config demo train.steps=100
#   Multi-node, the same command on every node with its NODE_RANK (torchrun underneath, static rendezvous):
#                NNODES=4 NODE_RANK=0 NPROC=8 MASTER_ADDR=node001 MASTER_PORT=29500 launchers/accelerate.sh train --config imp_b16
# ACCELERATE_CONFIG names another accelerate config file; ACCELERATE_ARGS adds `accelerate launch` flags.
# Extra arguments go to `mmpt`. On CPU-only machines DeepSpeed uses gloo.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# Not in the venv? Use the one `make` builds.
if ! command -v accelerate >/dev/null && [[ -x $ROOT/.venv/bin/accelerate ]]; then export PATH="$ROOT/.venv/bin:$PATH"; fi
NNODES=${NNODES:-1}
NPROC=${NPROC:-$(python -c 'import torch; print(max(torch.cuda.device_count(), 1))')}
if (( NNODES > 1 )); then
  : "${NODE_RANK:?set NODE_RANK (0 .. NNODES-1) on every node}" "${MASTER_ADDR:?set MASTER_ADDR (the NODE_RANK=0 host)}"
fi
PORT=${MASTER_PORT:-$((29500 + RANDOM % 1000))}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}
export DS_ACCELERATOR=${DS_ACCELERATOR:-$(python -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')}
# shellcheck disable=SC2086  # ACCELERATE_ARGS is a list of flags
exec accelerate launch --config_file "${ACCELERATE_CONFIG:-$ROOT/launchers/accelerate_deepspeed.yaml}" \
  --num_machines "$NNODES" --machine_rank "${NODE_RANK:-0}" --num_processes $((NPROC * NNODES)) \
  --main_process_ip "${MASTER_ADDR:-127.0.0.1}" --main_process_port "$PORT" ${ACCELERATE_ARGS:-} \
  --module mmpt.cli "$@"
