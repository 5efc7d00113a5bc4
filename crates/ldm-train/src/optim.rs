//! AdamW (Loshchilov & Hutter 2019, "Decoupled Weight Decay Regularization", Algorithm 2), computed exactly as
//! `torch.optim.AdamW` does it (torch 2.15, `_single_tensor_adam` with `decoupled_weight_decay=True`,
//! `foreach=False, amsgrad=False, maximize=False`).
//!
//! Notation: θ ↔ `param`, g ↔ `grad`, m ↔ `exp_avg`, v ↔ `exp_avg_sq`, t ↔ the parameter's own step count, γ ↔ `lr`,
//! λ ↔ `weight_decay`. One step, in torch's order of operations:
//!
//! ```text
//! t ← t + 1
//! θ ← θ · (1 − γλ)                       (only if λ ≠ 0; the factor is computed in f64, rounded to f32)
//! m ← lerp(m, g, 1 − β₁)                 (torch's lerp: m + w·(g − m) with one rounding when w < ½,
//!                                         g + (w − 1)·(g − m) otherwise)
//! v ← v · β₂;  v ← v + ((1 − β₂)·g)·g    (the last multiply-add has one rounding)
//! b₁ = 1 − β₁^t,  b₂ = 1 − β₂^t          (f64, `pow`)
//! denom = √v / √b₂ + ε                    (√b₂ in f64 by `pow(b₂, 0.5)`, then f32)
//! θ ← θ + ((−γ/b₁)·m) / denom            (torch's addcdiv: scale times numerator, then divide)
//! ```
//!
//! On the CPU with f32 parameters the step runs element by element in exactly this arithmetic: which of torch's
//! operations round once (its AVX2 build fuses `lerp` and `addcmul` into FMAs) was measured against
//! torch 2.15 (tools/fixtures/make_adamw.py, tests/adamw_parity.rs). The one difference left is √v: ours is
//! correctly rounded, torch's CPU `sqrt` is MKL's vmsSqrt, 1 ulp off for some inputs (which ones depends on the
//! CPU), so a few values in a thousand differ from torch's by 1 ulp. On other devices or dtypes the same formula
//! runs as candle tensor operations, equal to within a few ulp.
//!
//! Parameters without a gradient are skipped and keep no state until their first gradient, as in torch: each
//! parameter counts its own steps.

use std::collections::{BTreeMap, HashSet};

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};

/// AdamW hyper-parameters; the defaults are torch's (`lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
/// weight_decay=1e-2`). `lr` is the base rate: [`AdamW::step`] takes the rate of each step (from an
/// [`LrSchedule`](crate::lr::LrSchedule)).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-2,
        }
    }
}

impl AdamWConfig {
    /// The ranges torch accepts: `lr ≥ 0`, `eps ≥ 0`, `β ∈ [0, 1)`, `weight_decay ≥ 0`, all finite.
    pub fn validate(&self) -> Result<()> {
        let check = |field: &'static str, v: f64, ok: bool, range: &str| {
            if v.is_finite() && ok {
                Ok(())
            } else {
                Err(TrainError::invalid(field, format!("{v} is not {range}")))
            }
        };
        check("adamw.lr", self.lr, self.lr >= 0.0, "≥ 0")?;
        check("adamw.eps", self.eps, self.eps >= 0.0, "≥ 0")?;
        for (field, b) in [("adamw.beta1", self.beta1), ("adamw.beta2", self.beta2)] {
            check(field, b, (0.0..1.0).contains(&b), "in [0, 1)")?;
        }
        check(
            "adamw.weight_decay",
            self.weight_decay,
            self.weight_decay >= 0.0,
            "≥ 0",
        )
    }
}

/// The moments of one parameter that has had at least one gradient.
#[derive(Debug, Clone)]
struct Moments {
    step: u64,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
}

#[derive(Debug)]
struct Param {
    name: String,
    var: Var,
    moments: Option<Moments>,
}

/// The optimiser state, for checkpoints: per parameter name its step count and its two moments (same shape and
/// dtype as the parameter). Parameters that never had a gradient have no entry. A checkpoint stores the moments
/// as `<slot>.exp_avg.<name>` and `<slot>.exp_avg_sq.<name>` (slot `optim` for the main optimiser).
#[derive(Debug, Clone)]
pub struct AdamWState {
    pub config: AdamWConfig,
    pub steps: BTreeMap<String, u64>,
    pub exp_avg: BTreeMap<String, Tensor>,
    pub exp_avg_sq: BTreeMap<String, Tensor>,
}

/// AdamW over named parameters.
#[derive(Debug)]
pub struct AdamW {
    config: AdamWConfig,
    params: Vec<Param>,
}

impl AdamW {
    /// An optimiser for `params` (names must be unique). No state is allocated until a parameter's first gradient.
    pub fn new(params: Vec<(String, Var)>, config: AdamWConfig) -> Result<Self> {
        config.validate()?;
        let mut seen = HashSet::new();
        for (name, _) in &params {
            if !seen.insert(name.as_str()) {
                return Err(TrainError::invalid(
                    "optimizer parameters",
                    format!("parameter `{name}` is listed twice"),
                ));
            }
        }
        let params = params
            .into_iter()
            .map(|(name, var)| Param {
                name,
                var,
                moments: None,
            })
            .collect();
        Ok(Self { config, params })
    }

    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }

    /// The parameters in the order given to [`AdamW::new`].
    pub fn params(&self) -> impl Iterator<Item = (&str, &Var)> {
        self.params.iter().map(|p| (p.name.as_str(), &p.var))
    }

    /// The parameters' vars (cheap handles), e.g. for [`clip_grad_norm`](crate::grad::clip_grad_norm).
    pub fn vars(&self) -> Vec<Var> {
        self.params.iter().map(|p| p.var.clone()).collect()
    }

    /// The step count of parameter `name` (0 before its first gradient; `None` for an unknown name).
    pub fn param_step(&self, name: &str) -> Option<u64> {
        self.params
            .iter()
            .find(|p| p.name == name)
            .map(|p| p.moments.as_ref().map_or(0, |m| m.step))
    }

    /// One AdamW step with learning rate `lr` for every parameter that has a gradient in `grads`.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        if !(lr.is_finite() && lr >= 0.0) {
            return Err(TrainError::invalid("lr", format!("{lr} is not ≥ 0")));
        }
        let cfg = self.config;
        for p in &mut self.params {
            let Some(grad) = grads.get(p.var.as_tensor()) else {
                continue;
            };
            let param = p.var.as_tensor();
            if grad.dims() != param.dims() {
                return Err(TrainError::invalid(
                    "gradients",
                    format!(
                        "gradient of `{}` has shape {:?}, the parameter {:?}",
                        p.name,
                        grad.dims(),
                        param.dims()
                    ),
                ));
            }
            let grad = grad.to_dtype(param.dtype())?;
            let m = match &mut p.moments {
                Some(m) => m,
                None => p.moments.insert(Moments {
                    step: 0,
                    exp_avg: param.zeros_like()?,
                    exp_avg_sq: param.zeros_like()?,
                }),
            };
            m.step += 1;
            let scalars = StepScalars::new(&cfg, lr, m.step);
            let (new_param, exp_avg, exp_avg_sq) =
                if param.device().is_cpu() && param.dtype() == DType::F32 {
                    step_cpu_f32(param, &grad, &m.exp_avg, &m.exp_avg_sq, &scalars)?
                } else {
                    step_tensor_ops(param, &grad, &m.exp_avg, &m.exp_avg_sq, &scalars)?
                };
            p.var.set(&new_param)?;
            m.exp_avg = exp_avg;
            m.exp_avg_sq = exp_avg_sq;
        }
        Ok(())
    }

    /// A snapshot of the state (the moment tensors are shared, not copied: later steps make new tensors).
    pub fn state(&self) -> AdamWState {
        let mut state = AdamWState {
            config: self.config,
            steps: BTreeMap::new(),
            exp_avg: BTreeMap::new(),
            exp_avg_sq: BTreeMap::new(),
        };
        for p in &self.params {
            if let Some(m) = &p.moments {
                state.steps.insert(p.name.clone(), m.step);
                state.exp_avg.insert(p.name.clone(), m.exp_avg.clone());
                state
                    .exp_avg_sq
                    .insert(p.name.clone(), m.exp_avg_sq.clone());
            }
        }
        state
    }

    /// Restores a state taken by [`AdamW::state`], hyper-parameters included (as torch's `load_state_dict`).
    /// Every name must be one of this optimiser's parameters with both moments of the parameter's shape;
    /// parameters absent from the state start fresh. All problems are reported together; on error nothing changes.
    pub fn load_state(&mut self, state: &AdamWState) -> Result<()> {
        state.config.validate()?;
        let mut problems = Vec::new();
        let names: HashSet<&str> = self.params.iter().map(|p| p.name.as_str()).collect();
        for name in state
            .steps
            .keys()
            .chain(state.exp_avg.keys())
            .chain(state.exp_avg_sq.keys())
        {
            if !names.contains(name.as_str()) {
                problems.push(format!("state for unknown parameter `{name}`"));
            }
        }
        let mut restored = Vec::with_capacity(self.params.len());
        for p in &self.params {
            let step = state.steps.get(&p.name);
            let m = state.exp_avg.get(&p.name);
            let v = state.exp_avg_sq.get(&p.name);
            let moments = match (step, m, v) {
                (None, None, None) => None,
                (Some(&step), Some(m), Some(v)) => {
                    let want = p.var.dims();
                    for (what, t) in [("exp_avg", m), ("exp_avg_sq", v)] {
                        if t.dims() != want {
                            problems.push(format!(
                                "{what} of `{}` has shape {:?}, the parameter {want:?}",
                                p.name,
                                t.dims()
                            ));
                        }
                    }
                    if step == 0 {
                        problems.push(format!("`{}` has moments but step 0", p.name));
                    }
                    let device = p.var.device();
                    let dtype = p.var.dtype();
                    Some(Moments {
                        step,
                        exp_avg: m.to_device(device)?.to_dtype(dtype)?,
                        exp_avg_sq: v.to_device(device)?.to_dtype(dtype)?,
                    })
                }
                _ => {
                    problems.push(format!(
                        "incomplete state for `{}` (step {}, exp_avg {}, exp_avg_sq {})",
                        p.name,
                        presence(step.is_some()),
                        presence(m.is_some()),
                        presence(v.is_some())
                    ));
                    None
                }
            };
            restored.push(moments);
        }
        if !problems.is_empty() {
            return Err(TrainError::invalid(
                "optimizer state",
                format!("{} problem(s): {}", problems.len(), problems.join("; ")),
            ));
        }
        self.config = state.config;
        for (p, m) in self.params.iter_mut().zip(restored) {
            p.moments = m;
        }
        Ok(())
    }
}

fn presence(b: bool) -> &'static str {
    if b {
        "present"
    } else {
        "missing"
    }
}

/// The per-step scalars, computed as torch computes them (Python floats, i.e. f64).
struct StepScalars {
    /// `1 − γλ`, or `None` when λ = 0 (torch skips the multiply).
    decay: Option<f64>,
    /// `1 − β₁`, the lerp weight.
    lerp_weight: f64,
    beta2: f64,
    one_minus_beta2: f64,
    /// `γ / (1 − β₁^t)`
    step_size: f64,
    /// `(1 − β₂^t)^0.5`
    bias_correction2_sqrt: f64,
    eps: f64,
}

impl StepScalars {
    fn new(cfg: &AdamWConfig, lr: f64, step: u64) -> Self {
        // torch keeps the step in a float32 tensor and reads it back as a Python float: exact below 2^24.
        let t = step as f32 as f64;
        let bias_correction1 = 1.0 - cfg.beta1.powf(t);
        let bias_correction2 = 1.0 - cfg.beta2.powf(t);
        Self {
            decay: (cfg.weight_decay != 0.0).then_some(1.0 - lr * cfg.weight_decay),
            lerp_weight: 1.0 - cfg.beta1,
            beta2: cfg.beta2,
            one_minus_beta2: 1.0 - cfg.beta2,
            step_size: lr / bias_correction1,
            bias_correction2_sqrt: bias_correction2.powf(0.5),
            eps: cfg.eps,
        }
    }
}

fn cpu_f32(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_vec1::<f32>()?)
}

/// The step on f32 CPU tensors, element by element in torch's arithmetic (see the module docs).
fn step_cpu_f32(
    param: &Tensor,
    grad: &Tensor,
    exp_avg: &Tensor,
    exp_avg_sq: &Tensor,
    s: &StepScalars,
) -> Result<(Tensor, Tensor, Tensor)> {
    let mut p = cpu_f32(param)?;
    let g = cpu_f32(grad)?;
    let mut m = cpu_f32(exp_avg)?;
    let mut v = cpu_f32(exp_avg_sq)?;
    let decay = s.decay.map(|d| d as f32);
    let w = s.lerp_weight as f32;
    let small_weight = w.abs() < 0.5;
    let w_minus_one = w - 1.0;
    let beta2 = s.beta2 as f32;
    let one_minus_beta2 = s.one_minus_beta2 as f32;
    let bc2_sqrt = s.bias_correction2_sqrt as f32;
    let eps = s.eps as f32;
    let neg_step_size = (-s.step_size) as f32;
    for i in 0..p.len() {
        let mut pi = p[i];
        if let Some(d) = decay {
            pi *= d;
        }
        let gi = g[i];
        let diff = gi - m[i];
        let mi = if small_weight {
            w.mul_add(diff, m[i])
        } else {
            w_minus_one.mul_add(diff, gi)
        };
        let vi = (one_minus_beta2 * gi).mul_add(gi, v[i] * beta2);
        let denom = vi.sqrt() / bc2_sqrt + eps;
        pi += (neg_step_size * mi) / denom;
        p[i] = pi;
        m[i] = mi;
        v[i] = vi;
    }
    let shape = param.shape();
    let dev = &Device::Cpu;
    Ok((
        Tensor::from_vec(p, shape, dev)?,
        Tensor::from_vec(m, shape, dev)?,
        Tensor::from_vec(v, shape, dev)?,
    ))
}

/// The same step as candle tensor operations (any device and float dtype; equal to within a few ulp).
fn step_tensor_ops(
    param: &Tensor,
    grad: &Tensor,
    exp_avg: &Tensor,
    exp_avg_sq: &Tensor,
    s: &StepScalars,
) -> Result<(Tensor, Tensor, Tensor)> {
    let param = match s.decay {
        Some(d) => (param * d)?,
        None => param.clone(),
    };
    let exp_avg = (exp_avg + ((grad - exp_avg)? * s.lerp_weight)?)?;
    let exp_avg_sq = ((exp_avg_sq * s.beta2)? + (grad.sqr()? * s.one_minus_beta2)?)?;
    let denom = ((exp_avg_sq.sqrt()? / s.bias_correction2_sqrt)? + s.eps)?;
    let param = (param + ((&exp_avg * -s.step_size)? / denom)?)?;
    Ok((param, exp_avg, exp_avg_sq))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn var(v: &[f32]) -> Var {
        Var::from_slice(v, v.len(), &Device::Cpu).expect("var")
    }

    #[test]
    fn config_defaults_are_torchs_and_bad_values_are_refused() {
        let c = AdamWConfig::default();
        assert_eq!(
            (c.lr, c.beta1, c.beta2, c.eps, c.weight_decay),
            (1e-3, 0.9, 0.999, 1e-8, 1e-2)
        );
        let partial: AdamWConfig = serde_json::from_str(r#"{"lr": 0.5}"#).expect("parses");
        assert_eq!(partial.lr, 0.5);
        assert_eq!(partial.beta2, 0.999);
        for bad in [
            AdamWConfig { beta1: 1.0, ..c },
            AdamWConfig { lr: -1.0, ..c },
            AdamWConfig { eps: f64::NAN, ..c },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
        assert!(AdamW::new(
            vec![("a".into(), var(&[1.0])), ("a".into(), var(&[2.0]))],
            c
        )
        .is_err());
    }

    #[test]
    fn first_step_moves_each_weight_by_lr_times_sign() {
        // With zero moments, m̂/√v̂ = g/|g| on the first step (up to ε): the classic Adam sanity check.
        let a = var(&[1.0, -2.0, 0.5]);
        let b = var(&[3.0]); // no gradient: untouched, no state
        let cfg = AdamWConfig {
            weight_decay: 0.0,
            eps: 0.0,
            ..Default::default()
        };
        let mut opt = AdamW::new(vec![("a".into(), a.clone()), ("b".into(), b.clone())], cfg)
            .expect("optimizer");
        let mut grads = GradStore::default();
        grads.insert(
            a.as_tensor(),
            Tensor::new(&[0.3f32, -4.0, 1e-3], &Device::Cpu).expect("grad"),
        );
        opt.step(&grads, 0.1).expect("step");
        let got = a.as_tensor().to_vec1::<f32>().expect("values");
        for (x, want) in got.iter().zip([0.9f32, -1.9, 0.4]) {
            assert!((x - want).abs() < 1e-6, "{got:?}");
        }
        assert_eq!(b.as_tensor().to_vec1::<f32>().expect("values"), [3.0]);
        assert_eq!(opt.param_step("a"), Some(1));
        assert_eq!(opt.param_step("b"), Some(0));
        let state = opt.state();
        assert_eq!(state.steps.keys().collect::<Vec<_>>(), ["a"]);
    }

    #[test]
    fn tensor_ops_path_agrees_with_exact_path() {
        let p = Tensor::new(&[0.7f32, -1.3, 2.2, 0.0, 5.0], &Device::Cpu).expect("p");
        let g = Tensor::new(&[0.1f32, 2.0, -0.5, 1e-4, -3.0], &Device::Cpu).expect("g");
        let m = Tensor::new(&[0.01f32, -0.2, 0.3, 0.0, 1.0], &Device::Cpu).expect("m");
        let v = Tensor::new(&[1e-3f32, 0.5, 0.02, 0.0, 2.0], &Device::Cpu).expect("v");
        let cfg = AdamWConfig {
            beta1: 0.3,
            ..Default::default()
        };
        let s = StepScalars::new(&cfg, 0.01, 3);
        let a = step_cpu_f32(&p, &g, &m, &v, &s).expect("exact");
        let b = step_tensor_ops(&p, &g, &m, &v, &s).expect("ops");
        for (x, y) in [(a.0, b.0), (a.1, b.1), (a.2, b.2)] {
            let x = x.to_vec1::<f32>().expect("x");
            let y = y.to_vec1::<f32>().expect("y");
            for (x, y) in x.iter().zip(&y) {
                assert!((x - y).abs() <= 1e-6 * (x + y).abs().max(1e-6), "{x} {y}");
            }
        }
    }

    #[test]
    fn load_state_refuses_mismatches_and_names_them() {
        let a = var(&[1.0, 2.0]);
        let mut opt =
            AdamW::new(vec![("a".into(), a.clone())], AdamWConfig::default()).expect("optimizer");
        let mut grads = GradStore::default();
        grads.insert(
            a.as_tensor(),
            Tensor::new(&[1f32, 1.0], &Device::Cpu).expect("g"),
        );
        opt.step(&grads, 1e-3).expect("step");
        let good = opt.state();

        let mut wrong_shape = good.clone();
        wrong_shape.exp_avg.insert(
            "a".into(),
            Tensor::zeros(3, DType::F32, &Device::Cpu).expect("zeros"),
        );
        let err = opt.load_state(&wrong_shape).expect_err("shape").to_string();
        assert!(err.contains("exp_avg of `a` has shape [3]"), "{err}");

        let mut unknown = good.clone();
        unknown.steps.insert("zzz".into(), 1);
        let err = opt.load_state(&unknown).expect_err("unknown").to_string();
        assert!(err.contains("unknown parameter `zzz`"), "{err}");

        let mut partial = good.clone();
        partial.exp_avg_sq.clear();
        let err = opt.load_state(&partial).expect_err("partial").to_string();
        assert!(err.contains("incomplete state for `a`"), "{err}");

        opt.load_state(&good).expect("round trip");
        assert_eq!(opt.param_step("a"), Some(1));
    }
}
