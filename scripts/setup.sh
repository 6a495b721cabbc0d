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
.venv/bin/python -m pip install --quiet -e ".[torch,export,dicom,dev,bench,embed,ray]"
# prism-rt serve (the 'serve' extra's packages): nvidia-pytriton 0.7 pins numpy<2 for its Python stub
# only, and `.[serve]` would downgrade this environment's numpy; so it is installed without its pins,
# its other requirements named here, and the stub gets its own numpy<2 environment (.venv/triton-stub)
.venv/bin/python -m pip install --quiet "tritonclient[http,grpc]>=2.40" "pyzmq>=23" "sh>=1.14" "typing_inspect>=0.6" \
    "wrapt>=1.11" "typer>=0.9" "importlib_metadata>=7.0.1" "grpcio>=1.64.3" "protobuf>=3.7"
.venv/bin/python -m pip install --quiet --no-deps "nvidia-pytriton>=0.7"
[ -x .venv/triton-stub/bin/python ] || scripts/triton_stub_env.sh .venv/triton-stub
