#!/usr/bin/env bash
# One short call on a lent GPU machine: side by side with the original on the GPU, then the GPU report.
#
#   bash benchmarks/gpu_session.sh OUT_DIR [PATH_TO_A_DETR_CLONE]     # clone default: .orig/detr_clone
#   DRY_RUN=1 bash benchmarks/gpu_session.sh /tmp/out                 # the same steps on the CPU, tiny model
#
# Side by side first: inference at batch 1 and 8 and a training step at batch 2, the original's code
# and this project's in one process, fp32 and bf16 autocast, modes interleaved. Then gpu_report.py
# with GPU_REPORT_BUDGET_S (default 240 s). Every step writes its JSON and log into OUT_DIR (7 files:
# fewer than a device call brings back); a failing step does not stop the ones after it.
set -u
out=${1:?usage: gpu_session.sh OUT_DIR [PATH_TO_A_DETR_CLONE]}
cd "$(dirname "$0")/.."
original=${2:-.orig/detr_clone}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if [ "${DRY_RUN:-0}" = 1 ]; then
    device=(--device cpu --quick); report=(--device cpu --quick); rounds=(--warmup 0 --repeats 1)
else
    device=(--device cuda); report=(); rounds=(--warmup 3 --repeats 15)
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.draw --format=csv
fi

if [ -d "$original" ]; then
    {
        timeout 100 python3 benchmarks/bench_vs_original.py --original "$original" "${device[@]}" "${rounds[@]}" \
            --amp bf16 --out "$out/vs_original_b1.json"
        timeout 100 python3 benchmarks/bench_vs_original.py --original "$original" "${device[@]}" "${rounds[@]}" \
            --amp bf16 --batch 8 --out "$out/vs_original_b8.json"
        timeout 120 python3 benchmarks/bench_vs_original.py --original "$original" "${device[@]}" "${rounds[@]}" \
            --amp bf16 --train --batch 2 --out "$out/vs_original_train_b2.json"
    } 2>&1 | tee "$out/vs_original.log"
else
    echo "no DETR clone at $original: side by side skipped" | tee "$out/vs_original.log"
fi

python3 benchmarks/gpu_report.py "${report[@]}" --out-dir "$out" --budget-s "${GPU_REPORT_BUDGET_S:-240}" \
    2>&1 | tee "$out/gpu_report.log"
