#!/usr/bin/env bash
# Create .venv (once) and install prism-rt with the torch backend, DICOM support and test tools.
# torch is pinned to the CPU wheel here; on a CUDA machine install the torch you want first.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
    .venv/bin/python -m pip install --quiet "torch==2.13.0"
fi
.venv/bin/python -m pip install --quiet -e ".[torch,export,dicom,dev,bench,embed]"
