#!/usr/bin/env bash
# The training-step benchmark on one GPU, with its PyTorch anchors (docs/benchmarks.md, "Training step").
# From the repository root of a checkout that carries .anchors/ (a copy of ../shared/anchors, git-ignored):
#   bash benchmarks/run_train_step_gpu.sh [more train_step.py flags]     # JSON in ${OUT:-.}/train_step.json
# Installs FLA from .anchors/wheels offline into $ANCHORS_SITE (default /tmp/site), as
# ../shared/anchors/anchors_gpu.sh does (pip --no-index --no-deps --target; the wheels are pure Python,
# so unzipping them is the fallback), then runs train_step.py: 20m at batch 16 and 120m at batch 8
# (context 2048), fp32 and TF32, torch fp32 / TF32 / bf16, rows not started after 300 s skipped.
# Flags given here come after these defaults, so they win (e.g. --time-limit 540, --sizes 120m).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
SITE="${ANCHORS_SITE:-/tmp/site}"
shopt -s nullglob
WHEELS=(.anchors/wheels/fla_core-*.whl .anchors/wheels/packaging-*.whl)
if [ "${#WHEELS[@]}" -gt 0 ]; then
  mkdir -p "$SITE"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${WHEELS[@]}" \
    || for w in "${WHEELS[@]}"; do "$PY" -m zipfile -e "$w" "$SITE"; done
else
  echo "run_train_step_gpu.sh: no .anchors/wheels here: the torch Gated DeltaNet rows will be skipped" >&2
fi
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-/tmp/triton_cache}"    # $HOME may be read-only there
export CUPY_CACHE_DIR="${CUPY_CACHE_DIR:-/tmp/cupy_cache}"
exec "$PY" benchmarks/train_step.py --device gpu --tf32 --batch 20m=16,120m=8 --context 2048 \
  --time-limit 300 --json "${OUT:-.}/train_step.json" "$@"
