#!/usr/bin/env bash
# DeepSpeed's own runner (`deepspeed`), one process per GPU (or NPROC CPU processes on gloo).
#   This node:          NPROC=2 launchers/deepspeed.sh train --config demo train.steps=100
#   Hosts of a hostfile (pdsh + passwordless ssh from this node to every host, same paths everywhere):
#                       HOSTFILE=launchers/hostfile.example launchers/deepspeed.sh train --config imp_b16
#   Without ssh, the same command on every node with its rank and the first host's address:
#                       HOSTFILE=hosts NODE_RANK=0 MASTER_ADDR=node001 MASTER_PORT=29500 launchers/deepspeed.sh train ...
# Extra arguments go to `mmpt`. DS_ARGS adds runner flags (e.g. "--bind_cores_to_rank", "--launcher_args=...").
# The runner starts `python -m mmpt.cli` (--module) without --local_rank=N (--no_local_rank): ranks come from
# RANK/LOCAL_RANK/WORLD_SIZE. On CPU, DeepSpeed counts NUMA nodes as devices, so `--include localhost:0,1` fails
# on a one-socket machine ("No slot '1'"); --num_gpus=N is what asks for N processes there.
# Remote hosts receive only what DeepSpeed forwards (NCCL*, PYTHON*, UCX*, MV2* and ~/.deepspeed_env lines).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# Not in the venv? Use the one `make` builds.
if ! command -v deepspeed >/dev/null && [[ -x $ROOT/.venv/bin/deepspeed ]]; then export PATH="$ROOT/.venv/bin:$PATH"; fi
PORT=${MASTER_PORT:-$((29500 + RANDOM % 1000))}
GPUS=${NPROC:-}
if [[ -z ${DS_ACCELERATOR:-} || -z $GPUS ]]; then
  read -r GPUS DEVICE < <(python -c 'import torch; n = torch.cuda.device_count(); print(n, "cuda" if n else "cpu")')
  export DS_ACCELERATOR=${DS_ACCELERATOR:-$DEVICE}
fi
args=(--master_port="$PORT" --module --no_local_rank)
if [[ -n ${HOSTFILE:-} ]]; then
  [[ -f $HOSTFILE ]] || { echo "deepspeed.sh: HOSTFILE=$HOSTFILE: no such file" >&2; exit 2; }
  args+=(--hostfile="$HOSTFILE")
  if [[ -n ${NPROC:-} ]]; then args+=(--num_gpus="$NPROC"); fi         # else the hostfile's slots=
  if [[ -n ${MASTER_ADDR:-} ]]; then args+=(--master_addr="$MASTER_ADDR"); fi  # else the first host's `hostname -I`
  if [[ -n ${NODE_RANK:-} ]]; then  # no ssh: every node must name the same rendezvous
    : "${MASTER_ADDR:?set MASTER_ADDR (the first host) on every node}" "${MASTER_PORT:?set MASTER_PORT, the same on every node}"
    args+=(--no_ssh --node_rank="$NODE_RANK")
  fi
  if [[ -n ${VIRTUAL_ENV:-} ]]; then args+=(--venv_script="$VIRTUAL_ENV/bin/activate"); fi
else
  args+=(--hostfile=/dev/null)  # not a file: this node only, even where DeepSpeed's default /job/hostfile exists
  if [[ $DS_ACCELERATOR == cpu ]]; then
    NPROC=${NPROC:-1}
    args+=(--num_gpus="$NPROC")
  elif [[ -n ${NPROC:-} ]]; then
    # With CUDA_VISIBLE_DEVICES set the runner uses exactly those GPUs; narrow that list to use fewer.
    if [[ -n ${CUDA_VISIBLE_DEVICES:-} ]]; then
      IFS=, read -ra visible <<< "$CUDA_VISIBLE_DEVICES"
      if (( ${#visible[@]} != NPROC )); then
        echo "deepspeed.sh: CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES decides the processes; NPROC=$NPROC ignored" >&2
      fi
    else
      args+=(--num_gpus="$NPROC")
    fi
  fi
  NPROC=${NPROC:-$(( GPUS > 0 ? GPUS : 1 ))}
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}
fi
# shellcheck disable=SC2086  # DS_ARGS is a list of flags
exec deepspeed "${args[@]}" ${DS_ARGS:-} mmpt.cli "$@"
