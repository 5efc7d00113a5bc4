//! Where the memory of one whole txt2img run goes: the same calls as `ldm txt2img` (open, validate,
//! `SdModels::build`, `txt2img`), with wall time and /proc/self/status (VmRSS, VmHWM, RssAnon, RssFile) printed
//! at each phase boundary, and a sampler thread (every 50 ms) keeping the RssAnon/RssFile split at the highest
//! VmRSS of each phase. For tools/bench/txt2img_rss.sh; the headline figures come from the `ldm` binary itself.
//!
//! ```text
//! cargo run --release -p ldm-pipeline --example txt2img_rss -- MODEL [--config PRESET_OR_YAML]
//!     [--steps N] [--sampler NAME] [--size PX] [--cfg-scale F] [--seed N] [--prompt TEXT]
//! ```
//! Defaults: 2 steps, ddim, 512 px, guidance 7.5, seed 42, the prompt of txt2img_rss.sh. No image is written.
//! The allocator policy of the `ldm` binary is applied first (`ldm_kernels::alloc::tune`; `LDM_ALLOC=system`
//! keeps glibc's defaults). Threads: `LDM_BENCH_THREADS` (default 2) sets `RAYON_NUM_THREADS` /
//! `CANDLE_NUM_THREADS` unless they are set.
//!
//! Phases: `open` (header, spec, tokenizer), `build` (every tensor read from the map and converted to f32),
//! `encode+1` (from the end of the build to the first progress callback, which comes after the first model
//! evaluation: prompt encoding, noise and the first UNet step), `steps` (the other UNet steps), `decode` (after
//! the last step: VAE decode and conversion to [0, 1]).
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::Device;
use ldm_pipeline::{ConfigOverride, GenerateRequest, SdModels};

const PHASES: [&str; 5] = ["open", "build", "encode+1", "steps", "decode"];

#[derive(Clone, Copy, Default)]
struct Status {
    rss: f64,
    hwm: f64,
    anon: f64,
    file: f64,
}

/// VmRSS, VmHWM, RssAnon, RssFile of this process in MiB (zeros where /proc is missing).
fn status() -> Status {
    let text = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .map_or(0.0, |kib| kib / 1024.0)
    };
    Status {
        rss: field("VmRSS:"),
        hwm: field("VmHWM:"),
        anon: field("RssAnon:"),
        file: field("RssFile:"),
    }
}

fn show(s: &Status) -> String {
    format!(
        "VmRSS {:.0} MiB (RssAnon {:.0}, RssFile {:.0}), VmHWM {:.0} MiB",
        s.rss, s.anon, s.file, s.hwm
    )
}

struct Args {
    model: PathBuf,
    config: Option<String>,
    req: GenerateRequest,
}

fn parse_args() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let mut model = None;
    let mut config = None;
    let mut req = GenerateRequest {
        prompt: "a photograph of an astronaut riding a horse".into(),
        steps: 2,
        cfg_scale: 7.5,
        sampler: "ddim".into(),
        width: Some(512),
        height: Some(512),
        seed: Some(42),
        ..GenerateRequest::default()
    };
    while let Some(a) = it.next() {
        let mut val = |name: &str| it.next().ok_or(format!("{name} needs a value"));
        let num = |name: &str, v: String| -> Result<f64, String> {
            v.parse::<f64>()
                .map_err(|_| format!("{name}: `{v}` is not a number"))
        };
        match a.as_str() {
            "--config" => config = Some(val("--config")?),
            "--steps" => req.steps = num("--steps", val("--steps")?)? as usize,
            "--sampler" => req.sampler = val("--sampler")?,
            "--size" => {
                let s = num("--size", val("--size")?)? as usize;
                req.width = Some(s);
                req.height = Some(s);
            }
            "--cfg-scale" => req.cfg_scale = num("--cfg-scale", val("--cfg-scale")?)?,
            "--seed" => req.seed = Some(num("--seed", val("--seed")?)? as u64),
            "--prompt" => req.prompt = val("--prompt")?,
            s if !s.starts_with("--") && model.is_none() => model = Some(PathBuf::from(s)),
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    Ok(Args {
        model: model.ok_or("usage: txt2img_rss MODEL [--steps N] [--sampler S] [--size PX] ...")?,
        config,
        req,
    })
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let tuned = ldm_kernels::alloc::tune();
    let threads = std::env::var("LDM_BENCH_THREADS").unwrap_or_else(|_| "2".into());
    for var in ["RAYON_NUM_THREADS", "CANDLE_NUM_THREADS"] {
        if std::env::var_os(var).is_none() {
            // SAFETY: single-threaded here; nothing has read the environment concurrently yet.
            unsafe { std::env::set_var(var, &threads) };
        }
    }
    let args = parse_args()?;
    let t0 = Instant::now();
    let start = status();
    println!(
        "allocator: {tuned:?}; threads {threads}; start: {}",
        show(&start)
    );

    // Sampler thread: the highest-VmRSS reading per phase.
    let phase = Arc::new(AtomicUsize::new(0));
    let peaks = Arc::new(Mutex::new([Status::default(); PHASES.len()]));
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (phase, peaks, stop) = (phase.clone(), peaks.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let s = status();
                let p = phase.load(Ordering::Relaxed);
                if let Ok(mut pk) = peaks.lock() {
                    if s.rss > pk[p].rss {
                        pk[p] = s;
                    }
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    let mark = |name: &str, since: Instant| {
        let s = status();
        println!(
            "{name:>8} done at {:7.2} s (phase {:6.2} s): {}",
            t0.elapsed().as_secs_f64(),
            since.elapsed().as_secs_f64(),
            show(&s)
        );
        s
    };

    let t = Instant::now();
    let config = args.config.as_deref().map(ConfigOverride::parse);
    let opened = ldm_pipeline::open(&args.model, config.as_ref())?;
    let valid = args.req.validate(&opened.spec, 0)?;
    mark("open", t);

    phase.store(1, Ordering::Relaxed);
    let t = Instant::now();
    let models = SdModels::build(opened, &Device::Cpu)?;
    let load_s = t0.elapsed().as_secs_f64();
    let after_load = mark("build", t);

    phase.store(2, Ordering::Relaxed);
    let t_encode = Instant::now();
    let t_sample = Mutex::new(None::<Instant>);
    let mut progress = |done: usize, total: usize| {
        if done == 0 || phase.load(Ordering::Relaxed) == 2 {
            mark("encode+1", t_encode);
            phase.store(3, Ordering::Relaxed);
            if let Ok(mut ts) = t_sample.lock() {
                *ts = Some(Instant::now());
            }
        }
        if done > 0 {
            let s = status();
            println!(
                "    step {done}/{total} at {:7.2} s: {}",
                t0.elapsed().as_secs_f64(),
                show(&s)
            );
        }
        if done == total {
            phase.store(4, Ordering::Relaxed);
        }
    };
    let out = ldm_pipeline::txt2img::txt2img(&models, &valid, &mut progress)?;
    let end = mark("txt2img", t_encode);
    let sample_s = t_encode.elapsed().as_secs_f64();
    let mean = out.images.mean_all()?.to_scalar::<f32>()?;
    stop.store(true, Ordering::Relaxed);
    sampler.join().map_err(|_| "sampler thread panicked")?;
    let pk = *peaks.lock().map_err(|_| "sampler lock poisoned")?;
    println!("image mean {mean:.4}; highest VmRSS seen per phase (50 ms sampling):");
    for (name, s) in PHASES.iter().zip(pk.iter()) {
        println!("  {name:>7}: {}", show(s));
    }
    let (worst, s) = PHASES
        .iter()
        .zip(pk.iter())
        .max_by(|a, b| a.1.rss.total_cmp(&b.1.rss))
        .map(|(n, s)| (*n, *s))
        .unwrap_or(("none", Status::default()));
    println!(
        "RESULT impl=ldm-rs-example load_s={load_s:.2} sample_s={sample_s:.2} total_s={:.2} peak_rss_mib={:.0} \
         rss_after_load_mib={:.0} anon_after_load_mib={:.0} file_after_load_mib={:.0} peak_after_load_mib={:.0} \
         load_peak_anon_mib={:.0} load_peak_file_mib={:.0} peak_phase={worst} peak_anon_mib={:.0} peak_file_mib={:.0}",
        t0.elapsed().as_secs_f64(),
        end.hwm,
        after_load.rss,
        after_load.anon,
        after_load.file,
        after_load.hwm,
        pk[1].anon,
        pk[1].file,
        s.anon,
        s.file,
    );
    Ok(())
}
