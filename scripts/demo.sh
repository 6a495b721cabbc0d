#!/usr/bin/env bash
# The main job on the bundled default: set up, then `prism-rt demo` on engines/phantom-demo (a
# small SD-v1.5-layout model trained here on phantom chest radiographs): invert a held-out phantom
# patient on ONNX Runtime, remove its support devices with PRISM's settings (refine + reweight, the
# five self-window values in one batch), pick the value with the bundled classifier, and write
# the counterfactuals, result.json and figure.png to out/demo/ (or the folder given).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/prism-rt demo --out "${1:-out/demo}"
