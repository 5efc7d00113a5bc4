//! Normalisation ops that work for inference and for training.
//!
//! candle_nn's fused `softmax_last_dim` and `layer_norm` kernels are fast but have no backward pass, so a graph
//! that goes through them cannot be trained. The functions here take the fused kernel when nothing upstream
//! needs a gradient (inference: plain tensors, no `Var`); when training, `ldm_kernels`' custom ops with their
//! backward passes for f32 on the CPU, and otherwise the same maths written with differentiable tensor ops,
//! which autodiff handles on every device.
//!
//! | code      | maths                                              |
//! |-----------|----------------------------------------------------|
//! | `softmax` | softmax(x)_i = exp(x_i − max x) / Σ_j exp(x_j − max x) |
//! | `LayerNorm` | (x − E[x]) / √(Var[x] + ε) · γ + β, over the last dim (Ba et al. 2016) |
use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::VarBuilder;

/// Softmax over the last dimension. Differentiable when `x` is part of a graph that tracks gradients.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if !x.track_op() {
        return candle_nn::ops::softmax_last_dim(x);
    }
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        // One pass each way, with its own backward (`ldm_kernels`).
        return ldm_kernels::softmax_last_dim(x);
    }
    // The max is a constant shift (softmax is invariant to it), so it is detached.
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// Layer normalisation over the last dimension with a weight and a bias (PyTorch `nn.LayerNorm`).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn new(weight: Tensor, bias: Tensor, eps: f64) -> Self {
        Self { weight, bias, eps }
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
}

/// `nn.LayerNorm(dim, eps)` at `vb` (keys `weight`, `bias`; a new trainable one starts at γ = 1, β = 0).
pub fn layer_norm(dim: usize, eps: f64, vb: VarBuilder) -> Result<LayerNorm> {
    let weight = vb.get_with_hints(dim, "weight", candle_nn::Init::Const(1.))?;
    let bias = vb.get_with_hints(dim, "bias", candle_nn::Init::Const(0.))?;
    Ok(LayerNorm::new(weight, bias, eps))
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let trains = x.track_op() || self.weight.track_op() || self.bias.track_op();
        // The fused kernel has no f64 version.
        if !trains && x.is_contiguous() && x.dtype() != DType::F64 {
            return candle_nn::ops::layer_norm(x, &self.weight, &self.bias, self.eps as f32);
        }
        // Training on the CPU in f32: one pass each way, with its own backward (`ldm_kernels`).
        if let Some(y) = ldm_kernels::layer_norm(x, &self.weight, &self.bias, self.eps)? {
            return Ok(y);
        }
        let dtype = x.dtype();
        let x = match dtype {
            DType::F16 | DType::BF16 => x.to_dtype(DType::F32)?,
            _ => x.clone(),
        };
        let centred = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
        let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centred.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        normed
            .to_dtype(dtype)?
            .broadcast_mul(&self.weight)?
            .broadcast_add(&self.bias)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .and_then(|d| d.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>())
            .expect("same shapes")
    }

    #[test]
    fn softmax_paths_agree_and_the_tracked_one_has_the_analytic_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let x = (Tensor::randn(0f32, 3., (2, 3, 7), &dev)? + 5.)?;
        let v = Var::from_tensor(&x)?;
        let fast = softmax_last_dim(&x)?;
        let tracked = softmax_last_dim(v.as_tensor())?;
        assert!(max_abs(&fast, &tracked) < 1e-6);
        // d/dx Σ w·softmax(x) = y ⊙ (w − Σ w⊙y)
        let w = Tensor::randn(0f32, 1., (2, 3, 7), &dev)?;
        let grads = (&tracked * &w)?.sum_all()?.backward()?;
        let g = grads.get(v.as_tensor()).expect("x has a gradient");
        let y = fast;
        let expect = (&y * (w.broadcast_sub(&(&w * &y)?.sum_keepdim(D::Minus1)?))?)?;
        assert!(max_abs(g, &expect) < 1e-6, "{}", max_abs(g, &expect));
        Ok(())
    }

    #[test]
    fn layer_norm_paths_agree_and_the_tracked_one_gives_finite_difference_gradients() -> Result<()>
    {
        let dev = Device::Cpu;
        let x = (Tensor::randn(0f64, 2., (3, 5), &dev)? + 1.)?;
        let w = Tensor::randn(1f64, 0.1, 5, &dev)?;
        let b = Tensor::randn(0f64, 0.1, 5, &dev)?;
        let fast = LayerNorm::new(w.clone(), b.clone(), 1e-5).forward(&x)?;
        let vx = Var::from_tensor(&x)?;
        let ln = LayerNorm::new(w.clone(), b.clone(), 1e-5);
        let tracked = ln.forward(vx.as_tensor())?;
        let d = (&fast - &tracked)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f64>()?;
        assert!(d < 1e-6, "{d}");
        // Loss Σ c ⊙ LN(x); compare one partial derivative with a central difference.
        let c = Tensor::randn(0f64, 1., (3, 5), &dev)?;
        let loss =
            |x: &Tensor| -> Result<f64> { (ln.forward(x)? * &c)?.sum_all()?.to_scalar::<f64>() };
        let grads = (&tracked * &c)?.sum_all()?.backward()?;
        let g = grads
            .get(vx.as_tensor())
            .expect("x has a gradient")
            .to_vec2::<f64>()?;
        let h = 1e-6;
        for (i, j) in [(0, 0), (1, 3), (2, 4)] {
            let mut bump = vec![0f64; 15];
            bump[i * 5 + j] = h;
            let e = Tensor::from_vec(bump, (3, 5), &dev)?;
            let fd = (loss(&(&x + &e)?)? - loss(&(&x - &e)?)?) / (2. * h);
            assert!(
                (fd - g[i][j]).abs() < 1e-6,
                "({i},{j}): fd {fd} vs {}",
                g[i][j]
            );
        }
        Ok(())
    }
}
