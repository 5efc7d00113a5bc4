//! The text encoder of a diffusers `LDMTextToImagePipeline` folder (`bert/config.json` + `bert/model.safetensors`,
//! diffusers' `LDMBertModel`, pipelines/latent_diffusion/pipeline_latent_diffusion.py in diffusers 0.42.1) onto the
//! canonical names of the original `BERTEmbedder` (x_transformer `TransformerWrapper`, prefix
//! [`LDMBERT_PREFIX`]; model: `text::x_transformer`).
//!
//! Both hold the same network (diffusers converted CompVis' `txt2img-f8-large` this way; the fixture script checks
//! that both give identical hidden states on the same weights). Rules, per block `i`:
//!
//! | diffusers (`LDMBertModel`) | canonical (`TransformerWrapper`) |
//! |---|---|
//! | `model.embed_tokens.weight` | `token_emb.weight` |
//! | `model.embed_positions.weight` | `pos_emb.emb.weight` |
//! | `model.layers.{i}.self_attn_layer_norm` | `attn_layers.layers.{2i}.0` |
//! | `model.layers.{i}.self_attn.{q,k,v}_proj.weight` | `attn_layers.layers.{2i}.1.to_{q,k,v}.weight` |
//! | `model.layers.{i}.self_attn.out_proj` | `attn_layers.layers.{2i}.1.to_out` |
//! | `model.layers.{i}.final_layer_norm` | `attn_layers.layers.{2i+1}.0` |
//! | `model.layers.{i}.fc1` | `attn_layers.layers.{2i+1}.1.net.0.0` |
//! | `model.layers.{i}.fc2` | `attn_layers.layers.{2i+1}.1.net.2` |
//! | `model.layer_norm` | `norm` |
//! | `to_logits` | `to_logits` (language-model head, unused by the encoder) |
use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use super::error::{ImportError, Result};
use super::json::{check_rest, read_config, Accepted, Fixed, BOOKKEEPING};
use super::key_map::KeyMap;

const WHAT: &str = "LDMBertModel";

/// Prefix of the LDM BERT text encoder in an original single file.
pub const LDMBERT_PREFIX: &str = "cond_stage_model.transformer.";

/// The entries of diffusers' `LDMBertConfig` that shape the weights (defaults as in diffusers: the txt2img-large
/// model, 32 layers of width 1280).
#[derive(Debug, Clone, Deserialize)]
pub struct DiffusersLdmBertConfig {
    #[serde(default = "vocab")]
    pub vocab_size: usize,
    #[serde(default = "positions")]
    pub max_position_embeddings: usize,
    #[serde(default = "layers")]
    pub encoder_layers: usize,
    #[serde(default = "ffn")]
    pub encoder_ffn_dim: usize,
    #[serde(default = "heads")]
    pub encoder_attention_heads: usize,
    #[serde(default = "head_dim")]
    pub head_dim: usize,
    #[serde(default = "d_model")]
    pub d_model: usize,
    /// All other entries (reported by [`DiffusersLdmBertConfig::arch`] unless known to be harmless).
    #[serde(flatten)]
    pub rest: BTreeMap<String, Value>,
}

fn vocab() -> usize {
    30522
}
fn positions() -> usize {
    77
}
fn layers() -> usize {
    32
}
fn ffn() -> usize {
    5120
}
fn heads() -> usize {
    8
}
fn head_dim() -> usize {
    64
}
fn d_model() -> usize {
    1280
}

/// The LDM BERT encoder's architecture under the original names (`TransformerWrapper` / `Encoder`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LdmBertArch {
    pub vocab_size: usize,
    pub max_seq_len: usize,
    pub dim: usize,
    pub depth: usize,
    pub heads: usize,
    pub dim_head: usize,
    pub ff_inner: usize,
    /// Config entries that were neither used nor known to be harmless: log them.
    pub ignored: Vec<String>,
}

/// Entries that do not change the hidden states: dropout (inactive at inference), initialisation, bookkeeping.
/// `scale_embedding` is stored but never read by `LDMBertEncoder.forward`.
const HARMLESS: &[&str] = &[
    "architectures",
    "model_type",
    "torch_dtype",
    "dtype",
    "transformers_version",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "init_std",
    "dropout",
    "attention_dropout",
    "activation_dropout",
    "classifier_dropout",
    "encoder_layerdrop",
    "use_cache",
    "scale_embedding",
    "num_hidden_layers",
    "hidden_size",
    "num_attention_heads",
];

/// x_transformer's feed-forward uses the exact GELU (`nn.GELU()`), which is transformers' `"gelu"`.
const FIXED: &[Fixed] = &[Fixed {
    field: "activation_function",
    accepted: &[Accepted::Str("gelu")],
    reason: "the original x_transformer feed-forward uses the exact (erf) GELU",
}];

impl DiffusersLdmBertConfig {
    pub fn from_json(text: &str) -> Result<Self> {
        serde_json::from_str(text).map_err(|source| ImportError::Json { what: WHAT, source })
    }

    /// Reads `bert/config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        read_config(WHAT, path)
    }

    pub fn arch(&self) -> Result<LdmBertArch> {
        let mut harmless = BOOKKEEPING.to_vec();
        harmless.extend_from_slice(HARMLESS);
        let ignored = check_rest(WHAT, &self.rest, FIXED, &harmless)?;
        // `num_hidden_layers` is an alias transformers writes next to `encoder_layers`; they must agree.
        if let Some(n) = self.rest.get("num_hidden_layers").and_then(Value::as_u64) {
            if n != self.encoder_layers as u64 {
                return Err(ImportError::Inconsistent {
                    what: WHAT,
                    detail: format!(
                        "num_hidden_layers {n} differs from encoder_layers {}",
                        self.encoder_layers
                    ),
                });
            }
        }
        for (field, v) in [
            ("vocab_size", self.vocab_size),
            ("max_position_embeddings", self.max_position_embeddings),
            ("encoder_layers", self.encoder_layers),
            ("encoder_ffn_dim", self.encoder_ffn_dim),
            ("encoder_attention_heads", self.encoder_attention_heads),
            ("head_dim", self.head_dim),
            ("d_model", self.d_model),
        ] {
            if v == 0 {
                return Err(ImportError::Inconsistent {
                    what: WHAT,
                    detail: format!("`{field}` is 0"),
                });
            }
        }
        Ok(LdmBertArch {
            vocab_size: self.vocab_size,
            max_seq_len: self.max_position_embeddings,
            dim: self.d_model,
            depth: self.encoder_layers,
            heads: self.encoder_attention_heads,
            dim_head: self.head_dim,
            ff_inner: self.encoder_ffn_dim,
            ignored,
        })
    }
}

/// diffusers `LDMBertModel` names -> canonical names relative to [`LDMBERT_PREFIX`] (see the module docs).
pub fn ldmbert_key_map(cfg: &DiffusersLdmBertConfig) -> Result<KeyMap> {
    ldmbert_key_map_for(&cfg.arch()?)
}

pub fn ldmbert_key_map_for(a: &LdmBertArch) -> Result<KeyMap> {
    let mut m = KeyMap::new();
    let (d, inner, ff) = (a.dim, a.heads * a.dim_head, a.ff_inner);
    m.rename(
        "model.embed_tokens.weight",
        "token_emb.weight",
        &[a.vocab_size, d],
    )?;
    m.rename(
        "model.embed_positions.weight",
        "pos_emb.emb.weight",
        &[a.max_seq_len, d],
    )?;
    for i in 0..a.depth {
        let p = format!("model.layers.{i}");
        let (attn, fwd) = (
            format!("attn_layers.layers.{}", 2 * i),
            format!("attn_layers.layers.{}", 2 * i + 1),
        );
        m.norm(
            &format!("{p}.self_attn_layer_norm"),
            &format!("{attn}.0"),
            d,
        )?;
        for x in ["q", "k", "v"] {
            m.linear(
                &format!("{p}.self_attn.{x}_proj"),
                &format!("{attn}.1.to_{x}"),
                inner,
                d,
                false,
            )?;
        }
        m.linear(
            &format!("{p}.self_attn.out_proj"),
            &format!("{attn}.1.to_out"),
            d,
            inner,
            true,
        )?;
        m.norm(&format!("{p}.final_layer_norm"), &format!("{fwd}.0"), d)?;
        m.linear(
            &format!("{p}.fc1"),
            &format!("{fwd}.1.net.0.0"),
            ff,
            d,
            true,
        )?;
        m.linear(&format!("{p}.fc2"), &format!("{fwd}.1.net.2"), d, ff, true)?;
    }
    m.norm("model.layer_norm", "norm", d)?;
    m.linear("to_logits", "to_logits", a.vocab_size, d, true)?;
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::import::Conversion;

    fn tiny() -> DiffusersLdmBertConfig {
        DiffusersLdmBertConfig::from_json(
            r#"{"_class_name": "LDMBertModel", "activation_function": "gelu", "architectures": ["LDMBertModel"],
                "d_model": 8, "dropout": 0.0, "encoder_attention_heads": 8, "encoder_ffn_dim": 32,
                "encoder_layers": 2, "head_dim": 64, "max_position_embeddings": 77, "model_type": "ldmbert",
                "num_hidden_layers": 2, "scale_embedding": false, "vocab_size": 30522, "use_cache": true,
                "some_future_flag": 1}"#,
        )
        .expect("config")
    }

    #[test]
    fn config_translates_and_reports_unknown_entries() {
        let a = tiny().arch().expect("arch");
        assert_eq!(
            (
                a.vocab_size,
                a.max_seq_len,
                a.dim,
                a.depth,
                a.heads,
                a.dim_head,
                a.ff_inner
            ),
            (30522, 77, 8, 2, 8, 64, 32)
        );
        assert_eq!(a.ignored, ["some_future_flag"]);
        let defaults = DiffusersLdmBertConfig::from_json("{}")
            .expect("empty")
            .arch()
            .expect("arch");
        assert_eq!(
            (defaults.dim, defaults.depth, defaults.ff_inner),
            (1280, 32, 5120)
        );
    }

    #[test]
    fn config_rejects_other_activations_and_contradictions() {
        let relu =
            DiffusersLdmBertConfig::from_json(r#"{"activation_function": "relu"}"#).expect("json");
        assert!(matches!(
            relu.arch(),
            Err(ImportError::Unsupported {
                field: "activation_function",
                ..
            })
        ));
        let bad =
            DiffusersLdmBertConfig::from_json(r#"{"encoder_layers": 2, "num_hidden_layers": 3}"#)
                .expect("json");
        assert!(matches!(bad.arch(), Err(ImportError::Inconsistent { .. })));
    }

    fn rule(m: &KeyMap, diffusers: &str, canonical: &str, shape: &[usize]) {
        let e = m
            .entry(diffusers)
            .unwrap_or_else(|| panic!("no rule for {diffusers}"));
        assert_eq!(e.canonical, canonical, "{diffusers}");
        assert_eq!(e.canonical_shape, shape, "{diffusers}");
        assert_eq!(e.diffusers_shape, shape, "{diffusers}");
        assert_eq!(e.conversion, Conversion::Identity, "{diffusers}");
    }

    #[test]
    fn every_rule_of_the_table() {
        let m = ldmbert_key_map(&tiny()).expect("map");
        rule(
            &m,
            "model.embed_tokens.weight",
            "token_emb.weight",
            &[30522, 8],
        );
        rule(
            &m,
            "model.embed_positions.weight",
            "pos_emb.emb.weight",
            &[77, 8],
        );
        let l = "model.layers.1";
        rule(
            &m,
            &format!("{l}.self_attn_layer_norm.weight"),
            "attn_layers.layers.2.0.weight",
            &[8],
        );
        rule(
            &m,
            &format!("{l}.self_attn_layer_norm.bias"),
            "attn_layers.layers.2.0.bias",
            &[8],
        );
        for x in ["q", "k", "v"] {
            rule(
                &m,
                &format!("{l}.self_attn.{x}_proj.weight"),
                &format!("attn_layers.layers.2.1.to_{x}.weight"),
                &[512, 8],
            );
            assert!(m.entry(&format!("{l}.self_attn.{x}_proj.bias")).is_none());
        }
        rule(
            &m,
            &format!("{l}.self_attn.out_proj.weight"),
            "attn_layers.layers.2.1.to_out.weight",
            &[8, 512],
        );
        rule(
            &m,
            &format!("{l}.self_attn.out_proj.bias"),
            "attn_layers.layers.2.1.to_out.bias",
            &[8],
        );
        rule(
            &m,
            &format!("{l}.final_layer_norm.weight"),
            "attn_layers.layers.3.0.weight",
            &[8],
        );
        rule(
            &m,
            &format!("{l}.final_layer_norm.bias"),
            "attn_layers.layers.3.0.bias",
            &[8],
        );
        rule(
            &m,
            &format!("{l}.fc1.weight"),
            "attn_layers.layers.3.1.net.0.0.weight",
            &[32, 8],
        );
        rule(
            &m,
            &format!("{l}.fc1.bias"),
            "attn_layers.layers.3.1.net.0.0.bias",
            &[32],
        );
        rule(
            &m,
            &format!("{l}.fc2.weight"),
            "attn_layers.layers.3.1.net.2.weight",
            &[8, 32],
        );
        rule(
            &m,
            &format!("{l}.fc2.bias"),
            "attn_layers.layers.3.1.net.2.bias",
            &[8],
        );
        rule(&m, "model.layer_norm.weight", "norm.weight", &[8]);
        rule(&m, "model.layer_norm.bias", "norm.bias", &[8]);
        rule(&m, "to_logits.weight", "to_logits.weight", &[30522, 8]);
        rule(&m, "to_logits.bias", "to_logits.bias", &[30522]);
        // 2 embeddings + 13 per layer (2 norms, q, k, v, out, fc1, fc2) + final norm 2 + head 2
        assert_eq!(m.len(), 2 + 2 * 13 + 2 + 2);
        let pre = m.with_canonical_prefix(LDMBERT_PREFIX);
        assert_eq!(
            pre.canonical_key("model.layers.0.fc2.bias"),
            Some("cond_stage_model.transformer.attn_layers.layers.1.1.net.2.bias")
        );
    }
}
