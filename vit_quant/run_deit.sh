#!/usr/bin/env bash
# GPTQ vs GPTAQ on vision transformers at W4A4 and W2A4 (FP and RTN rows included).
#   bash vit_quant/run_deit.sh                                  embedded Fashion-MNIST ViT (offline, CPU)
#   DATA_PATH=/data/imagenet bash vit_quant/run_deit.sh         DeiT-S and DeiT-B on ImageNet (GPU)
#   DATA_PATH=... MODELS="deit_small_patch16_224" bash vit_quant/run_deit.sh --nsamples 256
# Extra arguments are passed on to every run as overrides.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
if [ -z "${DATA_PATH:-}" ]; then
  for bits in 4 2; do
    "$PYTHON" -m vit_quant.main --config vit_quant/configs/embedded.yaml --w_bits "$bits" "$@"
  done
else
  for model in ${MODELS:-deit_small_patch16_224 deit_base_patch16_224}; do
    for bits in 4 2; do
      "$PYTHON" -m vit_quant.main --config vit_quant/configs/deit.yaml --model "$model" --data_path "$DATA_PATH" \
        --w_bits "$bits" "$@"
    done
  done
fi
