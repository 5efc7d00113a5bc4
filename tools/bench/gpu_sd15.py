#!/usr/bin/env python3
"""diffusers side of tools/bench/gpu.sh: a random-weight SD1.5 checkpoint, and diffusers' timings on it.

  gpu_sd15.py make OUT_DIR [--device cuda]
      Writes a diffusers folder (StableDiffusionPipeline layout, fp16 safetensors) with the real SD1.5
      architecture and random weights: UNet (runwayml/stable-diffusion-v1-5 unet/config.json), VAE (vae/config),
      CLIP ViT-L/14 text encoder (text_encoder/config), the real CLIP tokenizer files and the SD1.5 scheduler
      config, both copied from fixtures/sd1-tiny/diffusers. Weight rule as tools/bench/torch_sd15.py: every 1-D
      `*.weight` (norm gains) is 1, everything else N(0, 0.02²). `ldm txt2img --model OUT_DIR` reads it too.
  gpu_sd15.py bench MODEL_DIR [--device cuda] [--dtype fp16] [--size 512] [--steps 20] [--runs 3] [--unet-runs 20]
      Loads MODEL_DIR with StableDiffusionPipeline.from_pretrained in --dtype on --device and prints RESULT
      lines (median seconds):
        load                 from_pretrained + .to(device)
        unet_cfg_step        the UNet alone on x [2,4,h,w], t [2], context [2,77,768] (as crates/ldm-pipeline/
                             benches/sd15.rs), --unet-runs timed calls after 3 warm-ups, synchronised
        pipe_eval            one denoising step inside the pipeline (callback_on_step_end stamps, synchronised)
        txt2img              pipe(prompt, 512², --steps DDIM steps, guidance 7.5) to a numpy image, after 1 warm-up
      The images are checked finite.

Written against diffusers 0.42.1, transformers 5.x, torch 2.11-2.15. On the GPU machine diffusers is not
installed: tools/bench/gpu.sh installs the wheels carried in .gpu/whl (tools/bench/gpu-prepare.sh).
"""
import argparse
import json
import os
import shutil
import statistics
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXTURE = os.path.join(REPO, "fixtures", "sd1-tiny", "diffusers")

# The SD1.5 UNet, VAE and text-encoder configs and the weight rule are the CPU benchmark's (same directory).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_sd15 import SD15_CLIP_TEXT, SD15_UNET, SD_VAE, randomize  # noqa: E402


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def make(out_dir, device):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    start = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(device):
        unet = randomize(UNet2DConditionModel(**SD15_UNET))
        vae = randomize(AutoencoderKL(**SD_VAE))
        text = randomize(CLIPTextModel(CLIPTextConfig(**SD15_CLIP_TEXT)))
    tok_dir = os.path.join(FIXTURE, "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    with open(os.path.join(FIXTURE, "scheduler", "scheduler_config.json")) as f:
        sched_cfg = json.load(f)
    scheduler = DDIMScheduler.from_config(sched_cfg)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe = pipe.to(torch.float16)
    tmp = out_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    # The classic SD layout for the tokenizer and the scheduler (what real SD1.5 folders hold).
    shutil.rmtree(os.path.join(tmp, "tokenizer"))
    shutil.copytree(tok_dir, os.path.join(tmp, "tokenizer"))
    shutil.copy(os.path.join(FIXTURE, "scheduler", "scheduler_config.json"),
                os.path.join(tmp, "scheduler", "scheduler_config.json"))
    shutil.rmtree(out_dir, ignore_errors=True)
    os.rename(tmp, out_dir)
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out_dir) for f in fs)
    log(f"make: random SD1.5 (fp16) in {out_dir}: {size / 2**20:.0f} MiB, {time.perf_counter() - start:.1f} s")


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_time(fn, runs, warmups, device):
    for _ in range(warmups):
        fn()
    sync(device)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times), out


def result(workload, runs, med, mn, extra=""):
    print(f"RESULT impl=diffusers workload={workload} runs={runs} median_s={med:.4f} min_s={mn:.4f}{extra}", flush=True)


def bench(model_dir, device, dtype_name, size, steps, runs, unet_runs):
    import diffusers
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    dtype = {"fp16": torch.float16, "f16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32,
             "f32": torch.float32}[dtype_name]
    gpu = torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu"
    print(f"diffusers {diffusers.__version__} torch {torch.__version__} on {gpu}, {dtype_name}", flush=True)

    start = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(model_dir, torch_dtype=dtype, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    sync(device)
    load_s = time.perf_counter() - start
    result("load", 1, load_s, load_s)

    h = size // pipe.vae_scale_factor
    cfg = pipe.unet.config
    gen = torch.Generator("cpu").manual_seed(0)
    x = torch.randn(2, cfg.in_channels, h, h, generator=gen).to(device, dtype)
    t = torch.tensor([999.0, 999.0], device=device)
    ctx = torch.randn(2, 77, cfg.cross_attention_dim, generator=gen).to(device, dtype)
    with torch.no_grad():
        med, mn, out = median_time(lambda: pipe.unet(x, t, encoder_hidden_states=ctx).sample, unet_runs, 3, device)
    if not torch.isfinite(out).all():
        raise SystemExit("diffusers UNet output is not finite")
    result("unet_cfg_step", unet_runs, med, mn)

    stamps = []

    def on_step(p, i, t, kw):
        sync(device)
        stamps.append(time.perf_counter())
        return kw

    def run():
        stamps.clear()
        img = pipe("a photograph of an astronaut riding a horse", height=size, width=size, num_inference_steps=steps,
                   guidance_scale=7.5, generator=torch.Generator("cpu").manual_seed(0), output_type="np",
                   callback_on_step_end=on_step).images
        return img, list(stamps)

    with torch.no_grad():
        run()  # warm-up
        times, evals = [], []
        for _ in range(runs):
            start = time.perf_counter()
            img, st = run()
            sync(device)
            times.append(time.perf_counter() - start)
            evals.extend(b - a for a, b in zip(st, st[1:]))
    if not (img == img).all():
        raise SystemExit("diffusers image is not finite")
    result("pipe_eval", len(evals), statistics.median(evals), min(evals))
    result("txt2img", runs, statistics.median(times), min(times), f" size={size} steps={steps}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("out_dir")
    m.add_argument("--device", default="cuda")
    b = sub.add_parser("bench")
    b.add_argument("model_dir")
    b.add_argument("--device", default="cuda")
    b.add_argument("--dtype", default="fp16")
    b.add_argument("--size", type=int, default=512)
    b.add_argument("--steps", type=int, default=20)
    b.add_argument("--runs", type=int, default=3)
    b.add_argument("--unet-runs", type=int, default=20)
    a = ap.parse_args()
    if a.cmd == "make":
        make(a.out_dir, a.device)
    else:
        bench(a.model_dir, a.device, a.dtype, a.size, a.steps, a.runs, a.unet_runs)


if __name__ == "__main__":
    main()
