#!/usr/bin/env bash
# One machine, all its GPUs (or NPROC_PER_NODE processes; 1 on a CPU-only machine):
#   launch/torchrun.sh train.py optimizer=adam
#   NPROC_PER_NODE=2 launch/torchrun.sh train.py        # 2 gloo processes on a CPU machine
# Workers that die are restarted up to MAX_RESTARTS times (default 3).
set -euo pipefail
PYTHON=${PYTHON:-python}
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    NPROC_PER_NODE=$(nvidia-smi -L | grep -c '^GPU' || true)
  fi
  [[ "${NPROC_PER_NODE:-0}" -ge 1 ]] || NPROC_PER_NODE=1
fi
exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NPROC_PER_NODE" \
  --max-restarts="${MAX_RESTARTS:-3}" "$@"
