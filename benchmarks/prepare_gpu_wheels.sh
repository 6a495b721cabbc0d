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
# what the GPU machine already has (and the heavy ones it must not take from here), and what the
# offline check never imports: hf_xet (downloads), huggingface_hub's CLI (typer, rich, …),
# pydantic. Checked (2026-12-06) by building the model, loading the torch engine and inverting with
# only torch (and its own dependencies), numpy and these wheels on the path (python -S).
rm -f "$DEST"/numpy-* "$DEST"/torch-* "$DEST"/nvidia_* "$DEST"/triton-* "$DEST"/sympy-* "$DEST"/networkx-* \
      "$DEST"/hf_xet-* "$DEST"/pydantic* "$DEST"/pygments-* "$DEST"/rich-* "$DEST"/markdown_it* "$DEST"/mdurl-* \
      "$DEST"/typer-* "$DEST"/click-* "$DEST"/shellingham-* "$DEST"/annotated_types-* "$DEST"/typing_inspection-* \
      "$DEST"/filelock-* "$DEST"/fsspec-* "$DEST"/typing_extensions-*  # these three come with torch
# the model code the check imports (found by running it with the pruned packages; see prune_wheel.py)
"$PY" benchmarks/prune_wheel.py "$DEST"/transformers-*.whl transformers/models clip auto siglip dinov2_with_registers vit_mae
"$PY" benchmarks/prune_wheel.py "$DEST"/transformers-*.whl transformers data decision distributed generation integrations \
    loss models quantizers utils  # not: cli, exporters, pipelines
"$PY" benchmarks/prune_wheel.py "$DEST"/diffusers-*.whl diffusers/pipelines stable_diffusion
du -sh "$DEST"
# the device machine takes the working tree and carried paths together up to 64 MiB
TOTAL_KB=$(( $(git ls-files -z | du -ck --files0-from=- | tail -1 | cut -f1) + $(du -sk "$DEST" | cut -f1) ))
[ "$TOTAL_KB" -le $((64 * 1024)) ] || { echo "error: checkout + $DEST = $((TOTAL_KB / 1024)) MiB, over the 64 MiB carry limit; drop wheels the check does not import" >&2; exit 2; }
echo "checkout + $DEST: $((TOTAL_KB / 1024)) MiB of 64"
