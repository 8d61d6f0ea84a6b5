#!/usr/bin/env bash
# Train and export every shipped model in sequence on CPU (what `make train-<model>` / `export-<model>` run).
#   training/run_all.sh                      # all four, data from ../shared/data, model_store/<name>/1
#   MODELS="mask-refiner" VERSION=2 STEPS=100 OVERWRITE=1 DATA_ROOT=/data training/run_all.sh
# Each config's train.steps is the step count the shipped version was trained for; a run resumes from
# runs/<name>/latest.pt when it exists (delete runs/<name> for a fresh run).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DATA_ROOT=${DATA_ROOT:-../shared/data}
VERSION=${VERSION:-1}
MODELS=${MODELS:-"mask-refiner renderer-he-nuclei renderer-he-glands renderer-ihc"}
for model in $MODELS; do
  echo "== $model: train"
  "$PY" -m training.train --config "training/configs/$model.yaml" --data-root "$DATA_ROOT" --out "runs/$model" \
    ${STEPS:+--steps "$STEPS"} ${TIME_BUDGET:+--time-budget "$TIME_BUDGET"}
  echo "== $model: export"
  "$PY" -m training.export --config "training/configs/$model.yaml" --checkpoint "runs/$model/latest.pt" \
    --version "$VERSION" --data-root "$DATA_ROOT" ${OVERWRITE:+--overwrite}
done
