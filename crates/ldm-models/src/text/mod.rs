//! Text encoders of Stable Diffusion: one CLIP [`TextTransformer`] (Radford et al. 2021) with two weight
//! layouts — transformers' `CLIPTextModel` (SD1, all diffusers folders) and OpenCLIP's text tower (SD2
//! single files) — configured by [`TextConfig`]; and the LDM paper's own BERT-token transformer
//! ([`XTransformer`], `BERTEmbedder` / `TransformerEmbedder`, diffusers' `LDMBertModel`).
pub mod clip;
pub mod config;
pub mod open_clip;
pub mod transformer;
pub mod x_transformer;

pub use config::{Activation, TextConfig, TextConfigError, TextLayout, TextOutput};
pub use transformer::TextTransformer;
pub use x_transformer::{XTransformer, XTransformerConfig, XTransformerConfigError};

impl TextTransformer {
    /// Loads either layout; `vb` at the layout's root (see [`TextLayout`]).
    pub fn load(
        vb: candle_nn::VarBuilder,
        config: &TextConfig,
        layout: TextLayout,
    ) -> candle_core::Result<Self> {
        match layout {
            TextLayout::Hf => Self::load_hf(vb, config),
            TextLayout::OpenClip => Self::load_open_clip(vb, config),
        }
    }
}
