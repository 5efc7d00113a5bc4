//! The CLIP text transformer (Radford et al. 2021), one implementation for both weight layouts.
//!
//! `h⁰ = E_tok[ids] + E_pos[0..L]`; for each block `h ← h + Attn(LN₁(h))`, `h ← h + MLP(LN₂(h))` with a
//! causal mask; output `LN_final(h)` after all blocks, or after all but the last `n` ([`TextOutput`]).
//!
//! | symbol | here                      | HF key (`text_model.`)                | OpenCLIP key (`model.`)      |
//! |--------|---------------------------|---------------------------------------|------------------------------|
//! | E_tok  | `token_embedding`         | `embeddings.token_embedding.weight`   | `token_embedding.weight`     |
//! | E_pos  | `position_embedding`      | `embeddings.position_embedding.weight`| `positional_embedding`       |
//! | LN₁    | `TextBlock::ln_1`         | `encoder.layers.N.layer_norm1`        | `transformer.resblocks.N.ln_1` |
//! | W_qkv  | `TextBlock::qkv` (fused)  | `self_attn.{q,k,v}_proj` (concatenated) | `attn.in_proj_{weight,bias}` |
//! | W_o    | `TextBlock::out_proj`     | `self_attn.out_proj`                  | `attn.out_proj`              |
//! | MLP    | `fc1`, `fc2`              | `mlp.fc1`, `mlp.fc2`                  | `mlp.c_fc`, `mlp.c_proj`     |
//! | LN_final | `final_norm`            | `final_layer_norm`                    | `ln_final`                   |
use crate::ops::LayerNorm;
use candle_core::{DType, Device, Module, Result, Tensor, D};
use ldm_kernels::nn::Linear;

use super::config::{Activation, TextConfig};

/// LayerNorm epsilon of both CLIP implementations.
pub(crate) const LN_EPS: f64 = 1e-5;

/// One pre-norm transformer block.
#[derive(Debug, Clone)]
pub(crate) struct TextBlock {
    pub ln_1: LayerNorm,
    /// `[3·D, D]`: rows are q, then k, then v.
    pub qkv: Linear,
    pub out_proj: Linear,
    pub ln_2: LayerNorm,
    pub fc1: Linear,
    pub fc2: Linear,
}

impl TextBlock {
    fn forward(&self, x: &Tensor, mask: &Tensor, cfg: &TextConfig) -> Result<Tensor> {
        let x = (x + self.attention(&self.ln_1.forward(x)?, mask, cfg)?)?;
        let h = self.fc1.forward(&self.ln_2.forward(&x)?)?; // [B, L, I]
        let h = match cfg.activation {
            Activation::QuickGelu => (&h * candle_nn::ops::sigmoid(&(&h * 1.702)?)?)?,
            Activation::Gelu => h.gelu_erf()?,
        };
        x + self.fc2.forward(&h)?
    }

    /// Multi-head causal self-attention; `x: [B, L, D]`, `mask: [L, L]` additive (0 or −∞).
    fn attention(&self, x: &Tensor, mask: &Tensor, cfg: &TextConfig) -> Result<Tensor> {
        let (b, l, d) = x.dims3()?;
        let (heads, head_dim) = (cfg.heads, cfg.head_dim());
        let qkv = self.qkv.forward(x)?; // [B, L, 3·D]
        let split = |i: usize| -> Result<Tensor> {
            qkv.narrow(D::Minus1, i * d, d)?
                .reshape((b, l, heads, head_dim))?
                .transpose(1, 2)?
                .contiguous() // [B, H, L, d_h]
        };
        let (q, k, v) = (split(0)?, split(1)?, split(2)?);
        let scores = (q.matmul(&k.t()?)? * (head_dim as f64).powf(-0.5))?.broadcast_add(mask)?; // [B, H, L, L]
        let probs =
            crate::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(v.dtype())?;
        let out = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, l, d))?; // [B, L, D]
        self.out_proj.forward(&out)
    }
}

/// The CLIP text encoder. Build it with [`TextTransformer::load_hf`] or [`TextTransformer::load_open_clip`]
/// (or [`TextTransformer::load`] with a [`super::TextLayout`]).
#[derive(Debug, Clone)]
pub struct TextTransformer {
    pub(crate) token_embedding: Tensor,    // [V, D]
    pub(crate) position_embedding: Tensor, // [P, D]
    pub(crate) blocks: Vec<TextBlock>,
    pub(crate) final_norm: LayerNorm,
    pub(crate) config: TextConfig,
}

fn causal_mask(len: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let data: Vec<f32> = (0..len)
        .flat_map(|i| (0..len).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(data, (len, len), device)?.to_dtype(dtype)
}

impl TextTransformer {
    pub fn config(&self) -> &TextConfig {
        &self.config
    }

    /// Token ids `[B, L]` (any integer dtype, `L ≤ max_positions`) → hidden states `[B, L, hidden]`: the
    /// output of the configured block (see [`super::TextOutput`]) after the final LayerNorm.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, l) = ids.dims2()?;
        let cfg = &self.config;
        if l == 0 || l > cfg.max_positions {
            candle_core::bail!(
                "text encoder: {l} tokens per prompt, expected 1..={}",
                cfg.max_positions
            );
        }
        let ids = ids.to_dtype(DType::I64)?;
        let (lo, hi) = (
            ids.min_all()?.to_vec0::<i64>()?,
            ids.max_all()?.to_vec0::<i64>()?,
        );
        if lo < 0 || hi >= cfg.vocab_size as i64 {
            candle_core::bail!(
                "text encoder: token ids span [{lo}, {hi}], vocabulary is [0, {})",
                cfg.vocab_size
            );
        }
        let tok = self
            .token_embedding
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, l, cfg.hidden))?;
        let mut h = tok.broadcast_add(&self.position_embedding.narrow(0, 0, l)?)?; // [B, L, D]
        let mask = causal_mask(l, h.dtype(), h.device())?;
        for block in self.blocks.iter().take(cfg.active_layers()) {
            h = block.forward(&h, &mask, cfg)?;
        }
        self.final_norm.forward(&h)
    }
}
