#!/usr/bin/env python
"""PyTorch side of the whole-txt2img benchmark (tools/bench/txt2img_rss.sh): load an fp16 single-file SD1.5
checkpoint with diffusers' `StableDiffusionPipeline.from_single_file` (fp32 compute on the CPU, as a CPU user
would: torch_dtype=torch.float32), then one 512x512 txt2img; prints load time, sampling time and peak RSS.

  /opt/ldmvenv/bin/python tools/bench/torch_txt2img.py [CHECKPOINT] [--out IMAGE.png]

CHECKPOINT defaults to tools/bench/.sd15/sd15-random-fp16.safetensors (tools/bench/make_sd15_fp16.py); the
diffusers config folder `diffusers/` next to it is passed as `config=` (offline: no hub access).
Knobs: LDM_BENCH_STEPS (default 2), LDM_BENCH_THREADS (default 2, torch.set_num_threads), LDM_BENCH_SAMPLER
(ddim (default) or euler), LDM_BENCH_SIZE (default 512). Prompt, seed 42, guidance 7.5 as in txt2img_rss.sh.

Memory: ru_maxrss (peak RSS of the process, imports included) after the imports, after loading and at the end;
a sampler thread reads /proc/self/status every 0.1 s and keeps the RssAnon/RssFile split at the highest VmRSS it
saw (torch releases the GIL inside its kernels, so the thread runs during sampling). The last line is a RESULT
line for the shell script.

Written against torch 2.15.0, diffusers 0.42.1, transformers 5.25.0 (/opt/ldmvenv).
"""
import os
import resource
import sys
import threading
import time

T_START = time.perf_counter()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
import diffusers  # noqa: E402
from diffusers import DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline  # noqa: E402

PROMPT = "a photograph of an astronaut riding a horse"
SEED = 42
GUIDANCE = 7.5
HERE = os.path.dirname(os.path.abspath(__file__))


def env_int(name, default):
    v = os.environ.get(name)
    if v is None:
        return default
    n = int(v)
    if n <= 0:
        raise SystemExit(f"{name}={v!r} is not a positive integer")
    return n


def status():
    """VmRSS, VmHWM, RssAnon, RssFile of this process in MiB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, rest = line.partition(":")
            if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[k] = int(rest.split()[0]) / 1024.0
    return out


def maxrss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


class Sampler(threading.Thread):
    """Keeps the /proc/self/status reading with the highest VmRSS, per phase."""

    def __init__(self, period=0.1):
        super().__init__(daemon=True)
        self.period = period
        self.phase = "start"
        self.peaks = {}
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            self.take()
            self.stop.wait(self.period)

    def take(self):
        s = status()
        best = self.peaks.get(self.phase)
        if best is None or s["VmRSS"] > best["VmRSS"]:
            self.peaks[self.phase] = s


def fmt(s):
    return f"VmRSS {s['VmRSS']:.0f} MiB (RssAnon {s['RssAnon']:.0f}, RssFile {s['RssFile']:.0f})"


def main():
    args = [a for a in sys.argv[1:]]
    out_png = None
    if "--out" in args:
        i = args.index("--out")
        out_png = args[i + 1]
        del args[i : i + 2]
    ckpt = args[0] if args else os.path.join(HERE, ".sd15", "sd15-random-fp16.safetensors")
    folder = os.path.join(os.path.dirname(os.path.abspath(ckpt)), "diffusers")
    steps = env_int("LDM_BENCH_STEPS", 2)
    threads = env_int("LDM_BENCH_THREADS", 2)
    size = env_int("LDM_BENCH_SIZE", 512)
    sampler_name = os.environ.get("LDM_BENCH_SAMPLER", "ddim")
    torch.set_num_threads(threads)
    t_import = time.perf_counter() - T_START
    after_import = status()
    print(f"torch {torch.__version__} diffusers {diffusers.__version__} CPU, threads = {torch.get_num_threads()}, "
          f"cpu capability = {torch.backends.cpu.get_cpu_capability()}", flush=True)
    print(f"imports: {t_import:.2f} s, {fmt(after_import)}", flush=True)

    mon = Sampler()
    mon.phase = "load"
    mon.start()
    t0 = time.perf_counter()
    pipe = StableDiffusionPipeline.from_single_file(
        ckpt, config=folder, torch_dtype=torch.float32, local_files_only=True, safety_checker=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    load_s = time.perf_counter() - t0
    mon.take()
    after_load = status()
    maxrss_load = maxrss_mib()
    dtypes = {str(p.dtype) for m in (pipe.unet, pipe.vae, pipe.text_encoder) for p in m.parameters()}
    print(f"load: {load_s:.2f} s (from_single_file, parameters {sorted(dtypes)}); after load {fmt(after_load)}, "
          f"peak RSS so far {maxrss_load:.0f} MiB", flush=True)

    if sampler_name == "ddim":
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    elif sampler_name == "euler":
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    else:
        raise SystemExit(f"LDM_BENCH_SAMPLER={sampler_name!r}: expected ddim or euler")
    mon.phase = "sample"
    gen = torch.Generator("cpu").manual_seed(SEED)
    t1 = time.perf_counter()
    with torch.no_grad():
        image = pipe(
            prompt=PROMPT, num_inference_steps=steps, guidance_scale=GUIDANCE, height=size, width=size,
            generator=gen, output_type="pil",
        ).images[0]
    sample_s = time.perf_counter() - t1
    mon.take()
    mon.stop.set()
    mon.join()
    if out_png:
        image.save(out_png)
    total_s = time.perf_counter() - T_START
    peak = maxrss_mib()
    pk_load = mon.peaks.get("load", after_load)
    pk_sample = mon.peaks.get("sample", status())
    print(f"sampling ({sampler_name}, {steps} steps, {size}x{size}, guidance {GUIDANCE}, VAE decode included): "
          f"{sample_s:.2f} s", flush=True)
    print(f"highest sampled during load: {fmt(pk_load)}")
    print(f"highest sampled during sampling+decode: {fmt(pk_sample)}")
    print(f"total (process start to image): {total_s:.2f} s; peak RSS (ru_maxrss) {peak:.0f} MiB")
    print(
        f"RESULT impl=torch import_s={t_import:.2f} load_s={load_s:.2f} sample_s={sample_s:.2f} total_s={total_s:.2f} "
        f"peak_rss_mib={peak:.0f} rss_after_import_mib={after_import['VmRSS']:.0f} "
        f"rss_after_load_mib={after_load['VmRSS']:.0f} anon_after_load_mib={after_load['RssAnon']:.0f} "
        f"file_after_load_mib={after_load['RssFile']:.0f} peak_after_load_mib={maxrss_load:.0f} "
        f"load_peak_anon_mib={pk_load['RssAnon']:.0f} load_peak_file_mib={pk_load['RssFile']:.0f} "
        f"sample_peak_rss_mib={pk_sample['VmRSS']:.0f} sample_peak_anon_mib={pk_sample['RssAnon']:.0f} "
        f"sample_peak_file_mib={pk_sample['RssFile']:.0f} steps={steps} sampler={sampler_name}",
        flush=True,
    )


if __name__ == "__main__":
    main()
