#!/usr/bin/env bash
# The prepared GPU check (issue 27 §3). On a CUDA machine with torch but without diffusers or
# network:
#     bash benchmarks/gpu_check.sh OUT_DIR
# It installs the wheels prepared beforehand by `bash benchmarks/prepare_gpu_wheels.sh` (folder
# build/gpu-wheels, carried to the machine: diffusers, transformers, tokenizers, …;
# prepare_gpu_wheels.sh refuses a set that, with the checkout, passes the 64 MiB carry limit)
# into a venv
# that sees the machine's torch, then runs prism_bench.gpu_check from this checkout (no build
# step), writing OUT_DIR/gpu_check.json and OUT_DIR/gpu_check.md within 8 minutes (killed at 470 s
# of the 10-minute command limit; the JSON is saved after every stage).
#
# Dry run, on any CPU, in the test suite (tiny model, 2 steps, no venv, no wheels):
#     PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh OUT_DIR --dry      (or PRISM_GPU_CHECK_DRY=1)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR [--dry] [prism_bench.gpu_check options]}
shift
export PYTHONPATH="$PWD:$PWD/export:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
DRY=${PRISM_GPU_CHECK_DRY:-0}
for arg in "$@"; do [ "$arg" = "--dry" ] && DRY=1; done
if [ "$DRY" = 1 ]; then
    export PRISM_GPU_CHECK_DRY=1
    exec "${PYTHON:-python3}" -m prism_bench.gpu_check "$OUT" "$@"
fi
WHEELS=${PRISM_GPU_WHEELS:-build/gpu-wheels}
[ -d "$WHEELS" ] || { echo "error: $WHEELS is missing: run bash benchmarks/prepare_gpu_wheels.sh first" >&2; exit 2; }
VENV=${TMPDIR:-/tmp}/prism-gpu-venv
python3 -m venv --system-site-packages "$VENV"
"$VENV/bin/python" -m pip install --quiet --no-index --no-deps "$WHEELS"/*.whl
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
exec timeout 470 "$VENV/bin/python" -m prism_bench.gpu_check "$OUT" "$@"
