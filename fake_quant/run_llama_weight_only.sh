#!/usr/bin/env bash
# Weight-only GPTQ/GPTAQ with the paper-scale settings (fake_quant/configs/llama_w<BITS>_weight_only.yaml),
# exported in EXPORT_FORMAT (gptq, gptq_v2 or compressed-tensors; default gptq) under
# results/<format>/<model>-w<BITS>/ and evaluated again from them.
# Needs a GPU and the Hugging Face Hub.
# Usage: [EXPORT_FORMAT=...] MODEL=<hub id> bash fake_quant/run_llama_weight_only.sh w4|w3 [overrides]
set -euo pipefail
cd "$(dirname "$0")/.."
PRECISION="${1:?give w4 or w3}"
shift
MODEL="${MODEL:-meta-llama/Meta-Llama-3-8B}"
PYTHON="${PYTHON:-.venv/bin/python}"
LABEL="$(basename "$MODEL" | tr '[:upper:]' '[:lower:]')-$PRECISION"
FORMAT="${EXPORT_FORMAT:-gptq}"
CONFIG="fake_quant/configs/llama_${PRECISION}_weight_only.yaml"
"$PYTHON" -m fake_quant.main --config "$CONFIG" --model "$MODEL" --name "fake_quant-$LABEL" \
    --export_format "$FORMAT" --export_gptq "results/$FORMAT/$LABEL" "$@"
exec "$PYTHON" -m fake_quant.main --config "$CONFIG" --model "$MODEL" --name "fake_quant-$LABEL" \
    --export_format "$FORMAT" --load_gptq "results/$FORMAT/$LABEL" "$@"
