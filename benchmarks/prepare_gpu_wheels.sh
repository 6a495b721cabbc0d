#!/usr/bin/env bash
# Fill build/gpu-wheels with what benchmarks/gpu_check.sh installs on a GPU machine that has torch
# and numpy but no network: pure-Python / abi3 wheels of the model libraries and their small
# dependencies (torch, numpy and the CUDA stack are left out: the machine has its own). Run it
# here, then carry build/gpu-wheels to the GPU machine. The check edits a synthetic image
# (random weights): no pydicom and no DICOM file to carry.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=build/gpu-wheels
rm -rf "$DEST" && mkdir -p "$DEST"
PY=${PYTHON:-.venv/bin/python}
"$PY" -m pip download --quiet --dest "$DEST" --only-binary=:all: \
    "diffusers==$("$PY" -c 'import diffusers; print(diffusers.__version__)')" \
    "transformers==$("$PY" -c 'import transformers; print(transformers.__version__)')" \
    tokenizers safetensors array-api-compat
# what the GPU machine already has (and the heavy ones it must not take from here); hf_xet and
# kernels are optional downloaders / kernel hubs the offline check never imports
rm -f "$DEST"/numpy-* "$DEST"/torch-* "$DEST"/nvidia_* "$DEST"/triton-* "$DEST"/sympy-* "$DEST"/networkx-* \
      "$DEST"/hf_xet-* "$DEST"/kernels-*
du -sh "$DEST"
# the device machine takes the working tree and carried paths together up to 64 MiB
TOTAL_KB=$(( $(git ls-files -z | du -ck --files0-from=- | tail -1 | cut -f1) + $(du -sk "$DEST" | cut -f1) ))
[ "$TOTAL_KB" -le $((64 * 1024)) ] || { echo "error: checkout + $DEST = $((TOTAL_KB / 1024)) MiB, over the 64 MiB carry limit; drop wheels the check does not import" >&2; exit 2; }
echo "checkout + $DEST: $((TOTAL_KB / 1024)) MiB of 64"
