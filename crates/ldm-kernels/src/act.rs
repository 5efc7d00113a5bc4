//! GEGLU (Shazeer 2020), the feed-forward activation of every transformer block of the LDM UNet:
//! for h = [a; g] split in halves along the last dimension, y = a ⊙ GELU(g) with the exact (erf) GELU, as
//! `ldm.modules.attention.GEGLU` and diffusers' `GEGLU` compute it. candle builds it from two strided views, an
//! erf-GELU that calls a scalar erf per value, and a product (each a pass, with its own backward node); this is
//! one vectorisable pass each way over the contiguous rows of h.
//!
//! Backward, from dy: da = dy·GELU(g), dg = dy·a·GELU′(g) with GELU′(g) = Φ(g) + g·φ(g).
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

use crate::{exp_f32, f32_slice, horner, rows_per_task, simd_fn};

/// erf(x) in f32 without a libm call: x·P(x²)/Q(x²) on |x| ≤ 3.92 (beyond, erf rounds to ±1 in f32), a rational
/// approximation fitted for ldm-rs by reweighted least squares in f64 (tools/fixtures/erf_fit.py). Relative
/// error ≤ 4e-7 in f32 arithmetic (about 3 ulp; libm's erff is within 1 ulp).
#[inline(always)]
pub(crate) fn erf_f32(x: f32) -> f32 {
    // Printed by tools/fixtures/erf_fit.py.
    const P: [f32; 7] = [
        std::f32::consts::FRAC_2_SQRT_PI,
        0.185_109_93,
        0.054_255_534,
        0.003_839_534_2,
        0.000_377_392,
        4.626_695e-6,
        -1.288_828_3e-8,
    ];
    const Q: [f32; 6] = [
        1.0,
        0.497_382_82,
        0.113_876_484,
        0.015_434_056,
        0.001_302_563_4,
        6.256_471e-5,
    ];
    let x = x.clamp(-3.92, 3.92);
    let t = x * x;
    let (p, q) = (horner(P, t), horner(Q, t));
    x * p / q
}

/// Φ(g) (the standard normal CDF).
#[inline(always)]
fn cdf(g: f32) -> f32 {
    0.5 * (1.0 + erf_f32(g * std::f32::consts::FRAC_1_SQRT_2))
}

/// φ(g) (the standard normal density).
#[inline(always)]
fn pdf(g: f32) -> f32 {
    const INV_SQRT_2PI: f32 = 0.398_942_3;
    INV_SQRT_2PI * exp_f32(-0.5 * g * g)
}

fn inner_of(l: &Layout) -> Result<usize> {
    match l.dims().last() {
        Some(&w) if w > 0 && w % 2 == 0 => Ok(w / 2),
        _ => candle_core::bail!(
            "geglu: the last dimension of {:?} must be even (value and gate halves)",
            l.dims()
        ),
    }
}

/// Input values per parallel task (rows of h are 2·inner wide, 5120 in SD's UNet).
const TASK_VALUES: usize = 1 << 16;

struct Geglu;

impl CustomOp1 for Geglu {
    fn name(&self) -> &'static str {
        "ldm-geglu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let inner = inner_of(l)?;
        let h = f32_slice(s, l, "geglu", "input")?;
        let mut y = vec![0f32; h.len() / 2];
        let rows = rows_per_task(2 * inner, TASK_VALUES);
        y.par_chunks_mut(rows * inner)
            .zip(h.par_chunks(rows * 2 * inner))
            .for_each(|(yc, hc)| geglu_rows(yc, hc, inner));
        let mut dims = l.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = inner;
        }
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }

    fn bwd(&self, h: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(h.apply_op2_no_bwd(&grad.contiguous()?, &GegluGrad)?))
    }
}

/// (h, dy) → dh = [dy·GELU(g); dy·a·GELU′(g)].
struct GegluGrad;

impl CustomOp2 for GegluGrad {
    fn name(&self) -> &'static str {
        "ldm-geglu-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let inner = inner_of(l1)?;
        let (h, dy) = (
            f32_slice(s1, l1, "geglu", "input")?,
            f32_slice(s2, l2, "geglu", "gradient")?,
        );
        if dy.len() * 2 != h.len() {
            candle_core::bail!("geglu backward: inconsistent sizes");
        }
        let mut dh = vec![0f32; h.len()];
        let rows = rows_per_task(2 * inner, TASK_VALUES);
        dh.par_chunks_mut(rows * 2 * inner)
            .zip(
                h.par_chunks(rows * 2 * inner)
                    .zip(dy.par_chunks(rows * inner)),
            )
            .for_each(|(dc, (hc, gc))| geglu_grad_rows(dc, hc, gc, inner));
        Ok((CpuStorage::F32(dh), l1.shape().clone()))
    }
}

simd_fn! {
    /// Rows of `h` (2·inner each) → rows of y (inner each).
    fn geglu_rows(y: &mut [f32], h: &[f32], inner: usize) {
        for (yr, hr) in y.chunks_mut(inner).zip(h.chunks(2 * inner)) {
            let (a, g) = hr.split_at(inner);
            for ((o, &av), &gv) in yr.iter_mut().zip(a).zip(g) {
                *o = av * gv * cdf(gv);
            }
        }
    }
}

simd_fn! {
    /// Rows of (h, dy) → rows of dh.
    fn geglu_grad_rows(dh: &mut [f32], h: &[f32], dy: &[f32], inner: usize) {
        for ((dr, hr), gr) in dh.chunks_mut(2 * inner).zip(h.chunks(2 * inner)).zip(dy.chunks(inner)) {
            let (a, g) = hr.split_at(inner);
            let (da, dg) = dr.split_at_mut(inner);
            for ((((dav, dgv), &av), &gv), &d) in da.iter_mut().zip(dg).zip(a).zip(g).zip(gr) {
                let phi = cdf(gv);
                *dav = d * gv * phi;
                *dgv = d * av * (phi + gv * pdf(gv));
            }
        }
    }
}

/// a ⊙ GELU(g) for h = [a; g] halved along the last dimension (erf GELU), differentiable; our kernel for f32 on
/// the CPU, candle's ops otherwise.
pub fn geglu(h: &Tensor) -> Result<Tensor> {
    if h.device().is_cpu() && h.dtype() == DType::F32 {
        return h.contiguous()?.apply_op1(Geglu);
    }
    let inner = h.dim(D::Minus1)? / 2;
    let value = h.narrow(D::Minus1, 0, inner)?;
    let gate = h.narrow(D::Minus1, inner, inner)?.gelu_erf()?;
    value * gate
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// erf by its Maclaurin series in f64 (exact to ~1e-9 on |x| ≤ 4, far below f32's resolution).
    fn erf_series(x: f64) -> f64 {
        let (mut term, mut sum, mut n) = (x, x, 0f64);
        while term.abs() > 1e-18 * sum.abs().max(1e-300) && n < 200.0 {
            n += 1.0;
            term *= -x * x / n;
            sum += term / (2.0 * n + 1.0);
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    }

    #[test]
    fn erf_f32_is_within_4e_7() {
        let mut worst = 0f64;
        let mut x = -4.5f32;
        while x <= 4.5 {
            let want = if x.abs() > 4.0 {
                x.signum() as f64
            } else {
                erf_series(f64::from(x))
            };
            let got = f64::from(erf_f32(x));
            if want != 0.0 {
                worst = worst.max((got - want).abs() / want.abs());
            }
            x += 0.001_3;
        }
        assert!(worst < 4e-7, "worst relative error {worst:e}");
        assert_eq!(erf_f32(0.0), 0.0);
        assert_eq!(erf_f32(100.0), erf_f32(3.92));
        assert!(erf_f32(f32::NAN).is_nan());
    }

    /// Deterministic inputs spread over [-6, 6] (an irrational step, so no two values repeat), ending with a row
    /// whose gates are all negative: there Φ(g) = ½(1 + erf) loses digits to cancellation, in our f32 kernel as in
    /// PyTorch's f32 GELU, while candle's reference goes through f64; the error then scales with |a|·|g|, not with
    /// the (tiny) output, so the tolerances below are relative to the scale of the inputs.
    fn spread(shape: (usize, usize, usize), dev: &Device) -> Result<Tensor> {
        let n = shape.0 * shape.1 * shape.2;
        let mut v: Vec<f32> = (0..n)
            .map(|i| 6.0 * ((i as f32 * 0.618_034 + 0.1).fract() * 2.0 - 1.0))
            .collect();
        let inner = shape.2 / 2;
        let last = n - 2 * inner;
        for (k, g) in v[last + inner..].iter_mut().enumerate() {
            *g = -1.5 - k as f32 * 0.7;
        }
        Tensor::from_vec(v, shape, dev)
    }

    #[test]
    fn geglu_matches_candle_forward_and_backward() -> Result<()> {
        let dev = Device::Cpu;
        for shape in [(2usize, 5usize, 12usize), (3, 1, 2), (1, 700, 40)] {
            let h = Var::from_tensor(&spread(shape, &dev)?)?;
            let ours = geglu(h.as_tensor())?;
            let inner = shape.2 / 2;
            let t = h.as_tensor();
            let theirs = (t.narrow(2, 0, inner)? * t.narrow(2, inner, inner)?.gelu_erf()?)?;
            assert_eq!(ours.dims(), theirs.dims());
            let h_max = t.abs()?.max_all()?.to_scalar::<f32>()?.max(1.0);
            let gap = (&ours - &theirs)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(gap < 1e-6 * h_max * h_max, "forward {shape:?}: {gap:e}");
            let r = Tensor::from_vec(
                (0..ours.elem_count())
                    .map(|i| ((i * 7 % 13) as f32 - 6.0) / 6.0)
                    .collect(),
                ours.dims(),
                &dev,
            )?;
            let go = (&ours * &r)?.sum_all()?.backward()?;
            let gt = (&theirs * &r)?.sum_all()?.backward()?;
            let (Some(a), Some(b)) = (go.get(&h), gt.get(&h)) else {
                candle_core::bail!("no gradient for h")
            };
            let gap = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(gap < 1e-6 * h_max * h_max, "gradient {shape:?}: {gap:e}");
        }
        Ok(())
    }

    #[test]
    fn an_odd_last_dimension_is_an_error() -> Result<()> {
        let h = Tensor::zeros((2, 3), DType::F32, &Device::Cpu)?;
        let err = geglu(&h).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("must be even"), "{err}");
        Ok(())
    }
}
