//! Exponential moving average of the weights, with the semantics of `LitEma` in CompVis/latent-diffusion
//! (ldm/modules/ema.py): the paper's models sample with the averaged weights.
//!
//! Notation: θ ↔ a model parameter, θ̄ ↔ its `shadow`, n ↔ `num_updates`, d ↔ the decay of this update.
//!
//! ```text
//! n ← n + 1;  d = min(decay, (1 + n)/(10 + n))      (with use_num_updates; else d = decay)
//! θ̄ ← θ̄ − (1 − d)·(θ̄ − θ)
//! ```
//!
//! As in LitEma, `decay` and the warm-up ratio are float32 (`(1 + n)/(10 + n)` is a float32 division), and the
//! update is three float32 operations in that order. The shadow starts as a copy of the weights.

use std::collections::HashSet;

use candle_core::{Tensor, Var};

use crate::error::{Result, TrainError};

/// The EMA state, for checkpoints: the shadow weights are stored as `ema.<name>`.
#[derive(Debug, Clone)]
pub struct EmaState {
    pub decay: f64,
    /// The number of updates so far, or `None` when the warm-up ratio is not used.
    pub num_updates: Option<u64>,
    pub shadow: Vec<(String, Tensor)>,
}

/// The moving average of a set of named parameters.
#[derive(Debug)]
pub struct Ema {
    decay: f64,
    num_updates: Option<u64>,
    params: Vec<(String, Var)>,
    /// One per param, same order; never sharing storage with the param.
    shadow: Vec<Tensor>,
}

impl Ema {
    /// An average of `params` starting at their current values. `decay ∈ [0, 1]` (LitEma's default is 0.9999);
    /// `use_num_updates` enables the warm-up `min(decay, (1 + n)/(10 + n))` (LitEma's default: on).
    pub fn new(params: &[(String, Var)], decay: f64, use_num_updates: bool) -> Result<Self> {
        if !(0.0..=1.0).contains(&decay) {
            return Err(TrainError::invalid(
                "ema_decay",
                format!("{decay} is outside [0, 1]"),
            ));
        }
        let mut seen = HashSet::new();
        let mut shadow = Vec::with_capacity(params.len());
        for (name, var) in params {
            if !seen.insert(name.as_str()) {
                return Err(TrainError::invalid(
                    "ema parameters",
                    format!("parameter `{name}` is listed twice"),
                ));
            }
            shadow.push(var.as_tensor().copy()?);
        }
        Ok(Self {
            decay,
            num_updates: use_num_updates.then_some(0),
            params: params.to_vec(),
            shadow,
        })
    }

    pub fn decay(&self) -> f64 {
        self.decay
    }

    pub fn num_updates(&self) -> Option<u64> {
        self.num_updates
    }

    /// The decay the next [`update`](Self::update) will use (float32, as LitEma computes it).
    fn next_decay(&self) -> f32 {
        let decay = self.decay as f32;
        match self.num_updates {
            Some(n) => {
                let n = n + 1;
                let ratio = (1 + n) as f32 / (10 + n) as f32;
                // Python's min(decay, ratio) keeps `decay` unless `ratio` is smaller.
                if ratio < decay {
                    ratio
                } else {
                    decay
                }
            }
            None => decay,
        }
    }

    /// Moves the average towards the parameters' current values.
    pub fn update(&mut self) -> Result<()> {
        let one_minus_decay = 1.0f32 - self.next_decay();
        if let Some(n) = &mut self.num_updates {
            *n += 1;
        }
        for ((_, var), shadow) in self.params.iter().zip(self.shadow.iter_mut()) {
            let param = var.as_tensor().to_dtype(shadow.dtype())?;
            let c = Tensor::new(one_minus_decay, shadow.device())?.to_dtype(shadow.dtype())?;
            let step = (&*shadow - &param)?.broadcast_mul(&c)?;
            *shadow = (&*shadow - step)?;
        }
        Ok(())
    }

    /// The averaged weights by name (sharing storage with the average; later updates make new tensors).
    pub fn shadow(&self) -> Vec<(String, Tensor)> {
        self.params
            .iter()
            .map(|(n, _)| n.clone())
            .zip(self.shadow.iter().cloned())
            .collect()
    }

    /// Overwrites the parameters with the averaged weights (LitEma `copy_to`).
    pub fn copy_to_params(&self) -> Result<()> {
        for ((_, var), shadow) in self.params.iter().zip(&self.shadow) {
            var.set(&shadow.to_dtype(var.dtype())?)?;
        }
        Ok(())
    }

    /// Exchanges the parameters and the averaged weights: call once to sample with the EMA weights and once
    /// more to continue training (LitEma's `store` + `copy_to`, then `restore`, in one operation).
    pub fn swap(&mut self) -> Result<()> {
        for ((_, var), shadow) in self.params.iter().zip(self.shadow.iter_mut()) {
            let current = var.as_tensor().copy()?;
            var.set(&shadow.to_dtype(var.dtype())?)?;
            *shadow = current.to_dtype(shadow.dtype())?;
        }
        Ok(())
    }

    pub fn state(&self) -> EmaState {
        EmaState {
            decay: self.decay,
            num_updates: self.num_updates,
            shadow: self.shadow(),
        }
    }

    /// Restores a state taken by [`Ema::state`]: the shadow names must be exactly this average's parameter
    /// names with the same shapes (all problems are reported together; on error nothing changes).
    pub fn load_state(&mut self, state: &EmaState) -> Result<()> {
        if !(0.0..=1.0).contains(&state.decay) {
            return Err(TrainError::invalid(
                "ema state",
                format!("decay {} is outside [0, 1]", state.decay),
            ));
        }
        let tensors = match_named(&self.params, &state.shadow, "ema state")?;
        let mut shadow = Vec::with_capacity(tensors.len());
        for ((_, var), t) in self.params.iter().zip(tensors) {
            // A copy: the state's tensors may be shared with whoever else holds the state.
            shadow.push(t.to_device(var.device())?.to_dtype(var.dtype())?.copy()?);
        }
        self.decay = state.decay;
        self.num_updates = state.num_updates;
        self.shadow = shadow;
        Ok(())
    }
}

/// For each param, the tensor of the same name in `tensors`, checking that the names match exactly (no missing,
/// no unknown, no duplicate) and the shapes agree. All problems are reported in one error.
pub(crate) fn match_named<'a>(
    params: &[(String, Var)],
    tensors: &'a [(String, Tensor)],
    what: &'static str,
) -> Result<Vec<&'a Tensor>> {
    let mut by_name = std::collections::HashMap::with_capacity(tensors.len());
    let mut problems = Vec::new();
    for (name, t) in tensors {
        if by_name.insert(name.as_str(), t).is_some() {
            problems.push(format!("`{name}` appears twice"));
        }
    }
    let mut out = Vec::with_capacity(params.len());
    for (name, var) in params {
        match by_name.remove(name.as_str()) {
            Some(t) if t.dims() == var.dims() => out.push(t),
            Some(t) => problems.push(format!(
                "`{name}` has shape {:?}, the parameter {:?}",
                t.dims(),
                var.dims()
            )),
            None => problems.push(format!("missing `{name}` (shape {:?})", var.dims())),
        }
    }
    let mut unknown: Vec<&str> = by_name.into_keys().collect();
    unknown.sort_unstable();
    for name in unknown {
        problems.push(format!("unknown tensor `{name}`"));
    }
    if problems.is_empty() {
        Ok(out)
    } else {
        Err(TrainError::invalid(
            what,
            format!("{} problem(s): {}", problems.len(), problems.join("; ")),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn var(v: &[f32]) -> Var {
        Var::from_slice(v, v.len(), &Device::Cpu).expect("var")
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.to_vec1::<f32>().expect("values")
    }

    #[test]
    fn warmup_ratio_then_decay() {
        let w = var(&[0.0]);
        let mut ema = Ema::new(&[("w".into(), w.clone())], 0.5, true).expect("ema");
        // n = 1: d = min(0.5, 2/11) = 2/11, so θ̄ = 0 − (9/11)(0 − 1) = 9/11
        w.set(&Tensor::new(&[1f32], &Device::Cpu).expect("t"))
            .expect("set");
        ema.update().expect("update");
        let want = 0f32 - (1.0 - 2.0f32 / 11.0) * (0.0 - 1.0);
        assert_eq!(values(&ema.shadow()[0].1), [want]);
        // n large: d = 0.5
        for _ in 0..20 {
            ema.update().expect("update");
        }
        assert_eq!(ema.num_updates(), Some(21));
        assert_eq!(ema.next_decay(), 0.5);
        let mut plain = Ema::new(&[("w".into(), w.clone())], 0.25, false).expect("ema");
        assert_eq!(plain.next_decay(), 0.25);
        plain.update().expect("update");
        assert_eq!(plain.num_updates(), None);
    }

    #[test]
    fn swap_twice_restores_and_shadow_is_independent() {
        let w = var(&[1.0, 2.0]);
        let mut ema = Ema::new(&[("w".into(), w.clone())], 0.9, false).expect("ema");
        w.set(&Tensor::new(&[3f32, 4.0], &Device::Cpu).expect("t"))
            .expect("set");
        // the shadow did not follow the in-place set
        assert_eq!(values(&ema.shadow()[0].1), [1.0, 2.0]);
        ema.swap().expect("swap");
        assert_eq!(values(w.as_tensor()), [1.0, 2.0]);
        assert_eq!(values(&ema.shadow()[0].1), [3.0, 4.0]);
        ema.swap().expect("swap");
        assert_eq!(values(w.as_tensor()), [3.0, 4.0]);
        ema.copy_to_params().expect("copy");
        assert_eq!(values(w.as_tensor()), [1.0, 2.0]);
    }

    #[test]
    fn load_state_checks_names_and_shapes() {
        let w = var(&[1.0, 2.0]);
        let mut ema = Ema::new(&[("w".into(), w.clone())], 0.9, true).expect("ema");
        let mut state = ema.state();
        state.shadow[0].1 = Tensor::new(&[1f32], &Device::Cpu).expect("t");
        state.shadow.push((
            "extra".into(),
            Tensor::new(&[1f32], &Device::Cpu).expect("t"),
        ));
        let err = ema.load_state(&state).expect_err("bad").to_string();
        assert!(
            err.contains("`w` has shape [1]") && err.contains("unknown tensor `extra`"),
            "{err}"
        );
        let state = EmaState {
            decay: 0.5,
            num_updates: Some(7),
            shadow: vec![(
                "w".into(),
                Tensor::new(&[5f32, 6.0], &Device::Cpu).expect("t"),
            )],
        };
        ema.load_state(&state).expect("load");
        assert_eq!(ema.num_updates(), Some(7));
        assert_eq!(values(&ema.shadow()[0].1), [5.0, 6.0]);
    }
}
