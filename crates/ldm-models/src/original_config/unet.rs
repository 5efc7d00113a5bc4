//! `unet_config` (`ldm.modules.diffusionmodules.openaimodel.UNetModel`): every constructor argument that changes
//! the network or its weights, under the original names and with the original defaults. Consistency rules the
//! original asserts in its constructor are checked here too; whether ldm-rs's UNet can run a given combination is
//! for the model code to decide.
use crate::unet::HeadSpec;

use super::yaml::{Params, Parsed};

/// `context_dim`: one width for every transformer, or one per level (SD 2 code accepts a list).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContextDim {
    One(usize),
    PerLevel(Vec<usize>),
}

/// `num_classes` of the UNet: a label embedding added to the timestep embedding (ADM conditioning).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NumClasses {
    /// `nn.Embedding(n, time_embed_dim)`: class labels, or the x4 upscaler's noise level (1000).
    Count(usize),
    /// `"continuous"`: `nn.Linear(1, time_embed_dim)`.
    Continuous,
    /// `"sequential"`: an MLP from `adm_in_channels` (stable unCLIP).
    Sequential,
}

#[derive(Debug, Clone, PartialEq)]
pub struct OriginalUnet {
    /// Training latent side (the original requires it; the network itself is fully convolutional).
    pub image_size: usize,
    pub in_channels: usize,
    pub out_channels: usize,
    pub model_channels: usize,
    /// ResBlocks per level on the way down (the original accepts one number or one per level; here always one
    /// per level).
    pub num_res_blocks: Vec<usize>,
    /// Downsampling factors (1, 2, 4, ...) at which the levels carry attention. The original silently ignores
    /// factors that match no level (e.g. 16 with four levels); so does this description.
    pub attention_resolutions: Vec<usize>,
    /// Default `[1, 2, 4, 8]`.
    pub channel_mult: Vec<usize>,
    /// `num_head_channels` if given ([`HeadSpec::Dim`]), else `num_heads` ([`HeadSpec::Count`]).
    pub heads: HeadSpec,
    /// Heads of the up path's `AttentionBlock`s when counted (`num_heads_upsample`; `None`: as `num_heads`).
    pub num_heads_upsample: Option<usize>,
    pub use_scale_shift_norm: bool,
    pub resblock_updown: bool,
    pub use_new_attention_order: bool,
    /// `SpatialTransformer` (cross-attention) instead of `AttentionBlock` (self-attention only).
    pub use_spatial_transformer: bool,
    pub transformer_depth: usize,
    pub context_dim: Option<ContextDim>,
    pub use_linear_in_transformer: bool,
    /// Default true. With `use_spatial_transformer` the original computes the head width as
    /// `ch / num_heads` whatever `legacy` is, so it only matters for `AttentionBlock`s.
    pub legacy: bool,
    pub num_classes: Option<NumClasses>,
    pub adm_in_channels: Option<usize>,
    /// One flag per level: its transformers' first attention is cross-attention too.
    pub disable_self_attentions: Option<Vec<bool>>,
    pub disable_middle_self_attn: bool,
    /// Per level: how many of its blocks carry attention.
    pub num_attention_blocks: Option<Vec<usize>>,
    /// Default true: resampling by convolution.
    pub conv_resample: bool,
    /// Default 2 (images).
    pub dims: usize,
    /// Codebook size when the UNet predicts first-stage codebook ids (`n_embed`).
    pub n_embed: Option<usize>,
}

impl OriginalUnet {
    /// The number of ResBlocks per level when every level has the same.
    pub fn uniform_res_blocks(&self) -> Option<usize> {
        let first = *self.num_res_blocks.first()?;
        self.num_res_blocks
            .iter()
            .all(|&n| n == first)
            .then_some(first)
    }

    /// Levels (indices into `channel_mult`) whose blocks carry attention, as the original decides it: level `l`
    /// works at downsampling factor 2^l and has attention if that factor is in `attention_resolutions`; factors
    /// that match no level are ignored (LDM-SR `bsr_sr` lists [16, 8] with four levels: only level 3;
    /// `semantic_synthesis256` lists [32, 16, 8] with three levels: none, only the middle block attends).
    pub fn attention_levels(&self) -> Vec<usize> {
        (0..self.channel_mult.len())
            .filter(|&l| {
                1usize
                    .checked_shl(l as u32)
                    .is_some_and(|ds| self.attention_resolutions.contains(&ds))
            })
            .collect()
    }

    /// The context width when one width serves every level.
    pub fn single_context_dim(&self) -> Option<usize> {
        match &self.context_dim {
            Some(ContextDim::One(d)) => Some(*d),
            Some(ContextDim::PerLevel(v)) => {
                let first = *v.first()?;
                v.iter().all(|&d| d == first).then_some(first)
            }
            None => None,
        }
    }
}

/// Keys with no effect on the weights or the maths of inference.
const HARMLESS: &[&str] = &["use_checkpoint", "use_fp16", "use_bf16", "dropout"];

pub(crate) fn parse(p: &Params<'_>, ignored: &mut Vec<String>) -> Parsed<OriginalUnet> {
    let channel_mult = p
        .opt_usize_list("channel_mult")?
        .unwrap_or_else(|| vec![1, 2, 4, 8]);
    if channel_mult.is_empty() || channel_mult.contains(&0) {
        return Err(p.invalid(
            "channel_mult",
            format!("{channel_mult:?}"),
            "must be non-empty and positive",
        ));
    }
    let levels = channel_mult.len();
    let num_res_blocks = match p.get("num_res_blocks") {
        None => return Err(p.missing("num_res_blocks")),
        Some(yaml_rust2::Yaml::Array(_)) => {
            let v = p.req_usize_list("num_res_blocks")?;
            if v.len() != levels {
                return Err(p.invalid(
                    "num_res_blocks",
                    format!("{v:?}"),
                    format!("has {} entries for {levels} levels (channel_mult)", v.len()),
                ));
            }
            v
        }
        Some(_) => vec![p.req_usize("num_res_blocks")?; levels],
    };
    let num_heads = p.opt_usize_or_minus_one("num_heads")?;
    let num_head_channels = p.opt_usize_or_minus_one("num_head_channels")?;
    let heads = match (num_head_channels, num_heads) {
        (Some(d), _) => HeadSpec::Dim(d),
        (None, Some(n)) => HeadSpec::Count(n),
        (None, None) => return Err(p.missing("num_heads` or `num_head_channels")),
    };
    let context_dim = match p.get("context_dim") {
        None => None,
        Some(yaml_rust2::Yaml::Array(_)) => {
            Some(ContextDim::PerLevel(p.req_usize_list("context_dim")?))
        }
        Some(_) => Some(ContextDim::One(p.req_usize("context_dim")?)),
    };
    let use_spatial_transformer = p.bool_or("use_spatial_transformer", false)?;
    if use_spatial_transformer && context_dim.is_none() {
        return Err(p.missing("context_dim"));
    }
    if !use_spatial_transformer && context_dim.is_some() {
        return Err(p.invalid(
            "context_dim",
            "given",
            "cross-attention needs `use_spatial_transformer: true`",
        ));
    }
    let num_classes = match p.get("num_classes") {
        None => None,
        Some(yaml_rust2::Yaml::String(s)) => match s.as_str() {
            "continuous" => Some(NumClasses::Continuous),
            "sequential" => Some(NumClasses::Sequential),
            other => {
                return Err(p.invalid(
                    "num_classes",
                    other,
                    "expected an integer, `continuous` or `sequential`",
                ))
            }
        },
        Some(_) => Some(NumClasses::Count(p.req_usize("num_classes")?)),
    };
    let adm_in_channels = p.opt_usize("adm_in_channels")?;
    if num_classes == Some(NumClasses::Sequential) && adm_in_channels.is_none() {
        return Err(p.missing("adm_in_channels"));
    }
    let disable_self_attentions = p.opt_bool_list("disable_self_attentions")?;
    if let Some(v) = &disable_self_attentions {
        if v.len() != levels {
            return Err(p.invalid(
                "disable_self_attentions",
                format!("{v:?}"),
                format!("has {} entries for {levels} levels", v.len()),
            ));
        }
    }
    let num_attention_blocks = p.opt_usize_list("num_attention_blocks")?;
    if let Some(v) = &num_attention_blocks {
        if v.len() != levels || v.iter().zip(&num_res_blocks).any(|(a, r)| a > r) {
            return Err(p.invalid(
                "num_attention_blocks",
                format!("{v:?}"),
                format!(
                    "needs one entry per level, each at most num_res_blocks {num_res_blocks:?}"
                ),
            ));
        }
    }
    let cfg = OriginalUnet {
        image_size: p.req_usize("image_size")?,
        in_channels: p.req_usize("in_channels")?,
        out_channels: p.req_usize("out_channels")?,
        model_channels: p.req_usize("model_channels")?,
        num_res_blocks,
        attention_resolutions: p.req_usize_list("attention_resolutions")?,
        channel_mult,
        heads,
        num_heads_upsample: p.opt_usize_or_minus_one("num_heads_upsample")?,
        use_scale_shift_norm: p.bool_or("use_scale_shift_norm", false)?,
        resblock_updown: p.bool_or("resblock_updown", false)?,
        use_new_attention_order: p.bool_or("use_new_attention_order", false)?,
        use_spatial_transformer,
        transformer_depth: p.usize_or("transformer_depth", 1)?,
        context_dim,
        use_linear_in_transformer: p.bool_or("use_linear_in_transformer", false)?,
        legacy: p.bool_or("legacy", true)?,
        num_classes,
        adm_in_channels,
        disable_self_attentions,
        disable_middle_self_attn: p.bool_or("disable_middle_self_attn", false)?,
        num_attention_blocks,
        conv_resample: p.bool_or("conv_resample", true)?,
        dims: p.usize_or("dims", 2)?,
        n_embed: p.opt_usize("n_embed")?,
    };
    p.finish(HARMLESS, ignored);
    Ok(cfg)
}
