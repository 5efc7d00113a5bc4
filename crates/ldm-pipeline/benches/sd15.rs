//! CPU benchmark of the real Stable Diffusion 1.5 architecture with random weights (f32).
//!
//! Two workloads, the two that dominate a txt2img run:
//! - `unet`: one classifier-free-guidance step at 512²: `Unet::forward` on x `[2, 4, 64, 64]`, t `[2]`,
//!   context `[2, 77, 768]` (the unconditional and conditional halves batched together);
//! - `vae`: one `AutoencoderKl::decode` of a `[1, 4, 64, 64]` latent into a `[1, 3, 512, 512]` image.
//!
//! Weights are random: every 1-D `*.weight` (the GroupNorm/LayerNorm gains) is 1, everything else is drawn
//! from N(0, 0.02²), so activations stay finite and far from denormals. The cost of dense f32 kernels does
//! not depend on the values, so the timings stand for the real checkpoint's.
//!
//! Usage: `cargo bench -p ldm-pipeline --bench sd15 [-- unet|vae]` (both when no name is given).
//! Environment: `LDM_BENCH_RUNS` (timed runs after one warm-up, default 3), `LDM_BENCH_THREADS` (default 2;
//! sets `RAYON_NUM_THREADS` and `CANDLE_NUM_THREADS` unless those are already set), `LDM_BENCH_DEVICE`
//! (`cpu`, default, or `cuda[:N]` in a build with `--features cuda`) and `LDM_BENCH_DTYPE` (`f32`, `f16`, `bf16`;
//! default f32 on the CPU, f16 on CUDA). On CUDA each timed call ends with a device synchronisation.
//! Output: a table, and one `RESULT` line per workload for `tools/bench/run.sh`. Peak RSS is the process's
//! `VmHWM`, so it is cumulative when both workloads run in one process; run.sh runs them separately.
//! The PyTorch counterpart is `tools/bench/torch_sd15.py`.
use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use ldm_models::autoencoder::{AutoencoderKl, AutoencoderKlConfig};
use ldm_models::unet::{Unet, UnetConfig};
use ldm_pipeline::compute::{parse_dtype, Compute, DeviceSpec};
use std::time::Instant;

/// Weight standard deviation of the random init.
const STD: f64 = 0.02;

/// A VarBuilder backend that answers every request with a fresh random tensor of the asked shape.
struct RandomWeights;

impl SimpleBackend for RandomWeights {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> Result<Tensor> {
        if s.rank() == 1 && name.ends_with("weight") {
            Tensor::ones(s, dtype, dev) // norm gains
        } else {
            Tensor::randn(0f32, STD as f32, s, dev)?.to_dtype(dtype)
        }
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> Result<Tensor> {
        candle_core::bail!("random-weight backend: `{name}` requested without a shape")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

fn random_vb(c: &Compute) -> VarBuilder<'static> {
    VarBuilder::from_backend(Box::new(RandomWeights), c.dtype, c.device.clone())
}

/// Peak resident set size of this process in MiB (`VmHWM` of /proc/self/status), if readable.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

struct Measurement {
    name: &'static str,
    shape: &'static str,
    runs: usize,
    median_s: f64,
    min_s: f64,
    build_s: f64,
    mean_abs_out: f64,
    peak_rss_mib: Option<f64>,
}

/// One warm-up call, then `runs` timed calls; returns (median, min) seconds and the last output.
fn time_it(
    runs: usize,
    dev: &Device,
    mut f: impl FnMut() -> Result<Tensor>,
) -> Result<(f64, f64, Tensor)> {
    let mut out = f()?; // warm-up
    dev.synchronize()?;
    let mut times = Vec::with_capacity(runs);
    for i in 0..runs {
        let start = Instant::now();
        out = f()?;
        dev.synchronize()?;
        let dt = start.elapsed().as_secs_f64();
        eprintln!("  run {}/{runs}: {dt:.2} s", i + 1);
        times.push(dt);
    }
    times.sort_by(f64::total_cmp);
    let n = times.len();
    let median = if n % 2 == 1 {
        times[n / 2]
    } else {
        0.5 * (times[n / 2 - 1] + times[n / 2])
    };
    Ok((median, times[0], out))
}

fn mean_abs(t: &Tensor) -> Result<f64> {
    let m = t
        .to_dtype(DType::F32)?
        .abs()?
        .mean_all()?
        .to_scalar::<f32>()? as f64;
    if !m.is_finite() {
        candle_core::bail!("output is not finite (mean |y| = {m})");
    }
    Ok(m)
}

fn bench_unet(runs: usize, c: &Compute) -> Result<Measurement> {
    eprintln!("unet: building SD1.5 UNet with random weights");
    let start = Instant::now();
    let unet = Unet::new(random_vb(c), &UnetConfig::sd_v1())?;
    let build_s = start.elapsed().as_secs_f64();
    let dev = c.device.clone();
    let x = Tensor::randn(0f32, 1.0, (2, 4, 64, 64), &dev)?.to_dtype(c.dtype)?; // [2, 4, 64, 64]: uncond ‖ cond
    let t = Tensor::new(&[999f32, 999.], &dev)?; // [2]
    let context = Tensor::randn(0f32, 1.0, (2, 77, 768), &dev)?.to_dtype(c.dtype)?; // [2, 77, 768]
    eprintln!("unet: built in {build_s:.1} s; 1 warm-up + {runs} timed CFG steps");
    let (median_s, min_s, out) = time_it(runs, &dev, || unet.forward(&x, &t, &context))?;
    Ok(Measurement {
        name: "unet_cfg_step",
        shape: "x[2,4,64,64] ctx[2,77,768]",
        runs,
        median_s,
        min_s,
        build_s,
        mean_abs_out: mean_abs(&out)?,
        peak_rss_mib: peak_rss_mib(),
    })
}

fn bench_vae(runs: usize, c: &Compute) -> Result<Measurement> {
    eprintln!("vae: building SD AutoencoderKL with random weights");
    let start = Instant::now();
    let vae = AutoencoderKl::new(&AutoencoderKlConfig::sd(), random_vb(c))?;
    let build_s = start.elapsed().as_secs_f64();
    let z = Tensor::randn(0f32, 1.0, (1, 4, 64, 64), &c.device)?.to_dtype(c.dtype)?; // [1, 4, 64, 64]
    eprintln!("vae: built in {build_s:.1} s; 1 warm-up + {runs} timed decodes");
    let (median_s, min_s, out) = time_it(runs, &c.device, || vae.decode(&z))?;
    if out.dims() != [1, 3, 512, 512] {
        candle_core::bail!(
            "VAE decode gave {:?}, expected [1, 3, 512, 512]",
            out.dims()
        );
    }
    Ok(Measurement {
        name: "vae_decode",
        shape: "z[1,4,64,64] -> [1,3,512,512]",
        runs,
        median_s,
        min_s,
        build_s,
        mean_abs_out: mean_abs(&out)?,
        peak_rss_mib: peak_rss_mib(),
    })
}

fn env_usize(name: &str, default: usize) -> std::result::Result<usize, String> {
    match std::env::var(name) {
        Err(_) => Ok(default),
        Ok(v) => match v.parse::<usize>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(format!("{name}={v:?} is not a positive integer")),
        },
    }
}

fn main() -> std::result::Result<(), Box<dyn std::error::Error>> {
    // The allocator policy of the `ldm` binary (ldm_kernels::alloc), so the figures are what users get.
    let alloc = ldm_kernels::alloc::tune();
    eprintln!("allocator: {alloc:?}");
    let runs = env_usize("LDM_BENCH_RUNS", 3)?;
    let threads = env_usize("LDM_BENCH_THREADS", 2)?;
    // Before candle's thread pools start (they read these once).
    for var in ["RAYON_NUM_THREADS", "CANDLE_NUM_THREADS"] {
        if std::env::var_os(var).is_none() {
            std::env::set_var(var, threads.to_string());
        }
    }
    // cargo bench passes `--bench`; any other argument names a workload.
    let names: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let want = |n: &str| names.is_empty() || names.iter().any(|a| a == n);
    for a in &names {
        if a != "unet" && a != "vae" {
            return Err(format!("unknown workload `{a}` (expected `unet` or `vae`)").into());
        }
    }
    let device: DeviceSpec = std::env::var("LDM_BENCH_DEVICE")
        .unwrap_or_else(|_| "cpu".into())
        .parse()?;
    let dtype = match std::env::var("LDM_BENCH_DTYPE") {
        Ok(d) => Some(parse_dtype(&d)?),
        Err(_) => None,
    };
    let compute = Compute::resolve(device, dtype)?;
    println!(
        "ldm-rs (candle 0.11.1) {}, threads = {}, avx = {}, runs = {runs} (+1 warm-up)",
        compute.describe(),
        candle_core::utils::get_num_threads(),
        candle_core::utils::with_avx(),
    );
    let mut results = Vec::new();
    if want("unet") {
        results.push(bench_unet(runs, &compute)?);
    }
    if want("vae") {
        results.push(bench_vae(runs, &compute)?);
    }
    println!(
        "{:<14} {:<30} {:>4} {:>10} {:>10} {:>8} {:>12} {:>10}",
        "workload", "shape", "runs", "median_s", "min_s", "build_s", "peak_rss_MiB", "mean|y|"
    );
    for m in &results {
        let rss = m
            .peak_rss_mib
            .map_or("n/a".to_string(), |r| format!("{r:.0}"));
        println!(
            "{:<14} {:<30} {:>4} {:>10.3} {:>10.3} {:>8.2} {:>12} {:>10.4}",
            m.name, m.shape, m.runs, m.median_s, m.min_s, m.build_s, rss, m.mean_abs_out
        );
    }
    for m in &results {
        let rss = m
            .peak_rss_mib
            .map_or("nan".to_string(), |r| format!("{r:.0}"));
        println!(
            "RESULT impl=ldm-rs workload={} runs={} median_s={:.3} min_s={:.3} peak_rss_mib={rss}",
            m.name, m.runs, m.median_s, m.min_s
        );
    }
    Ok(())
}
