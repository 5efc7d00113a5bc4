//! Configuration of the CLIP text transformer, presets, and inference of the sizes from tensor shapes.
use serde::{Deserialize, Serialize};

/// The MLP non-linearity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// `x·σ(1.702·x)`, OpenAI CLIP (SD1; transformers' `quick_gelu`).
    QuickGelu,
    /// Exact `x·Φ(x)` with erf, OpenCLIP (SD2; transformers' `gelu`).
    Gelu,
}

/// Which hidden state the encoder returns. The final LayerNorm is applied in every case.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TextOutput {
    /// Run every block (SD1; SD2 diffusers folders, whose text encoder already lacks the last block).
    Last,
    /// Skip the last `n` blocks: `SkipLast(1)` is SD2's "penultimate" layer (`FrozenOpenCLIPEmbedder`,
    /// `layer="penultimate"`); larger `n` is the "CLIP skip" of some front ends.
    SkipLast(usize),
}

impl TextOutput {
    /// SD2's choice for the single-file OpenCLIP text tower.
    pub const PENULTIMATE: Self = Self::SkipLast(1);

    /// How many trailing blocks `forward` does not run.
    pub fn skipped(self) -> usize {
        match self {
            Self::Last => 0,
            Self::SkipLast(n) => n,
        }
    }
}

/// The two weight layouts of the same network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TextLayout {
    /// transformers' `CLIPTextModel` below `text_model.` (SD1 single files under
    /// `cond_stage_model.transformer.text_model`, every diffusers `text_encoder/`).
    Hf,
    /// OpenCLIP's text tower (SD2 single files under `cond_stage_model.model`), fused `in_proj`.
    OpenClip,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TextConfig {
    pub vocab_size: usize,
    /// Width of the residual stream (`d_model`).
    pub hidden: usize,
    /// Number of transformer blocks stored in the weights (all are loaded, see [`TextOutput`]).
    pub layers: usize,
    pub heads: usize,
    /// Width of the MLP's hidden layer.
    pub intermediate: usize,
    /// Length of the learned position table (77 for SD).
    pub max_positions: usize,
    pub activation: Activation,
    pub output: TextOutput,
}

/// Errors of [`TextConfig::infer`] and [`TextConfig::check`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TextConfigError {
    #[error("text encoder weight `{key}` is missing")]
    Missing { key: String },
    #[error("text encoder weight `{key}`: shape {found:?}, expected {expected}")]
    Shape {
        key: String,
        found: Vec<usize>,
        expected: String,
    },
    #[error("text encoder: {heads} heads do not divide the width {hidden}")]
    Heads { hidden: usize, heads: usize },
    #[error("text encoder: cannot skip {skip} of {layers} blocks")]
    Skip { skip: usize, layers: usize },
}

impl TextConfig {
    /// OpenAI CLIP ViT-L/14 text encoder as used by SD 1.x (last hidden state).
    pub fn sd_v1() -> Self {
        Self {
            vocab_size: 49408,
            hidden: 768,
            layers: 12,
            heads: 12,
            intermediate: 3072,
            max_positions: 77,
            activation: Activation::QuickGelu,
            output: TextOutput::Last,
        }
    }

    /// OpenCLIP ViT-H/14 text tower as stored in SD 2.x single files (24 blocks, penultimate output).
    pub fn sd_v2() -> Self {
        Self {
            hidden: 1024,
            layers: 24,
            heads: 16,
            intermediate: 4096,
            activation: Activation::Gelu,
            output: TextOutput::PENULTIMATE,
            ..Self::sd_v1()
        }
    }

    /// SD 2.x diffusers `text_encoder/`: the same tower converted with its last block dropped.
    pub fn sd_v2_diffusers() -> Self {
        Self {
            layers: 23,
            output: TextOutput::Last,
            ..Self::sd_v2()
        }
    }

    /// Head width `hidden / heads`.
    pub fn head_dim(&self) -> usize {
        self.hidden / self.heads.max(1)
    }

    /// Blocks that `forward` runs.
    pub fn active_layers(&self) -> usize {
        self.layers.saturating_sub(self.output.skipped())
    }

    /// Checks the relations between the sizes.
    pub fn check(&self) -> Result<(), TextConfigError> {
        if self.heads == 0 || !self.hidden.is_multiple_of(self.heads) {
            return Err(TextConfigError::Heads {
                hidden: self.hidden,
                heads: self.heads,
            });
        }
        if self.output.skipped() >= self.layers {
            return Err(TextConfigError::Skip {
                skip: self.output.skipped(),
                layers: self.layers,
            });
        }
        Ok(())
    }

    /// Reads every size but `heads` from tensor shapes. `shape_of` answers for keys RELATIVE to the layout's
    /// root (`text_model` for [`TextLayout::Hf`], `cond_stage_model.model` for [`TextLayout::OpenClip`]).
    /// `heads` defaults to `hidden / 64` (right for SD1 and SD2). Activation and output are not visible in
    /// the shapes, so the caller states them.
    pub fn infer(
        layout: TextLayout,
        shape_of: impl Fn(&str) -> Option<Vec<usize>>,
        heads: Option<usize>,
        activation: Activation,
        output: TextOutput,
    ) -> Result<Self, TextConfigError> {
        let keys = LayoutKeys::of(layout);
        let matrix = |key: String| -> Result<(usize, usize), TextConfigError> {
            match shape_of(&key) {
                Some(s) if s.len() == 2 => Ok((s[0], s[1])),
                Some(found) => Err(TextConfigError::Shape {
                    key,
                    found,
                    expected: "a matrix".into(),
                }),
                None => Err(TextConfigError::Missing { key }),
            }
        };
        let (vocab_size, hidden) = matrix(keys.token_embedding.to_string())?;
        let (max_positions, pos_width) = matrix(keys.position_embedding.to_string())?;
        if pos_width != hidden {
            return Err(TextConfigError::Shape {
                key: keys.position_embedding.into(),
                found: vec![max_positions, pos_width],
                expected: format!("[_, {hidden}]"),
            });
        }
        let layers = (0..)
            .take_while(|i| shape_of(&format!("{}.{i}.{}", keys.layers, keys.probe)).is_some())
            .count();
        if layers == 0 {
            return Err(TextConfigError::Missing {
                key: format!("{}.0.{}", keys.layers, keys.probe),
            });
        }
        let fc1 = format!("{}.0.{}", keys.layers, keys.fc1);
        let (intermediate, fc1_in) = matrix(fc1.clone())?;
        if fc1_in != hidden {
            return Err(TextConfigError::Shape {
                key: fc1,
                found: vec![intermediate, fc1_in],
                expected: format!("[_, {hidden}]"),
            });
        }
        let cfg = Self {
            vocab_size,
            hidden,
            layers,
            heads: heads.unwrap_or(hidden / 64),
            intermediate,
            max_positions,
            activation,
            output,
        };
        cfg.check()?;
        Ok(cfg)
    }
}

/// The key names that differ between the layouts (relative to the layout's root).
pub(crate) struct LayoutKeys {
    pub token_embedding: &'static str,
    pub position_embedding: &'static str,
    pub layers: &'static str,
    /// A weight every block has, used to count blocks.
    pub probe: &'static str,
    pub fc1: &'static str,
}

impl LayoutKeys {
    pub(crate) fn of(layout: TextLayout) -> Self {
        match layout {
            TextLayout::Hf => Self {
                token_embedding: "embeddings.token_embedding.weight",
                position_embedding: "embeddings.position_embedding.weight",
                layers: "encoder.layers",
                probe: "layer_norm1.weight",
                fc1: "mlp.fc1.weight",
            },
            TextLayout::OpenClip => Self {
                token_embedding: "token_embedding.weight",
                position_embedding: "positional_embedding",
                layers: "transformer.resblocks",
                probe: "ln_1.weight",
                fc1: "mlp.c_fc.weight",
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn open_clip_shapes(layers: usize) -> HashMap<String, Vec<usize>> {
        let mut m = HashMap::new();
        m.insert("token_embedding.weight".to_string(), vec![49408, 1024]);
        m.insert("positional_embedding".to_string(), vec![77, 1024]);
        for i in 0..layers {
            m.insert(format!("transformer.resblocks.{i}.ln_1.weight"), vec![1024]);
            m.insert(
                format!("transformer.resblocks.{i}.mlp.c_fc.weight"),
                vec![4096, 1024],
            );
        }
        m
    }

    #[test]
    fn infers_sd_v2_from_open_clip_shapes() {
        let shapes = open_clip_shapes(24);
        let cfg = TextConfig::infer(
            TextLayout::OpenClip,
            |k| shapes.get(k).cloned(),
            None,
            Activation::Gelu,
            TextOutput::PENULTIMATE,
        );
        assert_eq!(cfg, Ok(TextConfig::sd_v2()));
    }

    #[test]
    fn infer_names_the_missing_key() {
        let shapes: HashMap<String, Vec<usize>> = HashMap::new();
        let err = TextConfig::infer(
            TextLayout::Hf,
            |k| shapes.get(k).cloned(),
            None,
            Activation::QuickGelu,
            TextOutput::Last,
        );
        assert_eq!(
            err,
            Err(TextConfigError::Missing {
                key: "embeddings.token_embedding.weight".into()
            })
        );
    }

    #[test]
    fn infer_rejects_heads_that_do_not_divide() {
        let shapes = open_clip_shapes(2);
        let err = TextConfig::infer(
            TextLayout::OpenClip,
            |k| shapes.get(k).cloned(),
            Some(3),
            Activation::Gelu,
            TextOutput::Last,
        );
        assert_eq!(
            err,
            Err(TextConfigError::Heads {
                hidden: 1024,
                heads: 3
            })
        );
    }

    #[test]
    fn presets_pass_their_own_checks() {
        for cfg in [
            TextConfig::sd_v1(),
            TextConfig::sd_v2(),
            TextConfig::sd_v2_diffusers(),
        ] {
            assert_eq!(cfg.check(), Ok(()));
            assert_eq!(cfg.head_dim(), 64);
        }
        assert_eq!(
            TextConfig::sd_v2().active_layers(),
            TextConfig::sd_v2_diffusers().active_layers()
        );
    }
}
