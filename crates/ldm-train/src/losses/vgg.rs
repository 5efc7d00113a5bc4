//! The convolutional part of VGG16 (Simonyan & Zisserman 2015) as LPIPS uses it: torchvision's
//! `vgg16().features`, cut into the five slices that end at `relu1_2`, `relu2_2`, `relu3_3`, `relu4_3` and
//! `relu5_3` (`taming/modules/losses/lpips.py::vgg16`, CompVis/taming-transformers@3ba01b2).
//!
//! Keys are torchvision's: `features.{0,2,5,7,10,12,14,17,19,21,24,26,28}.{weight,bias}` (3×3 convolutions,
//! padding 1, each followed by a ReLU; 2×2 max-pools at indices 4, 9, 16, 23). The channel widths are read
//! from the weights, so a reduced-width network of the same layer structure (the tests use one) loads through
//! the same path as the real one (64, 128, 256, 512, 512).
use std::collections::HashMap;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::Conv2dConfig;
use ldm_kernels::Conv2d;

use crate::{Result, TrainError};

/// `features.N` indices of the convolutions, grouped by slice (a max-pool opens every slice but the first).
pub const VGG16_CONV_SLICES: [&[usize]; 5] = [
    &[0, 2],
    &[5, 7],
    &[10, 12, 14],
    &[17, 19, 21],
    &[24, 26, 28],
];

/// VGG16 `features` up to `relu5_3`, frozen (its weights are plain tensors, not variables).
#[derive(Debug, Clone)]
pub struct Vgg16Features {
    slices: Vec<Vec<Conv2d>>,
    widths: [usize; 5],
}

impl Vgg16Features {
    /// Builds the network from `features.N.weight`/`bias` tensors (other keys, e.g. torchvision's
    /// `classifier.*`, are ignored). Every convolution must be 3×3 and chain with its neighbours; the
    /// first takes 3 channels.
    pub fn from_tensors(
        tensors: &HashMap<String, Tensor>,
        source: &str,
        device: &Device,
    ) -> Result<Self> {
        let cfg = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let mut in_ch = 3;
        let mut slices = Vec::with_capacity(5);
        let mut widths = [0; 5];
        for (s, idxs) in VGG16_CONV_SLICES.iter().enumerate() {
            let mut convs = Vec::with_capacity(idxs.len());
            for i in idxs.iter() {
                let get = |name: &str| -> Result<Tensor> {
                    let key = format!("features.{i}.{name}");
                    tensors
                        .get(&key)
                        .ok_or_else(|| bad(source, format!("missing VGG16 weight `{key}`")))?
                        .to_dtype(DType::F32)?
                        .to_device(device)
                        .map_err(Into::into)
                };
                let w = get("weight")?;
                let b = get("bias")?;
                let dims = w.dims().to_vec();
                if dims.len() != 4 || dims[1] != in_ch || dims[2] != 3 || dims[3] != 3 {
                    return Err(bad(
                        source,
                        format!(
                            "`features.{i}.weight` is {dims:?}, expected [out, {in_ch}, 3, 3] (VGG16 layout)"
                        ),
                    ));
                }
                if b.dims() != [dims[0]] {
                    return Err(bad(
                        source,
                        format!(
                            "`features.{i}.bias` is {:?}, expected [{}]",
                            b.dims(),
                            dims[0]
                        ),
                    ));
                }
                in_ch = dims[0];
                convs.push(Conv2d::new(w, Some(b), cfg));
            }
            widths[s] = in_ch;
            slices.push(convs);
        }
        Ok(Self { slices, widths })
    }

    /// Channel widths of the five outputs (`[64, 128, 256, 512, 512]` for the real VGG16).
    pub fn widths(&self) -> [usize; 5] {
        self.widths
    }

    /// `[B, 3, H, W]` (already LPIPS-scaled) → the five ReLU outputs `relu1_2 … relu5_3`.
    pub fn forward(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        let mut h = x.clone();
        let mut outs = Vec::with_capacity(5);
        for (s, convs) in self.slices.iter().enumerate() {
            if s > 0 {
                h = max_pool_2x2(&h)?; // features.{4,9,16,23}
            }
            for conv in convs {
                h = conv.forward(&h)?.relu()?;
            }
            outs.push(h.clone());
        }
        Ok(outs)
    }
}

/// `nn.MaxPool2d(2, 2)` (odd trailing rows/columns dropped), built from a reshape and two max reductions so
/// that its gradient is right: candle 0.11.1's `max_pool2d` backward scales the gradient by 1/4 (it multiplies
/// by the tie fraction instead of dividing). Ties send the gradient to every tied element (torch picks one);
/// after a ReLU the only likely ties are zeros, whose gradient the ReLU stops anyway.
pub fn max_pool_2x2(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let (h2, w2) = (h / 2, w / 2);
    let x = if h % 2 != 0 || w % 2 != 0 {
        x.narrow(2, 0, 2 * h2)?.narrow(3, 0, 2 * w2)?
    } else {
        x.clone()
    };
    Ok(x.reshape((b, c, h2, 2, w2, 2))?.max(5)?.max(3)?)
}

fn bad(source: &str, reason: String) -> TrainError {
    TrainError::Checkpoint {
        path: source.into(),
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    #[test]
    fn max_pool_passes_the_whole_gradient_to_the_maximum() -> Result<()> {
        let x = Var::from_tensor(&Tensor::new(
            &[[[
                [1f32, 5., 0., -1.],
                [2., 3., 4., 7.],
                [9., 1., 1., 1.],
                [0., 0., 2., 8.],
            ]]],
            &Device::Cpu,
        )?)?;
        let y = max_pool_2x2(x.as_tensor())?;
        assert_eq!(y.flatten_all()?.to_vec1::<f32>()?, vec![5., 7., 9., 8.]);
        let g = y.sum_all()?.backward()?;
        let gx = g.get(x.as_tensor()).map(|t| t.flatten_all()).transpose()?;
        let gx = gx.map(|t| t.to_vec1::<f32>()).transpose()?;
        let want = vec![
            0f32, 1., 0., 0., 0., 0., 0., 1., 1., 0., 0., 0., 0., 0., 0., 1.,
        ];
        assert_eq!(gx, Some(want));
        Ok(())
    }
}
