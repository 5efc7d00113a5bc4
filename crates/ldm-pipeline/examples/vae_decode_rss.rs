//! Peak memory and wall time of ONE SD first-stage decode (KL-f8, `AutoencoderKlConfig::sd()`) to an N×N
//! image, whole or tiled. One size per process, so the process's peak RSS (`VmHWM` of /proc/self/status)
//! belongs to that decode (plus the 0.33 GB of f32 weights, whose RSS after building is printed too).
//!
//! ```text
//! cargo run --release -p ldm-pipeline --example vae_decode_rss -- SIZE [--tiled[=TILE[:OVERLAP]]]
//!     [--independent] [--weights FILE.safetensors [--prefix first_stage_model]]
//! ```
//! - `SIZE`: image side in pixels, a multiple of 8 (512, 1024, 2048, ...); the latent is `[1, 4, SIZE/8, SIZE/8]`.
//! - `--tiled`: tiled decode with `TileConfig::default()` (64-latent tiles, overlap ≥ 16) in the default
//!   shared-GroupNorm-statistics mode (exact; `mode=shared64`); `--tiled=48:12` sets tile and overlap in latent
//!   pixels (the overlap matters only with `--independent`).
//! - `--independent`: with `--tiled`, the independent-tiles mode (approximate, blended; `mode=indep64:16`).
//! - A latent that fits in one tile decodes untiled in both modes: at 512² (latent 64²) use `--tiled=32`.
//! - `--weights`: a single-file LDM/SD checkpoint (safetensors) whose first stage lives under `--prefix`;
//!   without it the weights are random (norm gains 1, everything else N(0, 0.02²): the cost of dense f32
//!   kernels does not depend on the values).
//! - Threads: `LDM_BENCH_THREADS` (default 2) sets `RAYON_NUM_THREADS`/`CANDLE_NUM_THREADS` unless set.
//!
//! Output: a human line and a `RESULT` line for tools/bench/vae_rss.sh. The latent is random N(0, 1).
use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use ldm_models::autoencoder::{AutoencoderKl, AutoencoderKlConfig, TileConfig, TileMode};

/// Every request answered with a random tensor (as benches/sd15.rs does).
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
            Tensor::randn(0f32, 0.02, s, dev)?.to_dtype(dtype)
        }
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> Result<Tensor> {
        candle_core::bail!("random-weight backend: `{name}` requested without a shape")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

/// `field` (`VmHWM` or `VmRSS`) of /proc/self/status in MiB.
fn status_mib(field: &str) -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn fmt_mib(v: Option<f64>) -> String {
    v.map_or("nan".into(), |m| format!("{m:.0}"))
}

struct Args {
    size: usize,
    tiles: Option<TileConfig>,
    weights: Option<PathBuf>,
    prefix: String,
}

fn parse_args() -> std::result::Result<Args, String> {
    let mut size = None;
    let mut tiles = None;
    let mut weights = None;
    let mut prefix = "first_stage_model".to_string();
    let mut independent = false;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        if a == "--tiled" {
            tiles = Some(TileConfig::default());
        } else if let Some(spec) = a.strip_prefix("--tiled=") {
            let (t, o) = match spec.split_once(':') {
                Some((t, o)) => (t, Some(o)),
                None => (spec, None),
            };
            let t: usize = t.parse().map_err(|_| format!("--tiled: bad tile `{t}`"))?;
            let o: usize = match o {
                Some(o) => o
                    .parse()
                    .map_err(|_| format!("--tiled: bad overlap `{o}`"))?,
                None => t / 4,
            };
            tiles = Some(TileConfig::new(t, o).map_err(|e| format!("--tiled: {e}"))?);
        } else if a == "--independent" {
            independent = true;
        } else if a == "--weights" {
            weights = Some(PathBuf::from(it.next().ok_or("--weights needs a file")?));
        } else if a == "--prefix" {
            prefix = it.next().ok_or("--prefix needs a value")?;
        } else if a.starts_with("--") {
            return Err(format!("unknown option `{a}`"));
        } else {
            let n: usize = a
                .parse()
                .map_err(|_| format!("SIZE `{a}` is not a number"))?;
            if n == 0 || !n.is_multiple_of(8) {
                return Err(format!("SIZE {n} must be a positive multiple of 8"));
            }
            size = Some(n);
        }
    }
    if independent {
        let t = tiles.ok_or("--independent needs --tiled")?;
        tiles = Some(t.with_mode(TileMode::Independent));
    }
    Ok(Args {
        size: size.ok_or(
            "usage: vae_decode_rss SIZE [--tiled[=TILE[:OVERLAP]] [--independent]] [--weights FILE]",
        )?,
        tiles,
        weights,
        prefix,
    })
}

fn main() -> std::result::Result<(), Box<dyn std::error::Error>> {
    // The allocator policy of the `ldm` binary (ldm_kernels::alloc), so the figures are what users get.
    let alloc = ldm_kernels::alloc::tune();
    eprintln!("allocator: {alloc:?}");
    let threads = std::env::var("LDM_BENCH_THREADS").unwrap_or_else(|_| "2".into());
    for var in ["RAYON_NUM_THREADS", "CANDLE_NUM_THREADS"] {
        if std::env::var_os(var).is_none() {
            std::env::set_var(var, &threads);
        }
    }
    let args = parse_args()?;
    let dev = Device::Cpu;
    let start = Instant::now();
    let vb = match &args.weights {
        // SAFETY: the file is mapped read-only and not modified while the process runs.
        Some(path) => unsafe { VarBuilder::from_mmaped_safetensors(&[path], DType::F32, &dev)? }
            .pp(&args.prefix),
        None => VarBuilder::from_backend(Box::new(RandomWeights), DType::F32, dev.clone()),
    };
    let vae = AutoencoderKl::new(&AutoencoderKlConfig::sd(), vb)?;
    let build_s = start.elapsed().as_secs_f64();
    let rss_built = status_mib("VmRSS:");
    let h = args.size / 8;
    let z = Tensor::randn(0f32, 1.0, (1, 4, h, h), &dev)?; // [1, 4, SIZE/8, SIZE/8]
    let start = Instant::now();
    let x = match &args.tiles {
        Some(cfg) => vae.decode_tiled(&z, cfg)?,
        None => vae.decode(&z)?,
    };
    let wall_s = start.elapsed().as_secs_f64();
    if x.dims() != [1, 3, args.size, args.size] {
        return Err(format!(
            "decode gave {:?}, expected [1, 3, {n}, {n}]",
            x.dims(),
            n = args.size
        )
        .into());
    }
    let mean_abs = x.abs()?.mean_all()?.to_scalar::<f32>()?;
    if !mean_abs.is_finite() {
        return Err(format!("output is not finite (mean |x| = {mean_abs})").into());
    }
    let peak = status_mib("VmHWM:");
    let mode = match &args.tiles {
        Some(c) => match c.mode() {
            TileMode::SharedNorm => format!("shared{}", c.tile()),
            TileMode::Independent => format!("indep{}:{}", c.tile(), c.overlap()),
        },
        None => "whole".into(),
    };
    let weights = args
        .weights
        .as_ref()
        .map_or("random".into(), |p| p.display().to_string());
    println!(
        "vae decode {n}x{n} ({mode}, weights {weights}, threads {t}): {wall_s:.2} s, peak RSS {} MiB \
         (after build {} MiB, build {build_s:.1} s), mean |x| {mean_abs:.4}",
        fmt_mib(peak),
        fmt_mib(rss_built),
        n = args.size,
        t = candle_core::utils::get_num_threads(),
    );
    println!(
        "RESULT impl=ldm-rs workload=vae_decode size={} mode={mode} wall_s={wall_s:.3} peak_rss_mib={} \
         rss_after_build_mib={}",
        args.size,
        fmt_mib(peak),
        fmt_mib(rss_built)
    );
    Ok(())
}
