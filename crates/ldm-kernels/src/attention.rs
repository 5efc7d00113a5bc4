//! Scaled dot-product attention for inference, softmax(q·kᵀ/√d)·v, in blocks of query rows: each task computes
//! the scores of 64 queries against all keys (one GEMM), exponentiates them in place (one pass, summing), multiplies
//! by v (a second GEMM) and divides each query's output by its sum, so no [B, h, n, m] score tensor is ever built and no elementwise pass leaves the cache. Tasks run in
//! parallel over (batch·head, query block) with single-threaded GEMMs. Forward only: training keeps the
//! differentiable composite.
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

use crate::conv::{matmul, Mat};
use crate::{exp_rows_in_place, f32_slice};

/// Query rows per task.
const QUERY_BLOCK: usize = 64;

struct Attention {
    scale: f32,
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "ldm-attention"
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
        let (&[b, h, n, d], &[kb, kh, m, kd], &[vb, vh, vm, dv]) =
            (l1.dims(), l2.dims(), l3.dims())
        else {
            candle_core::bail!("attention: q, k and v must be [B, h, tokens, dim]");
        };
        if (kb, kh, kd) != (b, h, d) || (vb, vh, vm) != (b, h, m) || m == 0 {
            candle_core::bail!(
                "attention: q {:?}, k {:?} and v {:?} do not fit together",
                l1.dims(),
                l2.dims(),
                l3.dims()
            );
        }
        let q = f32_slice(s1, l1, "attention", "query")?;
        let k = f32_slice(s2, l2, "attention", "key")?;
        let v = f32_slice(s3, l3, "attention", "value")?;
        let mut out = vec![0f32; b * h * n * dv];
        let blocks = n.div_ceil(QUERY_BLOCK);
        // One output chunk per (batch·head, query block): rows [r0, r1) of head `bh`.
        let mut tasks: Vec<(usize, usize, &mut [f32])> = Vec::with_capacity(b * h * blocks);
        for (bh, head) in out.chunks_mut(n * dv).enumerate() {
            let mut rest = head;
            for blk in 0..blocks {
                let rows = QUERY_BLOCK.min(n - blk * QUERY_BLOCK);
                let (this, tail) = rest.split_at_mut(rows * dv);
                tasks.push((bh, blk * QUERY_BLOCK, this));
                rest = tail;
            }
        }
        tasks.into_par_iter().for_each(|(bh, r0, o)| {
            let rows = o.len() / dv;
            let qb = &q[(bh * n + r0) * d..][..rows * d];
            let kh = &k[bh * m * d..][..m * d];
            let vh = &v[bh * m * dv..][..m * dv];
            let mut scores = vec![0f32; rows * m];
            // scores[rows, m] = q_blk[rows, d] · kᵀ[d, m]
            matmul(
                (rows, m, d),
                &mut scores,
                m,
                false,
                Mat::rows(qb, d),
                Mat::transposed(kh, d),
                Parallelism::None,
            );
            let mut sums = vec![0f32; rows];
            exp_rows_in_place(&mut scores, m, self.scale, &mut sums);
            // o[rows, dv] = (e[rows, m] · v[m, dv]) / Σ_m e
            matmul(
                (rows, dv, m),
                o,
                dv,
                false,
                Mat::rows(&scores, m),
                Mat::rows(vh, dv),
                Parallelism::None,
            );
            for (orow, &sum) in o.chunks_mut(dv).zip(&sums) {
                let inv = 1.0 / sum;
                for x in orow {
                    *x *= inv;
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((b, h, n, dv))))
    }
}

/// softmax(q·kᵀ·scale)·v for q `[B, h, n, d]`, k `[B, h, m, d]`, v `[B, h, m, dv]`, with our blocked kernel for
/// f32 on the CPU when nothing needs a gradient; `None` otherwise (the caller keeps its own path).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Option<Tensor>> {
    let plain = q.device().is_cpu()
        && [q.dtype(), k.dtype(), v.dtype()] == [DType::F32; 3]
        && !(q.track_op() || k.track_op() || v.track_op());
    if !plain {
        return Ok(None);
    }
    Ok(Some(q.contiguous()?.apply_op3_no_bwd(
        &k.contiguous()?,
        &v.contiguous()?,
        &Attention {
            scale: scale as f32,
        },
    )?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::max_rel;
    use candle_core::Device;

    #[test]
    fn blocked_attention_equals_the_plain_formula() -> Result<()> {
        let dev = Device::Cpu;
        // Query counts below, at and above one block, and not a multiple of it; self- and cross-attention sizes.
        for (b, h, n, m, d, dv) in [
            (1, 1, 3, 5, 4, 4),
            (2, 3, 64, 64, 8, 8),
            (2, 2, 130, 77, 16, 16),
            (1, 2, 200, 9, 8, 5),
        ] {
            let q = Tensor::randn(0f32, 1.0, (b, h, n, d), &dev)?;
            let k = Tensor::randn(0f32, 1.0, (b, h, m, d), &dev)?;
            let v = Tensor::randn(0f32, 1.0, (b, h, m, dv), &dev)?;
            let scale = 1.0 / (d as f64).sqrt();
            let ours =
                attention(&q, &k, &v, scale)?.ok_or(candle_core::Error::Msg("no kernel".into()))?;
            let scores = (q.matmul(&k.t()?)? * scale)?;
            let theirs = candle_core::Tensor::matmul(&candle_nn_softmax(&scores)?, &v)?;
            assert_eq!(ours.dims(), theirs.dims());
            let e = max_rel(&ours, &theirs)?;
            assert!(e < 1e-5, "{:?}: {e}", (b, h, n, m, d, dv));
        }
        Ok(())
    }

    fn candle_nn_softmax(x: &Tensor) -> Result<Tensor> {
        let max = x.max_keepdim(candle_core::D::Minus1)?;
        let e = x.broadcast_sub(&max)?.exp()?;
        e.broadcast_div(&e.sum_keepdim(candle_core::D::Minus1)?)
    }

    #[test]
    fn tracked_inputs_and_mismatched_shapes_are_not_taken() -> Result<()> {
        let dev = Device::Cpu;
        let q = candle_core::Var::from_tensor(&Tensor::randn(0f32, 1.0, (1, 1, 4, 2), &dev)?)?;
        let k = Tensor::randn(0f32, 1.0, (1, 1, 3, 2), &dev)?;
        assert!(
            attention(q.as_tensor(), &k, &k, 1.0)?.is_none(),
            "a training graph keeps its own path"
        );
        let q = Tensor::randn(0f32, 1.0, (1, 1, 4, 3), &dev)?;
        assert!(attention(&q, &k, &k, 1.0).is_err(), "head dims differ");
        Ok(())
    }
}
