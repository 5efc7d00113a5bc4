//! The text encoder of a diffusers folder (`text_encoder/config.json` + `text_encoder/model.safetensors`, a
//! transformers `CLIPTextModel`) onto the canonical single-file names.
//!
//! Both the prefixed names of transformers 4 (`text_model.encoder.layers.0...`) and the unprefixed names that
//! transformers 5 writes (`encoder.layers.0...`) are accepted; the maps produce the prefixed ones.
//!
//! SD1: the original `FrozenCLIPEmbedder` wraps the same transformers class, so the names are the same below
//! the prefix `cond_stage_model.transformer.` ([`clip_key_map`]).
//!
//! SD2: the original `FrozenOpenCLIPEmbedder` holds an OpenCLIP text tower under `cond_stage_model.model.` with
//! other names and a fused attention input projection: `in_proj_weight` `[3H, H]` is the rows of
//! `q_proj`, `k_proj`, `v_proj` stacked ([`open_clip_key_map`]; names as in diffusers 0.42.1
//! `single_file_utils.convert_open_clip_checkpoint`). A diffusers SD2 folder keeps only the layers SD2 uses
//! (23 of 24: the penultimate layer's output goes through `final_layer_norm`), and `CLIPTextModel` has no
//! `text_projection`, so the canonical tensors made from it lack `resblocks.{L}`, `text_projection` and
//! `logit_scale`; an OpenCLIP loader must accept those as absent. Going the other way, they are dropped.
use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use super::error::{ImportError, Result};
use super::json::{check_rest, read_config, BOOKKEEPING};
use super::key_map::{Conversion, Entry, KeyMap};

const WHAT: &str = "CLIPTextModel";

/// Prefix of SD1's text encoder (transformers names) in an original single file.
pub const CLIP_PREFIX: &str = "cond_stage_model.transformer.";
/// Prefix of SD2's text encoder (OpenCLIP names) in an original single file.
pub const OPEN_CLIP_PREFIX: &str = "cond_stage_model.model.";
/// The position id buffer some transformers versions save (not a weight).
pub const POSITION_IDS: &str = "text_model.embeddings.position_ids";

/// The entries of a transformers `CLIPTextConfig` that shape the weights (defaults as in transformers).
#[derive(Debug, Clone, Deserialize)]
pub struct DiffusersClipConfig {
    #[serde(default = "vocab")]
    pub vocab_size: usize,
    #[serde(default = "hidden")]
    pub hidden_size: usize,
    #[serde(default = "intermediate")]
    pub intermediate_size: usize,
    #[serde(default = "layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "heads")]
    pub num_attention_heads: usize,
    #[serde(default = "positions")]
    pub max_position_embeddings: usize,
    #[serde(default = "quick_gelu")]
    pub hidden_act: String,
    #[serde(default = "eps")]
    pub layer_norm_eps: f64,
    /// All other entries (reported by [`DiffusersClipConfig::arch`] unless known to be harmless).
    #[serde(flatten)]
    pub rest: BTreeMap<String, Value>,
}

fn vocab() -> usize {
    49408
}
fn hidden() -> usize {
    512
}
fn intermediate() -> usize {
    2048
}
fn layers() -> usize {
    12
}
fn heads() -> usize {
    8
}
fn positions() -> usize {
    77
}
fn quick_gelu() -> String {
    "quick_gelu".to_string()
}
fn eps() -> f64 {
    1e-5
}

/// The MLP activation of the text transformer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `x * sigmoid(1.702 x)` (OpenAI CLIP, SD1)
    QuickGelu,
    /// exact erf GELU (OpenCLIP, SD2)
    Gelu,
}

/// The text encoder's architecture.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipArch {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub layers: usize,
    pub heads: usize,
    pub max_positions: usize,
    pub activation: Activation,
    pub layer_norm_eps: f64,
    /// Config entries that were neither used nor known to be harmless: log them.
    pub ignored: Vec<String>,
}

/// Entries of a text config that do not affect the text encoder's weights or hidden states.
const HARMLESS: &[&str] = &[
    "architectures",
    "model_type",
    "torch_dtype",
    "dtype",
    "transformers_version",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "initializer_range",
    "initializer_factor",
    "attention_dropout",
    "dropout",
    "projection_dim",
];

impl DiffusersClipConfig {
    pub fn from_json(text: &str) -> Result<Self> {
        serde_json::from_str(text).map_err(|source| ImportError::Json { what: WHAT, source })
    }

    /// Reads `text_encoder/config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        read_config(WHAT, path)
    }

    pub fn arch(&self) -> Result<ClipArch> {
        let mut harmless = BOOKKEEPING.to_vec();
        harmless.extend_from_slice(HARMLESS);
        let ignored = check_rest(WHAT, &self.rest, &[], &harmless)?;
        let activation = match self.hidden_act.as_str() {
            "quick_gelu" => Activation::QuickGelu,
            "gelu" => Activation::Gelu,
            other => {
                return Err(ImportError::Unsupported {
                    what: WHAT,
                    field: "hidden_act",
                    value: other.to_string(),
                    reason: "SD's text encoders use quick_gelu (CLIP) or gelu (OpenCLIP)",
                })
            }
        };
        if self.hidden_size.checked_rem(self.num_attention_heads) != Some(0) {
            return Err(ImportError::Inconsistent {
                what: WHAT,
                detail: format!(
                    "hidden_size {} is not divisible into {} heads",
                    self.hidden_size, self.num_attention_heads
                ),
            });
        }
        Ok(ClipArch {
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            layers: self.num_hidden_layers,
            heads: self.num_attention_heads,
            max_positions: self.max_position_embeddings,
            activation,
            layer_norm_eps: self.layer_norm_eps,
            ignored,
        })
    }
}

/// SD1: diffusers `text_model.*` -> canonical `text_model.*` relative to [`CLIP_PREFIX`] (same names).
pub fn clip_key_map(cfg: &DiffusersClipConfig) -> Result<KeyMap> {
    clip_key_map_for(&cfg.arch()?)
}

pub fn clip_key_map_for(a: &ClipArch) -> Result<KeyMap> {
    let mut m = KeyMap::new();
    let (h, i) = (a.hidden_size, a.intermediate_size);
    m.rename(
        "text_model.embeddings.token_embedding.weight",
        "text_model.embeddings.token_embedding.weight",
        &[a.vocab_size, h],
    )?;
    m.rename(
        "text_model.embeddings.position_embedding.weight",
        "text_model.embeddings.position_embedding.weight",
        &[a.max_positions, h],
    )?;
    for l in 0..a.layers {
        let p = format!("text_model.encoder.layers.{l}");
        for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            let k = format!("{p}.self_attn.{proj}");
            m.linear(&k, &k, h, h, true)?;
        }
        for (k, out, inp) in [("mlp.fc1", i, h), ("mlp.fc2", h, i)] {
            let k = format!("{p}.{k}");
            m.linear(&k, &k, out, inp, true)?;
        }
        for norm in ["layer_norm1", "layer_norm2"] {
            let k = format!("{p}.{norm}");
            m.norm(&k, &k, h)?;
        }
    }
    m.norm(
        "text_model.final_layer_norm",
        "text_model.final_layer_norm",
        h,
    )?;
    accept_unprefixed(&mut m)?;
    m.ignore_canonical(POSITION_IDS);
    Ok(m)
}

/// SD2: diffusers `text_model.*` -> OpenCLIP names relative to [`OPEN_CLIP_PREFIX`] (see the module docs).
pub fn open_clip_key_map(cfg: &DiffusersClipConfig) -> Result<KeyMap> {
    open_clip_key_map_for(&cfg.arch()?)
}

pub fn open_clip_key_map_for(a: &ClipArch) -> Result<KeyMap> {
    let mut m = KeyMap::new();
    let (h, i) = (a.hidden_size, a.intermediate_size);
    m.rename(
        "text_model.embeddings.token_embedding.weight",
        "token_embedding.weight",
        &[a.vocab_size, h],
    )?;
    m.rename(
        "text_model.embeddings.position_embedding.weight",
        "positional_embedding",
        &[a.max_positions, h],
    )?;
    for l in 0..a.layers {
        let (d, c) = (
            format!("text_model.encoder.layers.{l}"),
            format!("transformer.resblocks.{l}"),
        );
        for (index, proj) in ["q_proj", "k_proj", "v_proj"].into_iter().enumerate() {
            for (p, dshape, cshape) in [
                ("weight", vec![h, h], vec![3 * h, h]),
                ("bias", vec![h], vec![3 * h]),
            ] {
                m.push(Entry {
                    diffusers: format!("{d}.self_attn.{proj}.{p}"),
                    diffusers_shape: dshape,
                    canonical: format!("{c}.attn.in_proj_{p}"),
                    canonical_shape: cshape,
                    conversion: Conversion::RowBlock { index, count: 3 },
                })?;
            }
        }
        m.linear(
            &format!("{d}.self_attn.out_proj"),
            &format!("{c}.attn.out_proj"),
            h,
            h,
            true,
        )?;
        m.norm(&format!("{d}.layer_norm1"), &format!("{c}.ln_1"), h)?;
        m.linear(
            &format!("{d}.mlp.fc1"),
            &format!("{c}.mlp.c_fc"),
            i,
            h,
            true,
        )?;
        m.linear(
            &format!("{d}.mlp.fc2"),
            &format!("{c}.mlp.c_proj"),
            h,
            i,
            true,
        )?;
        m.norm(&format!("{d}.layer_norm2"), &format!("{c}.ln_2"), h)?;
    }
    m.norm("text_model.final_layer_norm", "ln_final", h)?;
    accept_unprefixed(&mut m)?;
    // The layer after the ones SD2 uses, and the contrastive head: present in original files, never used.
    let unused = format!("transformer.resblocks.{}", a.layers);
    for k in [
        "attn.in_proj_weight",
        "attn.in_proj_bias",
        "attn.out_proj.weight",
        "attn.out_proj.bias",
        "ln_1.weight",
        "ln_1.bias",
        "ln_2.weight",
        "ln_2.bias",
        "mlp.c_fc.weight",
        "mlp.c_fc.bias",
        "mlp.c_proj.weight",
        "mlp.c_proj.bias",
    ] {
        m.ignore_canonical(&format!("{unused}.{k}"));
    }
    m.ignore_canonical("text_projection");
    m.ignore_canonical("logit_scale");
    Ok(m)
}

/// transformers 5 saves `CLIPTextModel` without the `text_model.` level (`embeddings.*`, `encoder.*`,
/// `final_layer_norm.*`; its `conversion_mapping.py` strips the prefix on load). Files written by earlier versions,
/// such as the published SD checkpoints, have it. The map produces the prefixed names and accepts both.
fn accept_unprefixed(m: &mut KeyMap) -> Result<()> {
    let keys: Vec<String> = m.entries().iter().map(|e| e.diffusers.clone()).collect();
    for k in keys {
        if let Some(short) = k.strip_prefix("text_model.") {
            m.alias(short, &k)?;
        }
    }
    m.ignore_diffusers(POSITION_IDS);
    if let Some(short) = POSITION_IDS.strip_prefix("text_model.") {
        m.ignore_diffusers(short);
    }
    Ok(())
}
