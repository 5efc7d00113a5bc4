#!/usr/bin/env python3
"""PyTorch counterpart of `cargo bench -p ldm-train --bench train_step` (crates/ldm-train/benches/train_step.rs).

The same model, batch, random-weight rule, warm-up/median and output lines:
- diffusers UNet2DConditionModel: block_out_channels (64, 128, 128), layers_per_block 2, DownBlock2D then two
  CrossAttnDownBlock2D (mirrored up), cross_attention_dim 64, 4 heads (`attention_head_dim=4`, diffusers' name
  for the head count), GroupNorm 32; = ldm-rs's UnetConfig model_channels 64, channel_mult (1, 2, 2),
  num_res_blocks 2, attention_levels [1, 2], HeadSpec::Count(4), context_dim 64;
- batch: z0 [8, 4, 32, 32], context [8, 8, 64]; per step: noise = randn_like(z0), t = randint(0, 1000, (8,)),
  z_t = DDPMScheduler(scaled_linear).add_noise, loss = mse_loss(unet(z_t, t, context), noise), backward;
  `train_step_adamw` adds torch.optim.AdamW.step() (default settings, foreach) and zero_grad(set_to_none=True).
Weights: every 1-D `*.weight` (norm gains) is 1, everything else N(0, 0.02^2). CPU, float32, unet.train(),
torch.set_num_threads(LDM_BENCH_THREADS, default 2), one warm-up then LDM_BENCH_RUNS (default 3) timed steps.
Attention: diffusers' default processor (AttnProcessor2_0, torch SDPA).

Usage: python tools/bench/train_step.py [--profile]   (--profile: also print torch.profiler's top ops of one step)
Written against torch 2.15.0, diffusers 0.42.1 (the versions in /opt/ldmvenv).
"""
import os
import statistics
import sys
import time

import torch
import diffusers
from diffusers import DDPMScheduler, UNet2DConditionModel

STD = 0.02
BATCH = 8

SMALL_UNET = dict(
    sample_size=32,
    in_channels=4,
    out_channels=4,
    flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(64, 128, 128),
    layers_per_block=2,
    norm_num_groups=32,
    norm_eps=1e-5,
    cross_attention_dim=64,
    attention_head_dim=4,
)


def env_int(name, default):
    v = os.environ.get(name)
    if v is None:
        return default
    n = int(v)
    if n <= 0:
        raise SystemExit(f"{name}={v!r} is not a positive integer")
    return n


def main():
    runs = env_int("LDM_BENCH_RUNS", 3)
    threads = env_int("LDM_BENCH_THREADS", 2)
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__} diffusers {diffusers.__version__} CPU f32 training step, "
          f"threads = {torch.get_num_threads()}, runs = {runs} (+1 warm-up)")
    unet = UNet2DConditionModel(**SMALL_UNET)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if p.dim() == 1 and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, STD)
    unet.train()
    n_params = sum(p.numel() for p in unet.parameters())
    opt = torch.optim.AdamW(unet.parameters())
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          num_train_timesteps=1000)
    z0 = torch.randn(BATCH, 4, 32, 32)
    ctx = torch.randn(BATCH, 8, 64)
    print(f"train_step: {n_params} parameters; 1 warm-up + {runs} timed steps", file=sys.stderr)

    def step():
        t0 = time.perf_counter()
        noise = torch.randn_like(z0)
        t = torch.randint(0, 1000, (BATCH,))
        z_t = sched.add_noise(z0, noise, t)
        loss = torch.nn.functional.mse_loss(unet(z_t, t, encoder_hidden_states=ctx).sample, noise)
        loss_value = loss.item()
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        return t1 - t0, t2 - t1, t3 - t2, loss_value

    step()  # warm-up
    fwd, bwd, adam = [], [], []
    for i in range(runs):
        f, b, a, loss = step()
        print(f"  run {i + 1}/{runs}: forward {f:.3f} s, backward {b:.3f} s, adamw {a:.3f} s, loss {loss:.4f}",
              file=sys.stderr)
        fwd.append(f)
        bwd.append(b)
        adam.append(a)
    fb = [f + b for f, b in zip(fwd, bwd)]
    total = [s + a for s, a in zip(fb, adam)]
    rows = [("train_step", fb), ("train_step_adamw", total), ("forward", fwd), ("backward", bwd), ("adamw", adam)]
    print(f"{'workload':<18} {'shape':<34} {'runs':>4} {'median_s':>10} {'min_s':>10}")
    for name, v in rows:
        print(f"{name:<18} {'z[8,4,32,32] ctx[8,8,64] mc64 (1,2,2)':<34} {runs:>4} "
              f"{statistics.median(v):>10.3f} {min(v):>10.3f}")
    for name, v in rows:
        print(f"RESULT impl=torch workload={name} runs={runs} median_s={statistics.median(v):.4f} min_s={min(v):.4f}")

    if "--profile" in sys.argv[1:]:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


if __name__ == "__main__":
    main()
