#!/usr/bin/env bash
# The GPU checks (tests/test_gpu.py, marker `gpu`) from a fresh checkout, then a results table
# to paste into the README. A few minutes on one GPU; the 2-process NCCL checks need 2 GPUs and
# report "skipped" with the reason on one.
#   bash launch/gpu_checks.sh                     # python3 must have the machine's CUDA torch
#   PYTHON=/opt/conda/bin/python bash launch/gpu_checks.sh -k fp16   # extra args go to pytest
# Uses the CUDA torch of $PYTHON as it is (never installs or replaces torch): inside a virtual or
# conda environment gddist is installed there; else into .venv-gpu (or $GDDIST_GPU_VENV), a venv
# that sees $PYTHON's packages. The table and the JUnit report go to $OUT_DIR (default $OUT,
# else gpu-checks/).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
OUT_DIR=${OUT_DIR:-${OUT:-gpu-checks}}
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "error: $PY has no torch that sees a CUDA GPU; install this machine's CUDA build of torch" \
    "(https://pytorch.org/get-started/locally/) or point PYTHON at the interpreter that has it" >&2
  exit 2
fi
if "$PY" -c 'import os, sys; sys.exit(0 if sys.prefix != sys.base_prefix or os.environ.get("CONDA_PREFIX") == sys.prefix else 1)'; then
  VPY=$PY  # already an environment of its own: install gddist into it
else
  VENV=${GDDIST_GPU_VENV:-.venv-gpu}
  [[ -x "$VENV/bin/python" ]] || "$PY" -m venv --system-site-packages "$VENV"
  VPY=$VENV/bin/python
fi
# Pin torch to the build that is there: pip fails rather than swap in another (CPU) build.
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
"$VPY" -c 'import torch; print(f"torch=={torch.__version__}")' > "$constraints"
"$VPY" -m pip install -q -c "$constraints" -e '.[dev]'

mkdir -p "$OUT_DIR"
# Deterministic cuBLAS (read when CUDA starts); the tests switch on deterministic algorithms.
export CUBLAS_WORKSPACE_CONFIG=${CUBLAS_WORKSPACE_CONFIG:-:4096:8}
start=$(date +%s)
status=0
# addopts cleared: no xdist workers sharing the GPU; -m gpu: only these checks.
"$VPY" -m pytest tests/test_gpu.py -m gpu -o addopts= --strict-markers -p no:cacheprovider -rA \
  --junitxml="$OUT_DIR/junit.xml" "$@" || status=$?
elapsed=$(( $(date +%s) - start ))

"$VPY" - "$OUT_DIR/junit.xml" "$elapsed" > "$OUT_DIR/results.md" <<'EOF'
"""The JUnit report as a Markdown table, with the machine it ran on."""
import sys
import xml.etree.ElementTree as ET

import torch
import torch.distributed

path, elapsed = sys.argv[1], sys.argv[2]
gpus = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
try:
    nccl = ".".join(map(str, torch.cuda.nccl.version()))
except Exception:  # a build without NCCL
    nccl = "n/a"
print(f"GPU checks on {gpus or 'no GPU'}: torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"NCCL {nccl}; {elapsed} s in all\n")
print("| check | result | time |")
print("|---|---|---|")
for case in ET.parse(path).getroot().iter("testcase"):
    result = "passed"
    for tag in ("failure", "error", "skipped"):
        node = case.find(tag)
        if node is not None:
            lines = (node.get("message") or "").splitlines()
            why = lines[0][:120].replace("|", "/") if lines else ""
            result = ("skipped" if tag == "skipped" else "FAILED") + (f": {why}" if why else "")
            break
    print(f"| {case.get('name')} | {result} | {float(case.get('time', 0)):.1f} s |")
EOF
cat "$OUT_DIR/results.md"
exit "$status"
