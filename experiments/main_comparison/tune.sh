#!/usr/bin/env bash
# Issue 42, phase 1: equal tuning. Every family is trained for one epoch of PTB (454 slow steps
# of 16 windows of 128 tokens) at each point of the same slow learning-rate grid (peak lr, cosine
# to a tenth, 45 warm-up steps) with seed 0, and scored on the whole valid split by iwae_ppl
# (K 16) at T_eval 4 (the no-inference ablation fitted like the LTM). Two jobs at a time, one
# thread each; a job whose JSON exists is skipped, so the same command resumes.
#
#   bash experiments/main_comparison/tune.sh        # from the repository root
set -euo pipefail
RUNS=${RUNS:-runs/main/tune}
OUT=${OUT:-experiments/results/main/tuning}
DATA=${DATA:-../shared/data/ptb}
PY=${PY:-.venv/bin/python}
LRS=${LRS:-"1e-3 3e-3 1e-2"}
mkdir -p "$RUNS" "$OUT"
export OMP_NUM_THREADS=1

declare -A FAMILY=(
  [ltm]=""
  [ltm-no-inference]="--inference-steps 0 --init-log-var 0 --init-loc-scale 0"
  [ar-window]="--model ar --match-params"
  [ar-full]="--model ar --match-params --window 0"
)
COMMON="--data $DATA --preset tiny --d-model 128 --seq-len 128 --window 32 --inference-steps 4
  --max-steps 454 --warmup-steps 45 --eval-every 227 --eval-windows 576 --seed 0 --no-progress"

jobs() {  # the LTM first: it is the longest
  for family in ltm ltm-no-inference ar-window ar-full; do
    for lr in $LRS; do echo "$family $lr"; done
  done
}

one() {
  local family=$1 lr=$2 name="$1@lr$2"
  [ -s "$OUT/$name.json" ] && return 0
  local eval_steps=()
  [[ $family == ltm* ]] && eval_steps=(--inference-steps 4)
  # shellcheck disable=SC2086
  $PY experiments/run_svi.py $COMMON ${FAMILY[$family]} --slow-lr "$lr" \
    --out "$RUNS/$name" > "$RUNS/$name.log" 2>&1
  $PY experiments/evaluate.py --checkpoint "$RUNS/$name" --split valid "${eval_steps[@]}" \
    --iw-samples 16 --prior-samples 0 --no-progress --json "$OUT/$name.json" >> "$RUNS/$name.log" 2>&1
}
export -f one
export RUNS OUT PY COMMON
export FAMILY_DEF="$(declare -p FAMILY)"
jobs | xargs -P 2 -L 1 bash -c 'eval "$FAMILY_DEF"; one "$@"' _
