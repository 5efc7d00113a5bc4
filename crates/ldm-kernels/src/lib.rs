//! ldm-kernels: CPU kernels for the operations where candle is slow on the CPU, as candle custom ops with
//! backward passes, each falling back to candle's own operation on other devices and dtypes; and `nn`-style
//! modules that use them.
use candle_core::{CpuStorage, Layout, Result};

pub mod alloc;
pub mod attention;
pub mod conv;
pub mod nn;
pub mod norm;
pub mod rows;

pub use conv::{conv2d, conv2d_bias, ConvParams};
pub use nn::{Conv2d, GroupNorm};
pub use norm::{group_norm, silu};
pub use rows::{layer_norm, softmax_last_dim};

/// The contiguous f32 values of a CPU storage; `what` names the operand in the error.
pub(crate) fn f32_slice<'a>(
    s: &'a CpuStorage,
    l: &Layout,
    op: &str,
    what: &str,
) -> Result<&'a [f32]> {
    let data = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{op}: the {what} must be contiguous"),
    }
}

/// Mean and 1/√(var + ε) (biased variance) of a group or row, accumulated in f64: the statistics of GroupNorm
/// and LayerNorm.
pub(crate) fn mean_rstd(x: &[f32], eps: f64) -> (f32, f32) {
    let m = x.len() as f64;
    let mean = x.iter().map(|&v| f64::from(v)).sum::<f64>() / m;
    let var = x
        .iter()
        .map(|&v| (f64::from(v) - mean).powi(2))
        .sum::<f64>()
        / m;
    (mean as f32, (1.0 / (var + eps).sqrt()) as f32)
}

type NormGrads = (
    Option<candle_core::Tensor>,
    Option<candle_core::Tensor>,
    Option<candle_core::Tensor>,
);

/// Splits the flat `[dx; dγ; dβ]` that the norm backward kernels return into the three gradients, shaped as `x`
/// and `param` (γ and β have one shape).
pub(crate) fn unpack_norm_grads(
    packed: &candle_core::Tensor,
    x: &candle_core::Tensor,
    param: &candle_core::Tensor,
) -> Result<NormGrads> {
    let (n, c) = (x.elem_count(), param.elem_count());
    let dx = packed.narrow(0, 0, n)?.reshape(x.shape())?;
    let dgamma = packed.narrow(0, n, c)?.reshape(param.shape())?;
    let dbeta = packed.narrow(0, n + c, c)?.reshape(param.shape())?;
    Ok((Some(dx), Some(dgamma), Some(dbeta)))
}

/// Largest |a − b| relative to the largest |b|.
#[cfg(test)]
pub(crate) fn max_rel(a: &candle_core::Tensor, b: &candle_core::Tensor) -> Result<f32> {
    let d = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
    let s = b.abs()?.max_all()?.to_scalar::<f32>()?.max(1e-6);
    Ok(d / s)
}

/// For the loss Σ y·r (r random, the same for both), the relative gap (as [`max_rel`]) between the gradients
/// through `ours` and through `theirs` of each of `vars`.
#[cfg(test)]
pub(crate) fn grad_gaps(
    ours: &candle_core::Tensor,
    theirs: &candle_core::Tensor,
    vars: &[&candle_core::Var],
) -> Result<Vec<f32>> {
    let r = candle_core::Tensor::randn(0f32, 1.0, ours.dims(), ours.device())?;
    let go = (ours * &r)?.sum_all()?.backward()?;
    let gt = (theirs * &r)?.sum_all()?.backward()?;
    vars.iter()
        .map(|v| match (go.get(v), gt.get(v)) {
            (Some(a), Some(b)) => max_rel(a, b),
            _ => candle_core::bail!("a variable has no gradient"),
        })
        .collect()
}
