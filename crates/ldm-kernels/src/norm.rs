//! GroupNorm (Wu & He 2018), optionally fused with the SiLU that follows it in every ResBlock, and SiLU alone,
//! as candle custom ops with backward passes (f32 on the CPU; candle's composite ops elsewhere). candle's
//! GroupNorm and SiLU are chains of elementwise tensor ops, each a pass over memory with its own backward node;
//! these are one pass forward and one backward, parallel over (item, group).
//!
//! Per group of m = (C/G)·H·W values: x̂ = (x − μ)·r with r = 1/√(σ² + ε) (biased variance), y = γ_c·x̂ + β_c,
//! out = y (or y·s(y) with the logistic s). Backward, from g = ∂L/∂out: dy = g (or g·s(y)·(1 + y·(1 − s(y)))),
//! dγ_c = Σ dy·x̂, dβ_c = Σ dy, and dx = r·(dx̂ − mean(dx̂) − x̂·mean(dx̂·x̂)) with dx̂ = γ_c·dy.
use candle_core::{CpuStorage, CustomOp1, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::{f32_slice, mean_rstd, sigmoid, simd_fn, sum_f64, sum_zip_f64, unpack_norm_grads};

#[derive(Debug, Clone, Copy)]
struct Norm {
    groups: usize,
    eps: f64,
    silu: bool,
}

/// (N, C, spatial size) of an `[N, C, ...]` input, checked against the group count.
fn sizes(dims: &[usize], groups: usize) -> Result<(usize, usize, usize)> {
    if dims.len() < 2 || groups == 0 || !dims[1].is_multiple_of(groups) {
        candle_core::bail!("group_norm: input {dims:?} cannot be split into {groups} groups");
    }
    Ok((dims[0], dims[1], dims[2..].iter().product()))
}

impl CustomOp3 for Norm {
    fn name(&self) -> &'static str {
        if self.silu {
            "ldm-group-norm-silu"
        } else {
            "ldm-group-norm"
        }
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, c, hw) = sizes(l1.dims(), self.groups)?;
        let (x, gamma, beta) = (
            f32_slice(s1, l1, "group_norm", "input")?,
            f32_slice(s2, l2, "group_norm", "weight")?,
            f32_slice(s3, l3, "group_norm", "bias")?,
        );
        if gamma.len() != c || beta.len() != c {
            candle_core::bail!("group_norm: weight and bias must have {c} values");
        }
        let cg = c / self.groups;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(cg * hw)
            .zip(x.par_chunks(cg * hw))
            .enumerate()
            .for_each(|(i, (o, xg))| {
                let c0 = (i % self.groups) * cg;
                let range = c0..c0 + cg;
                group_forward(
                    o,
                    xg,
                    &gamma[range.clone()],
                    &beta[range],
                    hw,
                    self.eps,
                    self.silu,
                );
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let params = Tensor::cat(&[gamma.flatten_all()?, beta.flatten_all()?], 0)?;
        let packed = x.apply_op3_no_bwd(&params, &grad.contiguous()?, &NormGrad(*self))?;
        unpack_norm_grads(&packed, x, gamma)
    }
}

/// (x, [γ; β], g) → [dx; dγ; dβ] flattened.
struct NormGrad(Norm);

impl CustomOp3 for NormGrad {
    fn name(&self) -> &'static str {
        "ldm-group-norm-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let p = self.0;
        let (_, c, hw) = sizes(l1.dims(), p.groups)?;
        let (x, params, g) = (
            f32_slice(s1, l1, "group_norm", "input")?,
            f32_slice(s2, l2, "group_norm", "weight")?,
            f32_slice(s3, l3, "group_norm", "gradient")?,
        );
        if params.len() != 2 * c || g.len() != x.len() {
            candle_core::bail!("group_norm backward: inconsistent sizes");
        }
        let (gamma, beta) = params.split_at(c);
        let cg = c / p.groups;
        let mut dx = vec![0f32; x.len()];
        // Per (item, group): dx and the group's per-channel Σ dy·x̂ and Σ dy.
        let partial: Vec<(Vec<f32>, Vec<f32>)> = dx
            .par_chunks_mut(cg * hw)
            .zip(x.par_chunks(cg * hw).zip(g.par_chunks(cg * hw)))
            .enumerate()
            .map(|(i, (dxg, (xg, gg)))| {
                let c0 = (i % p.groups) * cg;
                let range = c0..c0 + cg;
                group_backward(
                    dxg,
                    xg,
                    gg,
                    &gamma[range.clone()],
                    &beta[range],
                    hw,
                    p.eps,
                    p.silu,
                )
            })
            .collect();
        let mut out = dx;
        let (mut dgamma, mut dbeta) = (vec![0f32; c], vec![0f32; c]);
        for (i, (dg, db)) in partial.into_iter().enumerate() {
            let c0 = (i % p.groups) * cg;
            for j in 0..cg {
                dgamma[c0 + j] += dg[j];
                dbeta[c0 + j] += db[j];
            }
        }
        out.extend(dgamma);
        out.extend(dbeta);
        let len = out.len();
        Ok((CpuStorage::F32(out), Shape::from(len)))
    }
}

simd_fn! {
    /// One (item, group) of the forward pass: `xg` holds the group's channels of `hw` values each, `gamma` and
    /// `beta` their parameters.
    fn group_forward(
        o: &mut [f32],
        xg: &[f32],
        gamma: &[f32],
        beta: &[f32],
        hw: usize,
        eps: f64,
        silu: bool,
    ) {
        let (mean, r) = mean_rstd(xg, eps);
        for (j, (oc, xc)) in o.chunks_mut(hw).zip(xg.chunks(hw)).enumerate() {
            let (a, b) = (gamma[j] * r, beta[j] - gamma[j] * r * mean);
            if silu {
                for (ov, &xv) in oc.iter_mut().zip(xc) {
                    let y = a * xv + b;
                    *ov = y * sigmoid(y);
                }
            } else {
                for (ov, &xv) in oc.iter_mut().zip(xc) {
                    *ov = a * xv + b;
                }
            }
        }
    }
}

simd_fn! {
    /// One (item, group) of the backward pass: writes dx into `dxg` and returns the group's channels' dγ and dβ.
    fn group_backward(
        dxg: &mut [f32],
        xg: &[f32],
        gg: &[f32],
        gamma: &[f32],
        beta: &[f32],
        hw: usize,
        eps: f64,
        silu: bool,
    ) -> (Vec<f32>, Vec<f32>) {
        let cg = gamma.len();
        let (mean, r) = mean_rstd(xg, eps);
        let (mut dgam, mut dbet) = (vec![0f32; cg], vec![0f32; cg]);
        // dx̂ = γ·dy, so Σ dx̂ = Σ_c γ_c·dβ_c and Σ dx̂·x̂ = Σ_c γ_c·dγ_c: two sums per channel suffice.
        let (mut s1, mut s2) = (0f64, 0f64);
        for j in 0..cg {
            let (ga, be) = (gamma[j], beta[j]);
            let (xc, gc) = (&xg[j * hw..][..hw], &gg[j * hw..][..hw]);
            let dc = &mut dxg[j * hw..][..hw];
            // dc ← dy (the SiLU's derivative applied when fused).
            if silu {
                for ((d, &xv), &gv) in dc.iter_mut().zip(xc).zip(gc) {
                    let y = ga * ((xv - mean) * r) + be;
                    let s = sigmoid(y);
                    *d = gv * s * (1.0 + y * (1.0 - s));
                }
            } else {
                dc.copy_from_slice(gc);
            }
            let db = sum_f64(dc);
            let dg = sum_zip_f64(dc, xc, |dy, xv| dy * ((xv - mean) * r));
            s1 += f64::from(ga) * db;
            s2 += f64::from(ga) * dg;
            dgam[j] = dg as f32;
            dbet[j] = db as f32;
        }
        let m = (cg * hw) as f64;
        let (m1, m2) = ((s1 / m) as f32, (s2 / m) as f32);
        for j in 0..cg {
            let ga = gamma[j];
            let xc = &xg[j * hw..][..hw];
            for (d, &xv) in dxg[j * hw..][..hw].iter_mut().zip(xc) {
                let xh = (xv - mean) * r;
                *d = r * (ga * *d - m1 - xh * m2);
            }
        }
        (dgam, dbet)
    }
}

simd_fn! {
    /// o ← x·s(x).
    fn silu_chunk(o: &mut [f32], xs: &[f32]) {
        for (o, &v) in o.iter_mut().zip(xs) {
            *o = v * sigmoid(v);
        }
    }
}

simd_fn! {
    /// o ← g·s(x)·(1 + x·(1 − s(x))), the SiLU's backward.
    fn silu_grad_chunk(o: &mut [f32], xs: &[f32], gs: &[f32]) {
        for ((o, &v), &gv) in o.iter_mut().zip(xs).zip(gs) {
            let s = sigmoid(v);
            *o = gv * s * (1.0 + v * (1.0 - s));
        }
    }
}

/// GroupNorm of `x [N, C, ...]` with `groups` groups, weight and bias `[C]`, then SiLU when `silu`.
/// Differentiable in all three; our kernels for f32 on the CPU, candle's ops otherwise.
pub fn group_norm(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    groups: usize,
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    if x.device().is_cpu() && [x.dtype(), gamma.dtype(), beta.dtype()] == [DType::F32; 3] {
        return x.contiguous()?.apply_op3(
            &gamma.contiguous()?,
            &beta.contiguous()?,
            Norm { groups, eps, silu },
        );
    }
    let c = x.dim(1)?;
    let gn = candle_nn::GroupNorm::new(gamma.clone(), beta.clone(), c, groups, eps)?;
    let y = candle_core::Module::forward(&gn, x)?;
    if silu {
        candle_nn::ops::silu(&y)
    } else {
        Ok(y)
    }
}

struct Silu;

impl CustomOp1 for Silu {
    fn name(&self) -> &'static str {
        "ldm-silu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "group_norm", "input")?;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(1 << 14)
            .zip(x.par_chunks(1 << 14))
            .for_each(|(o, xs)| silu_chunk(o, xs));
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(&grad.contiguous()?, &SiluGrad)?))
    }
}

struct SiluGrad;

impl candle_core::CustomOp2 for SiluGrad {
    fn name(&self) -> &'static str {
        "ldm-silu-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, g) = (
            f32_slice(s1, l1, "group_norm", "input")?,
            f32_slice(s2, l2, "group_norm", "gradient")?,
        );
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(1 << 14)
            .zip(x.par_chunks(1 << 14).zip(g.par_chunks(1 << 14)))
            .for_each(|(o, (xs, gs))| silu_grad_chunk(o, xs, gs));
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// x·s(x), differentiable; our kernel for f32 on the CPU, candle's otherwise.
pub fn silu(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        x.contiguous()?.apply_op1(Silu)
    } else {
        candle_nn::ops::silu(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{grad_gaps, max_rel};
    use candle_core::{Device, Module, Var};

    #[test]
    fn group_norm_and_silu_match_candle_forward_and_backward() -> Result<()> {
        let dev = Device::Cpu;
        for (shape, groups, silu) in [
            ((2usize, 8usize, 5usize, 3usize), 4usize, false),
            ((3, 8, 4, 4), 2, true),
            ((1, 6, 7, 1), 3, true),
            ((4, 4, 2, 2), 4, false),
        ] {
            let x = Var::from_tensor(&(Tensor::randn(0f32, 2.0, shape, &dev)? + 0.5)?)?;
            let c = shape.1;
            let gamma = Var::from_tensor(&Tensor::randn(1f32, 0.3, c, &dev)?)?;
            let beta = Var::from_tensor(&Tensor::randn(0f32, 0.3, c, &dev)?)?;
            let ours = group_norm(
                x.as_tensor(),
                gamma.as_tensor(),
                beta.as_tensor(),
                groups,
                1e-5,
                silu,
            )?;
            let gn = candle_nn::GroupNorm::new(
                gamma.as_tensor().clone(),
                beta.as_tensor().clone(),
                c,
                groups,
                1e-5,
            )?;
            let theirs = gn.forward(x.as_tensor())?;
            let theirs = if silu {
                candle_nn::ops::silu(&theirs)?
            } else {
                theirs
            };
            assert!(max_rel(&ours, &theirs)? < 1e-5, "forward {shape:?}");
            let gaps = grad_gaps(&ours, &theirs, &[&x, &gamma, &beta])?;
            assert!(
                gaps.iter().all(|&e| e < 1e-4),
                "x, γ, β gradients {shape:?} silu {silu}: {gaps:?}"
            );
        }
        Ok(())
    }

    #[test]
    fn silu_matches_candle_forward_and_backward() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 3.0, (3, 5, 7), &dev)?)?;
        let ours = silu(x.as_tensor())?;
        let theirs = candle_nn::ops::silu(x.as_tensor())?;
        assert!(max_rel(&ours, &theirs)? < 1e-6);
        let gaps = grad_gaps(&ours, &theirs, &[&x])?;
        assert!(gaps[0] < 1e-5, "{gaps:?}");
        Ok(())
    }

    #[test]
    fn a_channel_count_not_divisible_by_the_groups_is_an_error() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::zeros((1, 6, 2, 2), DType::F32, &dev)?;
        let g = Tensor::ones(6, DType::F32, &dev)?;
        assert!(group_norm(&x, &g, &g, 4, 1e-5, false).is_err());
        Ok(())
    }
}
