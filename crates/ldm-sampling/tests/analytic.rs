//! Samplers on an analytic denoiser (STYLE 2.5.4): data N(0, s²) gives x̂₀ = x·s²/(s²+σ²) exactly, and the
//! probability-flow ODE dx/dσ = (x − x̂₀)/σ has the solution x(σ) = x(σ₀)·√(s²+σ²)/√(s²+σ₀²).
//! In f64: convergence orders (Euler ≈ 1, Heun ≈ 2, DPM++ 2M at least 2), DDIM with η = 0 is the Euler step on its
//! own σ grid (to 1e-12), and a DDIM step fed the true x₀ lands on x₀.

use candle_core::{DType, Device, Tensor};
use ldm_core::rng::NoiseRng;
use ldm_sampling::samplers::{self, sigma_of, DiscreteStep, Step};
use ldm_sampling::{prepare, Denoiser, Grid, NoiseLevel, Result, SamplerKind, SchedulerConfig};

struct Gaussian {
    s2: f64,
}

impl Denoiser for Gaussian {
    fn predict(&self, x: &Tensor, level: NoiseLevel) -> Result<Tensor> {
        Ok((x * (self.s2 / (self.s2 + level.sigma * level.sigma)))?)
    }
    fn x0_from_output(&self, out: &Tensor, _x: &Tensor, _sigma: f64) -> Result<Tensor> {
        Ok(out.clone())
    }
}

/// Always returns the same x₀.
struct Oracle(Tensor);

impl Denoiser for Oracle {
    fn predict(&self, _x: &Tensor, _level: NoiseLevel) -> Result<Tensor> {
        Ok(self.0.clone())
    }
    fn x0_from_output(&self, out: &Tensor, _x: &Tensor, _sigma: f64) -> Result<Tensor> {
        Ok(out.clone())
    }
}

struct NoNoise;
impl NoiseRng for NoNoise {
    fn randn(&mut self, n: usize) -> Vec<f32> {
        vec![0.0; n]
    }
}

fn start() -> Tensor {
    Tensor::new(&[[1.5f64, -0.7, 0.2, 2.0]], &Device::Cpu).expect("tensor")
}

fn values(t: &Tensor) -> Vec<f64> {
    t.flatten_all().and_then(|t| t.to_vec1()).expect("values")
}

/// Geometric σ grid from 10 to 0.5, `n` steps (no final 0: the exact solution there is smooth).
fn grid(n: usize) -> Vec<NoiseLevel> {
    (0..=n)
        .map(|i| NoiseLevel {
            sigma: 10.0 * (0.05f64).powf(i as f64 / n as f64),
            t: 0.0,
        })
        .collect()
}

fn error(kind: &str, n: usize) -> f64 {
    let d = Gaussian { s2: 1.0 };
    let levels = grid(n);
    let none = &mut |_: Step<'_>| {};
    let x = match kind {
        "euler" => samplers::euler(&d, start(), &levels, None, none),
        "heun" => samplers::heun(&d, start(), &levels, None, None, none),
        "dpmpp-2m" => samplers::dpmpp_2m(&d, start(), &levels, None, none),
        "lms" => samplers::lms(&d, start(), &levels, 0, None, none),
        _ => unreachable!(),
    }
    .expect("sample");
    let scale = ((1.0 + 0.25f64) / (1.0 + 100.0)).sqrt();
    values(&x)
        .iter()
        .zip(values(&start()))
        .map(|(a, b)| (a - b * scale).abs())
        .fold(0.0, f64::max)
}

#[test]
fn convergence_orders_match_the_methods() {
    for (kind, lo, hi) in [
        ("euler", 1.8, 2.2),
        ("heun", 3.5, 4.5),
        ("dpmpp-2m", 3.5, 8.5),
        ("lms", 3.5, 20.0),
    ] {
        let (e1, e2) = (error(kind, 40), error(kind, 80));
        println!(
            "{kind}: error {e1:.2e} at 40 steps, {e2:.2e} at 80, ratio {:.2}",
            e1 / e2
        );
        assert!((lo..=hi).contains(&(e1 / e2)), "{kind}: ratio {}", e1 / e2);
    }
    assert!(error("heun", 40) < error("euler", 40) / 10.0);
}

#[test]
fn ddim_eta0_is_the_euler_step_on_its_sigma_grid() {
    let plan = prepare(
        SamplerKind::Ddim,
        &SchedulerConfig::sd_default(),
        10,
        false,
        0.0,
    )
    .expect("plan");
    let Grid::Ddim { steps, .. } = &plan.grid else {
        panic!("not a DDIM plan")
    };
    let d = Gaussian { s2: 0.8 };
    let noise = start();
    let ddim = samplers::ddim(
        &d,
        noise.clone(),
        steps,
        0.0,
        None,
        &mut NoNoise,
        None,
        &mut |_| {},
    )
    .expect("ddim");
    let mut levels: Vec<NoiseLevel> = steps.iter().map(DiscreteStep::level).collect();
    let final_alpha_bar = steps[steps.len() - 1].alpha_bar_to;
    levels.push(NoiseLevel {
        sigma: sigma_of(final_alpha_bar),
        t: 0.0,
    });
    let x_ve = (&noise / steps[0].alpha_bar.sqrt()).expect("scale");
    let euler = samplers::euler(&d, x_ve, &levels, None, &mut |_| {}).expect("euler");
    let euler_vp = (euler * final_alpha_bar.sqrt()).expect("scale");
    for (a, b) in values(&ddim).iter().zip(values(&euler_vp)) {
        assert!(
            (a - b).abs() <= 1e-12 * (a + b).abs().max(1.0),
            "{a} vs {b}"
        );
    }
}

#[test]
fn ddim_step_fed_the_true_x0_recovers_it() {
    let x0 = Tensor::new(&[[0.3f64, -1.2, 0.9, 0.05]], &Device::Cpu).expect("x0");
    let eps = Tensor::new(&[[-0.4f64, 1.1, 0.6, -2.0]], &Device::Cpu).expect("eps");
    let alpha_bar: f64 = 0.3;
    let x_t = ((&x0 * alpha_bar.sqrt()).expect("a")
        + (&eps * (1.0f64 - alpha_bar).sqrt()).expect("b"))
    .expect("x_t");
    let step = DiscreteStep {
        t: 500.0,
        alpha_bar,
        alpha_bar_from: alpha_bar,
        alpha_bar_to: 1.0,
    };
    for eta in [0.0, 1.0] {
        let out = samplers::ddim(
            &Oracle(x0.clone()),
            x_t.clone(),
            &[step],
            eta,
            None,
            &mut NoNoise,
            None,
            &mut |_| {},
        )
        .expect("ddim");
        for (a, b) in values(&out).iter().zip(values(&x0)) {
            assert!((a - b).abs() <= 1e-12, "eta {eta}: {a} vs {b}");
        }
    }
}

#[test]
fn samplers_keep_dtype_and_report_every_evaluation() {
    let plan = prepare(
        SamplerKind::Heun,
        &SchedulerConfig::sd_default(),
        4,
        false,
        0.0,
    )
    .expect("plan");
    let noise = start().to_dtype(DType::F32).expect("f32");
    let mut seen = Vec::new();
    let out = ldm_sampling::run(
        &plan,
        &Gaussian { s2: 1.0 },
        &noise,
        &mut NoNoise,
        &mut |s| seen.push(s.level),
    )
    .expect("run");
    assert_eq!(out.dtype(), DType::F32);
    assert_eq!(seen, plan.evaluations());
    assert_eq!(seen.len(), 7);
}
