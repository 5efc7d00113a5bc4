//! The original `UNetModel(**unet_config.params)` arguments (CompVis/latent-diffusion @ a506df5 and
//! Stability-AI/stablediffusion @ cf1d67a `openaimodel.py`) as typed data, with the defaults of the original
//! constructor, and their translation to [`UnetConfig`] — rule by rule as the original builds the model:
//!
//! | argument | rule |
//! |---|---|
//! | `num_head_channels` ≠ −1 | [`HeadSpec::Dim`] (it wins over `num_heads`, as in the original) |
//! | else `num_heads` ≠ −1 | [`HeadSpec::Count`]; both −1 is the original's assertion error |
//! | `num_heads_upsample` | only −1 or `num_heads` (the deprecated other value is not built) |
//! | `use_spatial_transformer`, `context_dim` | both or neither (the original asserts it); `context_dim` a list is refused |
//! | `attention_resolutions` | [`UnetConfig::attention_levels_from_resolutions`] (unreached factors dropped) |
//! | `num_res_blocks`, `transformer_depth` | one value (a per-level list is refused) |
//! | `num_classes` | an int; `"continuous"` / `"sequential"` (unCLIP's `adm_in_channels`) are refused |
//! | `dims` | 2 only |
//! | `n_embed` | must be absent (codebook-id prediction is not built) |
//! | `legacy` | accepted either way: it changes nothing once the heads divide the channels, which is validated |
//! | `image_size`, `dropout`, `use_checkpoint`, `use_fp16`, `use_bf16` | no effect on inference weights or numerics |
use serde::{Deserialize, Serialize};

use super::config::{HeadSpec, UnetConfig, UnetConfigError};

/// An int or a list of ints (`num_res_blocks`, `transformer_depth`, `context_dim` may be either in the original).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum IntOrList {
    Int(usize),
    List(Vec<usize>),
}

/// `num_classes`: an int, or Stability's `"continuous"` / `"sequential"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum NumClasses {
    Int(usize),
    Kind(String),
}

fn minus_one() -> i64 {
    -1
}
fn one() -> IntOrList {
    IntOrList::Int(1)
}
fn two() -> usize {
    2
}
fn yes() -> bool {
    true
}
fn default_mult() -> Vec<usize> {
    vec![1, 2, 4, 8]
}

/// `model.params.unet_config.params` of an original config, with the original constructor's defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OriginalUnetParams {
    pub in_channels: usize,
    pub out_channels: usize,
    pub model_channels: usize,
    pub num_res_blocks: IntOrList,
    pub attention_resolutions: Vec<usize>,
    #[serde(default = "default_mult")]
    pub channel_mult: Vec<usize>,
    #[serde(default = "yes")]
    pub conv_resample: bool,
    #[serde(default = "two")]
    pub dims: usize,
    #[serde(default)]
    pub num_classes: Option<NumClasses>,
    #[serde(default = "minus_one")]
    pub num_heads: i64,
    #[serde(default = "minus_one")]
    pub num_head_channels: i64,
    #[serde(default = "minus_one")]
    pub num_heads_upsample: i64,
    #[serde(default)]
    pub use_scale_shift_norm: bool,
    #[serde(default)]
    pub resblock_updown: bool,
    #[serde(default)]
    pub use_new_attention_order: bool,
    #[serde(default)]
    pub use_spatial_transformer: bool,
    #[serde(default = "one")]
    pub transformer_depth: IntOrList,
    #[serde(default)]
    pub context_dim: Option<IntOrList>,
    #[serde(default)]
    pub n_embed: Option<usize>,
    #[serde(default = "yes")]
    pub legacy: bool,
    #[serde(default)]
    pub disable_self_attentions: Option<Vec<bool>>,
    #[serde(default)]
    pub num_attention_blocks: Option<Vec<usize>>,
    #[serde(default)]
    pub disable_middle_self_attn: bool,
    #[serde(default)]
    pub use_linear_in_transformer: bool,
    #[serde(default)]
    pub adm_in_channels: Option<usize>,
    // No effect on inference: accepted and ignored.
    #[serde(default)]
    pub image_size: Option<serde_json::Value>,
    #[serde(default)]
    pub dropout: Option<f64>,
    #[serde(default)]
    pub use_checkpoint: Option<bool>,
    #[serde(default)]
    pub use_fp16: Option<bool>,
    #[serde(default)]
    pub use_bf16: Option<bool>,
}

impl OriginalUnetParams {
    /// The `UnetConfig` the original builds from these arguments; `num_groups` is the GroupNorm group count
    /// (32 in every released model: the original hard-wires it).
    pub fn to_config(&self, num_groups: usize) -> Result<UnetConfig, UnetConfigError> {
        let invalid = |field, reason: String| Err(UnetConfigError::Invalid { field, reason });
        let single = |v: &IntOrList, field| match v {
            IntOrList::Int(n) => Ok(*n),
            IntOrList::List(l) => Err(UnetConfigError::Invalid {
                field,
                reason: format!(
                    "per-level values {l:?} are not supported (one value for all levels)"
                ),
            }),
        };
        let heads = match (self.num_heads, self.num_head_channels) {
            (_, d) if d > 0 => HeadSpec::Dim(d as usize),
            (n, -1) if n > 0 => HeadSpec::Count(n as usize),
            (n, d) => {
                return invalid(
                    "num_heads",
                    format!(
                        "num_heads {n} / num_head_channels {d}: one of them must be set (positive)"
                    ),
                )
            }
        };
        if self.num_heads_upsample != -1 && self.num_heads_upsample != self.num_heads {
            return invalid(
                "num_heads_upsample",
                format!(
                    "{} (deprecated; only -1 or num_heads is supported)",
                    self.num_heads_upsample
                ),
            );
        }
        if self.dims != 2 {
            return invalid(
                "dims",
                format!("{}: only 2-D UNets exist in LDM / SD", self.dims),
            );
        }
        if let Some(n) = self.n_embed {
            return invalid(
                "n_embed",
                format!("{n}: codebook-id prediction is not supported"),
            );
        }
        let context_dim = match (&self.context_dim, self.use_spatial_transformer) {
            (Some(c), true) => Some(single(c, "context_dim")?),
            (None, false) => None,
            (c, s) => {
                return invalid(
                    "context_dim",
                    format!(
                    "{c:?} with use_spatial_transformer {s}: the original requires both or neither"
                ),
                )
            }
        };
        let num_classes = match &self.num_classes {
            None => None,
            Some(NumClasses::Int(n)) => Some(*n),
            Some(NumClasses::Kind(k)) => {
                return invalid(
                    "num_classes",
                    format!(
                        "`{k}` (adm_in_channels {:?}): only an int class count is supported",
                        self.adm_in_channels
                    ),
                )
            }
        };
        let levels = self.channel_mult.len();
        let cfg = UnetConfig {
            in_channels: self.in_channels,
            out_channels: self.out_channels,
            model_channels: self.model_channels,
            channel_mult: self.channel_mult.clone(),
            num_res_blocks: single(&self.num_res_blocks, "num_res_blocks")?,
            attention_levels: UnetConfig::attention_levels_from_resolutions(
                &self.attention_resolutions,
                levels,
            )?,
            heads,
            transformer_depth: single(&self.transformer_depth, "transformer_depth")?,
            context_dim,
            use_linear_in_transformer: self.use_linear_in_transformer,
            num_groups,
            use_new_attention_order: self.use_new_attention_order,
            use_scale_shift_norm: self.use_scale_shift_norm,
            resblock_updown: self.resblock_updown,
            conv_resample: self.conv_resample,
            num_classes,
            disable_self_attentions: self.disable_self_attentions.clone(),
            disable_middle_self_attn: self.disable_middle_self_attn,
            num_attention_blocks: self.num_attention_blocks.clone(),
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(json: &str) -> OriginalUnetParams {
        serde_json::from_str(json).expect("params json")
    }

    // `unet_config.params` of the released yaml files (latent-diffusion @ a506df5, stablediffusion @ cf1d67a).
    #[test]
    fn released_configs_translate_to_the_presets() {
        let cases = [
            (
                r#"{"use_checkpoint": true, "num_classes": 1000, "image_size": 128, "in_channels": 7,
                "out_channels": 4, "model_channels": 256, "attention_resolutions": [2, 4, 8], "num_res_blocks": 2,
                "channel_mult": [1, 2, 2, 4], "disable_self_attentions": [true, true, true, false],
                "disable_middle_self_attn": false, "num_heads": 8, "use_spatial_transformer": true,
                "transformer_depth": 1, "context_dim": 1024, "legacy": false, "use_linear_in_transformer": true}"#,
                UnetConfig::sd_x4_upscaler(),
            ),
            (
                r#"{"image_size": 64, "in_channels": 3, "out_channels": 3, "model_channels": 224,
                "attention_resolutions": [8, 4, 2], "num_res_blocks": 2, "channel_mult": [1, 2, 3, 4],
                "num_head_channels": 32}"#,
                UnetConfig::ldm_vq4_uncond(),
            ),
            (
                r#"{"image_size": 64, "in_channels": 6, "out_channels": 3, "model_channels": 160,
                "attention_resolutions": [16, 8], "num_res_blocks": 2, "channel_mult": [1, 2, 2, 4],
                "num_head_channels": 32}"#,
                UnetConfig::ldm_bsr_sr(),
            ),
            (
                r#"{"image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 192,
                "attention_resolutions": [1, 2, 4, 8], "num_res_blocks": 2, "channel_mult": [1, 2, 2, 4, 4],
                "num_heads": 8, "use_scale_shift_norm": true, "resblock_updown": true}"#,
                UnetConfig::ldm_churches_kl8(),
            ),
            (
                r#"{"image_size": 64, "in_channels": 3, "out_channels": 3, "model_channels": 192,
                "attention_resolutions": [8, 4, 2], "num_res_blocks": 2, "channel_mult": [1, 2, 3, 5],
                "num_heads": 1, "use_spatial_transformer": true, "transformer_depth": 1, "context_dim": 512}"#,
                UnetConfig::ldm_cin256_v2(),
            ),
            (
                r#"{"use_checkpoint": true, "use_fp16": true, "image_size": 32, "in_channels": 4,
                "out_channels": 4, "model_channels": 320, "attention_resolutions": [4, 2, 1], "num_res_blocks": 2,
                "channel_mult": [1, 2, 4, 4], "num_head_channels": 64, "use_spatial_transformer": true,
                "use_linear_in_transformer": true, "transformer_depth": 1, "context_dim": 1024, "legacy": false}"#,
                UnetConfig::sd_v2(),
            ),
        ];
        for (json, want) in cases {
            assert_eq!(params(json).to_config(32), Ok(want));
        }
    }

    #[test]
    fn semantic_synthesis_has_attention_only_in_the_middle() {
        // models/ldm/semantic_synthesis256: attention_resolutions [32, 16, 8] with 3 levels (ds 1, 2, 4).
        let cfg = params(
            r#"{"image_size": 64, "in_channels": 6, "out_channels": 3, "model_channels": 128,
            "attention_resolutions": [32, 16, 8], "num_res_blocks": 2, "channel_mult": [1, 4, 8], "num_heads": 8}"#,
        )
        .to_config(32)
        .expect("config");
        assert!(cfg.attention_levels.is_empty());
        assert_eq!(cfg.context_dim, None);
    }

    #[test]
    fn unsupported_arguments_name_the_field() {
        let base = r#""in_channels": 4, "out_channels": 4, "model_channels": 32, "attention_resolutions": [1],
            "num_res_blocks": 1, "channel_mult": [1, 2]"#;
        let field = |extra: &str| match params(&format!("{{{base}, {extra}}}")).to_config(32) {
            Err(UnetConfigError::Invalid { field, .. }) => field,
            other => panic!("{extra}: {other:?}"),
        };
        assert_eq!(field(r#""num_heads": -1"#), "num_heads");
        assert_eq!(field(r#""num_heads": 2, "dims": 3"#), "dims");
        assert_eq!(
            field(r#""num_heads": 2, "num_heads_upsample": 4"#),
            "num_heads_upsample"
        );
        assert_eq!(field(r#""num_heads": 2, "context_dim": 16"#), "context_dim");
        assert_eq!(
            field(r#""num_heads": 2, "use_spatial_transformer": true"#),
            "context_dim"
        );
        assert_eq!(
            field(r#""num_heads": 2, "num_classes": "sequential", "adm_in_channels": 8"#),
            "num_classes"
        );
        assert_eq!(field(r#""num_heads": 2, "n_embed": 16"#), "n_embed");
        let per_level = params(
            r#"{"in_channels": 4, "out_channels": 4, "model_channels": 32, "attention_resolutions": [1],
            "num_res_blocks": [1, 2], "channel_mult": [1, 2], "num_heads": 2}"#,
        );
        assert!(matches!(
            per_level.to_config(32),
            Err(UnetConfigError::Invalid {
                field: "num_res_blocks",
                ..
            })
        ));
        // num_head_channels wins over num_heads, as in the original
        let cfg = params(&format!(
            r#"{{{base}, "num_heads": 2, "num_head_channels": 8}}"#
        ))
        .to_config(32)
        .expect("config");
        assert_eq!(cfg.heads, HeadSpec::Dim(8));
        let unknown: Result<OriginalUnetParams, _> =
            serde_json::from_str(&format!(r#"{{{base}, "num_heads": 2, "bogus": 1}}"#));
        assert!(unknown.is_err());
    }
}
