#!/usr/bin/env bash
# Rebuild the bundled demo engine engines/phantom-demo from nothing, on a CPU: train the phantom
# model (seeded, with word grounding: --attention-loss; about 75 min on one core), fine-tune its
# UNet and text encoder with the pixel-level grounding loss (--attention-pixel-loss; about 13 min),
# then export it with LocalBlend's maps at the latent's own size (--blend-downsample 1) and its
# int8-cpu variant calibrated on phantom patients, and bundle the attribute classifier, held-out
# phantom images (with masks and true counterfactuals) and demo.json.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
WORK=${WORK:-runs/phantom}
if [ ! -f "$WORK/model/model_index.json" ]; then
    rm -rf "$WORK/model"
    .venv/bin/prism-export train-phantom --out "$WORK/model" --seed 0 --attention-loss 0.1
fi
if [ ! -f "$WORK/pixel/model_index.json" ]; then
    rm -rf "$WORK/pixel"
    .venv/bin/prism-export train-phantom --out "$WORK/pixel" --seed 0 --vae-from "$WORK/model" \
        --unet-from "$WORK/model" --attention-loss 0.1 --attention-pixel-loss 1.0 --unet-steps 600 --unet-lr 3e-4
fi
rm -rf engines/phantom-demo
.venv/bin/prism-export bundle-demo --model "$WORK/pixel" --out engines/phantom-demo --blend-downsample 1
du -sh engines/phantom-demo
