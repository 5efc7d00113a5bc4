//! ldm-kernels: CPU kernels for the operations where candle is slow on the CPU, as candle custom ops with
//! backward passes, each falling back to candle's own operation on other devices and dtypes; and `nn`-style
//! modules that use them.
use candle_core::{CpuStorage, Layout, Result};

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
