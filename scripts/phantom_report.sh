#!/usr/bin/env bash
# The phantom evaluation of README ("Edit precision on phantoms"): held-out patients, removal and
# addition of support devices and of pleural effusion, scored against their true counterfactuals.
#   direct / negative-prompt (no blend, LocalBlend from attention, LocalBlend from the noise predictions,
#   the latter also with the difference composite) and legacy: the bundled engine on ONNX Runtime,
#   50 patients from SEED0 (README's table: 1000050, patients no default was chosen on);
#   null-text (no blend, LocalBlend from attention, from the noise predictions, + composite) and plain ddim:
#   inverted on torch from the trained checkpoint the engine was exported from (null-text needs autograd;
#   ~13 s per image), edited by the engine on ONNX Runtime.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-runs/phantom/pixel}          # the checkpoint scripts/build_demo.sh exported (its last train-phantom)
OUT=${OUT:-runs/phantom-eval}
CLS=engines/phantom-demo/classifier.onnx
.venv/bin/prism-rt evaluate --model engines/phantom-demo --backend onnxruntime --classifier "$CLS" \
    --patients "${PATIENTS:-50}" --seed0 "${SEED0:-1000050}" \
    --configs direct,direct+blend,direct+noise-blend,direct+noise-blend+composite,negative-prompt,negative-prompt+blend,negative-prompt+noise-blend,negative-prompt+noise-blend+composite,legacy \
    --out "$OUT/engine"
.venv/bin/prism-rt evaluate --model engines/phantom-demo --backend onnxruntime --invert-model "$MODEL" --classifier "$CLS" \
    --patients "${PATIENTS:-50}" --seed0 "${SEED0:-1000050}" \
    --configs null-text,null-text+blend,null-text+noise-blend,null-text+noise-blend+composite,ddim --out "$OUT/null-text"
