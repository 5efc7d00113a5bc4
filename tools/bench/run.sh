#!/usr/bin/env bash
# ldm-rs vs PyTorch/diffusers on CPU: SD1.5 UNet CFG step at 512² and SD VAE decode to 512², random weights, f32.
#
#   tools/bench/run.sh                      # LDM_BENCH_RUNS=3 timed runs after 1 warm-up, 2 threads
#   LDM_BENCH_RUNS=1 tools/bench/run.sh     # quicker
#   LDM_BENCH_THREADS=4 tools/bench/run.sh  # other thread count (both sides)
#
# Each workload runs in its own process (so peak RSS is per workload), ours then torch, UNet first, then VAE.
# Python: /opt/ldmvenv if it exists, else tools/bench/.venv (created here with torch, diffusers, transformers).
# Logs go to ${LDM_BENCH_LOGDIR:-tools/bench/.out}; the last lines printed are the side-by-side table.
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
cargo bench -p ldm-pipeline --bench sd15 --no-run 2>&1 | tail -1

: > "$logdir/results.txt"
for w in unet vae; do
    echo "== ldm-rs $w   (load average: $(cut -d' ' -f1-3 /proc/loadavg))"
    cargo bench -q -p ldm-pipeline --bench sd15 -- "$w" 2>&1 | tee "$logdir/ours_$w.log"
    grep '^RESULT' "$logdir/ours_$w.log" >> "$logdir/results.txt"
    echo "== torch $w   (load average: $(cut -d' ' -f1-3 /proc/loadavg))"
    "$py" tools/bench/torch_sd15.py "$w" 2>&1 | tee "$logdir/torch_$w.log"
    grep '^RESULT' "$logdir/torch_$w.log" >> "$logdir/results.txt"
done
echo "== done   (load average: $(cut -d' ' -f1-3 /proc/loadavg))"

# Side by side: median seconds and peak RSS, ours / torch.
awk '
/^RESULT/ {
    for (i = 2; i <= NF; i++) { split($i, kv, "="); f[kv[1]] = kv[2] }
    key = f["workload"]; impl = f["impl"]
    med[key, impl] = f["median_s"]; rss[key, impl] = f["peak_rss_mib"]; runs[key] = f["runs"]
    if (!(key in seen)) { seen[key] = 1; order[++n] = key }
}
END {
    printf "\n%-14s %5s %10s %10s %8s %12s %12s %8s\n", "workload", "runs", "ours_s", "torch_s", "ratio", "ours_RSS_MiB", "torch_RSS_MiB", "ratio"
    for (i = 1; i <= n; i++) {
        k = order[i]
        printf "%-14s %5s %10.2f %10.2f %8.2f %12.0f %12.0f %8.2f\n", k, runs[k], med[k, "ldm-rs"], med[k, "torch"],
            med[k, "ldm-rs"] / med[k, "torch"], rss[k, "ldm-rs"], rss[k, "torch"], rss[k, "ldm-rs"] / rss[k, "torch"]
    }
}' "$logdir/results.txt"
