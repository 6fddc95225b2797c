#!/usr/bin/env bash
# One machine, all its GPUs (or NPROC_PER_NODE processes; 1 on a CPU-only machine):
#   launch/torchrun.sh train.py optimizer=adam
#   NPROC_PER_NODE=2 launch/torchrun.sh train.py        # 2 gloo processes on a CPU machine
#   MAX_RESTARTS=0 launch/torchrun.sh train.py          # no elastic restarts
# Every argument goes to torchrun after its own options: the script, then Hydra overrides.
# Workers that die are restarted (all of them, together) up to MAX_RESTARTS times (default 3);
# checkpoint.resume=auto makes a restarted run continue from the newest checkpoint of its run dir,
# which stays the same across restarts and reruns (outputs/<data>-<model>-<optimizer>-<config hash>).
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
PYTHON=${PYTHON:-python}
nproc=$(nproc_per_node)
# After a restart, workers that share the agent's rendezvous store can read the previous attempt's
# addresses and fail to connect (pytorch/pytorch#135712, seen here with gloo): a store per attempt,
# hosted on this machine's loopback (its hostname need not resolve).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
exec "$PYTHON" -m torch.distributed.run --standalone --local-addr=127.0.0.1 \
  --nproc-per-node="$nproc" --max-restarts="${MAX_RESTARTS:-3}" "$@"
