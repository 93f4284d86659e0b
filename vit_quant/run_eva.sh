#!/usr/bin/env bash
# GPTQ vs GPTAQ on EVA-02 large (448 px) at W4A4 and W2A4 on ImageNet (GPU):
#   DATA_PATH=/data/imagenet bash vit_quant/run_eva.sh [overrides...]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
: "${DATA_PATH:?set DATA_PATH to an ImageNet root holding train/ and val/ (ImageFolder layout)}"
for bits in 4 2; do
  "$PYTHON" -m vit_quant.main --config vit_quant/configs/eva.yaml --data_path "$DATA_PATH" --w_bits "$bits" "$@"
done
