#!/usr/bin/env bash
# ldm-rs vs PyTorch/diffusers on CPU: one training step (forward + ε-MSE + backward, and + AdamW) of the small
# LDM UNet of issue 4 (model_channels 64, mult (1,2,2), 2 res blocks, cross-attention at levels 1,2; batch 8 of
# 4x32x32 latents, context 8x64), random weights, f32.
#
#   tools/bench/train_step.sh                      # LDM_BENCH_RUNS=3 timed steps after 1 warm-up, 2 threads
#   LDM_BENCH_RUNS=5 tools/bench/train_step.sh     # more runs
#   LDM_BENCH_THREADS=4 tools/bench/train_step.sh  # other thread count (both sides)
#
# Ours runs first, then torch, each in its own process. Python: /opt/ldmvenv if it exists, else
# tools/bench/.venv (created here with torch and diffusers). Logs go to ${LDM_BENCH_LOGDIR:-tools/bench/.out};
# the last lines printed are the side-by-side table (median seconds, ours / torch).
set -euo pipefail
cd "$(dirname "$0")/../.."
export LDM_BENCH_RUNS="${LDM_BENCH_RUNS:-3}"
export LDM_BENCH_THREADS="${LDM_BENCH_THREADS:-2}"
logdir="${LDM_BENCH_LOGDIR:-tools/bench/.out}"
mkdir -p "$logdir"

if [[ -x /opt/ldmvenv/bin/python ]]; then
    py=/opt/ldmvenv/bin/python
else
    venv=tools/bench/.venv
    if [[ ! -x "$venv/bin/python" ]]; then
        python3 -m venv "$venv"
        "$venv/bin/pip" install --quiet torch diffusers transformers
    fi
    py="$venv/bin/python"
fi

echo "== machine: $(lscpu | sed -n 's/^Model name: *//p' | head -1), $(nproc) CPUs visible; avx2: $(grep -qw avx2 /proc/cpuinfo && echo yes || echo no), avx512f: $(grep -qw avx512f /proc/cpuinfo && echo yes || echo no)"
echo "== $(date -u +%Y-%m-%dT%H:%MZ) runs=$LDM_BENCH_RUNS threads=$LDM_BENCH_THREADS python=$py"
echo "== building (release) ..."
cargo bench -p ldm-train --bench train_step --no-run 2>&1 | tail -1

echo "== ldm-rs train_step   (load average: $(cut -d' ' -f1-3 /proc/loadavg))"
cargo bench -q -p ldm-train --bench train_step 2>&1 | tee "$logdir/ours_train_step.log"
echo "== torch train_step   (load average: $(cut -d' ' -f1-3 /proc/loadavg))"
"$py" tools/bench/train_step.py 2>&1 | tee "$logdir/torch_train_step.log"
echo "== done   (load average: $(cut -d' ' -f1-3 /proc/loadavg))"

cat "$logdir/ours_train_step.log" "$logdir/torch_train_step.log" | grep '^RESULT' > "$logdir/train_step_results.txt"
awk '
/^RESULT/ {
    for (i = 2; i <= NF; i++) { split($i, kv, "="); f[kv[1]] = kv[2] }
    key = f["workload"]; impl = f["impl"]
    med[key, impl] = f["median_s"]; runs[key] = f["runs"]
    if (!(key in seen)) { seen[key] = 1; order[++n] = key }
}
END {
    printf "\n%-18s %5s %10s %10s %8s\n", "workload", "runs", "ours_s", "torch_s", "ratio"
    for (i = 1; i <= n; i++) {
        k = order[i]
        printf "%-18s %5s %10.3f %10.3f %8.2f\n", k, runs[k], med[k, "ldm-rs"], med[k, "torch"], med[k, "ldm-rs"] / med[k, "torch"]
    }
}' "$logdir/train_step_results.txt"
