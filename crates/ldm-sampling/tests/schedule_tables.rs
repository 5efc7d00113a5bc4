//! Schedule math and timestep selection against diffusers v0.42.1 (torch 2.15.0 CPU).
//! Fixture: fixtures/samplers/tables.safetensors from tools/fixtures/make_samplers.py.
//! Betas and ᾱ: |x−y| ≤ 1e-12 (they are the same f32 numbers). σ: ≤ 1 f32 ulp (torch's `** 0.5` is SLEEF
//! `powf`, not correctly rounded). Timesteps: exact; with Karras σ within 2e-4.

mod common;

use common::*;
use ldm_sampling::{prepare, BetaSchedule, SamplerKind, Schedule};

fn max_abs(x: &[f64], y: &[f64]) -> f64 {
    assert_eq!(x.len(), y.len());
    x.iter()
        .zip(y)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max)
}

fn max_rel(x: &[f64], y: &[f64]) -> f64 {
    assert_eq!(x.len(), y.len());
    x.iter()
        .zip(y)
        .map(|(a, b)| if a == b { 0.0 } else { (a - b).abs() / b.abs() })
        .fold(0.0, f64::max)
}

#[test]
fn betas_and_alphas_cumprod_match_diffusers() {
    let tables = load_tensors("tables.safetensors");
    let cases = [
        ("linear", BetaSchedule::Linear, 0.0001, 0.02),
        ("scaled_linear", BetaSchedule::ScaledLinear, 0.00085, 0.012),
        (
            "squaredcos_cap_v2",
            BetaSchedule::SquaredcosCapV2,
            0.0001,
            0.02,
        ),
    ];
    for (name, kind, start, end) in cases {
        let s = Schedule::new(kind, start, end, 1000).expect("schedule");
        let betas = max_abs(&s.betas(), &vec_f64(&tables[&format!("betas.{name}")]));
        let ab = max_abs(
            &s.alphas_cumprod(),
            &vec_f64(&tables[&format!("alphas_cumprod.{name}")]),
        );
        println!("{name}: max |Δβ| {betas:.1e}, max |Δᾱ| {ab:.1e}");
        assert!(
            betas <= 1e-12 && ab <= 1e-12,
            "{name}: betas {betas:e}, alphas_cumprod {ab:e}"
        );
    }
}

#[test]
fn training_sigmas_within_one_f32_ulp_of_diffusers() {
    let tables = load_tensors("tables.safetensors");
    let s = Schedule::new(BetaSchedule::ScaledLinear, 0.00085, 0.012, 1000).expect("schedule");
    let want = vec_f64(&tables["sigmas.train"]);
    let rel = max_rel(s.sigmas(), &want);
    let differ = s.sigmas().iter().zip(&want).filter(|(a, b)| a != b).count();
    println!("σ table: {differ} of 1000 differ, max relative {rel:.1e}");
    assert!(rel <= 1.2e-7, "max relative σ error {rel:e}");
}

#[test]
fn timesteps_and_sigmas_match_diffusers_for_every_spacing_and_step_count() {
    let meta = load_meta();
    let tables = load_tensors("tables.safetensors");
    let (mut worst_t_karras, mut worst_sigma, mut checked) = (0.0f64, 0.0f64, 0);
    for tag in meta["tables"].as_array().expect("tables") {
        let tag = tag.as_str().expect("tag");
        let parts: Vec<&str> = tag.split('.').collect();
        let (kind_name, spacing, n) = (parts[0], parts[1], parts[2].parse::<usize>().expect("n"));
        let karras = kind_name.ends_with("-karras");
        let kind: SamplerKind = kind_name.trim_end_matches("-karras").parse().expect("kind");
        let config = config_with(&meta, &serde_json::json!({ "timestep_spacing": spacing }));
        let plan = prepare(kind, &config, n, karras, 0.0).unwrap_or_else(|e| panic!("{tag}: {e}"));

        let got_t: Vec<f64> = plan.evaluations().iter().map(|l| l.t).collect();
        let want_t = vec_f64(&tables[&format!("ts.{tag}")]);
        let t_err = max_abs(&got_t, &want_t);
        if karras {
            worst_t_karras = worst_t_karras.max(t_err);
            assert!(t_err <= 2e-4, "{tag}: t {got_t:?} vs {want_t:?}");
        } else {
            assert_eq!(got_t, want_t, "{tag}: timesteps");
        }
        if let (Some(want), Some(levels)) = (tables.get(&format!("sigmas.{tag}")), plan.levels()) {
            let mut got: Vec<f64> = levels.iter().map(|l| l.sigma).collect();
            if kind == SamplerKind::Heun {
                let last = got.len() - 1;
                got = std::iter::once(got[0])
                    .chain(got[1..last].iter().flat_map(|&s| [s, s]))
                    .chain(std::iter::once(got[last]))
                    .collect();
            }
            let rel = max_rel(&got, &vec_f64(want));
            worst_sigma = worst_sigma.max(rel);
            assert!(
                rel <= 5e-7,
                "{tag}: σ relative error {rel:e}: {got:?} vs {:?}",
                vec_f64(want)
            );
        }
        checked += 1;
    }
    println!(
        "{checked} tables: Karras max |Δt| {worst_t_karras:.1e}, σ max relative {worst_sigma:.1e}"
    );
    assert!(checked > 400);
}
