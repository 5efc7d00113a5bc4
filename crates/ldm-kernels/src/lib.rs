//! ldm-kernels: CPU kernels for the operations where candle is slow on the CPU, as candle custom ops with
//! backward passes, each falling back to candle's own operation on other devices and dtypes; and `nn`-style
//! modules that use them.
use candle_core::{CpuStorage, Layout, Result};

pub mod act;
pub mod alloc;
pub mod attention;
pub mod conv;
pub mod nn;
pub mod norm;
pub mod rows;

pub use act::geglu;
pub use conv::{conv2d, conv2d_bias, set_conv_algorithm, ConvAlgorithm, ConvParams};
pub use nn::{Conv2d, GroupNorm, Linear};
pub use norm::{group_norm, silu};
pub use rows::{layer_norm, softmax_last_dim};

/// Whether this x86-64 CPU has AVX2 and FMA (checked once by std, then a cached load).
#[cfg(target_arch = "x86_64")]
#[inline]
pub(crate) fn has_avx2_fma() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

/// Defines `fn name(args) -> ret { body }` twice: as written (the portable build: SSE2 on x86-64, NEON on
/// arm64) and compiled for AVX2+FMA, and picks the second at run time where the CPU has them. The binary then
/// still runs on any x86-64, while our elementwise loops (exp, erf, norms) get 8-wide vectors; gemm does the same
/// for its own kernels. Arguments must be plain values or references (no generics).
macro_rules! simd_fn {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn portable($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                    portable($($arg),*)
                }
                if $crate::has_avx2_fma() {
                    // SAFETY: the CPU supports AVX2 and FMA (checked just above).
                    return unsafe { avx2($($arg),*) };
                }
            }
            portable($($arg),*)
        }
    };
}
pub(crate) use simd_fn;

simd_fn! {
    /// Each row of `rows` (rows of length `d`) ← softmax(scale · row), in place.
    pub(crate) fn softmax_rows_in_place(rows: &mut [f32], d: usize, scale: f32) {
        for row in rows.chunks_mut(d) {
            let max = max_f32(row);
            for v in row.iter_mut() {
                *v = exp_f32((*v - max) * scale);
            }
            let inv = (1.0 / sum_f64(row)) as f32;
            for v in row.iter_mut() {
                *v *= inv;
            }
        }
    }
}

simd_fn! {
    /// Each row of `rows` (rows of length `d`) ← e^(scale·(row − max row)), in place, and its sum into `sums`:
    /// softmax without the division, for callers that fold 1/sum into a smaller product (attention divides
    /// its `dv` outputs per query instead of its `m` probabilities). One pass for the exponentials and the sum.
    pub(crate) fn exp_rows_in_place(rows: &mut [f32], d: usize, scale: f32, sums: &mut [f32]) {
        for (row, sum) in rows.chunks_mut(d).zip(sums.iter_mut()) {
            let max = max_f32(row);
            let mut total = 0f64;
            for block in row.chunks_mut(4096) {
                let mut lanes = [0f32; 8];
                let mut it = block.chunks_exact_mut(8);
                for c in &mut it {
                    for (l, v) in lanes.iter_mut().zip(c.iter_mut()) {
                        *v = exp_f32((*v - max) * scale);
                        *l += *v;
                    }
                }
                for v in it.into_remainder() {
                    *v = exp_f32((*v - max) * scale);
                    lanes[0] += *v;
                }
                total += lanes.iter().map(|&l| f64::from(l)).sum::<f64>();
            }
            *sum = total as f32;
        }
    }
}

/// The largest value of `x` (NaNs ignored, −∞ for none), in 8 lanes so that it vectorises.
#[inline(always)]
pub(crate) fn max_f32(x: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let mut it = x.chunks_exact(8);
    for c in &mut it {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l = l.max(v);
        }
    }
    let tail = it
        .remainder()
        .iter()
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    lanes.iter().copied().fold(tail, f32::max)
}

/// Rows of `width` values per parallel task, for about `values` values per task (at least one row).
pub(crate) fn rows_per_task(width: usize, values: usize) -> usize {
    (values / width.max(1)).max(1)
}

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

/// e^x in f32 without a libm call, so loops over it vectorise: x = n·ln 2 + r with |r| ≤ ln 2 / 2, e^r as
/// 1 + r + r²·P(r) with Cephes' minimax P of degree 5 (within ~1 ulp, as libm's expf), 2^n put into the exponent
/// bits. Inputs are clamped to [−87, 88]: e^x underflows to 1.6e-38 (not 0) below, which no softmax or sigmoid
/// here can tell from 0 next to the terms ≥ 1 they are summed with. NaN stays NaN.
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4; // ln 2 split so that n·LN2_HI is exact for |n| ≤ 128
    const LN2_LO: f32 = -2.121_944_4e-4;
    const ROUND: f32 = 12_582_912.0; // 1.5·2^23: adding and subtracting it rounds to the nearest integer
    let x = x.clamp(-87.0, 88.0);
    let shifted = x * LOG2E + ROUND;
    let n = shifted - ROUND;
    // n as an integer from the bits of n + 1.5·2^23 (its low mantissa bits), not `n as i32`: Rust's saturating
    // float-to-int conversion compiles to a scalar convert and compares per lane, which kept this loop scalar.
    let n_int = (shifted.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = horner(
        [
            0.5,
            1.666_666_5e-1,
            4.166_579_6e-2,
            8.333_452e-3,
            1.398_199_9e-3,
            1.987_569_1e-4,
        ],
        r,
    );
    let e = p * (r * r) + r + 1.0;
    e * f32::from_bits((n_int.wrapping_add(127) as u32) << 23)
}

/// c₀ + t·(c₁ + t·(… + t·c_{N−1})) by Horner's rule, the last coefficient first. Always inlined, with the
/// array's length known, so it unrolls into the same multiply-adds as a written-out chain and loops over it
/// vectorise.
#[inline(always)]
pub(crate) fn horner<const N: usize>(c: [f32; N], t: f32) -> f32 {
    let (&last, rest) = c.split_last().expect("at least one coefficient");
    rest.iter().rev().fold(last, |acc, &ci| acc * t + ci)
}

/// The logistic function 1/(1 + e^−x) through [`exp_f32`].
#[inline(always)]
pub(crate) fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp_f32(-x))
}

/// Σ x in f32 lanes of 8 (vectorisable), blocks of 4096 added in f64: accurate to ~1e-7 relative on the sizes of
/// a norm group, where a plain f32 running sum drifts. Always inlined, so the AVX2 variants of `simd_fn!`
/// bodies vectorise it too.
#[inline(always)]
pub(crate) fn sum_f64(x: &[f32]) -> f64 {
    sum_map_f64(x, |v| v)
}

/// Σ f(x) as [`sum_f64`].
#[inline(always)]
pub(crate) fn sum_map_f64(x: &[f32], f: impl Fn(f32) -> f32) -> f64 {
    let mut total = 0f64;
    for block in x.chunks(4096) {
        let mut lanes = [0f32; 8];
        let mut it = block.chunks_exact(8);
        for c in &mut it {
            for (l, &v) in lanes.iter_mut().zip(c) {
                *l += f(v);
            }
        }
        let tail: f32 = it.remainder().iter().map(|&v| f(v)).sum();
        total += f64::from(lanes.iter().sum::<f32>() + tail);
    }
    total
}

/// Σ f(a, b) over two slices of one length, as [`sum_f64`].
#[inline(always)]
pub(crate) fn sum_zip_f64(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) -> f64 {
    debug_assert_eq!(a.len(), b.len());
    let mut total = 0f64;
    for (ba, bb) in a.chunks(4096).zip(b.chunks(4096)) {
        let mut lanes = [0f32; 8];
        let (mut ia, mut ib) = (ba.chunks_exact(8), bb.chunks_exact(8));
        for (ca, cb) in (&mut ia).zip(&mut ib) {
            for ((l, &x), &y) in lanes.iter_mut().zip(ca).zip(cb) {
                *l += f(x, y);
            }
        }
        let tail: f32 = ia
            .remainder()
            .iter()
            .zip(ib.remainder())
            .map(|(&x, &y)| f(x, y))
            .sum();
        total += f64::from(lanes.iter().sum::<f32>() + tail);
    }
    total
}

/// Mean and 1/√(var + ε) (biased variance, two passes) of a group or row: the statistics of GroupNorm and
/// LayerNorm. Always inlined, as [`sum_f64`].
#[inline(always)]
pub(crate) fn mean_rstd(x: &[f32], eps: f64) -> (f32, f32) {
    let m = x.len() as f64;
    let mean = sum_f64(x) / m;
    let mf = mean as f32;
    // Σ (x − μ)² with μ rounded to f32; the rounding error δ adds m·δ², far below f32's resolution of var.
    let var = sum_map_f64(x, |v| (v - mf) * (v - mf)) / m;
    (mf, (1.0 / (var + eps).sqrt()) as f32)
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

#[cfg(test)]
mod math_tests {
    use super::*;

    #[test]
    fn exp_f32_matches_libm_over_the_range_softmax_and_sigmoid_use() {
        let mut worst = 0f64;
        let mut x = -80.0f32;
        while x <= 80.0 {
            let (got, want) = (f64::from(exp_f32(x)), f64::from(x).exp());
            worst = worst.max((got - want).abs() / want);
            x += 0.0137;
        }
        assert!(worst < 2.5e-7, "worst relative error {worst:e}");
        assert_eq!(exp_f32(0.0), 1.0);
        assert!(exp_f32(-1e30) < 2e-38 && exp_f32(-1e30) >= 0.0);
        assert!(exp_f32(f32::NEG_INFINITY) < 2e-38);
        assert!(exp_f32(1e30).is_finite());
        assert!(exp_f32(f32::NAN).is_nan());
        assert!((sigmoid(0.0) - 0.5).abs() < 1e-7);
        assert!(sigmoid(-200.0) >= 0.0 && sigmoid(200.0) == 1.0);
    }

    #[test]
    fn max_f32_takes_every_lane_and_the_tail_and_skips_nan() {
        for n in [1usize, 7, 8, 9, 17, 64] {
            for at in 0..n {
                let mut x: Vec<f32> = (0..n).map(|i| -(i as f32) - 1.0).collect();
                x[at] = 5.0;
                assert_eq!(max_f32(&x), 5.0, "n {n}, max at {at}");
                x[(at + 1) % n] = f32::NAN;
                let want = if n == 1 { f32::NEG_INFINITY } else { 5.0 };
                assert_eq!(max_f32(&x), want, "n {n}, NaN beside the max at {at}");
            }
        }
        assert_eq!(max_f32(&[]), f32::NEG_INFINITY);
        assert_eq!(max_f32(&[f32::NAN, 1.0, f32::NAN]), 1.0);
    }

    #[test]
    fn sums_and_statistics_match_f64() {
        // 1e5 values around 1000 with unit spread: a plain f32 running sum is off by ~1e-3 relative here.
        let x: Vec<f32> = (0..100_003)
            .map(|i| 1000.0 + ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        let exact: f64 = x.iter().map(|&v| f64::from(v)).sum();
        assert!((sum_f64(&x) - exact).abs() / exact < 1e-7);
        let m = x.len() as f64;
        let mean = exact / m;
        let var = x
            .iter()
            .map(|&v| (f64::from(v) - mean).powi(2))
            .sum::<f64>()
            / m;
        let (mu, r) = mean_rstd(&x, 1e-5);
        assert!((f64::from(mu) - mean).abs() < 1e-4);
        let want = 1.0 / (var + 1e-5).sqrt();
        assert!((f64::from(r) - want).abs() / want < 1e-5, "{r} vs {want}");
    }
}
