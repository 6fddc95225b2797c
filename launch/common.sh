# shellcheck shell=bash
# Shared by the launch scripts (sourced, not run): how many processes to start on this node.
#
# nproc_per_node prints NPROC_PER_NODE when set; else the GPUs this node may use (SLURM's
# SLURM_GPUS_ON_NODE, else CUDA_VISIBLE_DEVICES, else `nvidia-smi -L`); else 1 (a CPU node runs
# one process unless told otherwise: more gloo processes on one CPU only share the same cores).

gpus_on_node() {
  if [[ -n "${SLURM_GPUS_ON_NODE:-}" ]]; then
    echo "$SLURM_GPUS_ON_NODE"
  elif [[ -n "${CUDA_VISIBLE_DEVICES+set}" ]]; then
    # Set but empty (or SLURM's "NoDevFiles") hides every GPU; else count the listed devices.
    local ids="${CUDA_VISIBLE_DEVICES//NoDevFiles/}"
    ids="${ids//[[:space:]]/}"
    if [[ -z "$ids" ]]; then echo 0; else local commas="${ids//[^,]/}"; echo $(( ${#commas} + 1 )); fi
  elif command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
  else
    echo 0
  fi
}

nproc_per_node() {
  local n="${NPROC_PER_NODE:-$(gpus_on_node)}"
  if ! [[ "$n" =~ ^[0-9]+$ ]]; then
    echo "error: NPROC_PER_NODE=$n is not a number of processes; set e.g. NPROC_PER_NODE=2" >&2
    return 2
  fi
  (( n >= 1 )) || n=1
  echo "$n"
}
