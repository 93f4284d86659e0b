#!/usr/bin/env bash
# SpinQuant + GPTQ/GPTAQ at W4A4 with the paper's settings (spinquant/configs/llama_w4a4.yaml).
# Needs a GPU and the Hugging Face Hub. MODEL picks the model (default Llama-3-8B); extra arguments are
# passed on as overrides, e.g.  MODEL=meta-llama/Llama-2-7b-hf bash spinquant/run_spinquant_w4a4.sh --offload
# A rotation trained elsewhere: --rotation_path /path/to/R.safetensors (used as is when complete).
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL="${MODEL:-meta-llama/Meta-Llama-3-8B}"
PYTHON="${PYTHON:-.venv/bin/python}"
NAME="spinquant-$(basename "$MODEL" | tr '[:upper:]' '[:lower:]')-w4a4"
exec "$PYTHON" -m spinquant.main --config spinquant/configs/llama_w4a4.yaml --model "$MODEL" --name "$NAME" "$@"
