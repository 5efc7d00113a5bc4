//! Row-wise operations over the last dimension as candle custom ops with backward passes (f32 on the CPU;
//! candle's ops elsewhere): softmax, the attention weights' normalisation, and LayerNorm (Ba et al. 2016).
//! One pass over each row forward and one backward, parallel over rows, instead of candle's chains of
//! broadcast ops and reductions.
//!
//! softmax: y = exp(x − max x) / Σ exp(x − max x); dx = y ⊙ (g − Σ g ⊙ y).
//! LayerNorm: x̂ = (x − μ)·r, r = 1/√(σ² + ε) (biased variance); y = γ ⊙ x̂ + β;
//! dγ = Σ_rows g ⊙ x̂, dβ = Σ_rows g, dx = r·(dx̂ − mean(dx̂) − x̂·mean(dx̂ ⊙ x̂)) with dx̂ = γ ⊙ g.
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor,
};
use rayon::prelude::*;

use crate::{f32_slice, mean_rstd, rows_per_task, softmax_rows_in_place, unpack_norm_grads};

/// Values per parallel task (whole rows, at least one): enough work per task for rows of any length.
const ROW_TASK_VALUES: usize = 4096;

fn last_dim(l: &Layout) -> Result<usize> {
    match l.dims().last() {
        Some(&d) if d > 0 => Ok(d),
        _ => candle_core::bail!("row op: {:?} has no last dimension", l.dims()),
    }
}

struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "ldm-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let d = last_dim(l)?;
        let x = f32_slice(s, l, "softmax", "input")?;
        let mut y = vec![0f32; x.len()];
        let chunk = rows_per_task(d, ROW_TASK_VALUES) * d;
        y.par_chunks_mut(chunk)
            .zip(x.par_chunks(chunk))
            .for_each(|(yc, xc)| {
                yc.copy_from_slice(xc);
                softmax_rows_in_place(yc, d, 1.0);
            });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(
            y.contiguous()?
                .apply_op2_no_bwd(&g.contiguous()?, &SoftmaxGrad)?,
        ))
    }
}

/// (y, g) → y ⊙ (g − Σ g ⊙ y).
struct SoftmaxGrad;

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "ldm-softmax-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = last_dim(l1)?;
        let (y, g) = (
            f32_slice(s1, l1, "softmax", "output")?,
            f32_slice(s2, l2, "softmax", "gradient")?,
        );
        let mut dx = vec![0f32; y.len()];
        let chunk = rows_per_task(d, ROW_TASK_VALUES) * d;
        dx.par_chunks_mut(chunk)
            .zip(y.par_chunks(chunk).zip(g.par_chunks(chunk)))
            .for_each(|(dc, (yc, gc))| {
                for ((dr, yr), gr) in dc.chunks_mut(d).zip(yc.chunks(d)).zip(gc.chunks(d)) {
                    let dot: f32 = yr.iter().zip(gr).map(|(a, b)| a * b).sum();
                    for ((o, &yv), &gv) in dr.iter_mut().zip(yr).zip(gr) {
                        *o = yv * (gv - dot);
                    }
                }
            });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// Softmax over the last dimension, differentiable; our kernel for f32 on the CPU, candle's otherwise.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        x.contiguous()?.apply_op1(Softmax)
    } else {
        let max = x.max_keepdim(candle_core::D::Minus1)?.detach();
        let e = x.broadcast_sub(&max)?.exp()?;
        e.broadcast_div(&e.sum_keepdim(candle_core::D::Minus1)?)
    }
}

struct LayerNorm(f64);

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "ldm-layer-norm"
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
        let d = last_dim(l1)?;
        let x = f32_slice(s1, l1, "layer_norm", "input")?;
        let gamma = f32_slice(s2, l2, "layer_norm", "weight")?;
        let beta = f32_slice(s3, l3, "layer_norm", "bias")?;
        if gamma.len() != d || beta.len() != d {
            candle_core::bail!("layer_norm: weight and bias must have {d} values");
        }
        let mut y = vec![0f32; x.len()];
        let chunk = rows_per_task(d, ROW_TASK_VALUES) * d;
        y.par_chunks_mut(chunk)
            .zip(x.par_chunks(chunk))
            .for_each(|(yc, xc)| {
                for (yr, xr) in yc.chunks_mut(d).zip(xc.chunks(d)) {
                    let (mean, r) = mean_rstd(xr, self.0);
                    for (((o, &v), &ga), &be) in yr.iter_mut().zip(xr).zip(gamma).zip(beta) {
                        *o = (v - mean) * r * ga + be;
                    }
                }
            });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let packed = x.apply_op3_no_bwd(
            &gamma.contiguous()?,
            &g.contiguous()?,
            &LayerNormGrad(self.0),
        )?;
        unpack_norm_grads(&packed, x, gamma)
    }
}

/// (x, γ, g) → [dx; dγ; dβ] flattened.
struct LayerNormGrad(f64);

impl CustomOp3 for LayerNormGrad {
    fn name(&self) -> &'static str {
        "ldm-layer-norm-grad"
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
        let d = last_dim(l1)?;
        let x = f32_slice(s1, l1, "layer_norm", "input")?;
        let gamma = f32_slice(s2, l2, "layer_norm", "weight")?;
        let g = f32_slice(s3, l3, "layer_norm", "gradient")?;
        if gamma.len() != d || g.len() != x.len() {
            candle_core::bail!("layer_norm backward: inconsistent sizes");
        }
        let mut dx = vec![0f32; x.len()];
        let chunk = rows_per_task(d, ROW_TASK_VALUES) * d;
        let partial: Vec<(Vec<f64>, Vec<f64>)> = dx
            .par_chunks_mut(chunk)
            .zip(x.par_chunks(chunk).zip(g.par_chunks(chunk)))
            .map(|(dc, (xc, gc))| {
                let (mut dg, mut db) = (vec![0f64; d], vec![0f64; d]);
                for ((dr, xr), gr) in dc.chunks_mut(d).zip(xc.chunks(d)).zip(gc.chunks(d)) {
                    let (mean, r) = mean_rstd(xr, self.0);
                    let (mut s1, mut s2) = (0f32, 0f32);
                    for j in 0..d {
                        let xh = (xr[j] - mean) * r;
                        dg[j] += f64::from(gr[j] * xh);
                        db[j] += f64::from(gr[j]);
                        let dxh = gr[j] * gamma[j];
                        s1 += dxh;
                        s2 += dxh * xh;
                        dr[j] = dxh;
                    }
                    let (m1, m2) = (s1 / d as f32, s2 / d as f32);
                    for (o, &xv) in dr.iter_mut().zip(xr) {
                        let xh = (xv - mean) * r;
                        *o = r * (*o - m1 - xh * m2);
                    }
                }
                (dg, db)
            })
            .collect();
        let (mut dgamma, mut dbeta) = (vec![0f64; d], vec![0f64; d]);
        for (dg, db) in partial {
            for j in 0..d {
                dgamma[j] += dg[j];
                dbeta[j] += db[j];
            }
        }
        let mut out = dx;
        out.extend(dgamma.iter().map(|&v| v as f32));
        out.extend(dbeta.iter().map(|&v| v as f32));
        let len = out.len();
        Ok((CpuStorage::F32(out), Shape::from(len)))
    }
}

/// LayerNorm over the last dimension with weight and bias `[D]`, differentiable in all three; our kernel for
/// f32 on the CPU. `None` elsewhere: the caller keeps its own path for other dtypes and devices.
pub fn layer_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Option<Tensor>> {
    if x.device().is_cpu() && [x.dtype(), gamma.dtype(), beta.dtype()] == [DType::F32; 3] {
        Ok(Some(x.contiguous()?.apply_op3(
            &gamma.contiguous()?,
            &beta.contiguous()?,
            LayerNorm(eps),
        )?))
    } else {
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{grad_gaps, max_rel};
    use candle_core::{Device, Var, D};

    #[test]
    fn softmax_matches_the_composite_forward_and_backward() -> Result<()> {
        let dev = Device::Cpu;
        for shape in [(2usize, 3usize, 7usize), (1, 1, 1), (3, 300, 5)] {
            let x = Var::from_tensor(&(Tensor::randn(0f32, 3.0, shape, &dev)? + 4.0)?)?;
            let ours = softmax_last_dim(x.as_tensor())?;
            let max = x.as_tensor().max_keepdim(D::Minus1)?.detach();
            let e = x.as_tensor().broadcast_sub(&max)?.exp()?;
            let theirs = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
            assert!(max_rel(&ours, &theirs)? < 1e-6, "{shape:?}");
            let gaps = grad_gaps(&ours, &theirs, &[&x])?;
            assert!(gaps[0] < 1e-5, "{shape:?}: {gaps:?}");
        }
        Ok(())
    }

    #[test]
    fn layer_norm_matches_the_composite_forward_and_backward() -> Result<()> {
        let dev = Device::Cpu;
        for shape in [(2usize, 5usize, 8usize), (3, 1, 33), (1, 700, 16)] {
            let d = shape.2;
            let x = Var::from_tensor(&(Tensor::randn(0f32, 2.0, shape, &dev)? + 1.0)?)?;
            let gamma = Var::from_tensor(&Tensor::randn(1f32, 0.3, d, &dev)?)?;
            let beta = Var::from_tensor(&Tensor::randn(0f32, 0.3, d, &dev)?)?;
            let ours = layer_norm(x.as_tensor(), gamma.as_tensor(), beta.as_tensor(), 1e-5)?
                .ok_or(candle_core::Error::Msg("no kernel".into()))?;
            let xs = x.as_tensor();
            let centred = xs.broadcast_sub(&xs.mean_keepdim(D::Minus1)?)?;
            let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
            let theirs = centred
                .broadcast_div(&(var + 1e-5)?.sqrt()?)?
                .broadcast_mul(gamma.as_tensor())?
                .broadcast_add(beta.as_tensor())?;
            assert!(max_rel(&ours, &theirs)? < 1e-5, "{shape:?}");
            let gaps = grad_gaps(&ours, &theirs, &[&x, &gamma, &beta])?;
            assert!(gaps.iter().all(|&e| e < 1e-4), "{shape:?}: {gaps:?}");
        }
        Ok(())
    }
}
