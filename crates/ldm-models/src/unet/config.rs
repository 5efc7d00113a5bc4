//! Typed configuration of the LDM UNet (`openaimodel.UNetModel` as SD1.x/SD2.x use it), with presets.
//!
//! | field                       | original `UNetModel` argument                                   |
//! |-----------------------------|-----------------------------------------------------------------|
//! | `in_channels`, `out_channels`, `model_channels`, `channel_mult`, `num_res_blocks`, `transformer_depth`, `context_dim`, `use_linear_in_transformer` | same name |
//! | `attention_levels`          | `attention_resolutions` (downsampling factors 2^level), see [`UnetConfig::attention_levels_from_resolutions`] |
//! | `heads`                     | `num_heads` ([`HeadSpec::Count`]) or `num_head_channels` ([`HeadSpec::Dim`]) |
//! | `num_groups`                | the 32 of `normalization()` / `Normalize()`                     |
//!
//! Options the SD models leave at their defaults (`use_scale_shift_norm`, `resblock_updown`,
//! `num_classes`, `disable_self_attentions`, `num_attention_blocks`) are not represented.
use serde::{Deserialize, Serialize};

/// How the attention heads of a transformer with `ch` channels are sized.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HeadSpec {
    /// A fixed number of heads (`num_heads`, SD1): head_dim = ch / n.
    Count(usize),
    /// A fixed head width (`num_head_channels`, SD2): num_heads = ch / d.
    Dim(usize),
}

impl HeadSpec {
    /// `(num_heads, head_dim)` for a transformer on `channels` channels.
    pub fn split(self, channels: usize) -> Result<(usize, usize), UnetConfigError> {
        let (n, what) = match self {
            HeadSpec::Count(n) => (n, "num_heads"),
            HeadSpec::Dim(d) => (d, "head_dim"),
        };
        if n == 0 || !channels.is_multiple_of(n) {
            return Err(UnetConfigError::Heads {
                spec: self,
                channels,
                reason: format!("{what} {n} does not divide {channels}"),
            });
        }
        Ok(match self {
            HeadSpec::Count(n) => (n, channels / n),
            HeadSpec::Dim(d) => (channels / d, d),
        })
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum UnetConfigError {
    #[error("UNet config: `{field}` {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("UNet config: heads {spec:?} on {channels} channels: {reason}")]
    Heads {
        spec: HeadSpec,
        channels: usize,
        reason: String,
    },
    #[error("UNet config: attention resolution {ds} is not a downsampling factor 2^level of the {levels} levels")]
    AttentionResolution { ds: usize, levels: usize },
}

fn default_num_groups() -> usize {
    32
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub model_channels: usize,
    /// Channel multiplier of each level; level `l` works at 1/2^l of the input resolution.
    pub channel_mult: Vec<usize>,
    /// ResBlocks per level on the way down (the way up has one more).
    pub num_res_blocks: usize,
    /// Levels (indices into `channel_mult`) whose blocks carry a SpatialTransformer. The middle block
    /// always has one.
    pub attention_levels: Vec<usize>,
    pub heads: HeadSpec,
    pub transformer_depth: usize,
    pub context_dim: usize,
    /// `proj_in`/`proj_out` are Linear layers (SD2) instead of 1×1 convolutions (SD1).
    pub use_linear_in_transformer: bool,
    #[serde(default = "default_num_groups")]
    pub num_groups: usize,
}

impl UnetConfig {
    /// SD1.x (v1-inference.yaml): 320 channels, mult [1,2,4,4], 2 res blocks, attention at ds 4,2,1,
    /// 8 heads, CLIP ViT-L context 768, conv projections.
    pub fn sd_v1() -> Self {
        Self {
            in_channels: 4,
            out_channels: 4,
            model_channels: 320,
            channel_mult: vec![1, 2, 4, 4],
            num_res_blocks: 2,
            attention_levels: vec![0, 1, 2],
            heads: HeadSpec::Count(8),
            transformer_depth: 1,
            context_dim: 768,
            use_linear_in_transformer: false,
            num_groups: 32,
        }
    }

    /// SD2.x (v2-inference(-v).yaml): as SD1 but heads of width 64, OpenCLIP ViT-H context 1024,
    /// linear projections.
    pub fn sd_v2() -> Self {
        Self {
            heads: HeadSpec::Dim(64),
            context_dim: 1024,
            use_linear_in_transformer: true,
            ..Self::sd_v1()
        }
    }

    /// The inpainting variant of a config: 9 input channels (latent 4 + mask 1 + masked-image latent 4).
    pub fn inpainting(self) -> Self {
        Self {
            in_channels: 9,
            ..self
        }
    }

    /// Converts the original `attention_resolutions` (downsampling factors ds = 2^level) to levels.
    /// Unlike the original, a factor that matches no level is an error rather than silently ignored.
    pub fn attention_levels_from_resolutions(
        resolutions: &[usize],
        num_levels: usize,
    ) -> Result<Vec<usize>, UnetConfigError> {
        let mut levels = resolutions
            .iter()
            .map(|&ds| {
                (0..num_levels).find(|&l| 1usize << l == ds).ok_or(
                    UnetConfigError::AttentionResolution {
                        ds,
                        levels: num_levels,
                    },
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        levels.sort_unstable();
        levels.dedup();
        Ok(levels)
    }

    /// The original `attention_resolutions` (downsampling factors, ascending).
    pub fn attention_resolutions(&self) -> Vec<usize> {
        self.attention_levels.iter().map(|&l| 1usize << l).collect()
    }

    /// Width of the timestep embedding (`time_embed_dim = 4 · model_channels`).
    pub fn time_embed_dim(&self) -> usize {
        4 * self.model_channels
    }

    /// Height and width of the input must be multiples of this (the down path halves them
    /// `len(channel_mult) − 1` times and the up path must meet the same sizes again).
    pub fn size_multiple(&self) -> usize {
        1 << self.channel_mult.len().saturating_sub(1)
    }

    pub fn validate(&self) -> Result<(), UnetConfigError> {
        let invalid = |field, reason: String| Err(UnetConfigError::Invalid { field, reason });
        for (field, v) in [
            ("in_channels", self.in_channels),
            ("out_channels", self.out_channels),
            ("model_channels", self.model_channels),
            ("num_res_blocks", self.num_res_blocks),
            ("context_dim", self.context_dim),
            ("num_groups", self.num_groups),
        ] {
            if v == 0 {
                return invalid(field, "must be positive".into());
            }
        }
        if self.channel_mult.is_empty() || self.channel_mult.contains(&0) {
            return invalid(
                "channel_mult",
                format!("{:?} must be non-empty and positive", self.channel_mult),
            );
        }
        if !self.model_channels.is_multiple_of(self.num_groups) {
            let reason = format!(
                "{} is not divisible by num_groups {}",
                self.model_channels, self.num_groups
            );
            return invalid("model_channels", reason);
        }
        if let Some(l) = self
            .attention_levels
            .iter()
            .find(|&&l| l >= self.channel_mult.len())
        {
            let reason = format!(
                "level {l} does not exist ({} levels)",
                self.channel_mult.len()
            );
            return invalid("attention_levels", reason);
        }
        if self.transformer_depth == 0 {
            return invalid(
                "transformer_depth",
                "must be positive (the middle block always has a transformer)".into(),
            );
        }
        for &l in &self.attention_levels {
            self.heads
                .split(self.model_channels * self.channel_mult[l])?;
        }
        self.heads
            .split(self.model_channels * self.channel_mult[self.channel_mult.len() - 1])?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_are_valid_and_match_the_original_yaml() {
        for cfg in [
            UnetConfig::sd_v1(),
            UnetConfig::sd_v2(),
            UnetConfig::sd_v1().inpainting(),
        ] {
            assert_eq!(cfg.validate(), Ok(()));
            assert_eq!(cfg.attention_resolutions(), vec![1, 2, 4]);
        }
        assert_eq!(UnetConfig::sd_v1().heads.split(1280), Ok((8, 160)));
        assert_eq!(UnetConfig::sd_v2().heads.split(1280), Ok((20, 64)));
    }

    #[test]
    fn resolutions_convert_to_levels_and_back() {
        let levels = UnetConfig::attention_levels_from_resolutions(&[4, 2, 1], 4);
        assert_eq!(levels, Ok(vec![0, 1, 2]));
        let bad = UnetConfig::attention_levels_from_resolutions(&[3], 4);
        assert_eq!(
            bad,
            Err(UnetConfigError::AttentionResolution { ds: 3, levels: 4 })
        );
        let too_deep = UnetConfig::attention_levels_from_resolutions(&[16], 4);
        assert!(too_deep.is_err());
    }

    #[test]
    fn json_round_trip_and_default_groups() {
        let json = r#"{"in_channels":4,"out_channels":4,"model_channels":32,"channel_mult":[1,2],
            "num_res_blocks":1,"attention_levels":[0],"heads":{"dim":8},"transformer_depth":1,
            "context_dim":16,"use_linear_in_transformer":true}"#;
        let cfg: UnetConfig = serde_json::from_str(json).expect("valid json");
        assert_eq!(cfg.num_groups, 32);
        assert_eq!(cfg.heads, HeadSpec::Dim(8));
        let back: UnetConfig =
            serde_json::from_str(&serde_json::to_string(&cfg).expect("serialises"))
                .expect("parses");
        assert_eq!(back, cfg);
    }

    #[test]
    fn invalid_configs_name_the_field() {
        let cfg = UnetConfig {
            heads: HeadSpec::Count(7),
            ..UnetConfig::sd_v1()
        };
        assert!(matches!(
            cfg.validate(),
            Err(UnetConfigError::Heads { channels: 320, .. })
        ));
        let cfg = UnetConfig {
            attention_levels: vec![4],
            ..UnetConfig::sd_v1()
        };
        assert!(matches!(
            cfg.validate(),
            Err(UnetConfigError::Invalid {
                field: "attention_levels",
                ..
            })
        ));
        let cfg = UnetConfig {
            model_channels: 48,
            ..UnetConfig::sd_v1()
        };
        assert!(matches!(
            cfg.validate(),
            Err(UnetConfigError::Invalid {
                field: "model_channels",
                ..
            })
        ));
    }
}
