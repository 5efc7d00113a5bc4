//! LPIPS, the learned perceptual image patch similarity (Zhang et al. 2018) with the VGG16 backbone, as the
//! autoencoder losses of Latent Diffusion use it (`taming/modules/losses/lpips.py::LPIPS`,
//! CompVis/taming-transformers@3ba01b2):
//!
//! `d(x, y) = Σ_k mean_hw( w_k · (φ̂_k(s(x)) − φ̂_k(s(y)))² )`, with
//!
//! | symbol  | here                                                                                 |
//! |---------|--------------------------------------------------------------------------------------|
//! | `s`     | scaling layer `(x − shift)/scale`, shift `[−.030, −.088, −.188]`, scale `[.458, .448, .450]` |
//! | `φ_k`   | VGG16 `relu{1_2,2_2,3_3,4_3,5_3}` ([`Vgg16Features`])                                  |
//! | `φ̂_k`   | `φ_k / (‖φ_k‖₂ over channels + 1e-10)`                                               |
//! | `w_k`   | the 1×1 head `lin{k}.model.1.weight` `[1, C_k, 1, 1]` (no bias)                        |
//!
//! Weights come from user-supplied files: torchvision's `vgg16-397923af.pth` and the `lpips` package's
//! `weights/v0.1/vgg.pth`, both PyTorch checkpoints read by ldm-core's restricted unpickler (nothing in them
//! is executed). The network is frozen: its weights are plain tensors, gradients flow only to the images.
//!
//! The heads sit behind `nn.Dropout` in the reference (`use_dropout=True`); LPIPS is put in `eval()` mode
//! there, but Lightning's `model.train()` switches it back, so the reference applies dropout (p = 0.5) to the
//! head inputs during training. We evaluate LPIPS deterministically (dropout off), as its `eval()` intends.
use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::vgg::Vgg16Features;
use crate::{Result, TrainError};

const SHIFT: [f32; 3] = [-0.030, -0.088, -0.188];
const SCALE: [f32; 3] = [0.458, 0.448, 0.450];
const NORM_EPS: f64 = 1e-10;

/// LPIPS-VGG: a frozen VGG16 trunk and five linear heads.
#[derive(Debug, Clone)]
pub struct Lpips {
    vgg: Vgg16Features,
    heads: Vec<Tensor>, // lin{k}.model.1.weight, [1, C_k, 1, 1]
    shift: Tensor,      // [1, 3, 1, 1]
    scale: Tensor,      // [1, 3, 1, 1]
}

fn read_tensors(path: &Path) -> Result<HashMap<String, Tensor>> {
    let ckpt = ldm_core::ckpt::read_ckpt(path).map_err(|e| TrainError::Checkpoint {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    Ok(ckpt.tensors.into_iter().collect())
}

impl Lpips {
    /// Reads torchvision's VGG16 checkpoint (`vgg16-397923af.pth`, or any file with the same
    /// `features.*` keys) and the lpips heads (`vgg.pth`, keys `lin{0..4}.model.1.weight`).
    pub fn load(vgg_path: &Path, heads_path: &Path, device: &Device) -> Result<Self> {
        let vgg = read_tensors(vgg_path)?;
        let heads = read_tensors(heads_path)?;
        Self::from_tensors(
            &vgg,
            &vgg_path.display().to_string(),
            &heads,
            &heads_path.display().to_string(),
            device,
        )
    }

    /// Builds LPIPS from already-read tensors (`source`s name them in errors).
    pub fn from_tensors(
        vgg: &HashMap<String, Tensor>,
        vgg_source: &str,
        heads: &HashMap<String, Tensor>,
        heads_source: &str,
        device: &Device,
    ) -> Result<Self> {
        let vgg = Vgg16Features::from_tensors(vgg, vgg_source, device)?;
        let mut lins = Vec::with_capacity(5);
        for (k, c) in vgg.widths().iter().enumerate() {
            let key = format!("lin{k}.model.1.weight");
            let w = heads.get(&key).ok_or_else(|| TrainError::Checkpoint {
                path: heads_source.into(),
                reason: format!("missing LPIPS head `{key}`"),
            })?;
            if w.dims() != [1, *c, 1, 1] {
                return Err(TrainError::Checkpoint {
                    path: heads_source.into(),
                    reason: format!(
                        "LPIPS head `{key}` is {:?}, but the VGG layer it weighs has {c} channels \
                         (expected [1, {c}, 1, 1])",
                        w.dims()
                    ),
                });
            }
            lins.push(w.to_dtype(DType::F32)?.to_device(device)?);
        }
        Ok(Self {
            vgg,
            heads: lins,
            shift: Tensor::from_slice(&SHIFT, (1, 3, 1, 1), device)?,
            scale: Tensor::from_slice(&SCALE, (1, 3, 1, 1), device)?,
        })
    }

    /// Perceptual distance of `x` and `y` `[B, 3, H, W]` in [−1, 1] → `[B, 1, 1, 1]`, differentiable in both.
    pub fn forward(&self, x: &Tensor, y: &Tensor) -> Result<Tensor> {
        let scale = |t: &Tensor| -> Result<Tensor> {
            Ok(t.broadcast_sub(&self.shift)?.broadcast_div(&self.scale)?)
        };
        let fx = self.vgg.forward(&scale(x)?)?;
        let fy = self.vgg.forward(&scale(y)?)?;
        let mut total: Option<Tensor> = None;
        for ((a, b), w) in fx.iter().zip(fy.iter()).zip(self.heads.iter()) {
            let d = (unit_normalize(a)? - unit_normalize(b)?)?.sqr()?; // [B, C_k, h, w]
            let r = ldm_kernels::conv2d(&d, w, ldm_kernels::ConvParams::default())?
                .mean_keepdim(2)?
                .mean_keepdim(3)?; // [B, 1, 1, 1]
            total = Some(match total {
                None => r,
                Some(t) => (t + r)?,
            });
        }
        total.ok_or_else(|| TrainError::invalid("lpips", "no VGG layers"))
    }
}

/// `x / (‖x‖₂ over channels + 1e-10)` (lpips `normalize_tensor`).
fn unit_normalize(x: &Tensor) -> Result<Tensor> {
    let norm = (x.sqr()?.sum_keepdim(1)?.sqrt()? + NORM_EPS)?;
    Ok(x.broadcast_div(&norm)?)
}
