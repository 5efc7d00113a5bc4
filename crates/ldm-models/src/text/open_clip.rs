//! OpenCLIP's text-tower weight layout, relative to `cond_stage_model.model` in SD2 single files
//! (`FrozenOpenCLIPEmbedder`, Stability-AI/stablediffusion@cf1d67a `ldm/modules/encoders/modules.py`;
//! open_clip `transformer.py` `ResidualAttentionBlock` with `nn.MultiheadAttention`, fused `in_proj`).
use crate::ops::layer_norm;
use candle_core::Result;
use candle_nn::VarBuilder;
use ldm_kernels::nn::{linear, Linear};

use super::config::TextConfig;
use super::transformer::{TextBlock, TextTransformer, LN_EPS};

fn block(cfg: &TextConfig, vb: VarBuilder) -> Result<TextBlock> {
    let d = cfg.hidden;
    let attn = vb.pp("attn");
    let qkv = Linear::new(
        attn.get((3 * d, d), "in_proj_weight")?,
        Some(attn.get(3 * d, "in_proj_bias")?),
    );
    Ok(TextBlock {
        ln_1: layer_norm(d, LN_EPS, vb.pp("ln_1"))?,
        qkv,
        out_proj: linear(d, d, attn.pp("out_proj"))?,
        ln_2: layer_norm(d, LN_EPS, vb.pp("ln_2"))?,
        fc1: linear(d, cfg.intermediate, vb.pp("mlp.c_fc"))?,
        fc2: linear(cfg.intermediate, d, vb.pp("mlp.c_proj"))?,
    })
}

impl TextTransformer {
    /// Loads the OpenCLIP layout; `vb` at `cond_stage_model.model`. Every stored block is loaded even when
    /// `config.output` skips some, so the module mirrors the key tree; `text_projection` and `logit_scale`
    /// (CLIP's contrastive head, unused for conditioning) are not read.
    pub fn load_open_clip(vb: VarBuilder, config: &TextConfig) -> Result<Self> {
        config.check().map_err(candle_core::Error::wrap)?;
        let d = config.hidden;
        let blocks = (0..config.layers)
            .map(|i| block(config, vb.pp(format!("transformer.resblocks.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            token_embedding: vb
                .get((config.vocab_size, d), "token_embedding.weight")?
                .to_dtype(vb.dtype())?,
            position_embedding: vb
                .get((config.max_positions, d), "positional_embedding")?
                .to_dtype(vb.dtype())?,
            blocks,
            final_norm: layer_norm(d, LN_EPS, vb.pp("ln_final"))?,
            config: config.clone(),
        })
    }
}
