//! CPU benchmark of one latent-diffusion training step (issue 4's benchmark), f32, random weights.
//!
//! The model is a small LDM UNet: model_channels 64, channel_mult (1, 2, 2), 2 res blocks per level, cross-
//! attention transformers at levels 1 and 2 and in the middle block (4 heads of 32 channels), context 8 tokens
//! × 64, GroupNorm 32; the batch is 8 latents of 4 × 32 × 32. One step is what `ldm train` does per batch:
//! draw ε and t ([`DiffusionObjective::sample_training_input`]), forward, ε-MSE loss, backward; the
//! `+adamw` workload adds one `candle_nn::AdamW` step over every parameter.
//!
//! Weights: built through a `VarMap` (so every parameter is a trainable `Var`), then overwritten with the rule
//! of the sd15 bench: every 1-D `*.weight` (norm gains) is 1, everything else N(0, 0.02²).
//!
//! Usage: `cargo bench -p ldm-train --bench train_step`. Environment: `LDM_BENCH_RUNS` (timed steps after one
//! warm-up, default 3), `LDM_BENCH_THREADS` (default 2; sets `RAYON_NUM_THREADS` and `CANDLE_NUM_THREADS` unless
//! already set). Output: a table with the median time of each phase, and `RESULT` lines for
//! `tools/bench/train_step.sh`. The PyTorch counterpart is `tools/bench/train_step.py` (the same model as a
//! diffusers `UNet2DConditionModel`).
use candle_core::{DType, Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use ldm_core::rng::TorchRng;
use ldm_models::unet::{HeadSpec, Unet, UnetConfig};
use ldm_sampling::schedule::{BetaSchedule, Schedule};
use ldm_train::diffusion::{DiffusionObjective, Prediction};
use std::time::Instant;

type Error = Box<dyn std::error::Error>;

const STD: f32 = 0.02;
const BATCH: usize = 8;
const LATENT: (usize, usize, usize) = (4, 32, 32);
const CONTEXT: (usize, usize) = (8, 64);

/// The benchmark UNet (the diffusers config in `tools/bench/train_step.py` is the same model).
fn small_unet() -> UnetConfig {
    UnetConfig {
        in_channels: LATENT.0,
        out_channels: LATENT.0,
        model_channels: 64,
        channel_mult: vec![1, 2, 2],
        num_res_blocks: 2,
        attention_levels: vec![1, 2],
        heads: HeadSpec::Count(4),
        transformer_depth: 1,
        context_dim: Some(CONTEXT.1),
        use_linear_in_transformer: false,
        num_groups: 32,
        ..UnetConfig::sd_v1()
    }
}

fn randomize(varmap: &VarMap) -> Result<usize, Error> {
    let data = varmap.data().lock().map_err(|_| "poisoned varmap")?;
    let mut count = 0;
    for (name, var) in data.iter() {
        let t = var.as_tensor();
        let value = if t.rank() == 1 && name.ends_with("weight") {
            Tensor::ones(t.shape(), DType::F32, t.device())?
        } else {
            Tensor::randn(0f32, STD, t.shape(), t.device())?
        };
        var.set(&value)?;
        count += t.elem_count();
    }
    Ok(count)
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

fn env_usize(name: &str, default: usize) -> Result<usize, Error> {
    match std::env::var(name) {
        Err(_) => Ok(default),
        Ok(v) => match v.parse::<usize>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(format!("{name}={v:?} is not a positive integer").into()),
        },
    }
}

/// Seconds of each phase of one step: (forward + loss, backward, AdamW step).
fn step(
    unet: &Unet,
    objective: &DiffusionObjective,
    opt: &mut AdamW,
    z0: &Tensor,
    context: &Tensor,
    rng: &mut TorchRng,
) -> Result<(f64, f64, f64, f32), Error> {
    let start = Instant::now();
    let (loss, _) = objective.training_loss(z0, rng, |z_t, t| unet.forward(z_t, t, context))?;
    let loss_value = loss.to_scalar::<f32>()?; // forces the forward pass
    let forward = start.elapsed().as_secs_f64();
    let start = Instant::now();
    let grads = loss.backward()?;
    let backward = start.elapsed().as_secs_f64();
    let start = Instant::now();
    opt.step(&grads)?;
    let adamw = start.elapsed().as_secs_f64();
    if !loss_value.is_finite() {
        return Err(format!("loss is not finite ({loss_value})").into());
    }
    Ok((forward, backward, adamw, loss_value))
}

fn main() -> Result<(), Error> {
    // The allocator policy of the `ldm` binary (ldm_kernels::alloc), so the figures are what users get.
    let alloc = ldm_kernels::alloc::tune();
    eprintln!("allocator: {alloc:?}");
    let runs = env_usize("LDM_BENCH_RUNS", 3)?;
    let threads = env_usize("LDM_BENCH_THREADS", 2)?;
    for var in ["RAYON_NUM_THREADS", "CANDLE_NUM_THREADS"] {
        if std::env::var_os(var).is_none() {
            std::env::set_var(var, threads.to_string());
        }
    }
    println!(
        "ldm-rs (candle 0.11.1) CPU f32 training step, threads = {}, avx = {}, runs = {runs} (+1 warm-up)",
        candle_core::utils::get_num_threads(),
        candle_core::utils::with_avx(),
    );
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let unet = Unet::new(
        VarBuilder::from_varmap(&varmap, DType::F32, &dev),
        &small_unet(),
    )?;
    let n_params = randomize(&varmap)?;
    let mut opt = AdamW::new(varmap.all_vars(), ParamsAdamW::default())?;
    let schedule = Schedule::new(BetaSchedule::ScaledLinear, 0.00085, 0.012, 1000)
        .map_err(|e| e.to_string())?;
    let objective = DiffusionObjective::new(schedule, Prediction::Epsilon);
    let z0 = Tensor::randn(0f32, 1.0, (BATCH, LATENT.0, LATENT.1, LATENT.2), &dev)?; // [8, 4, 32, 32]
    let context = Tensor::randn(0f32, 1.0, (BATCH, CONTEXT.0, CONTEXT.1), &dev)?; // [8, 8, 64]
    let mut rng = TorchRng::new(0);
    eprintln!("train_step: {n_params} parameters; 1 warm-up + {runs} timed steps");

    step(&unet, &objective, &mut opt, &z0, &context, &mut rng)?; // warm-up
    let (mut fwd, mut bwd, mut adam) = (vec![], vec![], vec![]);
    for i in 0..runs {
        let (f, b, a, loss) = step(&unet, &objective, &mut opt, &z0, &context, &mut rng)?;
        eprintln!(
            "  run {}/{runs}: forward {f:.3} s, backward {b:.3} s, adamw {a:.3} s, loss {loss:.4}",
            i + 1
        );
        fwd.push(f);
        bwd.push(b);
        adam.push(a);
    }
    let fb: Vec<f64> = fwd.iter().zip(&bwd).map(|(f, b)| f + b).collect();
    let all: Vec<f64> = fb.iter().zip(&adam).map(|(s, a)| s + a).collect();
    let rows = [
        (
            "train_step",
            median(&fb),
            fb.iter().copied().fold(f64::INFINITY, f64::min),
        ),
        (
            "train_step_adamw",
            median(&all),
            all.iter().copied().fold(f64::INFINITY, f64::min),
        ),
        (
            "forward",
            median(&fwd),
            fwd.iter().copied().fold(f64::INFINITY, f64::min),
        ),
        (
            "backward",
            median(&bwd),
            bwd.iter().copied().fold(f64::INFINITY, f64::min),
        ),
        (
            "adamw",
            median(&adam),
            adam.iter().copied().fold(f64::INFINITY, f64::min),
        ),
    ];
    println!(
        "{:<18} {:<34} {:>4} {:>10} {:>10}",
        "workload", "shape", "runs", "median_s", "min_s"
    );
    for (name, med, min) in rows {
        println!(
            "{name:<18} {:<34} {runs:>4} {med:>10.3} {min:>10.3}",
            "z[8,4,32,32] ctx[8,8,64] mc64 (1,2,2)"
        );
    }
    for (name, med, min) in rows {
        println!("RESULT impl=ldm-rs workload={name} runs={runs} median_s={med:.4} min_s={min:.4}");
    }
    Ok(())
}
