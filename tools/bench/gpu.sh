#!/usr/bin/env bash
# ldm-rs on CUDA vs diffusers fp16 on the same GPU: SD1.5 architecture with random weights, one UNet CFG step
# and a whole 512² txt2img (20 DDIM steps, guidance 7.5), side by side with ratios. ONE run, ~4-6 minutes.
#
# On the GPU machine (it has python3 with torch and the CUDA libraries, but no Rust and no diffusers):
#   1. here:  tools/bench/gpu-prepare.sh          # .gpu/ldm.xz (CUDA build), .gpu/sd15.xz (UNet bench), .gpu/whl
#   2. there: run(command="bash tools/bench/gpu.sh", carry=[".gpu"], timeout_s=600)
#   The last lines printed are the table; everything is also under $OUT (logs, results.txt).
# Dry run of the same script on the CPU here (tiny fixture model, 32², f32, the default cargo build):
#   tools/bench/gpu.sh --cpu
#
# What it does: (1) writes a random-weight SD1.5 diffusers folder in fp16 (tools/bench/gpu_sd15.py make);
# (2) diffusers: load, UNet CFG step (direct call, median of 20), one pipeline step, whole txt2img (median of 3
# after a warm-up); (3) ours: `ldm txt2img --device cuda --dtype f16 --timings` on the same folder, one warm-up
# run then 3 (each a fresh process: load, prompt, 20 steps, decode), and the UNet CFG step of
# `benches/sd15.rs` (LDM_BENCH_DEVICE=cuda, LDM_BENCH_DTYPE=f16) when .gpu/sd15.xz exists.
# Every step has its own time limit, so a failure still leaves the table of what ran.
set -uo pipefail
cd "$(dirname "$0")/../.."
MODE=gpu
[ "${1:-}" = "--cpu" ] && MODE=cpu
OUT="${OUT:-/tmp/ldm-gpu-bench}"
mkdir -p "$OUT"
RES="$OUT/results.txt"
: >"$RES"

if [ "$MODE" = gpu ]; then
    # The binaries travel xz-compressed (gpu-prepare.sh): the raw CUDA build is over the 64 MiB carry limit.
    for b in ldm sd15; do
        [ -f ".gpu/$b.xz" ] && { xz -dc ".gpu/$b.xz" >"/tmp/$b" && chmod +x "/tmp/$b"; }
    done
    BIN="${LDM_BIN:-/tmp/ldm}"
    UNET_BIN="${LDM_UNET_BIN:-/tmp/sd15}"
    PY=python3
    MODEL=/tmp/sd15-random
    SIZE=512 STEPS=20 RUNS=3 UNET_RUNS=20 DEVICE=cuda OURS_DTYPE=f16 THEIRS_DTYPE=fp16
    if ! $PY -c 'import diffusers' 2>/dev/null; then
        ls .gpu/whl/*.whl >/dev/null 2>&1 || { echo "gpu.sh: diffusers missing and no wheels in .gpu/whl" >&2; exit 1; }
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .gpu/whl/*.whl || exit 1
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
    # The CUDA libraries our binary links (candle 0.11.1 links cudarc dynamically): the toolkit's, else the
    # ones torch's wheels bring.
    SITE="$($PY -c 'import site; print(site.getsitepackages()[0])')"
    LIBS=""
    for so in libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13 libcudart.so.13; do
        for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib "$SITE"/nvidia/cu13/lib \
            "$SITE"/nvidia/*/lib; do
            if [ -e "$d/$so" ]; then
                case ":$LIBS:" in *":$d:"*) ;; *) LIBS="$LIBS:$d" ;; esac
                break
            fi
        done
    done
    export LD_LIBRARY_PATH="${LIBS#:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>&1 | tee "$OUT/gpu.txt"
else
    BIN="${LDM_BIN:-${CARGO_TARGET_DIR:-target}/release/ldm}"
    UNET_BIN="${LDM_UNET_BIN:-}"
    PY="${PYTHON:-/opt/ldmvenv/bin/python}"
    MODEL=fixtures/sd1-tiny/diffusers
    SIZE=32 STEPS=4 RUNS=2 UNET_RUNS=3 DEVICE=cpu OURS_DTYPE=f32 THEIRS_DTYPE=fp32
    [ -x "$BIN" ] || cargo build --release -p ldm-cli
fi
echo "== gpu.sh mode=$MODE bin=$BIN size=$SIZE steps=$STEPS runs=$RUNS $(date -u +%FT%TZ)"
echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}" >"$OUT/env.txt"
if ldd "$BIN" 2>&1 | grep -q "not found"; then
    echo "gpu.sh: $BIN misses libraries:" >&2
    ldd "$BIN" | grep "not found" >&2
    exit 1
fi

step() { # step NAME LIMIT_S CMD...: runs CMD with a time limit, its output in $OUT/NAME.log
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s)"
    local t0=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "   rc=$rc, $((SECONDS - t0)) s; tail:"
    tail -n 4 "$OUT/$name.log" | sed 's/^/   | /'
    return $rc
}

if [ "$MODE" = gpu ]; then
    step make 240 env PYTHONUNBUFFERED=1 $PY tools/bench/gpu_sd15.py make "$MODEL" --device cuda || exit 1
fi

# Ours first (the page cache then holds the weights for both: a fair second load for diffusers too).
ours=(txt2img "a photograph of an astronaut riding a horse" --model "$MODEL" --device "$DEVICE"
    --dtype "$OURS_DTYPE" --steps "$STEPS" --sampler ddim --cfg-scale 7.5 --width "$SIZE" --height "$SIZE"
    --seed 0 --timings -o "$OUT/ours.png")
if step ours_warmup 180 "$BIN" "${ours[@]}"; then
    for i in $(seq 1 "$RUNS"); do
        t0=$(date +%s.%N)
        step "ours_$i" 120 "$BIN" "${ours[@]}" || break
        t1=$(date +%s.%N)
        grep '^TIMINGS' "$OUT/ours_$i.log" | sed "s/^TIMINGS/OURS wall_s=$(awk "BEGIN { print $t1 - $t0 }")/" >>"$RES"
    done
fi
if [ -n "$UNET_BIN" ] && [ -x "$UNET_BIN" ]; then
    step ours_unet 180 env LDM_BENCH_DEVICE="$DEVICE" LDM_BENCH_DTYPE="$OURS_DTYPE" LDM_BENCH_RUNS="$UNET_RUNS" \
        "$UNET_BIN" unet && grep '^RESULT' "$OUT/ours_unet.log" >>"$RES"
fi

step diffusers 240 env PYTHONUNBUFFERED=1 $PY tools/bench/gpu_sd15.py bench "$MODEL" --device "$DEVICE" \
    --dtype "$THEIRS_DTYPE" --size "$SIZE" --steps "$STEPS" --runs "$RUNS" --unet-runs "$UNET_RUNS" &&
    grep '^RESULT' "$OUT/diffusers.log" >>"$RES"
grep -h '^diffusers \|^ldm-rs ' "$OUT"/*.log 2>/dev/null | sort -u

# The table: medians over the runs; ratio = ours / diffusers (below 1: we are faster).
awk -v mode="$MODE" '
function med(a, n,   i, j, t) {
    for (i = 2; i <= n; i++) { t = a[i]; for (j = i - 1; j >= 1 && a[j] > t; j--) a[j + 1] = a[j]; a[j + 1] = t }
    return n == 0 ? -1 : (n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2)
}
/^OURS/ {
    for (i = 2; i <= NF; i++) { split($i, kv, "="); f[kv[1]] = kv[2] }
    n++; load[n] = f["load_s"]; ev[n] = f["eval_median_s"]; gen[n] = f["generate_s"]; wall[n] = f["wall_s"]
    dec[n] = f["decode_s"]
}
/^RESULT impl=ldm-rs/ { for (i = 2; i <= NF; i++) { split($i, kv, "="); g[kv[1]] = kv[2] } ours_unet = g["median_s"] }
/^RESULT impl=diffusers/ {
    for (i = 2; i <= NF; i++) { split($i, kv, "="); h[kv[1]] = kv[2] }
    theirs[h["workload"]] = h["median_s"]
}
END {
    o["load"] = med(load, n); o["pipe_eval"] = med(ev, n); o["txt2img"] = med(gen, n)
    o["unet_cfg_step"] = ours_unet == "" ? -1 : ours_unet
    printf "\n%-44s %12s %12s %8s\n", "workload (" mode ", median s)", "ldm-rs", "diffusers", "ratio"
    split("unet_cfg_step pipe_eval txt2img load", order, " ")
    label["unet_cfg_step"] = "UNet CFG step (direct call)"
    label["pipe_eval"] = "one sampling step inside txt2img"
    label["txt2img"] = "txt2img (prompt, steps, decode; no load)"
    label["load"] = "load checkpoint to device"
    for (k = 1; k <= 4; k++) {
        w = order[k]; a = (w in o) ? o[w] : -1; b = (w in theirs) ? theirs[w] : -1
        printf "%-44s %12s %12s %8s\n", label[w], a < 0 ? "n/a" : sprintf("%.4f", a),
            b < 0 ? "n/a" : sprintf("%.4f", b), (a > 0 && b > 0) ? sprintf("%.2f", a / b) : "n/a"
    }
    if (n > 0) printf "ldm-rs whole process per image (wall, incl. start and load): %.2f s; decode %.4f s\n", med(wall, n), med(dec, n)
}' "$RES" | tee "$OUT/table.txt"
