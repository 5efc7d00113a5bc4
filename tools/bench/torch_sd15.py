#!/usr/bin/env python3
"""PyTorch counterpart of `cargo bench -p ldm-pipeline --bench sd15` (crates/ldm-pipeline/benches/sd15.rs).

Same workloads, same shapes, same random-weight rule, same warm-up/median, same output columns:
- unet: diffusers UNet2DConditionModel with the SD1.5 config (runwayml/stable-diffusion-v1-5 unet/config.json),
  one classifier-free-guidance step: x [2,4,64,64], t [2] = 999, encoder_hidden_states [2,77,768];
- vae: diffusers AutoencoderKL with the SD config (vae/config.json), decode of z [1,4,64,64] -> [1,3,512,512]
  (post_quant_conv + decoder, as ldm-rs's AutoencoderKl::decode).
Weights: every 1-D `*.weight` (norm gains) is 1, everything else N(0, 0.02^2). CPU, float32, torch.no_grad,
torch.set_num_threads(LDM_BENCH_THREADS, default 2), one warm-up then LDM_BENCH_RUNS (default 3) timed runs.
Attention goes through diffusers' default processor (AttnProcessor2_0, i.e. torch SDPA).
Peak RSS: resource.getrusage(RUSAGE_SELF).ru_maxrss (includes the torch import; cumulative within a process).

Usage: python tools/bench/torch_sd15.py [unet|vae]   (both when no name is given)
Written against torch 2.15.0, diffusers 0.42.1 (the versions in /opt/ldmvenv).
"""
import os
import resource
import statistics
import sys
import time

import torch
import diffusers
from diffusers import AutoencoderKL, UNet2DConditionModel

STD = 0.02

SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    center_input_sample=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    downsample_padding=1,
    mid_block_scale_factor=1,
    act_fn="silu",
    norm_num_groups=32,
    norm_eps=1e-5,
    cross_attention_dim=768,
    attention_head_dim=8,
)

SD_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
)

# openai/clip-vit-large-patch14's text tower, as stable-diffusion-v1-5/text_encoder/config.json (CLIPTextConfig
# keyword arguments; the txt2img benchmarks build it, this file's UNet/VAE workloads do not).
SD15_CLIP_TEXT = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    projection_dim=768,
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=1,
)


def env_int(name, default):
    v = os.environ.get(name)
    if v is None:
        return default
    n = int(v)
    if n <= 0:
        raise SystemExit(f"{name}={v!r} is not a positive integer")
    return n


def randomize(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and name.endswith("weight"):
                p.fill_(1.0)  # norm gains
            else:
                p.normal_(0.0, STD)
    return model.eval()


def peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # ru_maxrss is KiB on Linux


def time_it(runs, f):
    out = f()  # warm-up
    times = []
    for i in range(runs):
        start = time.perf_counter()
        out = f()
        dt = time.perf_counter() - start
        print(f"  run {i + 1}/{runs}: {dt:.2f} s", file=sys.stderr, flush=True)
        times.append(dt)
    return statistics.median(times), min(times), out


def mean_abs(t):
    m = t.abs().mean().item()
    if not torch.isfinite(torch.tensor(m)):
        raise SystemExit(f"output is not finite (mean |y| = {m})")
    return m


def bench_unet(runs):
    print("unet: building SD1.5 UNet2DConditionModel with random weights", file=sys.stderr, flush=True)
    start = time.perf_counter()
    unet = randomize(UNet2DConditionModel(**SD15_UNET))
    build_s = time.perf_counter() - start
    x = torch.randn(2, 4, 64, 64)
    t = torch.tensor([999.0, 999.0])
    ctx = torch.randn(2, 77, 768)
    print(f"unet: built in {build_s:.1f} s; 1 warm-up + {runs} timed CFG steps", file=sys.stderr, flush=True)
    med, mn, out = time_it(runs, lambda: unet(x, t, encoder_hidden_states=ctx).sample)
    return dict(name="unet_cfg_step", shape="x[2,4,64,64] ctx[2,77,768]", runs=runs, median_s=med, min_s=mn,
                build_s=build_s, mean_abs_out=mean_abs(out), peak_rss_mib=peak_rss_mib())


def bench_vae(runs):
    print("vae: building SD AutoencoderKL with random weights", file=sys.stderr, flush=True)
    start = time.perf_counter()
    vae = randomize(AutoencoderKL(**SD_VAE))
    build_s = time.perf_counter() - start
    z = torch.randn(1, 4, 64, 64)
    print(f"vae: built in {build_s:.1f} s; 1 warm-up + {runs} timed decodes", file=sys.stderr, flush=True)
    med, mn, out = time_it(runs, lambda: vae.decode(z).sample)
    if tuple(out.shape) != (1, 3, 512, 512):
        raise SystemExit(f"VAE decode gave {tuple(out.shape)}, expected (1, 3, 512, 512)")
    return dict(name="vae_decode", shape="z[1,4,64,64] -> [1,3,512,512]", runs=runs, median_s=med, min_s=mn,
                build_s=build_s, mean_abs_out=mean_abs(out), peak_rss_mib=peak_rss_mib())


def main():
    runs = env_int("LDM_BENCH_RUNS", 3)
    threads = env_int("LDM_BENCH_THREADS", 2)
    torch.set_num_threads(threads)
    names = [a for a in sys.argv[1:] if not a.startswith("--")]
    for a in names:
        if a not in ("unet", "vae"):
            raise SystemExit(f"unknown workload `{a}` (expected `unet` or `vae`)")
    want = lambda n: not names or n in names
    print(f"torch {torch.__version__} diffusers {diffusers.__version__} CPU f32, threads = {torch.get_num_threads()}, "
          f"cpu capability = {torch.backends.cpu.get_cpu_capability()}, runs = {runs} (+1 warm-up)")
    torch.manual_seed(0)
    results = []
    with torch.no_grad():
        if want("unet"):
            results.append(bench_unet(runs))
        if want("vae"):
            results.append(bench_vae(runs))
    print(f"{'workload':<14} {'shape':<30} {'runs':>4} {'median_s':>10} {'min_s':>10} {'build_s':>8} "
          f"{'peak_rss_MiB':>12} {'mean|y|':>10}")
    for m in results:
        print(f"{m['name']:<14} {m['shape']:<30} {m['runs']:>4} {m['median_s']:>10.3f} {m['min_s']:>10.3f} "
              f"{m['build_s']:>8.2f} {m['peak_rss_mib']:>12.0f} {m['mean_abs_out']:>10.4f}")
    for m in results:
        print(f"RESULT impl=torch workload={m['name']} runs={m['runs']} median_s={m['median_s']:.3f} "
              f"min_s={m['min_s']:.3f} peak_rss_mib={m['peak_rss_mib']:.0f}")


if __name__ == "__main__":
    main()
