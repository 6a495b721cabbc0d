#!/usr/bin/env bash
# The main job on the bundled default: set up, build the tiny SD-v1.5-layout model (random
# weights: it shows the pipeline, not a meaningful edit), and edit the real radiograph
# RG1_UNCR.dcm (pydicom-data) with PRISM's settings: null-text inversion, refine + reweight,
# LocalBlend, the five-value self-window sweep in one batch. Outputs land in out/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
MODEL=engines/tiny-sd
if [ ! -f "$MODEL/model_index.json" ]; then
    rm -rf "$MODEL"
    .venv/bin/prism-export tiny-model --out "$MODEL"
fi
DICOM=$(.venv/bin/python -c "import data_store, pathlib; print(pathlib.Path(data_store.__file__).parent / 'data' / 'RG1_UNCR.dcm')")
.venv/bin/prism-rt edit --model "$MODEL" --image "$DICOM" \
    --prompt "Chest X-ray showing Support Devices" \
    --target "Chest X-ray showing No Finding" \
    --blend-words Devices,Finding \
    --inversion null-text --out "${1:-out/demo}"
