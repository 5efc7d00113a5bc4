//! `cond_stage_config`: the conditioning encoder τ_θ of the paper (§3.3), or one of the original's sentinel strings.
//!
//! | original                                            | here                                         |
//! |-----------------------------------------------------|----------------------------------------------|
//! | `__is_unconditional__`                              | [`OriginalCondStage::Unconditional`]         |
//! | `__is_first_stage__`                                | [`OriginalCondStage::FirstStage`] (the conditioning image goes through the first stage's encoder) |
//! | `torch.nn.Identity`                                 | [`OriginalCondStage::Identity`] (the input is used as is) |
//! | `FrozenCLIPEmbedder`, `FrozenOpenCLIPEmbedder`, `BERTEmbedder`, `TransformerEmbedder` | [`OriginalCondStage::Text`] |
//! | `ClassEmbedder`                                     | [`OriginalCondStage::Class`]                 |
//! | `SpatialRescaler`                                   | [`OriginalCondStage::SpatialRescaler`]       |
use super::targets::Target;
use super::yaml::{Params, Parsed};

/// Which hidden state `FrozenCLIPEmbedder` returns (`layer`, `layer_idx`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClipLayer {
    /// `last_hidden_state` (SD 1.x).
    Last,
    /// The pooled output, as a sequence of one.
    Pooled,
    /// `hidden_states[layer_idx]` (Python indexing: negative counts from the end).
    Hidden(i64),
}

/// Which layer `FrozenOpenCLIPEmbedder` returns; both go through the final LayerNorm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenClipLayer {
    Last,
    /// The output of the second-to-last block (SD 2.x).
    Penultimate,
}

/// The paper's own text model: `x_transformer` encoder layers over BERT WordPiece tokens (`BERTEmbedder`).
#[derive(Debug, Clone, PartialEq)]
pub struct BertEmbedder {
    /// Width of the transformer (the context dimension).
    pub n_embed: usize,
    pub n_layer: usize,
    /// Default 30522 (bert-base-uncased).
    pub vocab_size: usize,
    /// Default 77.
    pub max_seq_len: usize,
    /// Tokenise text with the BERT tokenizer (default true); false: the input is already token ids
    /// (layout-to-image: quantised box coordinates).
    pub use_tokenizer: bool,
    /// ldm-rs extension for layout models: the number of object classes of the layout tokeniser, which the
    /// original keeps in its data config (`no_object_classes`).
    pub no_object_classes: Option<usize>,
    /// ldm-rs extension for layout models: taming's `use_additional_parameters` (group/occluded/depiction/inside
    /// flags folded into the class token).
    pub use_additional_parameters: Option<bool>,
}

/// `TransformerEmbedder`: the same encoder over token ids, without a tokenizer.
#[derive(Debug, Clone, PartialEq)]
pub struct TransformerEmbedder {
    pub n_embed: usize,
    pub n_layer: usize,
    pub vocab_size: usize,
    /// Default 77.
    pub max_seq_len: usize,
}

/// A text (or token) encoder whose output is the cross-attention context.
#[derive(Debug, Clone, PartialEq)]
pub enum OriginalTextEncoder {
    /// `FrozenCLIPEmbedder` (SD 1.x): a transformers `CLIPTextModel`.
    Clip {
        /// Hugging Face id of the model (default `openai/clip-vit-large-patch14`); a name, never fetched here.
        version: String,
        layer: ClipLayer,
        max_length: usize,
        /// ldm-rs extension key: the number of attention heads, which no tensor shape reveals.
        num_heads: Option<usize>,
    },
    /// `FrozenOpenCLIPEmbedder` (SD 2.x): an OpenCLIP text tower.
    OpenClip {
        /// Default `ViT-H-14`.
        arch: String,
        /// OpenCLIP pretrained tag (default `laion2b_s32b_b79k`); a name, never fetched here.
        version: String,
        layer: OpenClipLayer,
        max_length: usize,
        /// ldm-rs extension key, as for CLIP.
        num_heads: Option<usize>,
    },
    Bert(BertEmbedder),
    Transformer(TransformerEmbedder),
}

/// `ClassEmbedder`: an `nn.Embedding(n_classes, embed_dim)` whose one-token output is the context.
#[derive(Debug, Clone, PartialEq)]
pub struct ClassEmbedder {
    pub embed_dim: usize,
    /// Default 1000. The cin256 models use 1001: ImageNet's 1000 classes plus one for "no class".
    pub n_classes: usize,
    /// Batch key of the label (default `class`).
    pub key: String,
    /// Probability with which training replaced the label by the null class `n_classes − 1` (Stability's
    /// `ClassEmbedder`; 0 = no null class, except the 1001-row cin256 table).
    pub ucg_rate: f64,
}

/// Interpolation mode of [`SpatialRescaler`] (`torch.nn.functional.interpolate`'s `mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InterpolationMethod {
    Nearest,
    Linear,
    Bilinear,
    Trilinear,
    Bicubic,
    Area,
}

/// `SpatialRescaler`: resizes a spatial conditioning (e.g. a one-hot semantic map) `n_stages` times by
/// `multiplier`, then optionally maps its channels with a 1x1 convolution.
#[derive(Debug, Clone, PartialEq)]
pub struct SpatialRescaler {
    /// Default 1.
    pub n_stages: usize,
    /// Default bilinear.
    pub method: InterpolationMethod,
    /// Default 0.5.
    pub multiplier: f64,
    /// Default 3.
    pub in_channels: usize,
    /// `None`: no channel mapper.
    pub out_channels: Option<usize>,
    /// The channel mapper's bias (default false).
    pub bias: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub enum OriginalCondStage {
    /// `__is_unconditional__`: no conditioning at all (the conditioning key becomes `None`).
    Unconditional,
    /// `__is_first_stage__`: the conditioning image is encoded by the first stage (LDM inpainting).
    FirstStage,
    /// `torch.nn.Identity`: the conditioning goes in unchanged (LDM-SR's low-res image, RDM's retrieved
    /// embeddings).
    Identity,
    Text(OriginalTextEncoder),
    Class(ClassEmbedder),
    SpatialRescaler(SpatialRescaler),
}

/// Keys with no effect on inference.
const HARMLESS: &[&str] = &["device", "freeze", "ucg_rate", "embedding_dropout"];

pub(crate) fn parse(
    class: Target,
    p: &Params<'_>,
    ignored: &mut Vec<String>,
) -> Parsed<OriginalCondStage> {
    let stage = match class {
        Target::FrozenClipEmbedder => {
            let layer = match p.str_or("layer", "last")?.as_str() {
                "last" => ClipLayer::Last,
                "pooled" => ClipLayer::Pooled,
                "hidden" => {
                    let idx = match p.get("layer_idx") {
                        Some(yaml_rust2::Yaml::Integer(i)) => *i,
                        Some(other) => return Err(p.wrong("layer_idx", "an integer", other)),
                        None => return Err(p.missing("layer_idx")),
                    };
                    ClipLayer::Hidden(idx)
                }
                other => {
                    return Err(p.invalid("layer", other, "expected `last`, `pooled` or `hidden`"))
                }
            };
            OriginalCondStage::Text(OriginalTextEncoder::Clip {
                version: p.str_or("version", "openai/clip-vit-large-patch14")?,
                layer,
                max_length: p.usize_or("max_length", 77)?,
                num_heads: p.opt_usize("num_heads")?,
            })
        }
        Target::FrozenOpenClipEmbedder => {
            let layer = match p.str_or("layer", "last")?.as_str() {
                "last" => OpenClipLayer::Last,
                "penultimate" => OpenClipLayer::Penultimate,
                other => return Err(p.invalid("layer", other, "expected `last` or `penultimate`")),
            };
            OriginalCondStage::Text(OriginalTextEncoder::OpenClip {
                arch: p.str_or("arch", "ViT-H-14")?,
                version: p.str_or("version", "laion2b_s32b_b79k")?,
                layer,
                max_length: p.usize_or("max_length", 77)?,
                num_heads: p.opt_usize("num_heads")?,
            })
        }
        Target::BertEmbedder => OriginalCondStage::Text(OriginalTextEncoder::Bert(BertEmbedder {
            n_embed: p.req_usize("n_embed")?,
            n_layer: p.req_usize("n_layer")?,
            vocab_size: p.usize_or("vocab_size", 30522)?,
            max_seq_len: p.usize_or("max_seq_len", 77)?,
            use_tokenizer: p.bool_or("use_tokenizer", true)?,
            no_object_classes: p.opt_usize("no_object_classes")?,
            use_additional_parameters: match p.get("use_additional_parameters") {
                Some(_) => Some(p.bool_or("use_additional_parameters", true)?),
                None => None,
            },
        })),
        Target::TransformerEmbedder => {
            OriginalCondStage::Text(OriginalTextEncoder::Transformer(TransformerEmbedder {
                n_embed: p.req_usize("n_embed")?,
                n_layer: p.req_usize("n_layer")?,
                vocab_size: p.req_usize("vocab_size")?,
                max_seq_len: p.usize_or("max_seq_len", 77)?,
            }))
        }
        Target::ClassEmbedder => OriginalCondStage::Class(ClassEmbedder {
            embed_dim: p.req_usize("embed_dim")?,
            n_classes: p.usize_or("n_classes", 1000)?,
            key: p.str_or("key", "class")?,
            ucg_rate: p.f64_or("ucg_rate", 0.0)?,
        }),
        Target::SpatialRescaler => {
            let method = match p.str_or("method", "bilinear")?.as_str() {
                "nearest" => InterpolationMethod::Nearest,
                "linear" => InterpolationMethod::Linear,
                "bilinear" => InterpolationMethod::Bilinear,
                "trilinear" => InterpolationMethod::Trilinear,
                "bicubic" => InterpolationMethod::Bicubic,
                "area" => InterpolationMethod::Area,
                other => {
                    return Err(p.invalid(
                        "method",
                        other,
                        "expected nearest, linear, bilinear, trilinear, bicubic or area",
                    ))
                }
            };
            let multiplier = p.f64_or("multiplier", 0.5)?;
            if multiplier <= 0.0 {
                return Err(p.invalid("multiplier", multiplier.to_string(), "must be positive"));
            }
            OriginalCondStage::SpatialRescaler(SpatialRescaler {
                n_stages: p.usize_or("n_stages", 1)?,
                method,
                multiplier,
                in_channels: p.usize_or("in_channels", 3)?,
                out_channels: p.opt_usize("out_channels")?,
                bias: p.bool_or("bias", false)?,
            })
        }
        // torch.nn.Identity takes (and ignores) any arguments.
        _ => return Ok(OriginalCondStage::Identity),
    };
    p.finish(HARMLESS, ignored);
    Ok(stage)
}
