#!/usr/bin/env bash
# GPTAQ ablations on the embedded default (W4A4): exact vs official lazy update, and an α sweep.
# Results go to results/ablations/; `make report` (run by `make report-ablations`) adds them as sections.
#   bash fake_quant/run_ablations.sh
#   ALPHAS="0 0.5" CONFIG=fake_quant/configs/embedded_w2a4.yaml bash fake_quant/run_ablations.sh
# Extra arguments are passed on to every run as overrides.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
CONFIG="${CONFIG:-fake_quant/configs/embedded_w4a4.yaml}"
OUT=results/ablations
SETTING="$(basename "$CONFIG" .yaml)"
# α = 0.25 (the official code's value) comes from this run, with GPTQ as the reference.
"$PYTHON" -m fake_quant.main --config "$CONFIG" --methods gptq,gptaq,gptaq_official --alpha 0.25 \
  --name "ablation-$SETTING-lazy-update" --results_dir "$OUT" "$@"
for alpha in ${ALPHAS:-0 0.1 0.5 1}; do
  "$PYTHON" -m fake_quant.main --config "$CONFIG" --methods gptaq --alpha "$alpha" \
    --name "ablation-$SETTING-alpha-$alpha" --results_dir "$OUT" "$@"
done
