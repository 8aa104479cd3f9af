#!/usr/bin/env bash
# One short call on a lent GPU machine: the original side by side on the GPU, then the GPU report.
#
#   bash benchmarks/gpu_session.sh OUT_DIR [PATH_TO_A_DETR_CLONE]
#   DRY_RUN=1 bash benchmarks/gpu_session.sh /tmp/out PATH      # the same steps on the CPU, tiny model
#
# Side by side first (a minute): inference at batch 1 and 8 and a training step at batch 2, each with
# the original's code and this project's in one process, fp32 and bf16 autocast, modes interleaved.
# Then benchmarks/gpu_report.py with GPU_REPORT_BUDGET_S (default 300 s). Every step writes its JSON
# and log into OUT_DIR (8 files at most: what a device call brings back); a failing step does not
# stop the ones after it.
set -u
out=${1:?usage: gpu_session.sh OUT_DIR [PATH_TO_A_DETR_CLONE]}
original=${2:-}
cd "$(dirname "$0")/.."
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if [ "${DRY_RUN:-0}" = 1 ]; then
    device=(--device cpu --quick); report=(--device cpu --quick); rounds=(--warmup 0 --repeats 1)
else
    device=(--device cuda); report=(); rounds=(--warmup 3 --repeats 15)
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.draw --format=csv
fi
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"

if [ -n "$original" ]; then
    {
        timeout 120 python3 benchmarks/bench_vs_original.py --original "$original" "${device[@]}" "${rounds[@]}" \
            --amp bf16 --out "$out/vs_original_b1.json"
        timeout 120 python3 benchmarks/bench_vs_original.py --original "$original" "${device[@]}" "${rounds[@]}" \
            --amp bf16 --batch 8 --out "$out/vs_original_b8.json"
        timeout 150 python3 benchmarks/bench_vs_original.py --original "$original" "${device[@]}" "${rounds[@]}" \
            --amp bf16 --train --batch 2 --out "$out/vs_original_train_b2.json"
    } 2>&1 | tee "$out/vs_original.log"
fi

python3 benchmarks/gpu_report.py "${report[@]}" --out-dir "$out" --budget-s "${GPU_REPORT_BUDGET_S:-300}" \
    2>&1 | tee "$out/gpu_report.log"
