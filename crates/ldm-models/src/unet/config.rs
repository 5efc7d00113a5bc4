//! Typed configuration of the LDM UNet (`openaimodel.UNetModel` of CompVis/latent-diffusion @ a506df5 and
//! Stability-AI/stablediffusion @ cf1d67a), with presets.
//!
//! | field                       | original `UNetModel` argument                                   |
//! |-----------------------------|-----------------------------------------------------------------|
//! | `in_channels`, `out_channels`, `model_channels`, `channel_mult`, `num_res_blocks`, `transformer_depth`, `use_linear_in_transformer`, `use_scale_shift_norm`, `resblock_updown`, `conv_resample`, `use_new_attention_order`, `num_classes` (an int), `disable_self_attentions`, `disable_middle_self_attn`, `num_attention_blocks` | same name |
//! | `context_dim`               | `context_dim`; `Some` ⇔ `use_spatial_transformer=True` (the original asserts both ways): attention layers are `SpatialTransformer`s, else legacy `AttentionBlock`s |
//! | `attention_levels`          | `attention_resolutions` (downsampling factors 2^level), see [`UnetConfig::attention_levels_from_resolutions`] |
//! | `heads`                     | `num_heads` ([`HeadSpec::Count`]) or `num_head_channels` ([`HeadSpec::Dim`]) |
//! | `num_groups`                | the 32 of `normalization()` / `Normalize()`                     |
//!
//! Not represented: `dims` (only 2-D models exist; a translator must refuse other values), `legacy` (it only
//! changes the head split when the heads do not divide the channels, which [`UnetConfig::validate`] refuses),
//! `num_heads_upsample` (deprecated, used by no released config), `n_embed` (codebook-id prediction, unused),
//! `num_classes: "continuous" | "sequential"` with `adm_in_channels` (unCLIP), `dropout`, `use_checkpoint`,
//! `use_fp16`, `image_size`.
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
fn one() -> usize {
    1
}
fn yes() -> bool {
    true
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
    /// Levels (indices into `channel_mult`) whose blocks carry an attention layer. The middle block
    /// always has one.
    pub attention_levels: Vec<usize>,
    pub heads: HeadSpec,
    /// Transformer blocks per SpatialTransformer (unused without `context_dim`).
    #[serde(default = "one")]
    pub transformer_depth: usize,
    /// Width of the cross-attention context. `Some`: attention layers are SpatialTransformers
    /// (`use_spatial_transformer`); `None`: legacy self-attention `AttentionBlock`s and no context input
    /// (unconditional, concat-conditioned and class-label models).
    #[serde(default)]
    pub context_dim: Option<usize>,
    /// `proj_in`/`proj_out` are Linear layers (SD2) instead of 1×1 convolutions (SD1).
    #[serde(default)]
    pub use_linear_in_transformer: bool,
    #[serde(default = "default_num_groups")]
    pub num_groups: usize,
    /// Legacy `AttentionBlock`s split the fused qkv into q, k, v before the heads (`QKVAttention`) instead
    /// of heads first (`QKVAttentionLegacy`, the default).
    #[serde(default)]
    pub use_new_attention_order: bool,
    /// ResBlocks apply the time embedding as FiLM, `GN(h)·(1 + scale) + shift`, instead of adding it.
    #[serde(default)]
    pub use_scale_shift_norm: bool,
    /// Resolution changes are ResBlocks with `down`/`up` (else `Downsample`/`Upsample`).
    #[serde(default)]
    pub resblock_updown: bool,
    /// `Downsample`/`Upsample` carry a 3×3 conv (else average pooling / plain nearest upsampling).
    #[serde(default = "yes")]
    pub conv_resample: bool,
    /// Class-conditional: `label_emb = nn.Embedding(num_classes, 4·model_channels)` is added to the time
    /// embedding (class-conditional LDMs; the SD x4 upscaler's noise level).
    #[serde(default)]
    pub num_classes: Option<usize>,
    /// Per level: the transformers' `attn1` attends the context instead of `x` (SD x4 upscaler).
    #[serde(default)]
    pub disable_self_attentions: Option<Vec<bool>>,
    /// The same for the middle block's transformer.
    #[serde(default)]
    pub disable_middle_self_attn: bool,
    /// Per level: only the first `n` res blocks of each path get an attention layer (at attention levels).
    #[serde(default)]
    pub num_attention_blocks: Option<Vec<usize>>,
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
            context_dim: Some(768),
            use_linear_in_transformer: false,
            num_groups: 32,
            use_new_attention_order: false,
            use_scale_shift_norm: false,
            resblock_updown: false,
            conv_resample: true,
            num_classes: None,
            disable_self_attentions: None,
            disable_middle_self_attn: false,
            num_attention_blocks: None,
        }
    }

    /// SD2.x (v2-inference(-v).yaml): as SD1 but heads of width 64, OpenCLIP ViT-H context 1024,
    /// linear projections.
    pub fn sd_v2() -> Self {
        Self {
            heads: HeadSpec::Dim(64),
            context_dim: Some(1024),
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

    /// SD 2 x4 upscaler (x4-upscaling.yaml): 7 inputs (latent 4 + low-res image 3), 256 channels, mult
    /// [1,2,2,4], attention at ds 2,4,8 with `attn1` attending the context at levels 1 and 2 (not at 3 nor
    /// in the middle), 8 heads, linear projections, the noise level as a class label of 1000.
    pub fn sd_x4_upscaler() -> Self {
        Self {
            in_channels: 7,
            model_channels: 256,
            channel_mult: vec![1, 2, 2, 4],
            attention_levels: vec![1, 2, 3],
            heads: HeadSpec::Count(8),
            num_classes: Some(1000),
            disable_self_attentions: Some(vec![true, true, true, false]),
            ..Self::sd_v2()
        }
    }

    /// An unconditional (or concat-conditioned) LDM UNet with legacy self-attention only, the layout of
    /// latent-diffusion's celebahq/ffhq/lsun_beds `*-ldm-vq-4` models: 224 channels, mult [1,2,3,4],
    /// 2 res blocks, attention at ds 8,4,2 with heads of 32 channels, 3 in/out channels.
    pub fn ldm_vq4_uncond() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            model_channels: 224,
            channel_mult: vec![1, 2, 3, 4],
            attention_levels: vec![1, 2, 3],
            heads: HeadSpec::Dim(32),
            context_dim: None,
            ..Self::sd_v1()
        }
    }

    /// latent-diffusion `bsr_sr` (4x super-resolution, low-res image concatenated): 6 in, 3 out, 160
    /// channels, mult [1,2,2,4], attention at ds 8 only (the listed 16 is never reached), heads of 32.
    pub fn ldm_bsr_sr() -> Self {
        Self {
            in_channels: 6,
            model_channels: 160,
            channel_mult: vec![1, 2, 2, 4],
            attention_levels: vec![3],
            ..Self::ldm_vq4_uncond()
        }
    }

    /// latent-diffusion `lsun_churches-ldm-kl-8`: 192 channels, mult [1,2,2,4,4], attention at every
    /// level, 8 heads, scale-shift norm and ResBlock up/down sampling.
    pub fn ldm_churches_kl8() -> Self {
        Self {
            in_channels: 4,
            out_channels: 4,
            model_channels: 192,
            channel_mult: vec![1, 2, 2, 4, 4],
            attention_levels: vec![0, 1, 2, 3],
            heads: HeadSpec::Count(8),
            use_scale_shift_norm: true,
            resblock_updown: true,
            ..Self::ldm_vq4_uncond()
        }
    }

    /// latent-diffusion `cin256-v2` (class-conditional ImageNet): 192 channels, mult [1,2,3,5],
    /// transformers at ds 8,4,2 with one head, context = the 512-wide class embedding (one token).
    pub fn ldm_cin256_v2() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            model_channels: 192,
            channel_mult: vec![1, 2, 3, 5],
            attention_levels: vec![1, 2, 3],
            heads: HeadSpec::Count(1),
            context_dim: Some(512),
            ..Self::sd_v1()
        }
    }

    /// Converts the original `attention_resolutions` (downsampling factors ds = 2^level) to levels.
    /// As in the original, powers of two beyond the last level never match and are dropped (the released
    /// `bsr_sr` and `semantic_synthesis` configs list such factors); a factor that is not a power of two
    /// can never match anything and is refused.
    pub fn attention_levels_from_resolutions(
        resolutions: &[usize],
        num_levels: usize,
    ) -> Result<Vec<usize>, UnetConfigError> {
        let mut levels = Vec::new();
        for &ds in resolutions {
            if !ds.is_power_of_two() {
                return Err(UnetConfigError::AttentionResolution {
                    ds,
                    levels: num_levels,
                });
            }
            let level = ds.trailing_zeros() as usize;
            if level < num_levels {
                levels.push(level);
            }
        }
        levels.sort_unstable();
        levels.dedup();
        Ok(levels)
    }

    /// The original `attention_resolutions` (downsampling factors, ascending).
    pub fn attention_resolutions(&self) -> Vec<usize> {
        self.attention_levels.iter().map(|&l| 1usize << l).collect()
    }

    /// `use_spatial_transformer` of the original: attention layers are SpatialTransformers.
    pub fn use_spatial_transformer(&self) -> bool {
        self.context_dim.is_some()
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

    /// Whether res block `index` (0-based, of `num_res_blocks` down or `num_res_blocks + 1` up) of `level`
    /// carries an attention layer.
    pub fn has_attention(&self, level: usize, index: usize) -> bool {
        self.attention_levels.contains(&level)
            && self
                .num_attention_blocks
                .as_ref()
                .is_none_or(|n| n.get(level).is_some_and(|&n| index < n))
    }

    /// Whether the transformers of `level` (or of the middle block, `None`) let `attn1` attend the context.
    pub fn self_attention_disabled(&self, level: Option<usize>) -> bool {
        match level {
            None => self.disable_middle_self_attn,
            Some(l) => self
                .disable_self_attentions
                .as_ref()
                .is_some_and(|d| d.get(l).copied().unwrap_or(false)),
        }
    }

    pub fn validate(&self) -> Result<(), UnetConfigError> {
        let invalid = |field, reason: String| Err(UnetConfigError::Invalid { field, reason });
        for (field, v) in [
            ("in_channels", self.in_channels),
            ("out_channels", self.out_channels),
            ("model_channels", self.model_channels),
            ("num_res_blocks", self.num_res_blocks),
            ("num_groups", self.num_groups),
        ] {
            if v == 0 {
                return invalid(field, "must be positive".into());
            }
        }
        if self.context_dim == Some(0) {
            return invalid("context_dim", "must be positive when given".into());
        }
        if self.num_classes == Some(0) {
            return invalid("num_classes", "must be positive when given".into());
        }
        let levels = self.channel_mult.len();
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
        if let Some(l) = self.attention_levels.iter().find(|&&l| l >= levels) {
            let reason = format!("level {l} does not exist ({levels} levels)");
            return invalid("attention_levels", reason);
        }
        if self.use_spatial_transformer() && self.transformer_depth == 0 {
            return invalid(
                "transformer_depth",
                "must be positive (the middle block always has a transformer)".into(),
            );
        }
        if let Some(d) = &self.disable_self_attentions {
            if d.len() != levels {
                let reason = format!("{d:?} must have one entry per level ({levels})");
                return invalid("disable_self_attentions", reason);
            }
            if !self.use_spatial_transformer() && d.iter().any(|&b| b) {
                return invalid(
                    "disable_self_attentions",
                    "needs SpatialTransformers (a context_dim)".into(),
                );
            }
        }
        if self.disable_middle_self_attn && !self.use_spatial_transformer() {
            return invalid(
                "disable_middle_self_attn",
                "needs SpatialTransformers (a context_dim)".into(),
            );
        }
        if let Some(n) = &self.num_attention_blocks {
            if n.len() != levels || n.iter().any(|&n| n > self.num_res_blocks) {
                let reason = format!(
                    "{n:?} must have one entry per level ({levels}), each at most num_res_blocks {}",
                    self.num_res_blocks
                );
                return invalid("num_attention_blocks", reason);
            }
        }
        for &l in &self.attention_levels {
            self.heads
                .split(self.model_channels * self.channel_mult[l])?;
        }
        self.heads
            .split(self.model_channels * self.channel_mult[levels - 1])?;
        Ok(())
    }
}

impl TryFrom<&crate::import::UnetArch> for UnetConfig {
    type Error = UnetConfigError;

    /// A diffusers `UNet2DConditionModel` architecture as a `UnetConfig`; fails where ldm-rs takes one value for
    /// all levels (`layers_per_block`, `transformer_layers_per_block`).
    fn try_from(a: &crate::import::UnetArch) -> Result<Self, Self::Error> {
        use crate::import::Heads;
        let uniform = |v: &[usize], field: &'static str| match v.first() {
            Some(&x) if v.iter().all(|&y| y == x) => Ok(x),
            _ => Err(UnetConfigError::Invalid {
                field,
                reason: format!("per-level values {v:?} (ldm-rs takes one value for all levels)"),
            }),
        };
        let cfg = Self {
            in_channels: a.in_channels,
            out_channels: a.out_channels,
            model_channels: a.model_channels,
            channel_mult: a.channel_mult.clone(),
            num_res_blocks: uniform(&a.res_blocks, "num_res_blocks")?,
            attention_levels: a.attention_levels.clone(),
            heads: match a.heads {
                Heads::Count(n) => HeadSpec::Count(n),
                Heads::Dim(d) => HeadSpec::Dim(d),
            },
            transformer_depth: uniform(&a.transformer_depth, "transformer_depth")?,
            context_dim: Some(a.context_dim),
            use_linear_in_transformer: a.linear_projection,
            num_groups: a.norm_groups,
            use_new_attention_order: false,
            use_scale_shift_norm: false,
            resblock_updown: false,
            conv_resample: true,
            num_classes: a.num_classes,
            disable_self_attentions: a
                .disable_self_attentions
                .iter()
                .any(|&b| b)
                .then(|| a.disable_self_attentions.clone()),
            disable_middle_self_attn: a.disable_middle_self_attn,
            num_attention_blocks: None,
        };
        cfg.validate()?;
        Ok(cfg)
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
        for cfg in [
            UnetConfig::sd_x4_upscaler(),
            UnetConfig::ldm_vq4_uncond(),
            UnetConfig::ldm_bsr_sr(),
            UnetConfig::ldm_churches_kl8(),
            UnetConfig::ldm_cin256_v2(),
        ] {
            assert_eq!(cfg.validate(), Ok(()), "{cfg:?}");
        }
        assert_eq!(
            UnetConfig::sd_x4_upscaler().attention_resolutions(),
            vec![2, 4, 8]
        );
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
        // bsr_sr lists [16, 8] for 4 levels: 16 is never reached, as in the original.
        let bsr = UnetConfig::attention_levels_from_resolutions(&[16, 8], 4);
        assert_eq!(bsr, Ok(vec![3]));
    }

    #[test]
    fn json_round_trip_and_default_groups() {
        let json = r#"{"in_channels":4,"out_channels":4,"model_channels":32,"channel_mult":[1,2],
            "num_res_blocks":1,"attention_levels":[0],"heads":{"dim":8},"transformer_depth":1,
            "context_dim":16,"use_linear_in_transformer":true}"#;
        let cfg: UnetConfig = serde_json::from_str(json).expect("valid json");
        assert_eq!(cfg.num_groups, 32);
        assert_eq!(cfg.heads, HeadSpec::Dim(8));
        assert_eq!(cfg.context_dim, Some(16));
        // options absent from older configs take the original defaults
        assert!(cfg.conv_resample && !cfg.use_scale_shift_norm && !cfg.resblock_updown);
        assert_eq!(
            (cfg.num_classes, cfg.disable_self_attentions.clone()),
            (None, None)
        );
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
