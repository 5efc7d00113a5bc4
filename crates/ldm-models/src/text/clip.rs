//! transformers' `CLIPTextModel` weight layout, relative to `text_model`: SD1 single files
//! (`cond_stage_model.transformer.text_model`) and every diffusers `text_encoder/model.safetensors`
//! (`text_model`). Reference: transformers `models/clip/modeling_clip.py` (v4.x).
use crate::ops::layer_norm;
use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;
use ldm_kernels::nn::linear;

use super::config::TextConfig;
use super::transformer::{TextBlock, TextTransformer, LN_EPS};

fn block(cfg: &TextConfig, vb: VarBuilder) -> Result<TextBlock> {
    let d = cfg.hidden;
    let attn = vb.pp("self_attn");
    let proj = |name: &str| -> Result<(Tensor, Tensor)> {
        let vb = attn.pp(name);
        Ok((vb.get((d, d), "weight")?, vb.get(d, "bias")?))
    };
    let (q, k, v) = (proj("q_proj")?, proj("k_proj")?, proj("v_proj")?);
    let qkv = ldm_kernels::nn::Linear::new(
        Tensor::cat(&[&q.0, &k.0, &v.0], 0)?,
        Some(Tensor::cat(&[&q.1, &k.1, &v.1], 0)?),
    );
    Ok(TextBlock {
        ln_1: layer_norm(d, LN_EPS, vb.pp("layer_norm1"))?,
        qkv,
        out_proj: linear(d, d, attn.pp("out_proj"))?,
        ln_2: layer_norm(d, LN_EPS, vb.pp("layer_norm2"))?,
        fc1: linear(d, cfg.intermediate, vb.pp("mlp.fc1"))?,
        fc2: linear(cfg.intermediate, d, vb.pp("mlp.fc2"))?,
    })
}

impl TextTransformer {
    /// Loads the HF layout; `vb` at `text_model` (e.g. `cond_stage_model.transformer.text_model`).
    /// `embeddings.position_ids` (a buffer some files carry) is not read.
    pub fn load_hf(vb: VarBuilder, config: &TextConfig) -> Result<Self> {
        config.check().map_err(candle_core::Error::wrap)?;
        let (d, emb) = (config.hidden, vb.pp("embeddings"));
        let blocks = (0..config.layers)
            .map(|i| block(config, vb.pp(format!("encoder.layers.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            token_embedding: emb
                .get((config.vocab_size, d), "token_embedding.weight")?
                .to_dtype(vb.dtype())?,
            position_embedding: emb
                .get((config.max_positions, d), "position_embedding.weight")?
                .to_dtype(vb.dtype())?,
            blocks,
            final_norm: layer_norm(d, LN_EPS, vb.pp("final_layer_norm"))?,
            config: config.clone(),
        })
    }
}
