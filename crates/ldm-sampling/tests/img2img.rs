//! Starting a sampler part-way down its grid (img2img / inpainting, diffusers' `get_timesteps`), `add_noise`,
//! and the known-region re-imposition of inpainting with a plain UNet. Exact claims are checked in f64 to
//! 1e-9; the end-to-end match with diffusers is in ldm-pipeline's `img2img_parity` / `inpaint_parity`.

use candle_core::{Device, Tensor};
use ldm_core::rng::NoiseRng;
use ldm_sampling::{
    add_noise, prepare, prepare_img2img, run_latents, start_step, Denoiser, KnownRegion, NoiseAt,
    NoiseLevel, Result, SamplerKind, SamplingError, SchedulerConfig,
};

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

/// x̂₀ = x/2 whatever the level: a denoiser that is wrong, so that trajectories move.
struct Half;

impl Denoiser for Half {
    fn predict(&self, x: &Tensor, _level: NoiseLevel) -> Result<Tensor> {
        Ok((x * 0.5)?)
    }
    fn x0_from_output(&self, out: &Tensor, _x: &Tensor, _sigma: f64) -> Result<Tensor> {
        Ok(out.clone())
    }
}

struct Counting(f32);
impl NoiseRng for Counting {
    fn randn(&mut self, n: usize) -> Vec<f32> {
        self.0 += 0.25;
        (0..n).map(|i| self.0 - i as f32 * 0.1).collect()
    }
}

fn t(v: &[f64]) -> Tensor {
    Tensor::from_slice(v, (1, 1, 1, v.len()), &Device::Cpu).expect("tensor")
}

fn values(t: &Tensor) -> Vec<f64> {
    t.flatten_all().and_then(|t| t.to_vec1()).expect("values")
}

fn order(kind: SamplerKind) -> usize {
    if kind == SamplerKind::Heun {
        2
    } else {
        1
    }
}

#[test]
fn start_step_is_diffusers_get_timesteps() {
    // (steps, strength, t_start) as diffusers computes them: int(steps * strength) truncates
    for (steps, strength, skip) in [
        (5, 0.3, 4),
        (4, 0.75, 1),
        (20, 1.0, 0),
        (10, 0.0, 10),
        (10, 0.05, 10),
        (7, 0.5, 4),
        (3, 0.999, 1),
    ] {
        assert_eq!(
            start_step(steps, strength).expect("valid"),
            skip,
            "{steps} {strength}"
        );
    }
    for bad in [-0.1, 1.0001, f64::NAN, f64::INFINITY] {
        assert!(matches!(
            start_step(10, bad),
            Err(SamplingError::Strength(_))
        ));
        assert!(prepare_img2img(
            SamplerKind::Ddim,
            &SchedulerConfig::sd_default(),
            10,
            false,
            0.0,
            bad
        )
        .is_err());
    }
}

#[test]
fn partial_plans_are_the_tail_of_the_full_grid() {
    let cfg = SchedulerConfig::sd_default();
    for kind in SamplerKind::ALL {
        for karras in [false, true] {
            if karras && !kind.supports_karras() {
                continue;
            }
            for steps in [1, 4, 5, 7] {
                let full = prepare(kind, &cfg, steps, karras, 0.3).expect("plan");
                assert_eq!(
                    prepare_img2img(kind, &cfg, steps, karras, 0.3, 1.0).expect("plan"),
                    full,
                    "{kind} strength 1 is the whole plan"
                );
                for strength in [0.0, 0.3, 0.5, 0.75] {
                    let part =
                        prepare_img2img(kind, &cfg, steps, karras, 0.3, strength).expect("plan");
                    let skip = start_step(steps, strength).expect("valid");
                    let want = if skip == steps {
                        Vec::new()
                    } else {
                        full.evaluations()[skip * order(kind)..].to_vec()
                    };
                    assert_eq!(part.evaluations(), want, "{kind} {steps} {strength}");
                    assert_eq!(part.init_noise_sigma, full.init_noise_sigma);
                }
            }
        }
    }
}

#[test]
fn add_noise_uses_each_schedulers_own_form() {
    let cfg = SchedulerConfig::sd_default();
    let (x0, eps) = (t(&[0.5, -1.0]), t(&[1.0, 2.0]));
    for kind in SamplerKind::ALL {
        let plan = prepare_img2img(kind, &cfg, 10, false, 0.0, 0.6).expect("plan");
        let got = values(&add_noise(&plan, &x0, &eps).expect("noised"));
        let first = plan.evaluations()[0];
        let want: Vec<f64> = match kind {
            // ᾱ-based: √ᾱ x₀ + √(1−ᾱ) ε, with σ = √((1−ᾱ)/ᾱ) ⇒ the VE form divided by √(σ²+1)
            SamplerKind::Ddim | SamplerKind::Plms | SamplerKind::Ddpm | SamplerKind::DpmPp2m => {
                let s = first.sigma;
                [(0.5, 1.0), (-1.0, 2.0)]
                    .iter()
                    .map(|(x, e)| (x + s * e) / (s * s + 1.0).sqrt())
                    .collect()
            }
            _ => vec![0.5 + first.sigma, -1.0 + 2.0 * first.sigma],
        };
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() <= 1e-9, "{kind}: {g} vs {w}");
        }
        assert!(plan.start_level().is_some(), "{kind} has a first level");
    }
    // no steps left: the latents stay clean and running changes nothing
    let none = prepare_img2img(SamplerKind::Euler, &cfg, 10, false, 0.0, 0.05).expect("plan");
    assert_eq!(none.model_calls(), 0);
    assert_eq!(
        values(&add_noise(&none, &x0, &eps).expect("x")),
        values(&x0)
    );
    let out = run_latents(
        &none,
        &Half,
        x0.clone(),
        &mut Counting(0.0),
        None,
        &mut |_| {},
    )
    .expect("run");
    assert_eq!(values(&out), values(&x0));
}

#[test]
fn deterministic_samplers_fed_the_true_x0_land_on_it_from_any_strength() {
    // DDIM (η = 0), Euler, Heun and DPM++ 2M move x₀ + σε along the exact path of that ε. (PLMS and LMS
    // started part-way do not: diffusers restarts their warm-up with mismatched levels, which is reproduced.)
    let cfg = SchedulerConfig::sd_default();
    let (x0, eps) = (t(&[0.5, -1.0, 0.25]), t(&[1.0, 2.0, -0.5]));
    for kind in [
        SamplerKind::Ddim,
        SamplerKind::Euler,
        SamplerKind::Heun,
        SamplerKind::DpmPp2m,
    ] {
        for strength in [0.3, 0.6, 1.0] {
            let plan = prepare_img2img(kind, &cfg, 10, false, 0.0, strength).expect("plan");
            let x = add_noise(&plan, &x0, &eps).expect("noised");
            let out = run_latents(
                &plan,
                &Oracle(x0.clone()),
                x,
                &mut Counting(0.0),
                None,
                &mut |_| {},
            )
            .expect("run");
            // DDIM ends at ᾱ_0 (set_alpha_to_one false), not at 1
            let scale = if kind == SamplerKind::Ddim {
                let a0 = ldm_sampling::Schedule::from_config(&cfg, kind)
                    .expect("schedule")
                    .alpha_bar(0);
                Some(a0)
            } else {
                None
            };
            for ((g, x), e) in values(&out).iter().zip(values(&x0)).zip(values(&eps)) {
                let want = match scale {
                    Some(a0) => a0.sqrt() * x + (1.0 - a0).sqrt() * e,
                    None => x,
                };
                assert!((g - want).abs() <= 1e-9, "{kind} {strength}: {g} vs {want}");
            }
        }
    }
}

#[test]
fn known_region_mask_zero_keeps_the_image_and_mask_one_changes_nothing() {
    let cfg = SchedulerConfig::sd_default();
    let (x0, eps) = (t(&[0.5, -1.0, 0.25]), t(&[1.0, 2.0, -0.5]));
    let zeros = Tensor::zeros((1, 1, 1, 3), candle_core::DType::F64, &Device::Cpu).expect("m");
    let ones = zeros.ones_like().expect("m");
    for kind in SamplerKind::ALL {
        let plan = prepare_img2img(kind, &cfg, 6, false, 0.5, 0.7).expect("plan");
        let run = |keep: Option<&KnownRegion<'_>>| {
            let x = add_noise(&plan, &x0, &eps).expect("noised");
            let mut calls = 0;
            let out = run_latents(&plan, &Half, x, &mut Counting(0.0), keep, &mut |_| {
                calls += 1
            })
            .expect("run");
            assert_eq!(calls, plan.model_calls());
            values(&out)
        };
        let keep_all = KnownRegion {
            latents: &x0,
            noise: &eps,
            mask: &zeros,
        };
        assert_eq!(run(Some(&keep_all)), values(&x0), "{kind}: mask 0 keeps x₀");
        let repaint_all = KnownRegion {
            mask: &ones,
            ..keep_all
        };
        assert_eq!(
            run(Some(&repaint_all)),
            run(None),
            "{kind}: mask 1 is plain img2img"
        );
    }
}

#[test]
fn reimpose_noises_the_known_part_to_the_given_level() {
    let (x0, eps, x) = (t(&[0.5, -1.0]), t(&[1.0, 2.0]), t(&[7.0, 9.0]));
    let mask = t(&[0.0, 1.0]);
    let k = KnownRegion {
        latents: &x0,
        noise: &eps,
        mask: &mask,
    };
    let ve = values(
        &k.reimpose(x.clone(), Some(NoiseAt::Ve { sigma: 3.0 }))
            .expect("ve"),
    );
    assert_eq!(ve, vec![3.5, 9.0]);
    let vp = values(
        &k.reimpose(x.clone(), Some(NoiseAt::Vp { alpha_bar: 0.64 }))
            .expect("vp"),
    );
    assert!((vp[0] - (0.8 * 0.5 + 0.6)).abs() < 1e-12 && vp[1] == 9.0);
    assert_eq!(values(&k.reimpose(x, None).expect("clean")), vec![0.5, 9.0]);
}
