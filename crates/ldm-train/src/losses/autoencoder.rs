//! The losses of first-stage training (Rombach et al. 2022, §3 and App. G; Esser et al. 2021, Eq. 4–7):
//! `ldm/modules/losses/contperceptual.py::LPIPSWithDiscriminator` (KL-regularised, CompVis/latent-diffusion@a506df5)
//! and `vqperceptual.py::VQLPIPSWithDiscriminator` (VQ-regularised; the taming version LDM's VQ configs name is
//! the same with an L1 pixel loss).
//!
//! | symbol        | meaning                                                                          |
//! |---------------|----------------------------------------------------------------------------------|
//! | `x`, `x̂`      | input and reconstruction `[B, 3, H, W]` in [−1, 1]                                |
//! | `rec`         | `|x − x̂| + w_p·P(x, x̂)` per pixel (`P` per image, broadcast over pixels)            |
//! | `P`           | LPIPS ([`Lpips`]) or, without VGG weights, `1 − SSIM` per image                     |
//! | `s`           | learnable log-variance `loss.logvar` (scalar, KL only)                            |
//! | `nll`         | KL: `Σ(rec/eˢ + s)/B`; VQ: `mean(rec)`                                             |
//! | `KL`          | `Σ ½(μ² + σ² − 1 − log σ²)/B` of the posterior                                    |
//! | `g`           | `−mean(D(x̂))`, the generator's GAN loss                                           |
//! | `λ`           | `clamp(‖∇_W nll‖ / (‖∇_W g‖ + 1e-4), 0, 1e4)·disc_weight`, `W` = `decoder.conv_out.weight` |
//! | `f`           | `disc_factor`, 0 before step `disc_start`                                         |
//! | total (KL)    | `nll + kl_weight·KL + λ·f·g`                                                      |
//! | total (VQ)    | `nll + λ·f·g + codebook_weight·L_q` (`L_q` from [`VectorQuantizer::forward_train`]) |
//! | `d_loss`      | `f·½(mean(relu(1 − D(x))) + mean(relu(1 + D(x̂))))` (hinge) or the softplus form     |
//!
//! **How λ is computed without two backward passes through the autoencoder.** The reference asks autograd for
//! `∇_W nll` and `∇_W g` (two partial passes through the loss networks and the last layer) and then
//! back-propagates the total through everything. Here the decoder's last layer is applied by the loss:
//! `x̂ = conv_out(h)` with `h` = [`LastLayer::input`]. The losses are evaluated on a LEAF copy `x̂ₗ` of
//! `x̂`'s values, and two small passes give `∂nll/∂x̂` and `∂g/∂x̂` (through LPIPS and the discriminator only).
//! `∇_W` of each follows from a pass through the last convolution alone, on a detached `h`:
//! `∇_W L = ∇_W Σ conv_out(sg[h]) · ∂L/∂x̂`. Then the update of every autoencoder parameter comes from ONE pass
//! through the autoencoder of the surrogate `S = Σ x̂·sg[∂nll/∂x̂ + λ·f·∂g/∂x̂] + (regulariser terms)`, whose
//! gradient equals that of the total loss exactly (the chain rule at `x̂`); the log-variance enters `S` as
//! `sg[Σrec]·e⁻ˢ/B + s·N/B`. The value of the total loss is reported separately.
//!
//! In training the reference runs a second autoencoder forward (new posterior sample, updated weights) for the
//! discriminator step; [`LpipsWithDiscriminator::discriminator_step`] takes whatever reconstructions the
//! caller passes. LDM's `configure_optimizers` leaves `loss.logvar` out of the autoencoder optimiser (it stays
//! at `logvar_init`); its gradient is in [`GeneratorStep::grads`] all the same.
use std::collections::BTreeMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Module, Tensor, Var};
use candle_nn::{Init, VarBuilder};
use ldm_kernels::Conv2d;
use ldm_models::autoencoder::DiagonalGaussian;
#[cfg(doc)]
use ldm_models::autoencoder::VectorQuantizer;
use serde::{Deserialize, Serialize};

use super::discriminator::{DiscLoss, DiscriminatorConfig, NLayerDiscriminator};
use super::lpips::Lpips;
use super::ssim::ssim_map;
use crate::{Result, TrainError};

/// The message that says, once, that the perceptual term is `1 − SSIM` (see [`Perceptual::notice`]).
pub const SSIM_FALLBACK_NOTICE: &str =
    "no VGG16/LPIPS weights given: the perceptual loss term is 1 − SSIM \
     (Gaussian window 11, σ 1.5) instead of LPIPS";

/// The perceptual distance `P(x, x̂)` of the reconstruction loss.
#[derive(Debug, Clone)]
pub enum Perceptual {
    Lpips(Box<Lpips>),
    /// `1 − SSIM` per image (data range 2), when no VGG weights are available.
    Ssim,
}

impl Perceptual {
    /// A line for the user when the choice deserves one (the SSIM fallback); callers print it once.
    pub fn notice(&self) -> Option<&'static str> {
        match self {
            Perceptual::Lpips(_) => None,
            Perceptual::Ssim => Some(SSIM_FALLBACK_NOTICE),
        }
    }

    /// `[B, 1, 1, 1]` distances of `x` and `y` `[B, 3, H, W]`.
    pub fn distance(&self, x: &Tensor, y: &Tensor) -> Result<Tensor> {
        match self {
            Perceptual::Lpips(l) => l.forward(x, y),
            Perceptual::Ssim => {
                let b = x.dim(0)?;
                let per_image = ssim_map(x, y, 2.0)?.reshape((b, ()))?.mean(1)?; // [B]
                Ok((1.0 - per_image)?.reshape((b, 1, 1, 1))?)
            }
        }
    }
}

/// The pixel distance of the VQ loss (`pixel_loss` of ldm's `VQLPIPSWithDiscriminator`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PixelLoss {
    #[default]
    L1,
    L2,
}

/// `lossconfig.params` of `LPIPSWithDiscriminator` (pixelloss_weight is unused by the original and omitted).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KlLossConfig {
    pub disc_start: u64,
    pub logvar_init: f64,
    pub kl_weight: f64,
    pub perceptual_weight: f64,
    pub disc_factor: f64,
    pub disc_weight: f64,
    pub disc_loss: DiscLoss,
    pub discriminator: DiscriminatorConfig,
}

impl KlLossConfig {
    /// LDM `autoencoder_kl_*` configs: `disc_start 50001, kl_weight 1e-6, disc_weight 0.5`, other defaults.
    pub fn ldm_kl() -> Self {
        Self {
            disc_start: 50001,
            logvar_init: 0.0,
            kl_weight: 1e-6,
            perceptual_weight: 1.0,
            disc_factor: 1.0,
            disc_weight: 0.5,
            disc_loss: DiscLoss::Hinge,
            discriminator: DiscriminatorConfig::default(),
        }
    }
}

/// `lossconfig.params` of `VQLPIPSWithDiscriminator`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VqLossConfig {
    pub disc_start: u64,
    pub codebook_weight: f64,
    pub perceptual_weight: f64,
    pub pixel_loss: PixelLoss,
    pub disc_factor: f64,
    pub disc_weight: f64,
    pub disc_loss: DiscLoss,
    pub discriminator: DiscriminatorConfig,
}

impl VqLossConfig {
    /// LDM `vq-f4`/`vq-f8` configs: `disc_start 0, disc_weight 0.75, codebook_weight 1.0`, other defaults.
    pub fn ldm_vq() -> Self {
        Self {
            disc_start: 0,
            codebook_weight: 1.0,
            perceptual_weight: 1.0,
            pixel_loss: PixelLoss::L1,
            disc_factor: 1.0,
            disc_weight: 0.75,
            disc_loss: DiscLoss::Hinge,
            discriminator: DiscriminatorConfig::default(),
        }
    }
}

/// The decoder's last layer and its input: the loss applies it (see the module docs for why).
#[derive(Debug, Clone, Copy)]
pub struct LastLayer<'a> {
    /// `h`, the input of `decoder.conv_out` (e.g. [`ldm_models::autoencoder::AutoencoderKl::decode_features`]).
    pub input: &'a Tensor,
    /// `decoder.conv_out`, whose weight is `W` of the adaptive weight.
    pub conv: &'a Conv2d,
}

/// The result of a generator (autoencoder) step.
#[derive(Debug)]
pub struct GeneratorStep {
    /// The total loss (value only; its gradient is `grads`).
    pub loss: f64,
    /// Gradients of the total loss for every variable the autoencoder, the posterior and `logvar` depend on
    /// (discriminator variables get none).
    pub grads: GradStore,
    /// `x̂`, detached: the reconstructions (for logging or the discriminator step).
    pub reconstructions: Tensor,
    /// The reference's `log` dict without the split prefix (`total_loss`, `nll_loss`, `d_weight`, ...), plus
    /// `nll_grad_norm` and `g_grad_norm` (`‖∇_W nll‖`, `‖∇_W g‖`) when λ was computed.
    pub log: BTreeMap<String, f64>,
}

/// The result of a discriminator step.
#[derive(Debug)]
pub struct DiscriminatorStep {
    /// `d_loss` (scalar), to back-propagate into the discriminator's variables.
    pub loss: Tensor,
    /// `disc_loss`, `logits_real`, `logits_fake`.
    pub log: BTreeMap<String, f64>,
}

/// Settings shared by both losses.
struct Gan<'a> {
    perceptual: &'a Perceptual,
    perceptual_weight: f64,
    pixel_loss: PixelLoss,
    disc: &'a NLayerDiscriminator,
    disc_weight: f64,
    disc_factor: f64,
    disc_start: u64,
    disc_loss: DiscLoss,
}

/// What [`Gan::generator`] hands to the two losses.
struct Generated {
    /// `Σ x̂·sg[∂L/∂x̂]` in the autoencoder's graph.
    surrogate: Tensor,
    ev: Evaluated,
    nll: Tensor,
    /// `x̂` in the autoencoder's graph.
    y: Tensor,
    d_weight: f64,
    /// The adopted disc_factor.
    f: f64,
    /// `‖∇_W nll‖`, `‖∇_W g‖` when λ was computed.
    norms: Option<(f64, f64)>,
}

impl Generated {
    fn log_norms(&self, log: &mut BTreeMap<String, f64>) {
        if let Some((n, g)) = self.norms {
            log.insert("nll_grad_norm".to_string(), n);
            log.insert("g_grad_norm".to_string(), g);
        }
    }
}

/// The pieces of a generator pass on the leaf reconstruction.
struct Evaluated {
    /// `[B, 3, H, W]` reconstruction-loss map (with the perceptual term broadcast).
    rec: Tensor,
    p_loss: Option<Tensor>,
    g: Tensor,
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.mean_all()?.to_scalar::<f64>()?)
}

fn missing(what: &str) -> TrainError {
    TrainError::invalid(
        "autoencoder loss",
        format!("no gradient reached {what} (is the decoder's last layer trainable?)"),
    )
}

impl Gan<'_> {
    fn adopt(&self, step: u64) -> f64 {
        if step < self.disc_start {
            0.0
        } else {
            self.disc_factor
        }
    }

    fn evaluate(&self, x: &Tensor, y: &Tensor) -> Result<Evaluated> {
        if x.dims() != y.dims() {
            return Err(TrainError::invalid(
                "autoencoder loss",
                format!(
                    "inputs {:?} and reconstructions {:?} differ in shape",
                    x.dims(),
                    y.dims()
                ),
            ));
        }
        let d = (x - y)?;
        let mut rec = match self.pixel_loss {
            PixelLoss::L1 => d.abs()?,
            PixelLoss::L2 => d.sqr()?,
        };
        let mut p_loss = None;
        if self.perceptual_weight > 0.0 {
            let p = self.perceptual.distance(x, y)?; // [B, 1, 1, 1]
            rec = rec.broadcast_add(&(&p * self.perceptual_weight)?)?;
            p_loss = Some(p);
        }
        let g = self.disc.forward_train(y)?.mean_all()?.neg()?;
        Ok(Evaluated { rec, p_loss, g })
    }

    /// `∇_W Σ conv(sg[h])·dy`: the last layer's weight gradient for an output gradient `dy`.
    fn weight_grad(last: &LastLayer, h_d: &Tensor, dy: &Tensor) -> Result<Tensor> {
        let s = (last.conv.forward(h_d)? * dy)?.sum_all()?;
        let grads = s.backward()?;
        grads
            .get(last.conv.weight())
            .cloned()
            .ok_or_else(|| missing("decoder.conv_out.weight"))
    }

    /// Runs the generator step. `nll_of` maps the rec map to the nll (on the leaf); `regulariser` is the
    /// extra term added to the surrogate (its value is reported by the caller); `lambda` says whether λ is
    /// computed (KL: only when disc_factor > 0).
    fn generator(
        &self,
        x: &Tensor,
        last: LastLayer,
        step: u64,
        lambda: bool,
        nll_of: &dyn Fn(&Tensor) -> Result<Tensor>,
    ) -> Result<Generated> {
        let y = last.conv.forward(last.input)?; // x̂ in the autoencoder's graph
        let leaf = Var::from_tensor(&y.detach())?;
        let ev = self.evaluate(&x.detach(), leaf.as_tensor())?;
        let nll = nll_of(&ev.rec)?;
        let dy_nll = nll
            .backward()?
            .get(leaf.as_tensor())
            .cloned()
            .ok_or_else(|| missing("the reconstruction (nll)"))?;
        let f = self.adopt(step);
        let mut norms = None;
        let (d_weight, dy) = if lambda {
            let dy_g =
                ev.g.backward()?
                    .get(leaf.as_tensor())
                    .cloned()
                    .ok_or_else(|| missing("the reconstruction (g)"))?;
            let h_d = last.input.detach();
            let gw_nll = Self::weight_grad(&last, &h_d, &dy_nll)?;
            let gw_g = Self::weight_grad(&last, &h_d, &dy_g)?;
            let n_nll = gw_nll
                .sqr()?
                .sum_all()?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?
                .sqrt();
            let n_g = gw_g
                .sqr()?
                .sum_all()?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?
                .sqrt();
            let w = (n_nll / (n_g + 1e-4)).clamp(0.0, 1e4) * self.disc_weight;
            norms = Some((n_nll, n_g));
            let dy = if w * f != 0.0 {
                (&dy_nll + (dy_g * (w * f))?)?
            } else {
                dy_nll
            };
            (w, dy)
        } else {
            (0.0, dy_nll)
        };
        let surrogate = (&y * dy)?.sum_all()?;
        Ok(Generated {
            surrogate,
            ev,
            nll,
            y,
            d_weight,
            f,
            norms,
        })
    }

    fn discriminator_step(&self, x: &Tensor, y: &Tensor, step: u64) -> Result<DiscriminatorStep> {
        let logits_real = self.disc.forward_train(&x.detach())?;
        let logits_fake = self.disc.forward_train(&y.detach())?;
        let f = self.adopt(step);
        let loss = (self.disc_loss.loss(&logits_real, &logits_fake)? * f)?;
        let log = BTreeMap::from([
            ("disc_loss".to_string(), scalar(&loss)?),
            ("logits_real".to_string(), scalar(&logits_real)?),
            ("logits_fake".to_string(), scalar(&logits_fake)?),
        ]);
        Ok(DiscriminatorStep { loss, log })
    }
}

/// `LPIPSWithDiscriminator`: the loss of the KL-regularised autoencoder, with its discriminator and `logvar`.
#[derive(Debug)]
pub struct LpipsWithDiscriminator {
    config: KlLossConfig,
    perceptual: Perceptual,
    discriminator: NLayerDiscriminator,
    logvar: Tensor, // scalar variable `logvar`
}

impl LpipsWithDiscriminator {
    /// `vb` at the loss's key (`loss` in an LDM training checkpoint): `logvar` and `discriminator.main.*`.
    pub fn new(config: KlLossConfig, perceptual: Perceptual, vb: VarBuilder) -> Result<Self> {
        let logvar = vb.get_with_hints((), "logvar", Init::Const(config.logvar_init))?;
        let discriminator = NLayerDiscriminator::new(config.discriminator, vb.pp("discriminator"))?;
        Ok(Self {
            config,
            perceptual,
            discriminator,
            logvar,
        })
    }

    pub fn config(&self) -> &KlLossConfig {
        &self.config
    }

    pub fn perceptual(&self) -> &Perceptual {
        &self.perceptual
    }

    pub fn discriminator(&self) -> &NLayerDiscriminator {
        &self.discriminator
    }

    /// The learnable log-variance (scalar).
    pub fn logvar(&self) -> &Tensor {
        &self.logvar
    }

    fn gan(&self) -> Gan<'_> {
        let c = &self.config;
        Gan {
            perceptual: &self.perceptual,
            perceptual_weight: c.perceptual_weight,
            pixel_loss: PixelLoss::L1,
            disc: &self.discriminator,
            disc_weight: c.disc_weight,
            disc_factor: c.disc_factor,
            disc_start: c.disc_start,
            disc_loss: c.disc_loss,
        }
    }

    /// The autoencoder step (`optimizer_idx == 0`) for inputs `x`, the posterior the latent was sampled from,
    /// and the decoder's last layer with its input. `global_step` gates the discriminator (`disc_start`).
    pub fn generator_step(
        &self,
        x: &Tensor,
        posterior: &DiagonalGaussian,
        last: LastLayer,
        global_step: u64,
    ) -> Result<GeneratorStep> {
        let b = x.dim(0)? as f64;
        let lv = &self.logvar;
        let nll_of = |rec: &Tensor| -> Result<Tensor> {
            let n = rec.elem_count() as f64;
            let inv = lv.neg()?.exp()?;
            Ok(((rec.sum_all()?.broadcast_mul(&inv)? + (lv * n)?)? / b)?)
        };
        let lambda = self.config.disc_factor > 0.0;
        let gen = self
            .gan()
            .generator(x, last, global_step, lambda, &nll_of)?;
        let (ev, d_weight, f) = (&gen.ev, gen.d_weight, gen.f);
        // KL(q(z|x) ‖ N(0, I)), summed per image, averaged over the batch.
        let kl = ((posterior.mean.sqr()? + posterior.logvar.exp()?)? - 1.0)?;
        let kl = ((kl - &posterior.logvar)?.sum_all()? * (0.5 / b))?;
        // logvar's own gradient: sg[Σrec]·e^{−s}/B + s·N/B.
        let rec_sum = ev.rec.sum_all()?.detach();
        let n = ev.rec.elem_count() as f64;
        let lv_term = ((rec_sum.broadcast_mul(&lv.neg()?.exp()?)? + (lv * n)?)? / b)?;
        let s = ((&gen.surrogate + (&kl * self.config.kl_weight)?)? + lv_term)?;
        let grads = s.backward()?;
        let (nll_v, kl_v, g_v) = (scalar(&gen.nll)?, scalar(&kl)?, scalar(&ev.g)?);
        let loss = nll_v + self.config.kl_weight * kl_v + d_weight * f * g_v;
        let mut log = BTreeMap::from([
            ("total_loss".to_string(), loss),
            ("logvar".to_string(), scalar(lv)?),
            ("kl_loss".to_string(), kl_v),
            ("nll_loss".to_string(), nll_v),
            ("rec_loss".to_string(), scalar(&ev.rec)?),
            ("d_weight".to_string(), d_weight),
            ("disc_factor".to_string(), f),
            ("g_loss".to_string(), g_v),
        ]);
        gen.log_norms(&mut log);
        Ok(GeneratorStep {
            loss,
            grads,
            reconstructions: gen.y.detach(),
            log,
        })
    }

    /// The discriminator step (`optimizer_idx == 1`): hinge (or vanilla) loss of `D(x)` against `D(x̂)`
    /// (both detached), times the adopted `disc_factor`.
    pub fn discriminator_step(
        &self,
        x: &Tensor,
        reconstructions: &Tensor,
        global_step: u64,
    ) -> Result<DiscriminatorStep> {
        self.gan()
            .discriminator_step(x, reconstructions, global_step)
    }
}

/// `VQLPIPSWithDiscriminator`: the loss of the VQ-regularised autoencoder, with its discriminator.
#[derive(Debug)]
pub struct VqLpipsWithDiscriminator {
    config: VqLossConfig,
    perceptual: Perceptual,
    discriminator: NLayerDiscriminator,
}

impl VqLpipsWithDiscriminator {
    /// `vb` at the loss's key (`loss`): `discriminator.main.*`.
    pub fn new(config: VqLossConfig, perceptual: Perceptual, vb: VarBuilder) -> Result<Self> {
        let discriminator = NLayerDiscriminator::new(config.discriminator, vb.pp("discriminator"))?;
        Ok(Self {
            config,
            perceptual,
            discriminator,
        })
    }

    pub fn config(&self) -> &VqLossConfig {
        &self.config
    }

    pub fn perceptual(&self) -> &Perceptual {
        &self.perceptual
    }

    pub fn discriminator(&self) -> &NLayerDiscriminator {
        &self.discriminator
    }

    fn gan(&self) -> Gan<'_> {
        let c = &self.config;
        Gan {
            perceptual: &self.perceptual,
            perceptual_weight: c.perceptual_weight,
            pixel_loss: c.pixel_loss,
            disc: &self.discriminator,
            disc_weight: c.disc_weight,
            disc_factor: c.disc_factor,
            disc_start: c.disc_start,
            disc_loss: c.disc_loss,
        }
    }

    /// The autoencoder step for inputs `x`, the quantiser's loss `codebook_loss` (scalar, from
    /// [`VectorQuantizer::forward_train`]) and the decoder's last layer with its input.
    pub fn generator_step(
        &self,
        x: &Tensor,
        codebook_loss: &Tensor,
        last: LastLayer,
        global_step: u64,
    ) -> Result<GeneratorStep> {
        let nll_of = |rec: &Tensor| -> Result<Tensor> { Ok(rec.mean_all()?) };
        let gen = self.gan().generator(x, last, global_step, true, &nll_of)?;
        let (ev, d_weight, f) = (&gen.ev, gen.d_weight, gen.f);
        let q = codebook_loss.mean_all()?;
        let s = (&gen.surrogate + (&q * self.config.codebook_weight)?)?;
        let grads = s.backward()?;
        let (nll_v, q_v, g_v) = (scalar(&gen.nll)?, scalar(&q)?, scalar(&ev.g)?);
        let loss = nll_v + d_weight * f * g_v + self.config.codebook_weight * q_v;
        let p_v = match &ev.p_loss {
            Some(p) => scalar(p)?,
            None => 0.0,
        };
        let mut log = BTreeMap::from([
            ("total_loss".to_string(), loss),
            ("quant_loss".to_string(), q_v),
            ("nll_loss".to_string(), nll_v),
            ("rec_loss".to_string(), scalar(&ev.rec)?),
            ("p_loss".to_string(), p_v),
            ("d_weight".to_string(), d_weight),
            ("disc_factor".to_string(), f),
            ("g_loss".to_string(), g_v),
        ]);
        gen.log_norms(&mut log);
        Ok(GeneratorStep {
            loss,
            grads,
            reconstructions: gen.y.detach(),
            log,
        })
    }

    /// The discriminator step, as [`LpipsWithDiscriminator::discriminator_step`].
    pub fn discriminator_step(
        &self,
        x: &Tensor,
        reconstructions: &Tensor,
        global_step: u64,
    ) -> Result<DiscriminatorStep> {
        self.gan()
            .discriminator_step(x, reconstructions, global_step)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use candle_nn::{Conv2dConfig, VarMap};

    struct Setup {
        vm: VarMap,
        loss: LpipsWithDiscriminator,
        x: Tensor,
        h: Var,
        conv: Conv2d,
        moments: Var,
    }

    fn setup(disc_start: u64) -> Result<Setup> {
        let dev = Device::Cpu;
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
        let cfg = KlLossConfig {
            disc_start,
            logvar_init: 0.2,
            kl_weight: 1e-2,
            disc_weight: 0.5,
            discriminator: DiscriminatorConfig {
                input_nc: 3,
                ndf: 4,
                n_layers: 1,
            },
            ..KlLossConfig::ldm_kl()
        };
        let loss = LpipsWithDiscriminator::new(cfg, Perceptual::Ssim, vb.pp("loss"))?;
        let w = vb.get_with_hints(
            (3, 5, 3, 3),
            "conv_out.weight",
            Init::Randn {
                mean: 0.0,
                stdev: 0.2,
            },
        )?;
        let b = vb.get_with_hints(3, "conv_out.bias", Init::Const(0.1))?;
        let conv = Conv2d::new(
            w,
            Some(b),
            Conv2dConfig {
                padding: 1,
                ..Default::default()
            },
        );
        Ok(Setup {
            loss,
            x: Tensor::randn(0f32, 0.5, (2, 3, 16, 16), &dev)?.clamp(-1f32, 1f32)?,
            h: Var::randn(0f32, 1.0, (2, 5, 16, 16), &dev)?,
            conv,
            moments: Var::randn(0f32, 0.5, (2, 4, 4, 4), &dev)?,
            vm,
        })
    }

    #[test]
    fn surrogate_gradients_equal_those_of_the_total_loss() -> Result<()> {
        let s = setup(0)?;
        assert_eq!(s.loss.perceptual().notice(), Some(SSIM_FALLBACK_NOTICE));
        let post = DiagonalGaussian::from_moments(s.moments.as_tensor())?;
        let last = LastLayer {
            input: s.h.as_tensor(),
            conv: &s.conv,
        };
        let out = s.loss.generator_step(&s.x, &post, last, 5)?;
        let lambda = out.log["d_weight"];
        assert!(lambda > 0.0 && out.log["disc_factor"] == 1.0);
        // The total loss as one graph, with the same λ: its gradients must be the same.
        let y = s.conv.forward(s.h.as_tensor())?;
        let rec = (&s.x - &y)?
            .abs()?
            .broadcast_add(&Perceptual::Ssim.distance(&s.x, &y)?)?;
        let lv = s.loss.logvar();
        let nll = ((rec.sum_all()?.broadcast_mul(&lv.neg()?.exp()?)?
            + (lv * rec.elem_count() as f64)?)?
            / 2.0)?;
        let kl = ((post.mean.sqr()? + post.logvar.exp()?)? - 1.0)?;
        let kl = ((kl - &post.logvar)?.sum_all()? * 0.25)?;
        let g = s
            .loss
            .discriminator()
            .forward_train(&y)?
            .mean_all()?
            .neg()?;
        let total = ((nll + (kl * 1e-2)?)? + (g * lambda)?)?;
        let total_v = total.to_scalar::<f32>()? as f64;
        assert!(
            (total_v - out.loss).abs() <= 1e-5 * total_v.abs(),
            "{total_v} vs {}",
            out.loss
        );
        let want = total.backward()?;
        let data =
            s.vm.data()
                .lock()
                .map_err(|_| TrainError::invalid("test", "lock"))?;
        let mut vars: Vec<(&str, Tensor)> = vec![
            ("h", s.h.as_tensor().clone()),
            ("moments", s.moments.as_tensor().clone()),
        ];
        for k in ["conv_out.weight", "conv_out.bias", "loss.logvar"] {
            let v = data.get(k).ok_or_else(|| TrainError::invalid("test", k))?;
            vars.push((k, v.as_tensor().clone()));
        }
        for (name, v) in vars {
            let a = out
                .grads
                .get(&v)
                .ok_or_else(|| TrainError::invalid("test", name))?;
            let b = want
                .get(&v)
                .ok_or_else(|| TrainError::invalid("test", name))?;
            let scale = b.abs()?.max_all()?.to_scalar::<f32>()?.max(1e-6);
            let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(
                diff <= 1e-4 * scale,
                "{name}: max diff {diff}, scale {scale}"
            );
        }
        Ok(())
    }

    #[test]
    fn before_disc_start_the_gan_term_is_off_but_lambda_is_logged() -> Result<()> {
        let s = setup(100)?;
        let post = DiagonalGaussian::from_moments(s.moments.as_tensor())?;
        let last = LastLayer {
            input: s.h.as_tensor(),
            conv: &s.conv,
        };
        let out = s.loss.generator_step(&s.x, &post, last, 99)?;
        assert_eq!(out.log["disc_factor"], 0.0);
        assert!(out.log["d_weight"] > 0.0);
        let want = out.log["nll_loss"] + 1e-2 * out.log["kl_loss"];
        assert!((out.loss - want).abs() <= 1e-9 * want.abs());
        let d = s.loss.discriminator_step(&s.x, &out.reconstructions, 99)?;
        assert_eq!(d.loss.to_scalar::<f32>()?, 0.0);
        let d = s.loss.discriminator_step(&s.x, &out.reconstructions, 100)?;
        assert!(d.loss.to_scalar::<f32>()? > 0.0);
        Ok(())
    }
}
