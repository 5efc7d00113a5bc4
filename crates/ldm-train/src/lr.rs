//! Learning-rate schedules: a pure function of the step, so a resumed run needs to store nothing but the step.
//!
//! `step` is the 0-based index of the optimiser step about to be taken (the first step is 0). With warm-up over
//! `w` steps the rate grows linearly as `base·(step + 1)/w`, so the first step already moves the weights (by
//! `base/w`) and step `w − 1` reaches `base`; this is `LambdaLR(lambda s: min(1, (s + 1)/w))` in PyTorch terms.
//! The cosine schedule then decays from `base` at step `w` to `base·min_lr_ratio` at `total_steps`
//! (Loshchilov & Hutter 2017, SGDR, without restarts) and stays there:
//!
//!   lr(s) = base · (r + (1 − r) · ½ (1 + cos(π · p))),  p = (s − w)/(total_steps − w) clamped to [0, 1].

use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};

/// How the learning rate changes with the step. In a config file (JSON/YAML via serde):
/// `{"kind": "constant"}`, `{"kind": "linear_warmup", "warmup_steps": 500}` or
/// `{"kind": "cosine", "warmup_steps": 500, "total_steps": 100000, "min_lr_ratio": 0.1}`.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum LrSchedule {
    /// The base rate at every step.
    #[default]
    Constant,
    /// Linear warm-up to the base rate, then constant.
    LinearWarmup { warmup_steps: u64 },
    /// Linear warm-up, then cosine decay to `base · min_lr_ratio` at `total_steps`.
    Cosine {
        warmup_steps: u64,
        total_steps: u64,
        min_lr_ratio: f64,
    },
}

impl LrSchedule {
    /// Checks the settings: `total_steps > warmup_steps` and `min_lr_ratio ∈ [0, 1]` for the cosine schedule.
    pub fn validate(&self) -> Result<()> {
        if let LrSchedule::Cosine {
            warmup_steps,
            total_steps,
            min_lr_ratio,
        } = *self
        {
            if total_steps <= warmup_steps {
                return Err(TrainError::invalid(
                    "lr_schedule.total_steps",
                    format!("{total_steps} must exceed warmup_steps ({warmup_steps})"),
                ));
            }
            if !(0.0..=1.0).contains(&min_lr_ratio) {
                return Err(TrainError::invalid(
                    "lr_schedule.min_lr_ratio",
                    format!("{min_lr_ratio} is outside [0, 1]"),
                ));
            }
        }
        Ok(())
    }

    /// The learning rate for optimiser step `step` (0-based) given the base rate.
    pub fn lr_at(&self, step: u64, base_lr: f64) -> f64 {
        let warmup = |w: u64| -> f64 {
            if step < w {
                (step + 1) as f64 / w as f64
            } else {
                1.0
            }
        };
        match *self {
            LrSchedule::Constant => base_lr,
            LrSchedule::LinearWarmup { warmup_steps } => base_lr * warmup(warmup_steps),
            LrSchedule::Cosine {
                warmup_steps,
                total_steps,
                min_lr_ratio,
            } => {
                if step < warmup_steps {
                    return base_lr * warmup(warmup_steps);
                }
                let span = total_steps.saturating_sub(warmup_steps).max(1) as f64;
                let progress = ((step - warmup_steps) as f64 / span).min(1.0);
                let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
                base_lr * (min_lr_ratio + (1.0 - min_lr_ratio) * cosine)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-12 * (a.abs() + b.abs()).max(1e-300)
    }

    #[test]
    fn constant_and_linear_warmup() {
        assert_eq!(LrSchedule::Constant.lr_at(12345, 3e-4), 3e-4);
        let s = LrSchedule::LinearWarmup { warmup_steps: 4 };
        let got: Vec<f64> = (0..6).map(|i| s.lr_at(i, 1.0)).collect();
        assert_eq!(got, [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]);
        assert_eq!(
            LrSchedule::LinearWarmup { warmup_steps: 0 }.lr_at(0, 2.0),
            2.0
        );
    }

    #[test]
    fn cosine_hits_its_end_points_and_midpoint() {
        let s = LrSchedule::Cosine {
            warmup_steps: 10,
            total_steps: 110,
            min_lr_ratio: 0.1,
        };
        s.validate().expect("valid");
        assert!(close(s.lr_at(0, 2.0), 0.2));
        assert!(close(s.lr_at(9, 2.0), 2.0));
        assert!(close(s.lr_at(10, 2.0), 2.0));
        assert!(close(s.lr_at(60, 2.0), 2.0 * (0.1 + 0.9 * 0.5)));
        assert!(close(s.lr_at(110, 2.0), 0.2));
        assert!(close(s.lr_at(5000, 2.0), 0.2));
        // strictly decreasing after warm-up
        for i in 10..110 {
            assert!(s.lr_at(i + 1, 1.0) < s.lr_at(i, 1.0), "step {i}");
        }
    }

    #[test]
    fn deserializes_from_config_and_rejects_bad_settings() {
        let s: LrSchedule = serde_json::from_str(
            r#"{"kind": "cosine", "warmup_steps": 5, "total_steps": 50, "min_lr_ratio": 0.0}"#,
        )
        .expect("parses");
        assert_eq!(
            s,
            LrSchedule::Cosine {
                warmup_steps: 5,
                total_steps: 50,
                min_lr_ratio: 0.0
            }
        );
        let c: LrSchedule = serde_json::from_str(r#"{"kind": "constant"}"#).expect("parses");
        assert_eq!(c, LrSchedule::Constant);
        assert!(serde_json::from_str::<LrSchedule>(
            r#"{"kind": "linear_warmup", "warmup_steps": 5, "typo": 1}"#
        )
        .is_err());
        let bad = LrSchedule::Cosine {
            warmup_steps: 50,
            total_steps: 50,
            min_lr_ratio: 0.0,
        };
        assert!(matches!(bad.validate(), Err(TrainError::Invalid { .. })));
        let bad = LrSchedule::Cosine {
            warmup_steps: 0,
            total_steps: 50,
            min_lr_ratio: 1.5,
        };
        assert!(bad.validate().is_err());
    }
}
