#!/usr/bin/env bash
# Rebuild the bundled demo engine engines/phantom-demo from nothing, on a CPU: train the phantom
# model (seeded, with word grounding: --attention-loss; about 75 min on one core), then export it
# with its int8-cpu variant calibrated on phantom patients, and bundle the attribute classifier,
# held-out phantom images (with masks and true counterfactuals) and demo.json.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
WORK=${WORK:-runs/phantom}
if [ ! -f "$WORK/model/model_index.json" ]; then
    rm -rf "$WORK/model"
    .venv/bin/prism-export train-phantom --out "$WORK/model" --seed 0 --attention-loss 0.1
fi
rm -rf engines/phantom-demo
.venv/bin/prism-export bundle-demo --model "$WORK/model" --out engines/phantom-demo
du -sh engines/phantom-demo
