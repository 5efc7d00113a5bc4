//! Multi-head (cross-)attention of the LDM transformer blocks (`ldm.modules.attention.CrossAttention`).
//!
//! Vaswani et al. 2017, Eq. 1: Attention(Q, K, V) = softmax(QKᵀ/√d)V, per head.
//!
//! | code        | math / shape                                              |
//! |-------------|-----------------------------------------------------------|
//! | `x`         | queries' source, `[B, N, query_dim]`                      |
//! | `context`   | keys'/values' source, `[B, M, context_dim]` (`x` for self-attention) |
//! | `num_heads` | h                                                         |
//! | `head_dim`  | d (inner dim = h·d)                                       |
//! | `scale`     | 1/√d                                                      |
//!
//! Keys: `to_q`, `to_k`, `to_v` (no bias), `to_out.0` (with bias; `to_out.1` is an inference-inert Dropout).
//! When the score tensor `[B, h, N, M]` would exceed [`MAX_SCORE_BYTES`], the queries are processed in
//! balanced chunks; every query row is computed by the same operations either way (on CPU the results are
//! bit-identical unless a chunk is only a few rows, where gemm may switch kernels: see the tests).
use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;
use ldm_kernels::nn::Linear;

/// Largest attention-score tensor (in bytes) materialised at once: 256 MiB.
pub const MAX_SCORE_BYTES: usize = 256 << 20;

#[derive(Debug, Clone)]
pub struct CrossAttention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear, // to_out.0
    num_heads: usize,
    head_dim: usize,
    max_score_bytes: usize,
}

impl CrossAttention {
    /// `context_dim: None` builds self-attention (keys and values from `query_dim`).
    pub fn new(
        query_dim: usize,
        context_dim: Option<usize>,
        num_heads: usize,
        head_dim: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let inner = num_heads * head_dim;
        let kv_dim = context_dim.unwrap_or(query_dim);
        Ok(Self {
            to_q: ldm_kernels::nn::linear_no_bias(query_dim, inner, vb.pp("to_q"))?,
            to_k: ldm_kernels::nn::linear_no_bias(kv_dim, inner, vb.pp("to_k"))?,
            to_v: ldm_kernels::nn::linear_no_bias(kv_dim, inner, vb.pp("to_v"))?,
            to_out: ldm_kernels::nn::linear(inner, query_dim, vb.pp("to_out").pp("0"))?,
            num_heads,
            head_dim,
            max_score_bytes: MAX_SCORE_BYTES,
        })
    }

    /// Overrides the score-memory bound (tests use it to force chunking).
    pub fn with_max_score_bytes(mut self, bytes: usize) -> Self {
        self.max_score_bytes = bytes;
        self
    }

    /// `x`: `[B, N, query_dim]`, `context`: `[B, M, context_dim]` or `None` (self-attention).
    pub fn forward(&self, x: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let context = context.unwrap_or(x);
        let q = self.split_heads(&self.to_q.forward(x)?)?; // [B, h, N, d]
        let k = self.split_heads(&self.to_k.forward(context)?)?; // [B, h, M, d]
        let v = self.split_heads(&self.to_v.forward(context)?)?; // [B, h, M, d]
        let out = attention(&q, &k, &v, self.max_score_bytes)?; // [B, h, N, d]
        let (b, h, n, d) = out.dims4()?;
        let out = out.transpose(1, 2)?.reshape((b, n, h * d))?; // [B, N, h·d]
        self.to_out.forward(&out)
    }

    fn split_heads(&self, x: &Tensor) -> Result<Tensor> {
        let (b, n, _) = x.dims3()?;
        x.reshape((b, n, self.num_heads, self.head_dim))?
            .transpose(1, 2)?
            .contiguous()
    }
}

/// softmax(q·kᵀ/√d)·v for `q` `[B, h, N, d]`, `k`, `v` `[B, h, M, d]` → `[B, h, N, d]`. Inference in f32 on the
/// CPU takes `ldm_kernels`' blocked kernel (64 queries at a time, no score tensor); otherwise (training graphs,
/// f16/bf16, CUDA) chunks of queries so that no score tensor exceeds `max_score_bytes` (at least one query row
/// at a time).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, max_score_bytes: usize) -> Result<Tensor> {
    let (b, h, n, d) = q.dims4()?;
    let m = k.dim(2)?;
    let scale = 1.0 / (d as f64).sqrt();
    // Inference in f32 on the CPU: the blocked kernel (no score tensor at all).
    if let Some(out) = ldm_kernels::attention::attention(q, k, v, scale)? {
        return Ok(out);
    }
    let kt = k.t()?; // [B, h, d, M]
    let row_bytes = b * h * m * q.dtype().size_in_bytes();
    let max_rows = (max_score_bytes / row_bytes.max(1)).clamp(1, n.max(1));
    // Balanced chunks, so that no chunk is a sliver computed by a different matmul kernel path.
    let chunk = n.div_ceil(n.div_ceil(max_rows).max(1)).max(1);
    let one = |q: &Tensor| -> Result<Tensor> {
        let scores = (q.matmul(&kt)? * scale)?; // [B, h, n_chunk, M]
        crate::ops::softmax_last_dim(&scores)?.matmul(v) // [B, h, n_chunk, d]
    };
    if chunk >= n {
        return one(q);
    }
    let mut parts = Vec::with_capacity(n.div_ceil(chunk));
    for start in (0..n).step_by(chunk) {
        parts.push(one(&q.narrow(2, start, chunk.min(n - start))?)?);
    }
    Tensor::cat(&parts, 2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
    }

    #[test]
    fn chunked_attention_equals_unchunked() -> Result<()> {
        let dev = Device::Cpu;
        let (b, h, n, m, d) = (2, 2, 256, 77, 16);
        // A tracked query (a training graph) takes the chunked path.
        let q = candle_core::Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, h, n, d), &dev)?)?;
        let q = q.as_tensor();
        let k = Tensor::randn(0f32, 1.0, (b, h, m, d), &dev)?;
        let v = Tensor::randn(0f32, 1.0, (b, h, m, d), &dev)?;
        let full = attention(q, &k, &v, usize::MAX)?;
        let row = b * h * m * 4;
        // 100 rows allowed → 3 balanced chunks (86, 86, 84): bit-identical on CPU.
        assert_eq!(max_diff(&full, &attention(q, &k, &v, 100 * row)?)?, 0.0);
        // Single-row chunks may take gemm's small-matrix path: equal up to f32 rounding.
        assert!(max_diff(&full, &attention(q, &k, &v, row)?)? <= 1e-6);
        // The inference kernel (plain tensors) gives the same result.
        let plain = attention(&q.detach(), &k, &v, usize::MAX)?;
        assert!(max_diff(&full, &plain)? <= 1e-5);
        Ok(())
    }

    #[test]
    fn attention_of_identical_keys_averages_values() -> Result<()> {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (1, 1, 4, 2), &dev)?;
        let k = Tensor::ones((1, 1, 3, 2), DType::F32, &dev)?;
        let v = Tensor::new(&[[[[1f32, 2.], [3., 4.], [5., 12.]]]], &dev)?;
        let out = attention(&q, &k, &v, usize::MAX)?
            .squeeze(0)?
            .squeeze(0)?
            .to_vec2::<f32>()?;
        for row in out {
            assert!(
                (row[0] - 3.0).abs() < 1e-6 && (row[1] - 6.0).abs() < 1e-6,
                "{row:?}"
            );
        }
        Ok(())
    }
}
