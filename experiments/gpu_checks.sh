#!/usr/bin/env bash
# The prepared GPU run (issue 7, point 3): every check that needs a GPU, in one command, so a
# session lent one spends minutes, not its whole budget.
#
#   make gpu-wheels                  # here, once: pyro-ppl and pyro-api wheels into .whl/
#   bash experiments/gpu_checks.sh   # there (device tool: carry [".whl"], timeout_s 600)
#
# Results land in $OUT (the device tool's folder; runs/gpu-checks elsewhere): the ltm-s speed
# benchmark compiled (h200.json/.md, the figures) and eager (eager.json/.md, the
# before/after of --compile), a compiled end-to-end run of the main job and one under torchrun
# (their output in log.txt). Each step is bounded by its own timeout (560 s in all) and a
# failed step does not stop the next.
# DEVICE/PRESET/BATCH/SEQ_LEN/NAME override the defaults, e.g. a CPU dry run of this script:
#   DEVICE=cpu PRESET=tiny BATCH=2 SEQ_LEN=64 NAME=dry-run bash experiments/gpu_checks.sh
set -uo pipefail
out=${OUT:-runs/gpu-checks}
device=${DEVICE:-cuda}
python=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
    $python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/ltm-site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/ltm-site
fi
log="$out/log.txt"
step() {  # step NAME SECONDS COMMAND...: run one check, log it, never stop the script
    local name=$1 limit=$2
    shift 2
    echo "=== $name ($(date -u +%FT%TZ))" | tee -a "$log"
    timeout "$limit" "$@" 2>&1 | tee -a "$log"
    echo "=== $name: exit ${PIPESTATUS[0]}" | tee -a "$log"
}
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version \
    --format=csv | tee -a "$log"
bench=(experiments/bench_speed.py --preset "${PRESET:-ltm-s}" --batch-size "${BATCH:-16}"
       --seq-len "${SEQ_LEN:-1024}" --inference-steps 16 --device "$device")
step "bench_speed, compiled" 280 $python "${bench[@]}" --compile --json "$out/${NAME:-h200}.json"
step "bench_speed, eager" 100 $python "${bench[@]}" --json "$out/eager.json"
short=(--max-steps 6 --eval-every 3 --eval-windows 8 --checkpoint-every 3 --no-progress)
step "run_svi, compiled" 90 $python experiments/run_svi.py --out "$out/run" --device "$device" \
    --compile "${short[@]}"
step "run_svi under torchrun (one process; NCCL on a GPU)" 90 $python -m torch.distributed.run \
    --standalone --nproc_per_node=1 experiments/run_svi.py --out "$out/ddp" --device "$device" \
    "${short[@]}"
rm -rf "$out/run" "$out/ddp"  # each run checks its own files; only the log comes back
