//! diffusers `UNet2DConditionModel` (`unet/config.json` + `unet/diffusion_pytorch_model.safetensors`) onto the
//! original LDM `UNetModel` (`openaimodel.py`): config translation and key map.
//!
//! Naming trap: diffusers' `attention_head_dim` is the number of heads, not their width. `UNet2DConditionModel`
//! sets `num_attention_heads = num_attention_heads or attention_head_dim` and builds
//! `Transformer2DModel(num_attention_heads, out_channels // num_attention_heads, ..)`
//! (diffusers 0.42.1 `unet_2d_condition.py` l.254, `unet_2d_blocks.py` l.811). SD1 writes the count (8), SD2
//! writes one count per level (`[5, 10, 20, 20]` = channels / 64, from `num_head_channels: 64` in
//! `single_file_utils.create_unet_diffusers_config_from_ldm`). [`UnetArch::heads`] says which it is.
//!
//! Index arithmetic (level `i` with `R_i` res blocks, `n` levels, no placeholders):
//! `input_blocks.0` is `conv_in`; level `i` owns input blocks `1 + Σ_{l<i}(R_l + 1) ..`, one per res block
//! (`.0` resnet, `.1` transformer) and then, unless last, one for the downsampler (`.0.op`). Output blocks run
//! over levels in reverse with `R + 1` res blocks each; the upsampler sits in the level's last output block at
//! `.1` (no attention) or `.2` (after the transformer). The middle block is resnet, transformer, resnet.
use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use super::error::{ImportError, Result};
use super::json::{check_rest, read_config, Accepted, Fixed, OneOrMany, BOOKKEEPING};
use super::key_map::KeyMap;

const WHAT: &str = "UNet2DConditionModel";

/// Prefix of the UNet's canonical keys in an original single file.
pub const UNET_PREFIX: &str = "model.diffusion_model.";

/// The entries of a diffusers `unet/config.json` that shape the weights. Everything else is checked against
/// the values the original architecture hard-wires (see [`DiffusersUnetConfig::arch`]).
#[derive(Debug, Clone, Deserialize)]
pub struct DiffusersUnetConfig {
    #[serde(default = "four")]
    pub in_channels: usize,
    #[serde(default = "four")]
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    #[serde(default = "default_mid_block")]
    pub mid_block_type: Option<String>,
    #[serde(default = "two")]
    pub layers_per_block: OneOrMany<usize>,
    /// Head COUNT per level (diffusers' misnomer, see the module docs).
    #[serde(default = "eight")]
    pub attention_head_dim: OneOrMany<usize>,
    #[serde(default)]
    pub num_attention_heads: Option<OneOrMany<usize>>,
    #[serde(default = "default_context")]
    pub cross_attention_dim: OneOrMany<usize>,
    #[serde(default = "one")]
    pub transformer_layers_per_block: OneOrMany<usize>,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default = "default_groups")]
    pub norm_num_groups: Option<usize>,
    #[serde(default)]
    pub num_class_embeds: Option<usize>,
    #[serde(default)]
    pub upcast_attention: bool,
    #[serde(default = "no")]
    pub only_cross_attention: OneOrMany<bool>,
    /// `null`: the value of `only_cross_attention` when that is a single bool, else false (diffusers' rule).
    #[serde(default)]
    pub mid_block_only_cross_attention: Option<bool>,
    #[serde(default)]
    pub time_embedding_dim: Option<usize>,
    /// All other entries, checked by [`DiffusersUnetConfig::arch`].
    #[serde(flatten)]
    pub rest: BTreeMap<String, Value>,
}

fn four() -> usize {
    4
}
fn two() -> OneOrMany<usize> {
    OneOrMany::One(2)
}
fn eight() -> OneOrMany<usize> {
    OneOrMany::One(8)
}
fn one() -> OneOrMany<usize> {
    OneOrMany::One(1)
}
fn no() -> OneOrMany<bool> {
    OneOrMany::One(false)
}
fn default_context() -> OneOrMany<usize> {
    OneOrMany::One(1280)
}
fn default_groups() -> Option<usize> {
    Some(32)
}
fn default_mid_block() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".to_string())
}

/// How a level's attention is split into heads, as the original config states it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Heads {
    /// `num_heads`: the same number of heads at every level (SD1: 8).
    Count(usize),
    /// `num_head_channels`: heads of this width, so the count grows with the channels (SD2: 64).
    Dim(usize),
}

impl Heads {
    /// Number of heads for an attention layer with `channels` channels.
    pub fn count(self, channels: usize) -> usize {
        match self {
            Heads::Count(n) => n,
            Heads::Dim(d) => channels / d.max(1),
        }
    }
}

/// The architecture a diffusers UNet config describes, in the original LDM's terms (`UNetModel` arguments).
/// The maintainer turns this into `UnetConfig` (see `import/mod.rs`).
#[derive(Debug, Clone, PartialEq)]
pub struct UnetArch {
    pub in_channels: usize,
    pub out_channels: usize,
    /// `model_channels`: the width of `conv_in` and of level 0.
    pub model_channels: usize,
    /// Level widths are `model_channels * channel_mult[i]`.
    pub channel_mult: Vec<usize>,
    /// `num_res_blocks` per level (down path; the up path has one more per level).
    pub res_blocks: Vec<usize>,
    /// Levels (indices into `channel_mult`) whose res blocks are followed by a transformer.
    pub attention_levels: Vec<usize>,
    pub heads: Heads,
    /// `transformer_depth` per level; the middle block uses the last entry.
    pub transformer_depth: Vec<usize>,
    pub context_dim: usize,
    /// `use_linear_in_transformer`: proj_in / proj_out are linear `[C, C]` (else 1x1 convs `[C, C, 1, 1]`).
    pub linear_projection: bool,
    pub norm_groups: usize,
    /// `num_classes` of an `nn.Embedding` class label input (`label_emb`), e.g. the x4 upscaler's noise level.
    pub num_classes: Option<usize>,
    /// `disable_self_attentions` per level (diffusers `only_cross_attention`): `attn1` attends the context.
    pub disable_self_attentions: Vec<bool>,
    /// `disable_middle_self_attn` (diffusers `mid_block_only_cross_attention`).
    pub disable_middle_self_attn: bool,
    /// diffusers computes attention scores in f32 (SD2.1's config sets it); a numerics hint, no weights.
    pub upcast_attention: bool,
    /// Config entries that were neither used nor known to be harmless: log them.
    pub ignored: Vec<String>,
}

impl UnetArch {
    pub fn levels(&self) -> usize {
        self.channel_mult.len()
    }
    pub fn channels(&self, level: usize) -> usize {
        self.model_channels * self.channel_mult[level]
    }
    pub fn time_embed_dim(&self) -> usize {
        4 * self.model_channels
    }
    pub fn has_attention(&self, level: usize) -> bool {
        self.attention_levels.contains(&level)
    }
}

#[rustfmt::skip]
const FIXED: &[Fixed] = &[
    Fixed { field: "act_fn", accepted: &[Accepted::Str("silu")], reason: "the original ResBlock uses SiLU" },
    Fixed { field: "norm_eps", accepted: &[Accepted::Num(1e-5)], reason: "GroupNorm32 uses eps 1e-5" },
    Fixed { field: "flip_sin_to_cos", accepted: &[Accepted::Bool(true)], reason: "the original embedding is [cos, sin]" },
    Fixed { field: "freq_shift", accepted: &[Accepted::Num(0.0)], reason: "the original embedding has no shift" },
    Fixed { field: "center_input_sample", accepted: &[Accepted::Bool(false)], reason: "no input centring in LDM" },
    Fixed { field: "downsample_padding", accepted: &[Accepted::Num(1.0)], reason: "the original Downsample pads by 1" },
    Fixed { field: "mid_block_scale_factor", accepted: &[Accepted::Num(1.0)], reason: "no output scaling in LDM" },
    Fixed { field: "resnet_time_scale_shift", accepted: &[Accepted::Str("default")], reason: "use_scale_shift_norm is not used by SD" },
    Fixed { field: "resnet_skip_time_act", accepted: &[Accepted::Bool(false)], reason: "not in LDM" },
    Fixed { field: "resnet_out_scale_factor", accepted: &[Accepted::Num(1.0)], reason: "not in LDM" },
    Fixed { field: "time_embedding_type", accepted: &[Accepted::Str("positional")], reason: "LDM uses the sinusoidal embedding" },
    Fixed { field: "time_embedding_act_fn", accepted: &[Accepted::Null], reason: "not in LDM" },
    Fixed { field: "timestep_post_act", accepted: &[Accepted::Null], reason: "not in LDM" },
    Fixed { field: "time_cond_proj_dim", accepted: &[Accepted::Null], reason: "not in LDM" },
    Fixed { field: "conv_in_kernel", accepted: &[Accepted::Num(3.0)], reason: "LDM's conv_in is 3x3" },
    Fixed { field: "conv_out_kernel", accepted: &[Accepted::Num(3.0)], reason: "LDM's conv_out is 3x3" },
    Fixed { field: "dual_cross_attention", accepted: &[Accepted::Bool(false)], reason: "not in LDM" },
    Fixed { field: "class_embed_type", accepted: &[Accepted::Null], reason: "only an `nn.Embedding` label input (num_class_embeds) is supported" },
    Fixed { field: "addition_embed_type", accepted: &[Accepted::Null], reason: "SDXL-style added embeddings are not supported" },
    Fixed { field: "addition_time_embed_dim", accepted: &[Accepted::Null], reason: "SDXL-style added embeddings are not supported" },
    Fixed { field: "projection_class_embeddings_input_dim", accepted: &[Accepted::Null], reason: "projected class embeddings are not supported" },
    Fixed { field: "class_embeddings_concat", accepted: &[Accepted::Bool(false)], reason: "not in LDM" },
    Fixed { field: "encoder_hid_dim", accepted: &[Accepted::Null], reason: "no context projection in LDM" },
    Fixed { field: "encoder_hid_dim_type", accepted: &[Accepted::Null], reason: "no context projection in LDM" },
    Fixed { field: "attention_type", accepted: &[Accepted::Str("default")], reason: "gated attention is not in LDM" },
    Fixed { field: "cross_attention_norm", accepted: &[Accepted::Null], reason: "not in LDM" },
    Fixed { field: "reverse_transformer_layers_per_block", accepted: &[Accepted::Null], reason: "LDM's up path mirrors the down path's depths" },
    Fixed { field: "addition_embed_type_num_heads", accepted: &[Accepted::Num(64.0)], reason: "SDXL-style added embeddings are not supported" },
];

/// Entries that do not affect the weights or the inference numerics.
const HARMLESS: &[&str] = &["sample_size", "dropout"];

impl DiffusersUnetConfig {
    pub fn from_json(text: &str) -> Result<Self> {
        serde_json::from_str(text).map_err(|source| ImportError::Json { what: WHAT, source })
    }

    /// Reads `unet/config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        read_config(WHAT, path)
    }

    /// Checks the config against what the original `UNetModel` can express and translates it.
    pub fn arch(&self) -> Result<UnetArch> {
        let mut harmless = BOOKKEEPING.to_vec();
        harmless.extend_from_slice(HARMLESS);
        let ignored = check_rest(WHAT, &self.rest, FIXED, &harmless)?;
        let inconsistent = |detail: String| ImportError::Inconsistent { what: WHAT, detail };
        let unsupported = |field, value: String, reason| ImportError::Unsupported {
            what: WHAT,
            field,
            value,
            reason,
        };

        let n = self.block_out_channels.len();
        let mc = self.block_out_channels.first().copied().unwrap_or(0);
        if mc == 0 {
            return Err(inconsistent(format!(
                "block_out_channels = {:?}",
                self.block_out_channels
            )));
        }
        if self.block_out_channels.iter().any(|c| c % mc != 0) {
            return Err(inconsistent(format!(
                "block_out_channels {:?} are not multiples of the first (LDM's channel_mult must be integers)",
                self.block_out_channels
            )));
        }
        let channel_mult: Vec<usize> = self.block_out_channels.iter().map(|c| c / mc).collect();
        if self.down_block_types.len() != n || self.up_block_types.len() != n {
            return Err(inconsistent(format!(
                "{} down and {} up block types for {n} levels",
                self.down_block_types.len(),
                self.up_block_types.len()
            )));
        }
        let mut attention_levels = Vec::new();
        for (i, down) in self.down_block_types.iter().enumerate() {
            let attn = match down.as_str() {
                "CrossAttnDownBlock2D" => true,
                "DownBlock2D" => false,
                _ => {
                    return Err(unsupported(
                        "down_block_types",
                        down.clone(),
                        "only CrossAttnDownBlock2D and DownBlock2D exist in LDM",
                    ))
                }
            };
            let up = &self.up_block_types[n - 1 - i];
            let up_attn = match up.as_str() {
                "CrossAttnUpBlock2D" => true,
                "UpBlock2D" => false,
                _ => {
                    return Err(unsupported(
                        "up_block_types",
                        up.clone(),
                        "only CrossAttnUpBlock2D and UpBlock2D exist in LDM",
                    ))
                }
            };
            if attn != up_attn {
                return Err(inconsistent(format!(
                    "down block {i} is {down} but its mirror, up block {}, is {up} (LDM's attention_resolutions apply to both paths)",
                    n - 1 - i
                )));
            }
            if attn {
                attention_levels.push(i);
            }
        }
        match self.mid_block_type.as_deref() {
            Some("UNetMidBlock2DCrossAttn") => {}
            other => {
                return Err(unsupported(
                    "mid_block_type",
                    format!("{other:?}"),
                    "LDM's middle block is resnet, transformer, resnet",
                ))
            }
        }
        if let Some(h) = &self.num_attention_heads {
            return Err(unsupported(
                "num_attention_heads",
                format!("{h:?}"),
                "diffusers itself rejects it; heads come from attention_head_dim",
            ));
        }
        let disable_self_attentions =
            self.only_cross_attention
                .per_level(n, WHAT, "only_cross_attention")?;
        let disable_middle_self_attn =
            self.mid_block_only_cross_attention
                .unwrap_or(match self.only_cross_attention {
                    OneOrMany::One(b) => b,
                    OneOrMany::Many(_) => false,
                });
        let context = self
            .cross_attention_dim
            .per_level(n, WHAT, "cross_attention_dim")?;
        let context_dim = context[0];
        if context.iter().any(|&c| c != context_dim) {
            return Err(unsupported(
                "cross_attention_dim",
                format!("{context:?}"),
                "one context width for all levels",
            ));
        }
        let norm_groups = match self.norm_num_groups {
            Some(g) if g > 0 => g,
            other => {
                return Err(unsupported(
                    "norm_num_groups",
                    format!("{other:?}"),
                    "LDM always normalises with GroupNorm",
                ))
            }
        };
        if let Some(d) = self.time_embedding_dim {
            if d != 4 * mc {
                return Err(unsupported(
                    "time_embedding_dim",
                    d.to_string(),
                    "LDM's time embedding is 4 * model_channels wide",
                ));
            }
        }
        let res_blocks = self
            .layers_per_block
            .per_level(n, WHAT, "layers_per_block")?;
        let transformer_depth =
            self.transformer_layers_per_block
                .per_level(n, WHAT, "transformer_layers_per_block")?;
        let heads = self.heads(&attention_levels)?;
        Ok(UnetArch {
            in_channels: self.in_channels,
            out_channels: self.out_channels,
            model_channels: mc,
            channel_mult,
            res_blocks,
            attention_levels,
            heads,
            transformer_depth,
            context_dim,
            linear_projection: self.use_linear_projection,
            norm_groups,
            num_classes: self.num_class_embeds,
            disable_self_attentions,
            disable_middle_self_attn,
            upcast_attention: self.upcast_attention,
            ignored,
        })
    }

    /// Head counts of the levels that have attention (and of the last level, whose count the middle block
    /// uses) as one `Heads`: a constant count stays `Count`; a per-level list becomes `Dim` when it is a
    /// constant width (SD2), else `Count` when it is constant.
    fn heads(&self, attention_levels: &[usize]) -> Result<Heads> {
        let n = self.block_out_channels.len();
        let counts = self
            .attention_head_dim
            .per_level(n, WHAT, "attention_head_dim")?;
        let mut used: Vec<usize> = attention_levels.to_vec();
        used.push(n - 1);
        let mut widths = Vec::new();
        for &l in &used {
            let (c, h) = (self.block_out_channels[l], counts[l]);
            if h == 0 || c % h != 0 {
                return Err(ImportError::Inconsistent {
                    what: WHAT,
                    detail: format!("level {l}: {c} channels cannot be split into {h} heads (attention_head_dim is a head count)"),
                });
            }
            widths.push(c / h);
        }
        let all_same = |v: &[usize]| v.iter().all(|&x| x == v[0]);
        let used_counts: Vec<usize> = used.iter().map(|&l| counts[l]).collect();
        match &self.attention_head_dim {
            OneOrMany::One(h) => Ok(Heads::Count(*h)),
            OneOrMany::Many(_) if all_same(&widths) => Ok(Heads::Dim(widths[0])),
            OneOrMany::Many(_) if all_same(&used_counts) => Ok(Heads::Count(used_counts[0])),
            OneOrMany::Many(v) => Err(ImportError::Unsupported {
                what: WHAT,
                field: "attention_head_dim",
                value: format!("{v:?}"),
                reason: "neither a constant head count nor a constant head width (LDM's num_heads / num_head_channels)",
            }),
        }
    }
}

/// The key map of a diffusers UNet config: diffusers names -> canonical names relative to [`UNET_PREFIX`].
pub fn unet_key_map(cfg: &DiffusersUnetConfig) -> Result<KeyMap> {
    unet_key_map_for(&cfg.arch()?)
}

/// The key map of an architecture (canonical names relative to [`UNET_PREFIX`]).
pub fn unet_key_map_for(a: &UnetArch) -> Result<KeyMap> {
    let mut m = KeyMap::new();
    let mc = a.model_channels;
    let temb = a.time_embed_dim();
    let n = a.levels();
    m.conv("conv_in", "input_blocks.0.0", mc, a.in_channels, 3)?;
    m.linear("time_embedding.linear_1", "time_embed.0", temb, mc, true)?;
    m.linear("time_embedding.linear_2", "time_embed.2", temb, temb, true)?;
    // An `nn.Embedding` label input is `label_emb.weight` in the original (`num_classes` an int).
    if let Some(classes) = a.num_classes {
        m.rename(
            "class_embedding.weight",
            "label_emb.weight",
            &[classes, temb],
        )?;
    }

    // Down path; `skips` are the widths of the input blocks' outputs that the up path concatenates.
    let mut skips = vec![mc];
    let mut ch = mc;
    let mut block = 1;
    for level in 0..n {
        let out = a.channels(level);
        for j in 0..a.res_blocks[level] {
            resnet(
                &mut m,
                &format!("down_blocks.{level}.resnets.{j}"),
                &format!("input_blocks.{block}.0"),
                ch,
                out,
                temb,
            )?;
            ch = out;
            if a.has_attention(level) {
                let d = format!("down_blocks.{level}.attentions.{j}");
                transformer(
                    &mut m,
                    a,
                    &d,
                    &format!("input_blocks.{block}.1"),
                    ch,
                    a.transformer_depth[level],
                    Some(level),
                )?;
            }
            skips.push(ch);
            block += 1;
        }
        if level + 1 != n {
            m.conv(
                &format!("down_blocks.{level}.downsamplers.0.conv"),
                &format!("input_blocks.{block}.0.op"),
                ch,
                ch,
                3,
            )?;
            skips.push(ch);
            block += 1;
        }
    }

    resnet(
        &mut m,
        "mid_block.resnets.0",
        "middle_block.0",
        ch,
        ch,
        temb,
    )?;
    transformer(
        &mut m,
        a,
        "mid_block.attentions.0",
        "middle_block.1",
        ch,
        a.transformer_depth[n - 1],
        None,
    )?;
    resnet(
        &mut m,
        "mid_block.resnets.1",
        "middle_block.2",
        ch,
        ch,
        temb,
    )?;

    let mut block = 0;
    for (u, level) in (0..n).rev().enumerate() {
        let out = a.channels(level);
        let last = a.res_blocks[level];
        for j in 0..=last {
            let skip = skips.pop().ok_or_else(|| ImportError::Inconsistent {
                what: WHAT,
                detail: "more up-path res blocks than skip connections".to_string(),
            })?;
            let c = format!("output_blocks.{block}");
            resnet(
                &mut m,
                &format!("up_blocks.{u}.resnets.{j}"),
                &format!("{c}.0"),
                ch + skip,
                out,
                temb,
            )?;
            ch = out;
            let mut slot = 1;
            if a.has_attention(level) {
                transformer(
                    &mut m,
                    a,
                    &format!("up_blocks.{u}.attentions.{j}"),
                    &format!("{c}.1"),
                    ch,
                    a.transformer_depth[level],
                    Some(level),
                )?;
                slot = 2;
            }
            if level != 0 && j == last {
                m.conv(
                    &format!("up_blocks.{u}.upsamplers.0.conv"),
                    &format!("{c}.{slot}.conv"),
                    ch,
                    ch,
                    3,
                )?;
            }
            block += 1;
        }
    }
    m.norm("conv_norm_out", "out.0", mc)?;
    m.conv("conv_out", "out.2", a.out_channels, mc, 3)?;
    Ok(m)
}

/// diffusers `ResnetBlock2D` -> LDM `ResBlock` (`in_layers = [norm, SiLU, conv]`, `emb_layers = [SiLU, linear]`,
/// `out_layers = [norm, SiLU, dropout, conv]`; the weightless indices are skipped).
fn resnet(m: &mut KeyMap, d: &str, c: &str, inp: usize, out: usize, temb: usize) -> Result<()> {
    resnet_block(m, d, c, inp, out, temb, false)
}

/// [`resnet`] with `use_scale_shift_norm` (`resnet_time_scale_shift: "scale_shift"`): the time projection
/// gives `2 · out` (scale and shift).
pub(crate) fn resnet_block(
    m: &mut KeyMap,
    d: &str,
    c: &str,
    inp: usize,
    out: usize,
    temb: usize,
    scale_shift: bool,
) -> Result<()> {
    let emb_out = if scale_shift { 2 * out } else { out };
    m.norm(&format!("{d}.norm1"), &format!("{c}.in_layers.0"), inp)?;
    m.conv(
        &format!("{d}.conv1"),
        &format!("{c}.in_layers.2"),
        out,
        inp,
        3,
    )?;
    m.linear(
        &format!("{d}.time_emb_proj"),
        &format!("{c}.emb_layers.1"),
        emb_out,
        temb,
        true,
    )?;
    m.norm(&format!("{d}.norm2"), &format!("{c}.out_layers.0"), out)?;
    m.conv(
        &format!("{d}.conv2"),
        &format!("{c}.out_layers.3"),
        out,
        out,
        3,
    )?;
    if inp != out {
        m.conv(
            &format!("{d}.conv_shortcut"),
            &format!("{c}.skip_connection"),
            out,
            inp,
            1,
        )?;
    }
    Ok(())
}

/// diffusers `Transformer2DModel` -> LDM `SpatialTransformer`: the names below the block are the same.
/// `level: None` is the middle block (its `attn1` follows `disable_middle_self_attn`).
fn transformer(
    m: &mut KeyMap,
    a: &UnetArch,
    d: &str,
    c: &str,
    ch: usize,
    depth: usize,
    level: Option<usize>,
) -> Result<()> {
    let ctx = a.context_dim;
    let attn1_kv = match level {
        Some(l) if a.disable_self_attentions.get(l).copied().unwrap_or(false) => ctx,
        None if a.disable_middle_self_attn => ctx,
        _ => ch,
    };
    let proj = |m: &mut KeyMap, p: &str| {
        if a.linear_projection {
            m.linear(&format!("{d}.{p}"), &format!("{c}.{p}"), ch, ch, true)
        } else {
            m.conv(&format!("{d}.{p}"), &format!("{c}.{p}"), ch, ch, 1)
        }
    };
    m.norm(&format!("{d}.norm"), &format!("{c}.norm"), ch)?;
    proj(m, "proj_in")?;
    for k in 0..depth {
        let (d, c) = (
            format!("{d}.transformer_blocks.{k}"),
            format!("{c}.transformer_blocks.{k}"),
        );
        for (attn, kv) in [("attn1", attn1_kv), ("attn2", ctx)] {
            m.linear(
                &format!("{d}.{attn}.to_q"),
                &format!("{c}.{attn}.to_q"),
                ch,
                ch,
                false,
            )?;
            m.linear(
                &format!("{d}.{attn}.to_k"),
                &format!("{c}.{attn}.to_k"),
                ch,
                kv,
                false,
            )?;
            m.linear(
                &format!("{d}.{attn}.to_v"),
                &format!("{c}.{attn}.to_v"),
                ch,
                kv,
                false,
            )?;
            m.linear(
                &format!("{d}.{attn}.to_out.0"),
                &format!("{c}.{attn}.to_out.0"),
                ch,
                ch,
                true,
            )?;
        }
        for norm in ["norm1", "norm2", "norm3"] {
            m.norm(&format!("{d}.{norm}"), &format!("{c}.{norm}"), ch)?;
        }
        // GEGLU: one projection to 2 * 4C (value and gate), then 4C -> C.
        m.linear(
            &format!("{d}.ff.net.0.proj"),
            &format!("{c}.ff.net.0.proj"),
            8 * ch,
            ch,
            true,
        )?;
        m.linear(
            &format!("{d}.ff.net.2"),
            &format!("{c}.ff.net.2"),
            ch,
            4 * ch,
            true,
        )?;
    }
    proj(m, "proj_out")
}
