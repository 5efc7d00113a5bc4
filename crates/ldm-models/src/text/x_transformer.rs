//! The LDM paper's own text encoder (Rombach et al. 2022, Sec. 4.3.1 and Tab. 15: "a transformer trained from
//! scratch" on BERT WordPiece tokens, `txt2img-f8-large` / `txt2img-1p4B-eval.yaml`), and the same network on layout
//! box tokens (layout-to-image). Original: CompVis/latent-diffusion@a506df5 `ldm/modules/x_transformer.py`
//! `TransformerWrapper(num_tokens, max_seq_len, attn_layers=Encoder(dim, depth))` as built by
//! `ldm.modules.encoders.modules.BERTEmbedder(n_embed, n_layer)` and `TransformerEmbedder`, called with
//! `return_embeddings=True`. diffusers has it as `LDMBertModel` (see `import::diffusers_ldmbert`).
//!
//! `h⁰ = E_tok[ids] + E_pos[0..L]`; for each of the `depth` blocks `h ← h + Attn(LN_a(h))`, `h ← h + FF(LN_f(h))`
//! (pre-norm, bidirectional: no mask); output `LN_out(h)`, `[B, L, dim]`. `Attn` has `heads` heads of width
//! `dim_head` (inner width `heads·dim_head`, not `dim`: x_transformer's defaults are 8 × 64 whatever `dim` is), no
//! q/k/v bias; `FF(x) = W₂·GELU(W₁x + b₁) + b₂` with the exact (erf) GELU and inner width `ff_inner` (4·dim).
//! All LayerNorms have ε = 1e-5. The language-model head `to_logits` is in every checkpoint and unused here.
//!
//! | symbol | here | key below `cond_stage_model.transformer.` |
//! |---|---|---|
//! | E_tok | `token_emb` | `token_emb.weight` `[V, dim]` |
//! | E_pos | `pos_emb` | `pos_emb.emb.weight` `[max_seq_len, dim]` |
//! | LN_a | `XBlock::attn_norm` | `attn_layers.layers.{2i}.0` |
//! | W_q, W_k, W_v | `XBlock::{to_q,to_k,to_v}` | `attn_layers.layers.{2i}.1.to_{q,k,v}.weight` `[inner, dim]` |
//! | W_o | `XBlock::to_out` | `attn_layers.layers.{2i}.1.to_out` `[dim, inner]` + bias |
//! | LN_f | `XBlock::ff_norm` | `attn_layers.layers.{2i+1}.0` |
//! | W₁, W₂ | `XBlock::{ff_in,ff_out}` | `attn_layers.layers.{2i+1}.1.net.0.0`, `….net.2` |
//! | LN_out | `norm` | `norm` |
//!
//! In `layers.{n}.{m}`, `m` = 0 is the norm, 1 the attention/feed-forward, 2 the weightless `Residual`.
use crate::ops::{layer_norm, LayerNorm};
use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;
use ldm_kernels::nn::{linear, linear_no_bias, Linear};
use serde::{Deserialize, Serialize};

/// LayerNorm epsilon (`nn.LayerNorm` default).
const LN_EPS: f64 = 1e-5;
/// Initial embeddings of a new model, as `TransformerWrapper.init_` draws them: N(0, 0.02²).
const EMB_INIT: candle_nn::Init = candle_nn::Init::Randn {
    mean: 0.,
    stdev: 0.02,
};
/// x_transformer's `DEFAULT_DIM_HEAD`.
pub const DEFAULT_DIM_HEAD: usize = 64;
/// x_transformer's default head count (`AttentionLayers(heads=8)`).
pub const DEFAULT_HEADS: usize = 8;
/// Canonical prefix of the BERT / layout text encoder in an original LDM single file.
pub const X_TRANSFORMER_PREFIX: &str = "cond_stage_model.transformer.";
/// Tensors of the checkpoint that the encoder does not read (the language-model head).
pub const UNUSED_KEYS: &[&str] = &["to_logits.weight", "to_logits.bias"];

/// Sizes of `TransformerWrapper(num_tokens, max_seq_len, Encoder(dim, depth, heads, attn_dim_head))`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct XTransformerConfig {
    /// `num_tokens` / `vocab_size` (30522 for BERT tokens).
    pub vocab_size: usize,
    /// Length of the learned position table (`max_seq_len`, 77).
    pub max_seq_len: usize,
    /// Width of the residual stream (`n_embed`).
    pub dim: usize,
    /// Number of attention + feed-forward blocks (`n_layer`).
    pub depth: usize,
    pub heads: usize,
    /// Width of one head; `heads · dim_head` is the attention's inner width.
    pub dim_head: usize,
    /// Width of the feed-forward hidden layer (`4 · dim`).
    pub ff_inner: usize,
}

impl XTransformerConfig {
    /// The encoder of the LDM paper's `BERTEmbedder`/`TransformerEmbedder`: x-transformers' `Encoder(dim,
    /// depth)` with its defaults — 8 heads of 64 and a 4× feed-forward.
    pub fn paper(vocab_size: usize, max_seq_len: usize, dim: usize, depth: usize) -> Self {
        Self {
            vocab_size,
            max_seq_len,
            dim,
            depth,
            heads: 8,
            dim_head: 64,
            ff_inner: 4 * dim,
        }
    }
}

/// Errors of [`XTransformerConfig::infer`] and [`XTransformerConfig::check`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum XTransformerConfigError {
    #[error("x-transformer weight `{key}` is missing")]
    Missing { key: String },
    #[error("x-transformer weight `{key}`: shape {found:?}, expected {expected}")]
    Shape {
        key: String,
        found: Vec<usize>,
        expected: String,
    },
    #[error("x-transformer: {heads} heads do not divide the attention width {inner}")]
    Heads { inner: usize, heads: usize },
    #[error("x-transformer: size `{field}` is zero")]
    Zero { field: &'static str },
}

impl XTransformerConfig {
    /// `txt2img-1p4B-eval.yaml`'s `BERTEmbedder(n_embed=1280, n_layer=32)` (the paper's LDM-KL-8-G text model).
    pub fn ldm_txt2img_1p4b() -> Self {
        Self::bert(1280, 32)
    }

    /// `BERTEmbedder(n_embed, n_layer)` with every other argument at its default.
    pub fn bert(n_embed: usize, n_layer: usize) -> Self {
        Self {
            vocab_size: 30522,
            max_seq_len: 77,
            dim: n_embed,
            depth: n_layer,
            heads: DEFAULT_HEADS,
            dim_head: DEFAULT_DIM_HEAD,
            ff_inner: 4 * n_embed,
        }
    }

    /// `TransformerEmbedder(n_embed, n_layer, vocab_size, max_seq_len)` (the layout-to-image box-token encoder): the
    /// same network without a tokenizer, with its own vocabulary size.
    pub fn transformer_embedder(
        n_embed: usize,
        n_layer: usize,
        vocab_size: usize,
        max_seq_len: usize,
    ) -> Self {
        Self {
            vocab_size,
            max_seq_len,
            ..Self::bert(n_embed, n_layer)
        }
    }

    /// Attention inner width `heads · dim_head`.
    pub fn inner(&self) -> usize {
        self.heads * self.dim_head
    }

    pub fn check(&self) -> std::result::Result<(), XTransformerConfigError> {
        for (field, v) in [
            ("vocab_size", self.vocab_size),
            ("max_seq_len", self.max_seq_len),
            ("dim", self.dim),
            ("depth", self.depth),
            ("heads", self.heads),
            ("dim_head", self.dim_head),
            ("ff_inner", self.ff_inner),
        ] {
            if v == 0 {
                return Err(XTransformerConfigError::Zero { field });
            }
        }
        Ok(())
    }

    /// Reads every size from tensor shapes; `shape_of` answers for keys relative to the encoder's root
    /// ([`X_TRANSFORMER_PREFIX`]). The head count is not visible in the shapes (`to_q` is `[heads·dim_head, dim]`):
    /// `heads` defaults to x_transformer's 8, which every published LDM config uses.
    pub fn infer(
        shape_of: impl Fn(&str) -> Option<Vec<usize>>,
        heads: Option<usize>,
    ) -> std::result::Result<Self, XTransformerConfigError> {
        let matrix = |key: String| -> std::result::Result<(usize, usize), XTransformerConfigError> {
            match shape_of(&key) {
                Some(s) if s.len() == 2 => Ok((s[0], s[1])),
                Some(found) => Err(XTransformerConfigError::Shape {
                    key,
                    found,
                    expected: "a matrix".into(),
                }),
                None => Err(XTransformerConfigError::Missing { key }),
            }
        };
        let want_width = |key: String, found: (usize, usize), width: usize| {
            if found.1 == width {
                Ok(())
            } else {
                Err(XTransformerConfigError::Shape {
                    key,
                    found: vec![found.0, found.1],
                    expected: format!("[_, {width}]"),
                })
            }
        };
        let (vocab_size, dim) = matrix("token_emb.weight".into())?;
        let pos_key = "pos_emb.emb.weight".to_string();
        let pos = matrix(pos_key.clone())?;
        want_width(pos_key, pos, dim)?;
        let depth = (0..)
            .take_while(|i| {
                shape_of(&format!("attn_layers.layers.{}.1.to_q.weight", 2 * i)).is_some()
            })
            .count();
        let q_key = "attn_layers.layers.0.1.to_q.weight".to_string();
        if depth == 0 {
            return Err(XTransformerConfigError::Missing { key: q_key });
        }
        let q = matrix(q_key.clone())?;
        want_width(q_key, q, dim)?;
        let ff_key = "attn_layers.layers.1.1.net.0.0.weight".to_string();
        let ff = matrix(ff_key.clone())?;
        want_width(ff_key, ff, dim)?;
        let heads = heads.unwrap_or(DEFAULT_HEADS);
        let inner = q.0;
        if heads == 0 || !inner.is_multiple_of(heads) {
            return Err(XTransformerConfigError::Heads { inner, heads });
        }
        let cfg = Self {
            vocab_size,
            max_seq_len: pos.0,
            dim,
            depth,
            heads,
            dim_head: inner / heads,
            ff_inner: ff.0,
        };
        cfg.check()?;
        Ok(cfg)
    }
}

impl From<&crate::import::LdmBertArch> for XTransformerConfig {
    fn from(a: &crate::import::LdmBertArch) -> Self {
        Self {
            vocab_size: a.vocab_size,
            max_seq_len: a.max_seq_len,
            dim: a.dim,
            depth: a.depth,
            heads: a.heads,
            dim_head: a.dim_head,
            ff_inner: a.ff_inner,
        }
    }
}

/// One attention block and one feed-forward block (`layers.{2i}` and `layers.{2i+1}`).
#[derive(Debug, Clone)]
struct XBlock {
    attn_norm: LayerNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    ff_norm: LayerNorm,
    ff_in: Linear,
    ff_out: Linear,
}

impl XBlock {
    fn load(cfg: &XTransformerConfig, i: usize, vb: &VarBuilder) -> Result<Self> {
        let (d, inner) = (cfg.dim, cfg.inner());
        let a = vb.pp(format!("attn_layers.layers.{}", 2 * i));
        let f = vb.pp(format!("attn_layers.layers.{}", 2 * i + 1));
        let attn = a.pp("1");
        // `.2` of both layers is x_transformer's weightless `Residual`.
        Ok(Self {
            attn_norm: layer_norm(d, LN_EPS, a.pp("0"))?,
            to_q: linear_no_bias(d, inner, attn.pp("to_q"))?,
            to_k: linear_no_bias(d, inner, attn.pp("to_k"))?,
            to_v: linear_no_bias(d, inner, attn.pp("to_v"))?,
            to_out: linear(inner, d, attn.pp("to_out"))?,
            ff_norm: layer_norm(d, LN_EPS, f.pp("0"))?,
            // `net.0` is `Sequential(Linear, GELU)`, `net.1` the (inactive) dropout.
            ff_in: linear(d, cfg.ff_inner, f.pp("1.net.0.0"))?,
            ff_out: linear(cfg.ff_inner, d, f.pp("1.net.2"))?,
        })
    }

    fn forward(&self, x: &Tensor, cfg: &XTransformerConfig) -> Result<Tensor> {
        let x = (x + self.attention(&self.attn_norm.forward(x)?, cfg)?)?;
        let h = self.ff_in.forward(&self.ff_norm.forward(&x)?)?.gelu_erf()?; // [B, L, ff_inner]
        x + self.ff_out.forward(&h)?
    }

    /// Bidirectional multi-head self-attention, `x: [B, L, dim]`.
    fn attention(&self, x: &Tensor, cfg: &XTransformerConfig) -> Result<Tensor> {
        let (b, l, _) = x.dims3()?;
        let heads = |t: Tensor| -> Result<Tensor> {
            t.reshape((b, l, cfg.heads, cfg.dim_head))?
                .transpose(1, 2)?
                .contiguous() // [B, H, L, d_h]
        };
        let q = heads(self.to_q.forward(x)?)?;
        let k = heads(self.to_k.forward(x)?)?;
        let v = heads(self.to_v.forward(x)?)?;
        let scores = (q.matmul(&k.t()?)? * (cfg.dim_head as f64).powf(-0.5))?; // [B, H, L, L]
        let probs =
            crate::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(v.dtype())?;
        let out = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((b, l, cfg.inner()))?; // [B, L, inner]
        self.to_out.forward(&out)
    }
}

/// x_transformer's `TransformerWrapper` + `Encoder` (see the module docs).
#[derive(Debug, Clone)]
pub struct XTransformer {
    token_emb: Tensor, // [V, dim]
    pos_emb: Tensor,   // [max_seq_len, dim]
    blocks: Vec<XBlock>,
    norm: LayerNorm,
    config: XTransformerConfig,
}

impl XTransformer {
    /// Loads the original layout; `vb` at the encoder's root (`cond_stage_model.transformer`). The checkpoint's
    /// [`UNUSED_KEYS`] are not read.
    pub fn load(vb: VarBuilder, config: &XTransformerConfig) -> Result<Self> {
        config.check().map_err(candle_core::Error::wrap)?;
        let blocks = (0..config.depth)
            .map(|i| XBlock::load(config, i, &vb))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            token_emb: vb
                .get_with_hints(
                    (config.vocab_size, config.dim),
                    "token_emb.weight",
                    EMB_INIT,
                )?
                .to_dtype(vb.dtype())?,
            pos_emb: vb
                .get_with_hints(
                    (config.max_seq_len, config.dim),
                    "pos_emb.emb.weight",
                    EMB_INIT,
                )?
                .to_dtype(vb.dtype())?,
            blocks,
            norm: layer_norm(config.dim, LN_EPS, vb.pp("norm"))?,
            config: config.clone(),
        })
    }

    pub fn config(&self) -> &XTransformerConfig {
        &self.config
    }

    /// Token ids `[B, L]` (any integer dtype, `1 ≤ L ≤ max_seq_len`, ids in `[0, vocab_size)`) → `[B, L, dim]`.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, l) = ids.dims2()?;
        let cfg = &self.config;
        if l == 0 || l > cfg.max_seq_len {
            candle_core::bail!(
                "x-transformer: {l} tokens per sequence, expected 1..={}",
                cfg.max_seq_len
            );
        }
        let ids = ids.to_dtype(DType::I64)?;
        let (lo, hi) = (
            ids.min_all()?.to_vec0::<i64>()?,
            ids.max_all()?.to_vec0::<i64>()?,
        );
        if lo < 0 || hi >= cfg.vocab_size as i64 {
            candle_core::bail!(
                "x-transformer: token ids span [{lo}, {hi}], vocabulary is [0, {})",
                cfg.vocab_size
            );
        }
        let tok = self
            .token_emb
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, l, cfg.dim))?;
        let mut h = tok.broadcast_add(&self.pos_emb.narrow(0, 0, l)?)?; // [B, L, dim]
        for block in &self.blocks {
            h = block.forward(&h, cfg)?;
        }
        self.norm.forward(&h.contiguous()?)
    }

    /// The hidden states' last dimension is `dim`; exposed for callers sizing cross-attention (`context_dim`).
    pub fn output_dim(&self) -> usize {
        self.config.dim
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn shapes(cfg: &XTransformerConfig) -> HashMap<String, Vec<usize>> {
        let mut m = HashMap::new();
        m.insert("token_emb.weight".into(), vec![cfg.vocab_size, cfg.dim]);
        m.insert("pos_emb.emb.weight".into(), vec![cfg.max_seq_len, cfg.dim]);
        for i in 0..cfg.depth {
            m.insert(
                format!("attn_layers.layers.{}.1.to_q.weight", 2 * i),
                vec![cfg.inner(), cfg.dim],
            );
            m.insert(
                format!("attn_layers.layers.{}.1.net.0.0.weight", 2 * i + 1),
                vec![cfg.ff_inner, cfg.dim],
            );
        }
        m
    }

    #[test]
    fn infers_the_paper_model_from_shapes() {
        let want = XTransformerConfig::ldm_txt2img_1p4b();
        assert_eq!(want.inner(), 512);
        let s = shapes(&want);
        assert_eq!(
            XTransformerConfig::infer(|k| s.get(k).cloned(), None),
            Ok(want)
        );
    }

    #[test]
    fn infer_names_missing_keys_and_bad_heads() {
        let empty: HashMap<String, Vec<usize>> = HashMap::new();
        assert_eq!(
            XTransformerConfig::infer(|k| empty.get(k).cloned(), None),
            Err(XTransformerConfigError::Missing {
                key: "token_emb.weight".into()
            })
        );
        let s = shapes(&XTransformerConfig::bert(16, 2));
        assert_eq!(
            XTransformerConfig::infer(|k| s.get(k).cloned(), Some(3)),
            Err(XTransformerConfigError::Heads {
                inner: 512,
                heads: 3
            })
        );
        let mut bad = s.clone();
        bad.insert("pos_emb.emb.weight".into(), vec![77, 15]);
        assert!(matches!(
            XTransformerConfig::infer(|k| bad.get(k).cloned(), None),
            Err(XTransformerConfigError::Shape { .. })
        ));
    }
}
