#!/usr/bin/env bash
# Peak RSS and wall time of the SD first-stage decode (KL-f8, random weights unless LDM_VAE_WEIGHTS names a
# single-file checkpoint) at 1024² and 2048², whole and tiled in both modes (TileConfig::default(): 64-latent =
# 512 px tiles): `shared64` (shared GroupNorm statistics, exact) and `indep64:16` (independent tiles blended
# over >= 16-latent overlaps, approximate). One decode per process
# (crates/ldm-pipeline/examples/vae_decode_rss.rs), so each VmHWM belongs to one decode.
#
#   tools/bench/vae_rss.sh                     # 1024 whole + both tiled modes, 2048 both tiled modes
#   LDM_VAE_RSS_SIZES="512 1024" tools/bench/vae_rss.sh
#   LDM_VAE_RSS_WHOLE_2048=1 tools/bench/vae_rss.sh   # also 2048 whole: expect ~20+ GiB RSS (may be OOM-killed)
#   LDM_BENCH_THREADS=4 tools/bench/vae_rss.sh
#
# Measured at 512² (test profile, 2 threads on 2 cores shared with other jobs, load ~5, 2026-12-07; 323 MiB of
# weights included): whole 273 s / 1690 MiB; --tiled=32 (shared statistics, exact) 185 s / 953 MiB;
# --tiled=32:8 --independent (3x3 blended tiles) 707 s / 729 MiB. Measured since: 1024² shared 2477 MiB,
# 2048² shared 8683 MiB (docs/PERFORMANCE.md). Estimates, not measured: 1024² whole ~5.8 GiB; independent
# tiles ~1.7 GiB at 1024² and 2048² (about 4x the shared mode's time); 2048² whole ~22 GiB. At 512² the default 64-latent tile is the whole latent (decoded untiled): use
# LDM_VAE_RSS_TILE=32 for a tiled 512² run.
# Logs go to ${LDM_BENCH_LOGDIR:-tools/bench/.out}/vae_rss_*.log; the table is printed at the end.
set -euo pipefail
cd "$(dirname "$0")/../.."
export LDM_BENCH_THREADS="${LDM_BENCH_THREADS:-2}"
logdir="${LDM_BENCH_LOGDIR:-tools/bench/.out}"
profile="${LDM_VAE_RSS_PROFILE:-release}"
sizes="${LDM_VAE_RSS_SIZES:-1024 2048}"
mkdir -p "$logdir"
weights=()
if [[ -n "${LDM_VAE_WEIGHTS:-}" ]]; then weights=(--weights "$LDM_VAE_WEIGHTS"); fi

echo "== building example vae_decode_rss (profile $profile) ..."
cargo build -q --profile "$profile" -p ldm-pipeline --example vae_decode_rss
dir=$([[ "$profile" == dev || "$profile" == test ]] && echo debug || echo "$profile")
bin="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/$dir/examples/vae_decode_rss"

: > "$logdir/vae_rss_results.txt"
run() {  # size mode-args...
    local size=$1; shift
    local tag="${size}_${*:-whole}"; tag=${tag//[^A-Za-z0-9_]/}
    echo "== $size $* (load average: $(cut -d' ' -f1-3 /proc/loadavg))"
    "$bin" "$size" "$@" "${weights[@]}" 2>&1 | tee "$logdir/vae_rss_$tag.log"
    grep '^RESULT' "$logdir/vae_rss_$tag.log" >> "$logdir/vae_rss_results.txt" || true
}
for s in $sizes; do
    if [[ "$s" -lt 2048 || -n "${LDM_VAE_RSS_WHOLE_2048:-}" ]]; then run "$s"; fi
    run "$s" "--tiled${LDM_VAE_RSS_TILE:+=$LDM_VAE_RSS_TILE}"
    run "$s" "--tiled${LDM_VAE_RSS_TILE:+=$LDM_VAE_RSS_TILE}" --independent
done

awk '/^RESULT/ { for (i = 2; i <= NF; i++) { split($i, kv, "="); f[kv[1]] = kv[2] }
    printf "%6s %-12s %10s s %10s MiB peak RSS (%s MiB after build)\n", f["size"], f["mode"], f["wall_s"],
        f["peak_rss_mib"], f["rss_after_build_mib"] }' "$logdir/vae_rss_results.txt"
