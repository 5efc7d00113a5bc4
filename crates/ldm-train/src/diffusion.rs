//! The diffusion training objective: Ho et al. 2020, "Denoising Diffusion Probabilistic Models", Algorithm 1 /
//! eq. (14) (L_simple), as Rombach et al. 2022 use it for latent diffusion (eq. (2)):
//!
//! L_LDM = E_{z0, ε ~ N(0, I), t ~ U{0..T−1}} ‖ target − ε_θ(z_t, t, τ_θ(y)) ‖²,
//! z_t = √ᾱ_t z0 + √(1−ᾱ_t) ε (eq. (4) of Ho et al.),
//!
//! with the target ε (ε-prediction) or v = √ᾱ_t ε − √(1−ᾱ_t) z0 (v-prediction, Salimans & Ho 2022,
//! "Progressive Distillation", §4 / App. D), reduced by the mean over every element as diffusers'
//! `train_text_to_image.py` does (`F.mse_loss(pred, target, reduction="mean")`). Classifier-free guidance
//! (Ho & Salimans 2022) trains the unconditional model jointly by replacing each item's condition by the null
//! condition with probability p ([`drop_condition`], [`drop_labels`]).
//!
//! | code        | paper    | meaning                                                 |
//! |-------------|----------|---------------------------------------------------------|
//! | `z0`        | z_0      | clean latents `[B, c, h, w]`                            |
//! | `eps`       | ε        | the noise, N(0, I), same shape as z0                    |
//! | `timesteps` | t        | integer training steps in 0..T                          |
//! | `alpha_bar` | ᾱ_t      | the schedule's signal fraction at t                     |
//! | `z_t`       | z_t      | the noised latents fed to the model                     |
//! | `v`         | v        | √ᾱ_t ε − √(1−ᾱ_t) z0                                    |
//!
//! Randomness comes from a [`TorchRng`] passed in (STYLE P7), drawn in diffusers' order so that a seed gives
//! the numbers of `torch.manual_seed(seed)`: `torch.randn_like(z0)` for ε, then
//! `torch.randint(0, T, (B,))` for t (torch draws one 32-bit word per item and takes it modulo T), and
//! `torch.rand(B) < p` for the guidance-dropout mask. The coefficients √ᾱ_t and √(1−ᾱ_t) are computed in f64
//! from the schedule's f32 ᾱ_t and rounded to f32 (diffusers computes them in f32: at most 1 ulp apart).
//! The model is not seen here: [`DiffusionObjective::training_loss`] takes it as a closure.
use crate::error::{Result, TrainError};
use candle_core::{DType, Tensor};
use ldm_core::rng::{NoiseRng, TorchRng};
pub use ldm_models::original_config::LossType;
use ldm_sampling::schedule::Schedule;
use serde::{Deserialize, Serialize};

/// What the model is trained to predict (diffusers' `prediction_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Prediction {
    /// The noise ε (DDPM, LDM, SD1.x, SD2-base).
    #[default]
    Epsilon,
    /// The velocity v = √ᾱ_t ε − √(1−ᾱ_t) z0 (SD2-768-v).
    #[serde(rename = "v_prediction")]
    V,
}

/// The noised batch of one training step, and what the model should predict for it.
#[derive(Debug, Clone)]
pub struct TrainingInput {
    /// z_t, `[B, c, h, w]` (the shape and dtype of z0).
    pub z_t: Tensor,
    /// The timesteps as the model takes them: f32 `[B]`.
    pub t: Tensor,
    /// The same timesteps as integers in 0..T.
    pub timesteps: Vec<usize>,
    /// The noise ε that was added, `[B, c, h, w]`.
    pub eps: Tensor,
    /// The regression target: ε or v, `[B, c, h, w]`.
    pub target: Tensor,
}

/// The ε/v MSE objective on a training schedule. Holds no state besides the schedule.
#[derive(Debug, Clone)]
pub struct DiffusionObjective {
    pub schedule: Schedule,
    pub prediction: Prediction,
    /// The loss's norm: the YAML's `loss_type` (l2 unless it says l1).
    pub loss_type: LossType,
}

/// `torch.randint(0, train_steps, (batch,))` on a CPU generator: one 32-bit word per item, modulo T.
pub fn sample_timesteps(
    rng: &mut TorchRng,
    batch: usize,
    train_steps: usize,
) -> Result<Vec<usize>> {
    let range = u32::try_from(train_steps)
        .ok()
        .filter(|&r| r > 0)
        .ok_or_else(|| {
            TrainError::invalid("train_steps", format!("{train_steps} is not in 1..=2^32-1"))
        })?;
    Ok((0..batch)
        .map(|_| (rng.random_u32() % range) as usize)
        .collect())
}

/// Per-item guidance-dropout decisions, `torch.rand(batch) < p`: `true` means "use the null condition".
pub fn dropout_mask(rng: &mut TorchRng, batch: usize, p: f64) -> Result<Vec<bool>> {
    if !(0.0..=1.0).contains(&p) {
        return Err(TrainError::invalid(
            "cond_drop_prob",
            format!("{p} is not a probability in [0, 1]"),
        ));
    }
    Ok(rng
        .rand(batch)
        .into_iter()
        .map(|u| f64::from(u) < p)
        .collect())
}

/// Classifier-free-guidance dropout of a continuous condition: each item of `cond` `[B, ...]` is replaced by
/// `null_cond` (`[...]` or `[1, ...]`, e.g. the empty prompt's context `[1, M, D]`) with probability `p`.
/// Returns the new condition (differentiable in both inputs) and the per-item mask (`true` = dropped).
pub fn drop_condition(
    cond: &Tensor,
    null_cond: &Tensor,
    p: f64,
    rng: &mut TorchRng,
) -> Result<(Tensor, Vec<bool>)> {
    let b = first_dim(cond, "cond")?;
    let item_dims = &cond.dims()[1..];
    let null = if null_cond.dims() == item_dims {
        null_cond.unsqueeze(0)?
    } else {
        null_cond.clone()
    };
    if null.dims()[0] != 1 || &null.dims()[1..] != item_dims {
        return Err(TrainError::invalid(
            "null_cond",
            format!(
                "shape {:?} does not fit one item of the condition {:?}",
                null_cond.dims(),
                cond.dims()
            ),
        ));
    }
    let null = null.to_dtype(cond.dtype())?.broadcast_as(cond.shape())?;
    let mask = dropout_mask(rng, b, p)?;
    let mut mask_shape = vec![b];
    mask_shape.extend(std::iter::repeat_n(1, item_dims.len()));
    let m = Tensor::from_iter(mask.iter().map(|&d| u8::from(d)), cond.device())?
        .reshape(mask_shape)?
        .broadcast_as(cond.shape())?;
    Ok((m.where_cond(&null, cond)?, mask))
}

/// Classifier-free-guidance dropout of class labels `[B]` (any integer dtype): each label is replaced by
/// `null_class` (the extra "no class" index, usually `num_classes`) with probability `p`.
pub fn drop_labels(
    labels: &Tensor,
    null_class: u32,
    p: f64,
    rng: &mut TorchRng,
) -> Result<(Tensor, Vec<bool>)> {
    if labels.rank() != 1 {
        return Err(TrainError::invalid(
            "labels",
            format!("expected a [B] tensor, got shape {:?}", labels.dims()),
        ));
    }
    let b = labels.dim(0)?;
    let mask = dropout_mask(rng, b, p)?;
    let m = Tensor::from_iter(mask.iter().map(|&d| u8::from(d)), labels.device())?;
    let null = Tensor::full(null_class, b, labels.device())?.to_dtype(labels.dtype())?;
    Ok((m.where_cond(&null, labels)?, mask))
}

fn first_dim(x: &Tensor, name: &'static str) -> Result<usize> {
    match x.dims().first() {
        Some(&b) if b > 0 => Ok(b),
        _ => Err(TrainError::invalid(
            name,
            format!(
                "expected a batch [B, ...] with B ≥ 1, got shape {:?}",
                x.dims()
            ),
        )),
    }
}

impl DiffusionObjective {
    pub fn new(schedule: Schedule, prediction: Prediction) -> Self {
        Self {
            schedule,
            prediction,
            loss_type: LossType::L2,
        }
    }

    /// The same objective with an l1 or l2 loss (`DDPM.get_loss` with `mean=True`).
    pub fn with_loss_type(self, loss_type: LossType) -> Self {
        Self { loss_type, ..self }
    }

    /// Draws ε ~ N(0, I) (`torch.randn_like(z0)`) and then t ~ U{0..T−1} (`torch.randint`) from `rng`, and
    /// builds the training input for clean latents `z0` `[B, ...]`.
    pub fn sample_training_input(&self, z0: &Tensor, rng: &mut TorchRng) -> Result<TrainingInput> {
        let b = first_dim(z0, "z0")?;
        let eps = Tensor::from_vec(rng.randn(z0.elem_count()), z0.shape(), z0.device())?
            .to_dtype(z0.dtype())?;
        let timesteps = sample_timesteps(rng, b, self.schedule.train_steps())?;
        self.training_input(z0, &eps, &timesteps)
    }

    /// The training input for given noise and timesteps (no randomness).
    pub fn training_input(
        &self,
        z0: &Tensor,
        eps: &Tensor,
        timesteps: &[usize],
    ) -> Result<TrainingInput> {
        let (a, s) = self.coefficients(z0, eps, timesteps)?;
        let z_t = (z0.broadcast_mul(&a)? + eps.broadcast_mul(&s)?)?;
        let target = match self.prediction {
            Prediction::Epsilon => eps.clone(),
            Prediction::V => (eps.broadcast_mul(&a)? - z0.broadcast_mul(&s)?)?,
        };
        let t = Tensor::from_iter(timesteps.iter().map(|&t| t as f32), z0.device())?;
        Ok(TrainingInput {
            z_t,
            t,
            timesteps: timesteps.to_vec(),
            eps: eps.clone(),
            target,
        })
    }

    /// z_t = √ᾱ_t z0 + √(1−ᾱ_t) ε (diffusers' `add_noise`).
    pub fn q_sample(&self, z0: &Tensor, eps: &Tensor, timesteps: &[usize]) -> Result<Tensor> {
        let (a, s) = self.coefficients(z0, eps, timesteps)?;
        Ok((z0.broadcast_mul(&a)? + eps.broadcast_mul(&s)?)?)
    }

    /// v = √ᾱ_t ε − √(1−ᾱ_t) z0 (diffusers' `get_velocity`).
    pub fn velocity(&self, z0: &Tensor, eps: &Tensor, timesteps: &[usize]) -> Result<Tensor> {
        let (a, s) = self.coefficients(z0, eps, timesteps)?;
        Ok((eps.broadcast_mul(&a)? - z0.broadcast_mul(&s)?)?)
    }

    /// (√ᾱ_t, √(1−ᾱ_t)) as `[B, 1, ..., 1]` tensors in z0's dtype, after checking the shapes and timesteps.
    fn coefficients(
        &self,
        z0: &Tensor,
        eps: &Tensor,
        timesteps: &[usize],
    ) -> Result<(Tensor, Tensor)> {
        let b = first_dim(z0, "z0")?;
        if eps.dims() != z0.dims() {
            return Err(TrainError::invalid(
                "eps",
                format!("shape {:?} differs from z0's {:?}", eps.dims(), z0.dims()),
            ));
        }
        if timesteps.len() != b {
            return Err(TrainError::invalid(
                "timesteps",
                format!("{} timesteps for a batch of {b}", timesteps.len()),
            ));
        }
        let steps = self.schedule.train_steps();
        if let Some(&t) = timesteps.iter().find(|&&t| t >= steps) {
            return Err(TrainError::invalid(
                "timesteps",
                format!("timestep {t} is outside 0..{steps}"),
            ));
        }
        let alpha_bar: Vec<f64> = timesteps
            .iter()
            .map(|&t| self.schedule.alpha_bar(t))
            .collect();
        let mut shape = vec![b];
        shape.extend(std::iter::repeat_n(1, z0.rank() - 1));
        let column = |f: &dyn Fn(f64) -> f64| -> Result<Tensor> {
            let v: Vec<f32> = alpha_bar.iter().map(|&a| f(a) as f32).collect();
            Ok(Tensor::from_vec(v, shape.as_slice(), z0.device())?.to_dtype(z0.dtype())?)
        };
        Ok((column(&|a| a.sqrt())?, column(&|a| (1.0 - a).sqrt())?))
    }

    /// mean((pred − target)²) (l2) or mean(|pred − target|) (l1) over every element, computed in f32 (a scalar
    /// tensor, differentiable in `pred`).
    pub fn loss(&self, pred: &Tensor, target: &Tensor) -> Result<Tensor> {
        if pred.dims() != target.dims() {
            return Err(TrainError::invalid(
                "pred",
                format!(
                    "the model output {:?} does not match the target {:?}",
                    pred.dims(),
                    target.dims()
                ),
            ));
        }
        let diff = (pred.to_dtype(DType::F32)? - target.to_dtype(DType::F32)?)?;
        Ok(match self.loss_type {
            LossType::L2 => diff.sqr()?.mean_all()?,
            LossType::L1 => diff.abs()?.mean_all()?,
        })
    }

    /// One step of the objective: samples the input from `rng`, calls `model(z_t, t)` and returns the loss with
    /// the input it was computed on.
    pub fn training_loss(
        &self,
        z0: &Tensor,
        rng: &mut TorchRng,
        model: impl FnOnce(&Tensor, &Tensor) -> candle_core::Result<Tensor>,
    ) -> Result<(Tensor, TrainingInput)> {
        let input = self.sample_training_input(z0, rng)?;
        let pred = model(&input.z_t, &input.t)?;
        let loss = self.loss(&pred, &input.target)?;
        Ok((loss, input))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use ldm_sampling::schedule::BetaSchedule;

    fn objective(schedule: BetaSchedule, prediction: Prediction) -> DiffusionObjective {
        let s = Schedule::new(schedule, 0.00085, 0.012, 1000).expect("valid schedule");
        DiffusionObjective::new(s, prediction)
    }

    fn to_vec(t: &Tensor) -> Vec<f32> {
        t.flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .expect("f32 tensor")
    }

    fn close(x: f32, y: f32, r: f32, a: f32) -> bool {
        (x - y).abs() <= (r * (x + y).abs()).max(a)
    }

    #[test]
    fn l1_loss_and_its_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let o = objective(BetaSchedule::Linear, Prediction::Epsilon).with_loss_type(LossType::L1);
        let pred = Var::from_vec(vec![1.0f32, -2.0, 0.5, 3.0], (1, 4), &dev)?;
        let target = Tensor::from_vec(vec![0.0f32, 0.0, 1.0, 1.0], (1, 4), &dev)?;
        let loss = o.loss(pred.as_tensor(), &target)?;
        // (1 + 2 + 0.5 + 2) / 4
        assert!((loss.to_scalar::<f32>()? - 1.375).abs() < 1e-7);
        let g = loss.backward()?;
        let g = to_vec(g.get(pred.as_tensor()).expect("a gradient"));
        assert_eq!(g, vec![0.25, -0.25, -0.25, 0.25]);
        Ok(())
    }

    #[test]
    fn q_sample_matches_closed_form() -> Result<()> {
        let dev = Device::Cpu;
        for sched in [
            BetaSchedule::Linear,
            BetaSchedule::ScaledLinear,
            BetaSchedule::SquaredcosCapV2,
        ] {
            let obj = objective(sched, Prediction::Epsilon);
            let mut rng = TorchRng::new(7);
            let z0 = Tensor::from_vec(rng.randn(3 * 2 * 4 * 4), (3, 2, 4, 4), &dev)?;
            let input = obj.sample_training_input(&z0, &mut rng)?;
            assert_eq!(input.timesteps.len(), 3);
            let (z, e, zt) = (to_vec(&z0), to_vec(&input.eps), to_vec(&input.z_t));
            for (i, &t) in input.timesteps.iter().enumerate() {
                let ab = obj.schedule.alpha_bar(t);
                for j in i * 32..(i + 1) * 32 {
                    let want =
                        (ab.sqrt() * f64::from(z[j]) + (1.0 - ab).sqrt() * f64::from(e[j])) as f32;
                    assert!(
                        close(zt[j], want, 1e-6, 1e-6),
                        "{sched:?} t={t}: {} vs {want}",
                        zt[j]
                    );
                }
            }
            assert_eq!(to_vec(&input.target), e, "ε target is the noise");
            assert_eq!(
                to_vec(&input.t),
                input
                    .timesteps
                    .iter()
                    .map(|&t| t as f32)
                    .collect::<Vec<_>>()
            );
        }
        Ok(())
    }

    #[test]
    fn v_target_recovers_x0_and_eps() -> Result<()> {
        let dev = Device::Cpu;
        let obj = objective(BetaSchedule::SquaredcosCapV2, Prediction::V);
        let mut rng = TorchRng::new(3);
        let z0 = Tensor::from_vec(rng.randn(4 * 3 * 5 * 5), (4, 3, 5, 5), &dev)?;
        let input = obj.training_input(
            &z0,
            &Tensor::from_vec(rng.randn(4 * 75), (4, 3, 5, 5), &dev)?,
            &[0, 1, 500, 999],
        )?;
        let (z, e, zt, v) = (
            to_vec(&z0),
            to_vec(&input.eps),
            to_vec(&input.z_t),
            to_vec(&input.target),
        );
        for (i, &t) in input.timesteps.iter().enumerate() {
            let ab = obj.schedule.alpha_bar(t);
            let (a, s) = (ab.sqrt(), (1.0 - ab).sqrt());
            for j in i * 75..(i + 1) * 75 {
                // x0 = √ᾱ z_t − √(1−ᾱ) v and ε = √(1−ᾱ) z_t + √ᾱ v (a rotation by the angle of (√ᾱ, √(1−ᾱ))).
                let x0 = (a * f64::from(zt[j]) - s * f64::from(v[j])) as f32;
                let eps = (s * f64::from(zt[j]) + a * f64::from(v[j])) as f32;
                assert!(close(x0, z[j], 1e-5, 1e-5), "t={t}: x0 {x0} vs {}", z[j]);
                assert!(close(eps, e[j], 1e-5, 1e-5), "t={t}: ε {eps} vs {}", e[j]);
            }
        }
        assert_eq!(to_vec(&obj.velocity(&z0, &input.eps, &input.timesteps)?), v);
        Ok(())
    }

    #[test]
    fn loss_is_mean_squared_error_and_differentiable() -> Result<()> {
        let dev = Device::Cpu;
        let obj = objective(BetaSchedule::Linear, Prediction::Epsilon);
        let pred = Var::from_vec(vec![1f32, 2., 3., 4.], (2, 2), &dev)?;
        let target = Tensor::from_vec(vec![0f32, 2., 5., 3.], (2, 2), &dev)?;
        let loss = obj.loss(pred.as_tensor(), &target)?;
        assert_eq!(loss.to_scalar::<f32>()?, (1.0 + 0.0 + 4.0 + 1.0) / 4.0);
        let grads = loss.backward()?;
        let g = grads.get(pred.as_tensor()).expect("gradient of pred");
        assert_eq!(to_vec(g), vec![0.5, 0.0, -1.0, 0.5]); // 2(pred − target)/N
        assert!(obj.loss(pred.as_tensor(), &target.reshape(4)?).is_err());
        Ok(())
    }

    #[test]
    fn timesteps_are_uniform_and_in_range() -> Result<()> {
        let mut rng = TorchRng::new(0);
        let t = sample_timesteps(&mut rng, 100_000, 1000)?;
        assert!(t.iter().all(|&t| t < 1000));
        let mean = t.iter().sum::<usize>() as f64 / t.len() as f64;
        // U{0..999}: mean 499.5, sd 288.7; the mean of 1e5 draws has sd 0.91.
        assert!((mean - 499.5).abs() < 5.0, "mean {mean}");
        assert!(sample_timesteps(&mut rng, 1, 0).is_err());
        Ok(())
    }

    #[test]
    fn condition_dropout_rate_is_p() -> Result<()> {
        let dev = Device::Cpu;
        let (b, p) = (20_000usize, 0.1);
        let cond = Tensor::ones((b, 3, 2), DType::F32, &dev)?;
        let null = Tensor::zeros((1, 3, 2), DType::F32, &dev)?;
        let mut rng = TorchRng::new(42);
        let (out, mask) = drop_condition(&cond, &null, p, &mut rng)?;
        let dropped = mask.iter().filter(|&&d| d).count();
        // Binomial(20000, 0.1): sd 42.4; 5 sd.
        assert!(
            (dropped as f64 - p * b as f64).abs() < 212.0,
            "{dropped} dropped"
        );
        let rows = out.sum((1, 2))?.to_vec1::<f32>()?;
        for (row, &d) in rows.iter().zip(&mask) {
            assert_eq!(*row, if d { 0.0 } else { 6.0 });
        }
        // `null` without the batch dim works too; p = 0 and p = 1 are exact.
        let (_, none) = drop_condition(&cond, &null.squeeze(0)?, 0.0, &mut rng)?;
        assert!(none.iter().all(|&d| !d));
        let (all_out, all) = drop_condition(&cond, &null, 1.0, &mut rng)?;
        assert!(all.iter().all(|&d| d));
        assert_eq!(all_out.sum_all()?.to_scalar::<f32>()?, 0.0);
        assert!(drop_condition(
            &cond,
            &Tensor::zeros((3, 3), DType::F32, &dev)?,
            p,
            &mut rng
        )
        .is_err());
        assert!(drop_condition(&cond, &null, 1.5, &mut rng).is_err());
        Ok(())
    }

    #[test]
    fn label_dropout_uses_the_null_class() -> Result<()> {
        let dev = Device::Cpu;
        let labels = Tensor::from_iter((0..1000u32).map(|i| i % 10), &dev)?;
        let mut rng = TorchRng::new(5);
        let (out, mask) = drop_labels(&labels, 10, 0.25, &mut rng)?;
        let dropped = mask.iter().filter(|&&d| d).count();
        // Binomial(1000, 0.25): sd 13.7.
        assert!((dropped as f64 - 250.0).abs() < 70.0, "{dropped} dropped");
        for (i, (&l, &d)) in out.to_vec1::<u32>()?.iter().zip(&mask).enumerate() {
            assert_eq!(l, if d { 10 } else { i as u32 % 10 });
        }
        let long = labels.to_dtype(DType::I64)?;
        assert_eq!(drop_labels(&long, 10, 0.5, &mut rng)?.0.dtype(), DType::I64);
        Ok(())
    }

    #[test]
    fn training_loss_passes_z_t_and_t_to_the_model() -> Result<()> {
        let dev = Device::Cpu;
        let obj = objective(BetaSchedule::ScaledLinear, Prediction::Epsilon);
        let z0 = Tensor::zeros((2, 4, 4, 4), DType::F32, &dev)?;
        // A model that predicts its input scaled back: with z0 = 0, z_t / √(1−ᾱ_t) = ε exactly (loss ≈ 0).
        let (loss, input) = obj.training_loss(&z0, &mut TorchRng::new(1), |z_t, t| {
            let ab: Vec<f32> = t
                .to_vec1::<f32>()?
                .iter()
                .map(|&t| (1.0 - obj.schedule.alpha_bar(t as usize)).sqrt() as f32)
                .collect();
            z_t.broadcast_div(&Tensor::from_vec(ab, (2, 1, 1, 1), &dev)?)
        })?;
        assert!(loss.to_scalar::<f32>()? < 1e-12, "loss {loss}");
        assert_eq!(input.timesteps.len(), 2);
        Ok(())
    }
}
