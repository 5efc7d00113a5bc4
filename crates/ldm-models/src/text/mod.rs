//! Text encoders of Stable Diffusion: one CLIP [`TextTransformer`] (Radford et al. 2021) with two weight
//! layouts — transformers' `CLIPTextModel` (SD1, all diffusers folders) and OpenCLIP's text tower (SD2
//! single files) — configured by [`TextConfig`].
pub mod clip;
pub mod config;
pub mod open_clip;
pub mod transformer;

pub use config::{Activation, TextConfig, TextConfigError, TextLayout, TextOutput};
pub use transformer::TextTransformer;

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
