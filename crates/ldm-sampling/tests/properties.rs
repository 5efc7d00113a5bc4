//! Properties of every plan over whole ranges of step counts (exhaustive loops rather than random sampling):
//! the number of model calls matches the request, σ grids strictly decrease and end at 0, ᾱ moves towards 1,
//! timesteps stay inside the training range. Plus config and CLI-name behaviour.

use ldm_sampling::{prepare, Grid, SamplerKind, SamplingError, SchedulerConfig, Spacing};

fn config(spacing: Spacing) -> SchedulerConfig {
    SchedulerConfig {
        timestep_spacing: Some(spacing),
        ..SchedulerConfig::sd_default()
    }
}

fn expected_calls(kind: SamplerKind, steps: usize) -> usize {
    match kind {
        // PNDM visits its second timestep twice; with one step there is no second.
        SamplerKind::Plms if steps > 1 => steps + 1,
        SamplerKind::Heun => 2 * steps - 1,
        _ => steps,
    }
}

fn check_plan(kind: SamplerKind, spacing: Spacing, steps: usize, karras: bool) {
    let what = format!("{kind} {spacing:?} {steps} karras={karras}");
    let plan = prepare(kind, &config(spacing), steps, karras, 0.0)
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(plan.kind(), kind);
    assert_eq!(plan.model_calls(), expected_calls(kind, steps), "{what}");
    assert!(
        plan.init_noise_sigma.is_finite() && plan.init_noise_sigma > 0.0,
        "{what}"
    );
    for l in plan.evaluations() {
        assert!(
            (0.0..=999.0).contains(&l.t) && l.sigma > 0.0 && l.sigma.is_finite(),
            "{what}: {l:?}"
        );
    }
    match &plan.grid {
        Grid::Ddim { steps: s, .. } | Grid::Ddpm { steps: s, .. } | Grid::Plms { calls: s } => {
            for st in s {
                assert!(
                    st.alpha_bar_from > 0.0 && st.alpha_bar_to <= 1.0,
                    "{what}: {st:?}"
                );
                assert!(
                    st.alpha_bar_to >= st.alpha_bar_from,
                    "{what}: step goes towards more noise: {st:?}"
                );
            }
            if !matches!(plan.grid, Grid::Plms { .. }) {
                assert!(
                    s.windows(2).all(|w| w[1].t < w[0].t),
                    "{what}: timesteps not strictly decreasing"
                );
            }
        }
        _ => {
            let levels = plan.levels().expect("σ grid");
            assert_eq!(levels.len(), steps + 1, "{what}");
            assert_eq!(levels[steps].sigma, 0.0, "{what}: must end at σ = 0");
            assert!(
                levels.windows(2).all(|w| w[1].sigma < w[0].sigma),
                "{what}: σ not strictly decreasing"
            );
        }
    }
}

#[test]
fn every_plan_has_the_requested_steps_and_a_decreasing_grid() {
    for kind in SamplerKind::ALL {
        for spacing in [Spacing::Leading, Spacing::Trailing, Spacing::Linspace] {
            for steps in 1..=999 {
                if (kind, spacing, steps) == (SamplerKind::DpmPp2m, Spacing::Leading, 999) {
                    // 999 * (1000 // 1000) + steps_offset = t 1000: refused (diffusers would clamp σ and feed t=1000)
                    assert!(prepare(kind, &config(spacing), steps, false, 0.0).is_err());
                    continue;
                }
                check_plan(kind, spacing, steps, false);
            }
        }
    }
}

#[test]
fn karras_plans_have_the_requested_steps_and_a_decreasing_grid() {
    for kind in SamplerKind::ALL.into_iter().filter(|k| k.supports_karras()) {
        for spacing in [Spacing::Leading, Spacing::Trailing, Spacing::Linspace] {
            for steps in (1..=60).chain([100, 150, 500]) {
                check_plan(kind, spacing, steps, true);
            }
        }
    }
}

#[test]
fn euler_ancestral_ignores_karras_like_diffusers() {
    let cfg = SchedulerConfig::sd_default();
    let with = prepare(SamplerKind::EulerAncestral, &cfg, 7, true, 0.0).expect("plan");
    let without = prepare(SamplerKind::EulerAncestral, &cfg, 7, false, 0.0).expect("plan");
    assert_eq!(with, without);
}

#[test]
fn step_counts_outside_the_training_range_are_refused() {
    let cfg = SchedulerConfig::sd_default();
    for kind in SamplerKind::ALL {
        assert!(matches!(
            prepare(kind, &cfg, 0, false, 0.0),
            Err(SamplingError::Steps {
                steps: 0,
                max: 1000
            })
        ));
        assert!(matches!(
            prepare(kind, &cfg, 1001, false, 0.0),
            Err(SamplingError::Steps { .. })
        ));
    }
    assert!(prepare(SamplerKind::Ddim, &cfg, 10, false, -0.5).is_err());
    assert!(prepare(SamplerKind::Ddim, &cfg, 10, false, f64::NAN).is_err());
}

#[test]
fn sampler_names_round_trip_and_unknown_names_are_refused() {
    for kind in SamplerKind::ALL {
        assert_eq!(
            kind.to_string().parse::<SamplerKind>().expect("parses"),
            kind
        );
    }
    let err = "euler_a".parse::<SamplerKind>().expect_err("unknown");
    assert!(
        err.to_string().contains("euler_a") && err.to_string().contains("dpmpp-2m"),
        "{err}"
    );
}

#[test]
fn sd15_scheduler_json_is_sd_default() {
    let json = r#"{"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": false, "num_train_timesteps": 1000,
        "set_alpha_to_one": false, "skip_prk_steps": true, "steps_offset": 1, "trained_betas": null}"#;
    assert_eq!(
        SchedulerConfig::from_json_str(json).expect("parses"),
        SchedulerConfig::sd_default()
    );
    let cfg = SchedulerConfig::sd_default();
    assert_eq!(cfg.resolved(SamplerKind::Ddim).spacing, Spacing::Leading);
    assert_eq!(cfg.resolved(SamplerKind::Euler).spacing, Spacing::Linspace);
    assert_eq!(cfg.resolved(SamplerKind::Ddim).clip, None);
    // With no keys, each class's defaults: DDIM clips and sets ᾱ to one, PNDM does not, Heun's betas differ.
    let bare = SchedulerConfig::from_json_str("{}").expect("parses");
    assert_eq!(bare.resolved(SamplerKind::Ddim).clip, Some(1.0));
    assert!(bare.resolved(SamplerKind::Ddim).set_alpha_to_one);
    assert!(!bare.resolved(SamplerKind::Plms).set_alpha_to_one);
    assert_eq!(bare.resolved(SamplerKind::Heun).beta_start, 0.00085);
    assert_eq!(bare.resolved(SamplerKind::Euler).beta_start, 0.0001);
}

#[test]
fn dpm_solver_json_with_python_infinity_parses() {
    let json = r#"{"_class_name": "DPMSolverMultistepScheduler", "lambda_min_clipped": -Infinity,
        "solver_order": 2, "algorithm_type": "dpmsolver++", "final_sigmas_type": "zero", "prediction_type": "v_prediction"}"#;
    let cfg = SchedulerConfig::from_json_str(json).expect("parses");
    assert_eq!(cfg.lambda_min_clipped, None);
    assert!(prepare(SamplerKind::DpmPp2m, &cfg, 10, false, 0.0).is_ok());
}

#[test]
fn unimplemented_config_values_are_refused_by_name() {
    let cases = [
        r#"{"thresholding": true}"#,
        r#"{"rescale_betas_zero_snr": true}"#,
        r#"{"final_sigmas_type": "sigma_min"}"#,
        r#"{"interpolation_type": "log_linear"}"#,
        r#"{"use_exponential_sigmas": true}"#,
    ];
    for json in cases {
        let cfg = SchedulerConfig::from_json_str(json).expect("parses");
        let err = prepare(SamplerKind::Euler, &cfg, 10, false, 0.0).expect_err(json);
        assert!(
            matches!(err, SamplingError::Unsupported { .. }),
            "{json}: {err}"
        );
    }
    let ddpm =
        SchedulerConfig::from_json_str(r#"{"variance_type": "learned_range"}"#).expect("parses");
    assert!(prepare(SamplerKind::Ddpm, &ddpm, 10, false, 0.0).is_err());
    assert!(SchedulerConfig::from_json_str(r#"{"beta_schedule": "sigmoid"}"#).is_err());
    assert!(SchedulerConfig::from_json_str(r#"{"prediction_type": "sample"}"#).is_err());
}
