#!/usr/bin/env bash
# The prepared GPU check (issue: benchmark suite). On a CUDA machine with torch but without
# diffusers or network:
#     bash benchmarks/gpu_check.sh OUT_DIR
# It installs the wheels prepared beforehand by `bash benchmarks/prepare_gpu_wheels.sh` (folder
# build/gpu-wheels: diffusers, transformers, tokenizers, pydicom, … and RG1_UNCR.dcm) into a venv
# that sees the machine's torch, then runs prism_bench.gpu_check from this checkout (no build step),
# writing OUT_DIR/gpu_check.json within 8 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR}
WHEELS=${PRISM_GPU_WHEELS:-build/gpu-wheels}
[ -d "$WHEELS" ] || { echo "error: $WHEELS is missing: run bash benchmarks/prepare_gpu_wheels.sh first" >&2; exit 2; }
VENV=${TMPDIR:-/tmp}/prism-gpu-venv
python3 -m venv --system-site-packages "$VENV"
"$VENV/bin/python" -m pip install --quiet --no-index --no-deps "$WHEELS"/*.whl
export PYTHONPATH="$PWD:$PWD/export:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
exec timeout 470 "$VENV/bin/python" -m prism_bench.gpu_check "$OUT" --image "$WHEELS/RG1_UNCR.dcm"
