#!/usr/bin/env bash
# GPTQ vs GPTAQ on vision transformers at W4A4 and W2A4 (FP and RTN rows included).
#   bash vit_quant/run_deit.sh                                  the shipped embedded ViT on cluttered Fashion-MNIST
#                                                               (offline, CPU; never trains: make train-embedded-vit)
#   DATA=/my/fashion-mnist bash vit_quant/run_deit.sh           same, with the four IDX files from a folder
#   DATA_PATH=/data/imagenet bash vit_quant/run_deit.sh         DeiT-S and DeiT-B on ImageNet (GPU)
#   DATA_PATH=... MODELS="deit_small_patch16_224" bash vit_quant/run_deit.sh --nsamples 256
# Extra arguments are passed on to every run as overrides. The embedded default gets Fashion-MNIST itself
# (vit_quant/get_fashion_mnist.sh) when DATA is not given.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
if [ ! -x "$PYTHON" ] && ! command -v "$PYTHON" > /dev/null; then
  echo "error: $PYTHON not found; run \`make setup\` first (or set PYTHON=/path/to/python)" >&2
  exit 1
fi
if [ -z "${DATA_PATH:-}" ]; then
  if [ -n "${DATA:-}" ]; then
    data_args=(--data_path "$DATA")
  else
    bash vit_quant/get_fashion_mnist.sh
    data_args=()
  fi
  for bits in 4 2; do
    "$PYTHON" -m vit_quant.main --config vit_quant/configs/embedded.yaml --w_bits "$bits" "${data_args[@]}" "$@"
  done
else
  for model in ${MODELS:-deit_small_patch16_224 deit_base_patch16_224}; do
    for bits in 4 2; do
      "$PYTHON" -m vit_quant.main --config vit_quant/configs/deit.yaml --model "$model" --data_path "$DATA_PATH" \
        --w_bits "$bits" "$@"
    done
  done
fi
