#!/usr/bin/env bash
# Whole 512² txt2img from an fp16 single-file SD1.5-architecture checkpoint (random weights): ldm-rs (`ldm
# txt2img`) vs PyTorch/diffusers (`StableDiffusionPipeline.from_single_file`, fp32 on the CPU) on the same file.
# Issue 5's target: peak RSS <= 0.8x PyTorch's, load time <= PyTorch's.
#
#   tools/bench/txt2img_rss.sh                 # 2 DDIM steps, guidance 7.5, 512², seed 42, 2 threads
#   LDM_BENCH_STEPS=4 tools/bench/txt2img_rss.sh
#   LDM_TXT2IMG_RSS_ONLY=ours tools/bench/txt2img_rss.sh   # or torch, or example (the phase breakdown only)
#
# Runs, one process each, one after the other (the checkpoint is read once with `cat` first so every run starts
# from a warm page cache; say so when quoting load times):
#   1. torch:   /usr/bin/time -v python tools/bench/torch_txt2img.py  (load = the from_single_file call; its
#               import of torch+diffusers is printed apart)
#   2. ours:    /usr/bin/time -v ldm txt2img ... (the release binary; RAYON_NUM_THREADS=CANDLE_NUM_THREADS=2)
#   3. example: crates/ldm-pipeline/examples/txt2img_rss.rs, the same calls as `ldm txt2img` with wall time and
#               /proc/self/status at each phase (open, build = load, encode, sample, decode).
# For 1 and 2 this script also reads /proc/PID/status every 0.2 s (VmRSS, RssAnon, RssFile) into
# $logdir/txt2img_{torch,ours}.trace; the table gives the split at the highest VmRSS seen. For ours the end of
# loading shows in that trace as the moment RssFile falls (the weight file's map is released when the build
# ends); the example states it exactly.
# The checkpoint comes from tools/bench/make_sd15_fp16.py (made here if missing, ~2 GB in tools/bench/.sd15/).
# Logs in ${LDM_BENCH_LOGDIR:-tools/bench/.out}; the last lines printed are the table.
set -euo pipefail
cd "$(dirname "$0")/../.."
steps="${LDM_BENCH_STEPS:-2}"
threads="${LDM_BENCH_THREADS:-2}"
only="${LDM_TXT2IMG_RSS_ONLY:-}"
export LDM_BENCH_STEPS="$steps" LDM_BENCH_THREADS="$threads" LDM_BENCH_SAMPLER=ddim
logdir="${LDM_BENCH_LOGDIR:-tools/bench/.out}"
ckpt="${LDM_TXT2IMG_CKPT:-tools/bench/.sd15/sd15-random-fp16.safetensors}"
py=/opt/ldmvenv/bin/python
[[ -x "$py" ]] || py=tools/bench/.venv/bin/python
prompt="a photograph of an astronaut riding a horse"
mkdir -p "$logdir"
[[ -x /usr/bin/time ]] || { echo "needs /usr/bin/time (apt-get install time)" >&2; exit 1; }

if [[ ! -f "$ckpt" ]]; then
    echo "== making $ckpt (tools/bench/make_sd15_fp16.py) ..."
    "$py" tools/bench/make_sd15_fp16.py --out "$(dirname "$ckpt")"
fi

echo "== building (release): ldm-cli, example txt2img_rss ..."
cargo build -q --release -p ldm-cli
cargo build -q --release -p ldm-pipeline --example txt2img_rss
target="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')"
ldm="$target/release/ldm"
example="$target/release/examples/txt2img_rss"

echo "== machine: $(lscpu | sed -n 's/^Model name: *//p' | head -1), $(nproc) CPUs, $(free -g | awk '/^Mem/ {print $2}') GiB RAM"
echo "== $(date -u +%Y-%m-%dT%H:%MZ) steps=$steps threads=$threads sampler=ddim guidance=7.5 size=512 seed=42"
echo "== checkpoint: $ckpt ($(du -m "$ckpt" | cut -f1) MiB)"

# trace PID FILE: VmRSS RssAnon RssFile (KiB) every 0.2 s while PID lives, with seconds since the launch.
trace() {
    local pid=$1 out=$2 t0=$3
    : > "$out"
    while [[ -r /proc/$pid/status ]]; do
        awk -v t="$(date +%s.%N)" -v t0="$t0" '/^(VmRSS|RssAnon|RssFile):/ { a[$1] = $2 }
            END { if (a["VmRSS:"] != "") printf "%.2f %d %d %d\n", t - t0, a["VmRSS:"], a["RssAnon:"], a["RssFile:"] }' \
            "/proc/$pid/status" >> "$out" 2>/dev/null || true
        sleep 0.2
    done
}

# timed NAME CMD...: runs CMD under /usr/bin/time -v with a /proc trace of the child; log in $logdir/txt2img_NAME.log
timed() {
    local name=$1; shift
    cat "$ckpt" > /dev/null   # warm page cache for every run
    echo "== $name   (load average: $(cut -d' ' -f1-3 /proc/loadavg))"
    local t0; t0=$(date +%s.%N)
    /usr/bin/time -v "$@" > "$logdir/txt2img_$name.log" 2>&1 &
    local tpid=$! cpid=""
    for _ in $(seq 100); do cpid=$(pgrep -P "$tpid" | head -1 || true); [[ -n "$cpid" ]] && break; sleep 0.05; done
    if [[ -n "$cpid" ]]; then trace "$cpid" "$logdir/txt2img_$name.trace" "$t0" & fi
    local rc=0; wait "$tpid" || rc=$?
    wait || true
    grep -v '^Loading pipeline components' "$logdir/txt2img_$name.log" | grep -v '^\s*\(Page size\|Socket\|Signals\|Swaps\|File system\|Average\|Exit status\|Command being\|Percent\|Major\|Voluntary\|Involuntary\|Minor\)' || true
    [[ $rc -eq 0 ]] || { echo "$name failed (exit $rc)" >&2; exit $rc; }
}

if [[ -z "$only" || "$only" == torch ]]; then
    timed torch "$py" tools/bench/torch_txt2img.py "$ckpt" --out "$logdir/txt2img_torch.png"
fi
if [[ -z "$only" || "$only" == ours ]]; then
    timed ours env RAYON_NUM_THREADS="$threads" CANDLE_NUM_THREADS="$threads" "$ldm" txt2img --model "$ckpt" \
        --sampler ddim --steps "$steps" --cfg-scale 7.5 --width 512 --height 512 --seed 42 \
        -o "$logdir/txt2img_ours.png" "$prompt"
fi
if [[ -z "$only" || "$only" == example ]]; then
    cat "$ckpt" > /dev/null
    echo "== example (phase breakdown)   (load average: $(cut -d' ' -f1-3 /proc/loadavg))"
    "$example" "$ckpt" --steps "$steps" --sampler ddim --size 512 --cfg-scale 7.5 --seed 42 --prompt "$prompt" \
        2>&1 | tee "$logdir/txt2img_example.log"
fi
echo "== done   (load average: $(cut -d' ' -f1-3 /proc/loadavg))"

python3 - "$logdir" <<'EOF'
import os, re, sys
d = sys.argv[1]

def read(name):
    p = os.path.join(d, f"txt2img_{name}.log")
    return open(p).read() if os.path.exists(p) else None

def time_v(text):
    wall = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", text)
    h, m, s = wall.groups()
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1))
    return (int(h or 0) * 3600 + int(m) * 60 + float(s)), rss / 1024

def result(text):
    m = re.search(r"^RESULT (.*)$", text or "", re.M)
    return dict(kv.split("=", 1) for kv in m.group(1).split()) if m else {}

def trace(name):
    p = os.path.join(d, f"txt2img_{name}.trace")
    rows = [tuple(float(x) for x in l.split()) for l in open(p)] if os.path.exists(p) else []
    if not rows:
        return None
    peak = max(rows, key=lambda r: r[1])
    big_file = [r for r in rows if r[3] > 1024 * 1024]   # RssFile > 1 GiB: the weight file is mapped and read
    return dict(peak=peak, file_until=big_file[-1][0] if big_file else None,
                max_file=max(r[3] for r in rows) / 1024, max_anon=max(r[2] for r in rows) / 1024)

rows = {}
for name in ("torch", "ours"):
    t = read(name)
    if t is None:
        continue
    wall, rss = time_v(t)
    rows[name] = dict(wall=wall, rss=rss, res=result(t), tr=trace(name))
ex = result(read("example"))

def f(v, fmt="{:.1f}"):
    return "-" if v is None else fmt.format(v)

def ratio(a, b):
    return "-" if a is None or b is None or b == 0 else f"{a / b:.2f}"

tq, ou = rows.get("torch"), rows.get("ours")
load_t = float(tq["res"]["load_s"]) if tq and "load_s" in tq["res"] else None
load_o = float(ex["load_s"]) if "load_s" in ex else None
print()
print(f"{'':34} {'ours':>10} {'torch':>10} {'ours/torch':>10}")
print(f"{'load s (ours: open+build, example)':34} {f(load_o):>10} {f(load_t):>10} {ratio(load_o, load_t):>10}")
if ou and ou["tr"] and ou["tr"]["file_until"] is not None:
    print(f"{'  ours ldm: weight map held until':34} {f(ou['tr']['file_until']):>10} {'':>10} {'(trace, 0.2 s)':>10}")
if tq:
    print(f"{'  torch import (not in load)':34} {'':>10} {f(float(tq['res']['import_s'])):>10}")
w_o, w_t = (ou["wall"] if ou else None), (tq["wall"] if tq else None)
print(f"{'total s (wall, /usr/bin/time)':34} {f(w_o):>10} {f(w_t):>10} {ratio(w_o, w_t):>10}")
r_o, r_t = (ou["rss"] if ou else None), (tq["rss"] if tq else None)
print(f"{'peak RSS MiB (/usr/bin/time)':34} {f(r_o, '{:.0f}'):>10} {f(r_t, '{:.0f}'):>10} {ratio(r_o, r_t):>10}")
for key, label in (("anon", "  RssAnon at highest VmRSS seen"), ("file", "  RssFile at highest VmRSS seen")):
    idx = 2 if key == "anon" else 3
    vo = ou["tr"]["peak"][idx] / 1024 if ou and ou["tr"] else None
    vt = tq["tr"]["peak"][idx] / 1024 if tq and tq["tr"] else None
    print(f"{label:34} {f(vo, '{:.0f}'):>10} {f(vt, '{:.0f}'):>10}")
to = ou["tr"]["peak"][0] if ou and ou["tr"] else None
tt = tq["tr"]["peak"][0] if tq and tq["tr"] else None
print(f"{'  highest VmRSS seen at s':34} {f(to):>10} {f(tt):>10}")
if ex:
    print(f"example: after load VmRSS {ex['rss_after_load_mib']} MiB (RssAnon {ex['anon_after_load_mib']}, RssFile "
          f"{ex['file_after_load_mib']}), VmHWM after load {ex['peak_after_load_mib']} MiB (load peak seen: RssAnon "
          f"{ex['load_peak_anon_mib']} + RssFile {ex['load_peak_file_mib']}); peak {ex['peak_rss_mib']} MiB in phase "
          f"{ex['peak_phase']} (RssAnon {ex['peak_anon_mib']}, RssFile {ex['peak_file_mib']})")
if tq:
    r = tq["res"]
    print(f"torch:   after load VmRSS {r['rss_after_load_mib']} MiB (RssAnon {r['anon_after_load_mib']}, RssFile "
          f"{r['file_after_load_mib']}), ru_maxrss after load {r['peak_after_load_mib']} MiB (load peak seen: RssAnon "
          f"{r['load_peak_anon_mib']} + RssFile {r['load_peak_file_mib']}); sampling peak seen {r['sample_peak_rss_mib']} "
          f"MiB (RssAnon {r['sample_peak_anon_mib']}, RssFile {r['sample_peak_file_mib']}); sampling {r['sample_s']} s")
EOF
