#!/usr/bin/env bash
# One node of launch/slurm.sbatch (srun runs this once per node): torchrun with NPROC_PER_NODE
# workers (default: this node's GPUs, 1 on a CPU node), joined to the other nodes by a c10d
# rendezvous on the job's first node. Not meant to be run by hand.
#   usage: slurm_node.sh HEAD_HOST:PORT TRAIN_SCRIPT [overrides...]
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
endpoint=$1
shift
nproc=$(nproc_per_node)
# The first node of the allocation hosts the rendezvous store. Say so explicitly: torch's guess
# (does the endpoint name this machine?) fails where node names differ from `hostname`.
is_host=0
[[ "${SLURM_NODEID:-0}" == 0 ]] && is_host=1
# SIGUSR1 (the preemption warning) reaches every process of the job step: SLURM signals the
# step's whole process tree, so the training workers get it directly and checkpoint. torchrun's
# agent has no USR1 handler, and USR1's default action would kill it, ending the step while
# its workers still write the checkpoint (SLURM then kills them). So the agent starts with USR1
# ignored; the workers inherit that until gddist installs its handler for training.
trap '' USR1
restarts=${MAX_RESTARTS:-0}
if (( restarts > 0 )); then
  # After an elastic restart, workers that share the agent's rendezvous store can read the previous
  # attempt's addresses and fail to connect (pytorch/pytorch#135712): a store per attempt. Its
  # host is then the first node's `hostname --fqdn`, which must resolve on the other nodes.
  export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
fi
exec "${PYTHON:-python}" -m torch.distributed.run \
  --nnodes="${SLURM_JOB_NUM_NODES:-1}" \
  --nproc-per-node="$nproc" \
  --rdzv-backend=c10d \
  --rdzv-endpoint="$endpoint" \
  --rdzv-id="${SLURM_JOB_ID:?run this under srun}" \
  --rdzv-conf="is_host=$is_host" \
  --max-restarts="$restarts" \
  "$@"
