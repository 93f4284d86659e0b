#!/usr/bin/env bash
# QuaRot + GPTQ/GPTAQ at W2A4 with the paper's settings (fake_quant/configs/llama_w2a4.yaml).
# Needs a GPU and the Hugging Face Hub. MODEL picks the model (default Llama-3-8B); extra arguments are
# passed on as overrides, e.g.  MODEL=meta-llama/Llama-2-7b-hf bash fake_quant/run_llama_w2a4.sh --offload
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL="${MODEL:-meta-llama/Meta-Llama-3-8B}"
PYTHON="${PYTHON:-.venv/bin/python}"
NAME="fake_quant-$(basename "$MODEL" | tr '[:upper:]' '[:lower:]')-w2a4"
exec "$PYTHON" -m fake_quant.main --config fake_quant/configs/llama_w2a4.yaml --model "$MODEL" --name "$NAME" "$@"
