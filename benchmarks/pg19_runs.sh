#!/usr/bin/env bash
# The 20m language-model runs of docs/results.md §2: train each model on pg19-mini with the same
# tokens, data order and schedule, then evaluate it. Resumable: a call continues where the last
# one stopped (an unfinished run resumes from its last checkpoint, finished runs and evaluations
# are skipped), so the same command can be repeated until it prints "all done".
#
#   bash benchmarks/pg19_runs.sh DATA RUNS [MODEL ...]      # default: the five models below
#
# DATA holds pg19-mini/, wikitext/, ruler_niah/ and lambada_openai/ (laid out as ../shared/data).
# Environment (defaults): STEPS (1200), BATCH (8), SEED (0), SIZE (20m), LR (the config's),
# EVAL_BYTES (1000000: the first bytes of pg19-mini's validation and test splits),
# LAMBADA (1000 examples), NIAH_SAMPLES (3 per task and length),
# EVALS (which evaluations, in order; default "val test wikitext lambada niah": a learning-rate
# sweep needs only "val"), STOP_AT (a Unix time: no job starts after it; default never), DEVICE (gpu).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
DATA=${1:?usage: pg19_runs.sh DATA RUNS [MODEL ...]}
RUNS=${2:?usage: pg19_runs.sh DATA RUNS [MODEL ...]}
shift 2
MODELS=("$@")
[ ${#MODELS[@]} -gt 0 ] || MODELS=(gated_deltanet moneta yaad memora transformer)
STEPS=${STEPS:-1200} BATCH=${BATCH:-8} SEED=${SEED:-0} SIZE=${SIZE:-20m}
EVAL_BYTES=${EVAL_BYTES:-1000000} LAMBADA=${LAMBADA:-1000} NIAH_SAMPLES=${NIAH_SAMPLES:-3}
STOP_AT=${STOP_AT:-9999999999} DEVICE=${DEVICE:-gpu}
ALL_EVALS="val test wikitext lambada niah"          # the cases of the evaluation loop below
EVALS=${EVALS:-$ALL_EVALS}
for name in $EVALS; do
  [[ " $ALL_EVALS " == *" $name "* ]] || { echo "pg19_runs.sh: unknown evaluation '$name' in EVALS" >&2; exit 2; }
done
PY=${PYTHON:-python3}
MS=("$PY" -m mirascore)

time_left() { [ "$(date +%s)" -lt "$STOP_AT" ]; }

# eval NAME ARGS...: one evaluation's JSON into $run/eval-NAME.json, once
evaluate() {
  local name=$1; shift
  local file="$run/eval-$name.json"
  [ -s "$file" ] && return 0
  time_left || return 1
  echo "== $(date +%T) $model: eval $name"
  local t0=$SECONDS
  if "${MS[@]}" eval "$run" --device "$DEVICE" --json "$@" > "$file.part"; then
    mv "$file.part" "$file"
    echo "   $(cat "$file") ($((SECONDS - t0)) s)"
  else
    echo "   eval $name failed" >&2; rm -f "$file.part"; return 1
  fi
}

all_done=1
for model in "${MODELS[@]}"; do
  run="$RUNS/$model-$SIZE-s$SEED"
  if [ ! -e "$run/trained" ]; then
    time_left || { all_done=0; break; }
    resume=()
    if [ -d "$run/checkpoint" ]; then resume=(--resume)
    elif [ -e "$run" ]; then rm -rf "$run"; fi      # stopped before its first checkpoint: nothing to keep
    sets=(batch="$BATCH" warmup=$((STEPS / 10)) eval_every=100 eval_batches=8 checkpoint_every=50 log_every=10
          tf32=true)       # (tf32 is ignored on the CPU)
    [ -n "${LR:-}" ] && sets+=(lr="$LR")
    echo "== $(date +%T) $model: train ${resume[*]}"
    "${MS[@]}" train "models/$model-$SIZE.toml" --device "$DEVICE" --data "$DATA/pg19-mini" --out "$run" \
      --steps "$STEPS" --seed "$SEED" --quiet "${resume[@]}" --set "${sets[@]}" || { all_done=0; continue; }
    touch "$run/trained"
  fi
  for name in $EVALS; do
    case $name in
      val)      evaluate val --task bpb --data "$DATA/pg19-mini" --split validation --max-bytes "$EVAL_BYTES" ;;
      test)     evaluate test --task bpb --data "$DATA/pg19-mini" --split test --max-bytes "$EVAL_BYTES" ;;
      wikitext) evaluate wikitext --task bpb --data "$DATA/wikitext/wikitext-2-raw-test.raw" --split all ;;
      lambada)  evaluate lambada --task lambada --data "$DATA/lambada_openai" --samples "$LAMBADA" ;;
      niah)     evaluate niah --task niah --data "$DATA/ruler_niah" --samples "$NIAH_SAMPLES" ;;
    esac || { all_done=0; break; }
  done
done
[ "$all_done" = 1 ] && echo "all done" || echo "not done: call again"
