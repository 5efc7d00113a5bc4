//! The PatchGAN discriminator of the autoencoder losses (Isola et al. 2017, pix2pix's `NLayerDiscriminator`,
//! as `taming/modules/discriminator/model.py`, CompVis/taming-transformers@3ba01b2, with `weights_init`) and
//! the two discriminator losses (`taming/modules/losses/vqperceptual.py`).
//!
//! Layers, keys `main.{i}` (LeakyReLU slope 0.2 between them has no weights and takes an index):
//!
//! | index          | layer                                                        |
//! |----------------|--------------------------------------------------------------|
//! | 0, (1)         | conv 4×4 stride 2 pad 1, `input_nc → ndf`, bias              |
//! | per n < layers | conv 4×4 stride 2 pad 1 no bias, BatchNorm2d, (LeakyReLU)      |
//! | then           | conv 4×4 stride 1 pad 1 no bias, BatchNorm2d, (LeakyReLU)      |
//! | last           | conv 4×4 stride 1 pad 1 → 1 channel, bias (the logits map)    |
//!
//! Channels are `ndf · min(2ⁿ, 8)`. Initialisation through [`candle_nn::VarBuilder`] hints: conv weights
//! N(0, 0.02), BatchNorm weight N(1, 0.02) and bias 0 (`weights_init`); conv biases keep torch's default
//! U(±1/√fan_in). BatchNorm runs in training mode (batch statistics, biased variance in the normalisation)
//! and updates its running statistics (momentum 0.1, unbiased variance), which live as `running_mean` /
//! `running_var` in the same `VarBuilder` (in a `VarMap` they are variables that never receive gradients:
//! leave them out of the optimiser).
use candle_core::{Module, Tensor};
use candle_nn::{BatchNorm, Conv2dConfig, Init, VarBuilder};
use ldm_kernels::Conv2d;
use serde::{Deserialize, Serialize};

use crate::{Result, TrainError};

const BN_EPS: f64 = 1e-5;
const LEAKY_SLOPE: f64 = 0.2;

/// `NLayerDiscriminator(input_nc, ndf, n_layers)` (ActNorm is not supported: `use_actnorm = False`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiscriminatorConfig {
    pub input_nc: usize,
    pub ndf: usize,
    pub n_layers: usize,
}

impl Default for DiscriminatorConfig {
    /// The LDM/taming default: 3 input channels, 64 filters, 3 layers.
    fn default() -> Self {
        Self {
            input_nc: 3,
            ndf: 64,
            n_layers: 3,
        }
    }
}

impl DiscriminatorConfig {
    /// The side of the logit map for an input of side `side` (4×4 convolutions with padding 1: `n_layers` of
    /// stride 2, then two of stride 1), or `None` when the input is too small for this many layers.
    pub fn output_side(&self, side: usize) -> Option<usize> {
        let mut s = side;
        for _ in 0..self.n_layers {
            s = (s + 2).checked_sub(4)? / 2 + 1;
        }
        for _ in 0..2 {
            s = (s + 2).checked_sub(4)? + 1;
        }
        (s > 0).then_some(s)
    }
}

#[derive(Debug, Clone)]
struct Stage {
    conv: Conv2d,
    norm: Option<BatchNorm>,
    /// Whether a LeakyReLU follows.
    act: bool,
}

/// The PatchGAN discriminator: `[B, input_nc, H, W]` → logits `[B, 1, h, w]`.
#[derive(Debug, Clone)]
pub struct NLayerDiscriminator {
    stages: Vec<Stage>,
    config: DiscriminatorConfig,
}

fn conv(
    c_in: usize,
    c_out: usize,
    stride: usize,
    bias: bool,
    vb: &VarBuilder,
    index: usize,
) -> Result<Conv2d> {
    let vb = vb.pp(index.to_string());
    let w = vb.get_with_hints(
        (c_out, c_in, 4, 4),
        "weight",
        Init::Randn {
            mean: 0.0,
            stdev: 0.02,
        },
    )?;
    let b = if bias {
        let bound = 1.0 / ((c_in * 16) as f64).sqrt();
        Some(vb.get_with_hints(
            c_out,
            "bias",
            Init::Uniform {
                lo: -bound,
                up: bound,
            },
        )?)
    } else {
        None
    };
    let cfg = Conv2dConfig {
        padding: 1,
        stride,
        ..Default::default()
    };
    Ok(Conv2d::new(w, b, cfg))
}

fn batch_norm(c: usize, vb: &VarBuilder, index: usize) -> Result<BatchNorm> {
    let vb = vb.pp(index.to_string());
    let weight = vb.get_with_hints(
        c,
        "weight",
        Init::Randn {
            mean: 1.0,
            stdev: 0.02,
        },
    )?;
    let bias = vb.get_with_hints(c, "bias", Init::Const(0.0))?;
    let running_mean = vb.get_with_hints(c, "running_mean", Init::Const(0.0))?;
    let running_var = vb.get_with_hints(c, "running_var", Init::Const(1.0))?;
    Ok(BatchNorm::new(
        c,
        running_mean,
        running_var,
        weight,
        bias,
        BN_EPS,
    )?)
}

impl NLayerDiscriminator {
    /// `vb` at the discriminator's key (`loss.discriminator` in an LDM training checkpoint).
    pub fn new(config: DiscriminatorConfig, vb: VarBuilder) -> Result<Self> {
        if config.input_nc == 0 || config.ndf == 0 || config.n_layers == 0 {
            return Err(TrainError::invalid(
                "discriminator",
                format!("zero-sized discriminator {config:?}"),
            ));
        }
        let vb = vb.pp("main");
        let ndf = config.ndf;
        let mut idx = 0;
        let mut stages = vec![Stage {
            conv: conv(config.input_nc, ndf, 2, true, &vb, idx)?,
            norm: None,
            act: true,
        }];
        idx += 2;
        let mut mult = 1;
        for n in 1..=config.n_layers {
            let prev = mult;
            mult = (1usize << n.min(3)).min(8);
            let stride = if n < config.n_layers { 2 } else { 1 };
            stages.push(Stage {
                conv: conv(ndf * prev, ndf * mult, stride, false, &vb, idx)?,
                norm: Some(batch_norm(ndf * mult, &vb, idx + 1)?),
                act: true,
            });
            idx += 3;
        }
        stages.push(Stage {
            conv: conv(ndf * mult, 1, 1, true, &vb, idx)?,
            norm: None,
            act: false,
        });
        Ok(Self { stages, config })
    }

    pub fn config(&self) -> &DiscriminatorConfig {
        &self.config
    }

    /// Logits in training mode: BatchNorm uses the batch statistics and updates its running statistics
    /// (as every forward of the reference does, whose discriminator is always in `train()` mode).
    pub fn forward_train(&self, x: &Tensor) -> Result<Tensor> {
        let c = x.dim(1)?;
        if c != self.config.input_nc {
            return Err(TrainError::invalid(
                "discriminator",
                format!(
                    "input has {c} channels, the discriminator takes {}",
                    self.config.input_nc
                ),
            ));
        }
        let mut h = x.clone();
        for s in &self.stages {
            h = s.conv.forward(&h)?;
            if let Some(bn) = &s.norm {
                h = bn.forward_train(&h)?;
            }
            if s.act {
                h = candle_nn::ops::leaky_relu(&h, LEAKY_SLOPE)?;
            }
        }
        Ok(h)
    }
}

/// Which discriminator loss (`disc_loss` of the loss config).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiscLoss {
    /// `½·(mean(relu(1 − D(x))) + mean(relu(1 + D(x̂))))`.
    #[default]
    Hinge,
    /// `½·(mean(softplus(−D(x))) + mean(softplus(D(x̂))))`.
    Vanilla,
}

impl DiscLoss {
    /// The loss of the real and fake logits (scalar tensor).
    pub fn loss(self, logits_real: &Tensor, logits_fake: &Tensor) -> Result<Tensor> {
        let (real, fake) = match self {
            DiscLoss::Hinge => (
                (1.0 - logits_real)?.relu()?.mean_all()?,
                (logits_fake + 1.0)?.relu()?.mean_all()?,
            ),
            DiscLoss::Vanilla => (
                softplus(&logits_real.neg()?)?.mean_all()?,
                softplus(logits_fake)?.mean_all()?,
            ),
        };
        Ok(((real + fake)? * 0.5)?)
    }
}

/// `log(1 + eˣ)`, stable for large |x|: `max(x, 0) + log(1 + e^{−|x|})`.
fn softplus(x: &Tensor) -> Result<Tensor> {
    Ok((x.relu()? + (x.abs()?.neg()?.exp()? + 1.0)?.log()?)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    #[test]
    fn keys_shapes_and_init_follow_taming() -> Result<()> {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let d = NLayerDiscriminator::new(DiscriminatorConfig::default(), vb)?;
        let data = vm
            .data()
            .lock()
            .map_err(|_| TrainError::invalid("test", "lock"))?;
        let shape = |k: &str| data.get(k).map(|v| v.as_tensor().dims().to_vec());
        assert_eq!(shape("main.0.weight"), Some(vec![64, 3, 4, 4]));
        assert_eq!(shape("main.2.weight"), Some(vec![128, 64, 4, 4]));
        assert_eq!(shape("main.5.weight"), Some(vec![256, 128, 4, 4]));
        assert_eq!(shape("main.8.weight"), Some(vec![512, 256, 4, 4]));
        assert_eq!(shape("main.9.running_var"), Some(vec![512]));
        assert_eq!(shape("main.11.weight"), Some(vec![1, 512, 4, 4]));
        assert!(
            shape("main.2.bias").is_none(),
            "convs before BatchNorm have no bias"
        );
        assert_eq!(data.len(), 13 + 6);
        let w = data.get("main.2.weight").map(|v| v.as_tensor().clone());
        let w = w.ok_or_else(|| TrainError::invalid("test", "main.2.weight"))?;
        let std = w.sqr()?.mean_all()?.sqrt()?.to_scalar::<f32>()?;
        assert!((std - 0.02).abs() < 0.002, "conv init std {std}");
        drop(data);
        // 64 → 32 → 16 → 8 → 7 → 6: two stride-2 convs after the first, then two stride-1 4x4 convs.
        let y = d.forward_train(&Tensor::randn(0f32, 1.0, (2, 3, 64, 64), &Device::Cpu)?)?;
        assert_eq!(y.dims(), &[2, 1, 6, 6]);
        let cfg = DiscriminatorConfig::default();
        assert_eq!(cfg.output_side(64), Some(6));
        // The smallest input a 3-layer PatchGAN takes: 24 → 12 → 6 → 3 → 2 → 1.
        assert_eq!(cfg.output_side(24), Some(1));
        let y = d.forward_train(&Tensor::randn(0f32, 1.0, (1, 3, 24, 24), &Device::Cpu)?)?;
        assert_eq!(y.dims(), &[1, 1, 1, 1]);
        assert_eq!(cfg.output_side(23), None);
        assert_eq!(cfg.output_side(16), None);
        Ok(())
    }

    #[test]
    fn hinge_and_vanilla_losses() -> Result<()> {
        let dev = Device::Cpu;
        let real = Tensor::new(&[2f32, 0.5], &dev)?;
        let fake = Tensor::new(&[-2f32, 0.0], &dev)?;
        // hinge: real relu(1 − r) = [0, 0.5] → 0.25; fake relu(1 + f) = [0, 1] → 0.5; ½(0.75)
        let h = DiscLoss::Hinge.loss(&real, &fake)?.to_scalar::<f32>()?;
        assert!((h - 0.375).abs() < 1e-7);
        let sp = |x: f64| (1.0 + x.exp()).ln();
        let want = 0.5 * ((sp(-2.0) + sp(-0.5)) / 2.0 + (sp(-2.0) + sp(0.0)) / 2.0);
        let v = DiscLoss::Vanilla.loss(&real, &fake)?.to_scalar::<f32>()? as f64;
        assert!((v - want).abs() < 1e-6, "{v} vs {want}");
        Ok(())
    }
}
