//! Training inputs of models conditioned by concatenation (Rombach et al. 2022, Sec. 3.3): channels joined to
//! z_t before the UNet, made from each training image, the same channels the inference commands make.
//!
//! * **Super-resolution** (LDM-SR, Sec. 4.4; `cond_stage_config: torch.nn.Identity`): the low-res image is
//!   the training image degraded by bicubic downsampling to the latent's size (the paper follows SR3 and fixes
//!   the degradation to bicubic 4× downsampling; here the factor is the first stage's f), in [−1, 1], not
//!   encoded. The UNet sees [z_t; lr].
//! * **The SD x4 upscaler's noise augmentation** (`LatentUpscaleDiffusion` with
//!   `ImageConcatWithNoiseAugmentation`): a noise level n uniform in [0, max_noise_level) per example, the
//!   low-res image noised to n on its own schedule (√ᾱ_n·lr + √(1−ᾱ_n)·ε), and n as the UNet's class label.
//! * **Stable Diffusion inpainting** (`LatentInpaintDiffusion`): a random mask m ∈ {0, 1} (1 = repaint,
//!   [`random_masks`]), the masked image x·(1 − m) (repainted pixels 0), and the UNet sees
//!   [z_t; m↓; scale·E(masked image)] with a posterior sample, as diffusers' `prepare_mask_latents` builds it.
//! * **The paper's inpainting model** (`cond_stage_config: __is_first_stage__`): the masked image in [0, 1]
//!   mapped to [−1, 1] (repainted pixels −1), encoded deterministically (VQ: before quantisation; no scale),
//!   then the mask as ±1: [z_t; E(masked); 2m↓ − 1], as `scripts/inpaint.py` feeds it.
//!
//! m↓ is the mask at latent resolution by nearest neighbour (pixel (f·i, f·j)), [`mask_to_latent`].
use candle_core::{DType, Device, Tensor};
use ldm_core::rng::{NoiseRng, TorchRng};
use ldm_models::autoencoder::{Encoded, FirstStage};
use ldm_pipeline::inpaint::mask_to_latent;
use ldm_pipeline::spec::{ConcatSpec, FirstStageSpec, InpaintConcat, ModelSpec};
use ldm_sampling::schedule::Schedule;
use ldm_sampling::SamplerKind;

use crate::data::{resize_batch, ResizeFilter};
use crate::error::{Result, TrainError};
use crate::recipe::MaskSettings;

/// The low-res image's noise augmentation.
pub struct NoiseAug {
    pub max_noise_level: usize,
    schedule: Schedule,
}

/// How the concatenated channels of a batch are made.
pub enum ConcatTraining {
    None,
    LowRes {
        aug: Option<NoiseAug>,
    },
    Inpaint {
        variant: InpaintConcat,
        masks: MaskSettings,
    },
}

/// What a batch adds to the UNet's inputs.
#[derive(Debug, Default)]
pub struct ConcatInputs {
    /// Joined to z_t on the channel axis, `[B, C', h, w]`.
    pub extra: Option<Tensor>,
    /// Class labels of the UNet (the x4 upscaler's noise levels), `[B]` u32.
    pub y: Option<Tensor>,
}

fn model_err(e: impl std::fmt::Display) -> TrainError {
    TrainError::invalid("model", e.to_string())
}

/// Image channels of a first stage.
pub fn image_channels(spec: &ModelSpec) -> usize {
    spec.first_stage.image_channels()
}

impl ConcatTraining {
    /// The inputs `spec` asks for; checks that the UNet takes z_t plus those channels.
    pub fn new(spec: &ModelSpec, masks: &MaskSettings) -> Result<Self> {
        let latent_c = spec.first_stage.latent_channels();
        let (this, extra_c) = match &spec.concat {
            ConcatSpec::None => return Ok(Self::None),
            ConcatSpec::LowRes { noise_aug } => {
                let aug = noise_aug
                    .as_ref()
                    .map(|a| -> Result<NoiseAug> {
                        if a.max_noise_level == 0 {
                            return Err(TrainError::invalid(
                                "model",
                                "the low-res noise augmentation has max_noise_level 0",
                            ));
                        }
                        if spec.unet.num_classes.is_none_or(|n| n < a.max_noise_level) {
                            return Err(TrainError::invalid(
                                "model",
                                format!(
                                    "the noise level (0..{}) is the UNet's class label, but its num_classes is \
                                     {:?}",
                                    a.max_noise_level, spec.unet.num_classes
                                ),
                            ));
                        }
                        Ok(NoiseAug {
                            max_noise_level: a.max_noise_level,
                            schedule: Schedule::from_config(&a.schedule, SamplerKind::Ddpm)
                                .map_err(model_err)?,
                        })
                    })
                    .transpose()?;
                (Self::LowRes { aug }, image_channels(spec))
            }
            ConcatSpec::Inpaint(variant) => {
                if *variant == InpaintConcat::Ldm && matches!(spec.first_stage, FirstStageSpec::Kl(_)) {
                    return Err(TrainError::invalid(
                        "model",
                        "a `__is_first_stage__` inpainting model concatenates the first stage's encoding of \
                         the masked image, which a KL first stage gives as a posterior: the original (and \
                         `ldm inpaint`) support VQ and identity first stages only",
                    ));
                }
                (
                    Self::Inpaint {
                        variant: *variant,
                        masks: masks.clone(),
                    },
                    latent_c + 1,
                )
            }
            ConcatSpec::Semantic(_) => {
                return Err(TrainError::invalid(
                    "model",
                    "semantic-synthesis training needs segmentation maps, which the data readers do not \
                     read yet",
                ))
            }
        };
        if spec.unet.in_channels != latent_c + extra_c {
            return Err(TrainError::invalid(
                "model",
                format!(
                    "{} concatenates {extra_c} channels to {latent_c} latent channels, but its UNet takes {} \
                     input channels (in_channels should be {})",
                    spec.conditioning(),
                    spec.unet.in_channels,
                    latent_c + extra_c
                ),
            ));
        }
        Ok(this)
    }

    pub fn is_none(&self) -> bool {
        matches!(self, Self::None)
    }

    /// The concatenated channels (and class labels) for `images` (`[B, C, H, W]` in [−1, 1], the first stage's
    /// channel count) on a first stage of factor `f`, drawing masks, noise levels and posterior noise from `rng`.
    pub fn inputs(
        &self,
        images: &Tensor,
        f: usize,
        first_stage: &FirstStage,
        latent_scale: f64,
        rng: &mut TorchRng,
    ) -> Result<ConcatInputs> {
        let (b, _, h, w) = images.dims4()?;
        let dev = images.device();
        match self {
            Self::None => Ok(ConcatInputs::default()),
            Self::LowRes { aug } => {
                let lr = degrade(images, f)?;
                match aug {
                    None => Ok(ConcatInputs {
                        extra: Some(lr),
                        y: None,
                    }),
                    Some(a) => {
                        let (noised, levels) = a.augment(&lr, rng)?;
                        Ok(ConcatInputs {
                            extra: Some(noised),
                            y: Some(Tensor::new(levels.as_slice(), dev)?),
                        })
                    }
                }
            }
            Self::Inpaint { variant, masks } => {
                let mask = random_masks(rng, b, h, w, masks, dev)?; // [B, 1, H, W], 1 = repaint
                let keep = (1.0 - &mask)?;
                let extra = match variant {
                    InpaintConcat::Sd => {
                        let masked = images.broadcast_mul(&keep)?;
                        let z = match first_stage.encode(&masked)? {
                            Encoded::Posterior(p) => {
                                let eps = Tensor::from_vec(
                                    rng.randn(p.mean.elem_count()),
                                    p.mean.shape(),
                                    dev,
                                )?;
                                (p.mean + ((p.logvar * 0.5)?.exp()? * eps)?)?
                            }
                            Encoded::Latent(z) => z,
                        };
                        let m = mask_to_latent(&mask, f, dev).map_err(model_err)?;
                        Tensor::cat(&[&m, &(z * latent_scale)?], 1)?
                    }
                    InpaintConcat::Ldm => {
                        let image01 = ((images + 1.0)? / 2.0)?;
                        let masked = image01.broadcast_mul(&keep)?.affine(2.0, -1.0)?;
                        let c = match first_stage.encode(&masked)? {
                            Encoded::Latent(z) => z,
                            Encoded::Posterior(_) => {
                                return Err(TrainError::invalid(
                                    "model",
                                    "a `__is_first_stage__` inpainting model needs a VQ or identity first stage",
                                ))
                            }
                        };
                        let m =
                            mask_to_latent(&mask.affine(2.0, -1.0)?, f, dev).map_err(model_err)?;
                        Tensor::cat(&[&c, &m], 1)?
                    }
                };
                Ok(ConcatInputs {
                    extra: Some(extra.detach()),
                    y: None,
                })
            }
        }
    }
}

impl NoiseAug {
    /// `ImageConcatWithNoiseAugmentation.forward`: one noise level per example (`torch.randint(0, max, (B,))`),
    /// then `q_sample` with one `randn_like`.
    pub fn augment(&self, lr: &Tensor, rng: &mut TorchRng) -> Result<(Tensor, Vec<u32>)> {
        let b = lr.dim(0)?;
        let levels: Vec<u32> = (0..b)
            .map(|_| rng.random_u32() % self.max_noise_level as u32)
            .collect();
        let (a, s): (Vec<f32>, Vec<f32>) = levels
            .iter()
            .map(|&n| {
                let ab = self.schedule.alpha_bar(n as usize);
                (ab.sqrt() as f32, (1.0 - ab).sqrt() as f32)
            })
            .unzip();
        let dev = lr.device();
        let noise = Tensor::from_vec(rng.randn(lr.elem_count()), lr.shape(), dev)?;
        let a = Tensor::from_vec(a, (b, 1, 1, 1), dev)?;
        let s = Tensor::from_vec(s, (b, 1, 1, 1), dev)?;
        Ok(((lr.broadcast_mul(&a)? + noise.broadcast_mul(&s)?)?, levels))
    }
}

/// The super-resolution degradation: bicubic (antialiased, as PIL) downsampling by `f` to the latent's size.
pub fn degrade(images: &Tensor, f: usize) -> Result<Tensor> {
    let (_, _, h, w) = images.dims4()?;
    if f == 1 {
        return Ok(images.clone());
    }
    resize_batch(images, h / f, w / f, ResizeFilter::CatmullRom)
}

/// `b` random masks `[b, 1, h, w]` (1 = repaint) as [`MaskSettings`] describes. Per mask: one uniform draw
/// for "everything"; otherwise one 32-bit draw for the box count, then per box four uniforms (height, width,
/// top, left).
pub fn random_masks(
    rng: &mut TorchRng,
    b: usize,
    h: usize,
    w: usize,
    s: &MaskSettings,
    device: &Device,
) -> Result<Tensor> {
    let mut data = vec![0f32; b * h * w];
    for m in data.chunks_exact_mut(h * w) {
        if f64::from(rng.rand(1)[0]) < s.full {
            m.fill(1.0);
            continue;
        }
        let (lo, hi) = s.boxes;
        let n = lo + (rng.random_u32() as usize) % (hi - lo + 1);
        for _ in 0..n {
            let u = rng.rand(4);
            let side = |u: f32, len: usize| {
                let frac = s.min_side + f64::from(u) * (s.max_side - s.min_side);
                ((frac * len as f64).round() as usize).clamp(1, len)
            };
            let (bh, bw) = (side(u[0], h), side(u[1], w));
            let top = ((f64::from(u[2]) * (h - bh + 1) as f64) as usize).min(h - bh);
            let left = ((f64::from(u[3]) * (w - bw + 1) as f64) as usize).min(w - bw);
            for row in m[top * w..(top + bh) * w].chunks_exact_mut(w) {
                row[left..left + bw].fill(1.0);
            }
        }
    }
    Ok(Tensor::from_vec(data, (b, 1, h, w), device)?.to_dtype(DType::F32)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_follow_their_settings() -> Result<()> {
        let dev = Device::Cpu;
        let s = MaskSettings {
            full: 0.25,
            boxes: (1, 2),
            min_side: 0.25,
            max_side: 0.5,
        };
        let mut rng = TorchRng::new(3);
        let m = random_masks(&mut rng, 400, 16, 16, &s, &dev)?;
        let v = m.flatten_all()?.to_vec1::<f32>()?;
        assert!(v.iter().all(|&x| x == 0.0 || x == 1.0));
        let mut full = 0;
        for mask in v.chunks_exact(256) {
            let on = mask.iter().filter(|&&x| x == 1.0).count();
            if on == 256 {
                full += 1;
                continue;
            }
            // One or two boxes of sides 4..=8: between 16 and 128 pixels.
            assert!((16..=128).contains(&on), "{on} pixels");
        }
        // 400 draws at p = 1/4: 100 ± 3σ (σ ≈ 8.7).
        assert!((74..=126).contains(&full), "{full} full masks");
        // The same generator state gives the same masks.
        let again = random_masks(&mut TorchRng::new(3), 400, 16, 16, &s, &dev)?;
        assert_eq!(again.flatten_all()?.to_vec1::<f32>()?, v);
        Ok(())
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .expect("an f32 tensor")
    }

    fn image(dev: &Device) -> Result<Tensor> {
        let v: Vec<f32> = (0..2 * 3 * 8 * 8)
            .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
            .collect();
        Ok(Tensor::from_vec(v, (2, 3, 8, 8), dev)?)
    }

    #[test]
    fn inpainting_inputs_are_built_as_each_original_builds_them() -> Result<()> {
        // On an identity first stage (f = 1) the encodings are the pixels, so both layouts can be checked
        // against the masks drawn from the same generator state.
        let dev = Device::Cpu;
        let x = image(&dev)?;
        let fs = FirstStage::Identity { channels: 3 };
        let masks = MaskSettings::default();
        for variant in [InpaintConcat::Sd, InpaintConcat::Ldm] {
            let c = ConcatTraining::Inpaint {
                variant,
                masks: masks.clone(),
            };
            let got = c.inputs(&x, 1, &fs, 0.5, &mut TorchRng::new(11))?;
            assert!(got.y.is_none());
            let extra = got.extra.expect("inpainting concatenates");
            assert_eq!(extra.dims(), &[2, 4, 8, 8]);
            let m = random_masks(&mut TorchRng::new(11), 2, 8, 8, &masks, &dev)?;
            let keep = (1.0 - &m)?;
            let want = match variant {
                // [m; scale · (x · (1 − m))]
                InpaintConcat::Sd => Tensor::cat(&[&m, &(x.broadcast_mul(&keep)? * 0.5)?], 1)?,
                // [2 · ((x + 1)/2 · (1 − m)) − 1; 2m − 1]
                InpaintConcat::Ldm => {
                    let masked = ((&x + 1.0)? / 2.0)?
                        .broadcast_mul(&keep)?
                        .affine(2.0, -1.0)?;
                    Tensor::cat(&[&masked, &m.affine(2.0, -1.0)?], 1)?
                }
            };
            let (a, b) = (values(&extra), values(&want));
            let worst = a
                .iter()
                .zip(&b)
                .map(|(p, q)| (p - q).abs())
                .fold(0f32, f32::max);
            assert!(worst < 1e-6, "{variant:?}: {worst}");
        }
        Ok(())
    }

    #[test]
    fn noise_augmentation_draws_levels_then_noise() -> Result<()> {
        let dev = Device::Cpu;
        let lr = image(&dev)?;
        let schedule = Schedule::new(
            ldm_sampling::schedule::BetaSchedule::Linear,
            1e-4,
            0.02,
            1000,
        )
        .map_err(model_err)?;
        let aug = NoiseAug {
            max_noise_level: 350,
            schedule: schedule.clone(),
        };
        let (noised, levels) = aug.augment(&lr, &mut TorchRng::new(5))?;
        assert!(levels.iter().all(|&l| l < 350));
        let mut rng = TorchRng::new(5);
        let again: Vec<u32> = (0..2).map(|_| rng.random_u32() % 350).collect();
        assert_eq!(again, levels);
        let eps = rng.randn(lr.elem_count());
        let (x, got) = (values(&lr), values(&noised));
        for (i, ((&x, &e), &g)) in x.iter().zip(&eps).zip(&got).enumerate() {
            let ab = schedule.alpha_bar(levels[i / 192] as usize);
            let want = (ab.sqrt() * f64::from(x) + (1.0 - ab).sqrt() * f64::from(e)) as f32;
            assert!((g - want).abs() < 1e-5, "{i}: {g} vs {want}");
        }
        // Through `inputs`: the levels are the class labels.
        let c = ConcatTraining::LowRes { aug: Some(aug) };
        let fs = FirstStage::Identity { channels: 3 };
        let got = c.inputs(&lr, 1, &fs, 1.0, &mut TorchRng::new(5))?;
        let y = got.y.expect("noise levels as labels").to_vec1::<u32>()?;
        assert_eq!(y, levels);
        Ok(())
    }

    #[test]
    fn degradation_is_bicubic_downsampling_to_the_latent_size() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::full(0.5f32, (2, 3, 16, 8), &dev)?;
        let lr = degrade(&x, 4)?;
        assert_eq!(lr.dims(), &[2, 3, 4, 2]);
        let v = lr.flatten_all()?.to_vec1::<f32>()?;
        assert!(v.iter().all(|&p| (p - 0.5).abs() < 1e-5));
        assert_eq!(degrade(&x, 1)?.dims(), x.dims());
        Ok(())
    }
}
