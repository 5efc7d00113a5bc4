//! The table of `target:` class names ldm-rs understands, per config section. A target is only ever looked up
//! here and matched to a Rust type; nothing is imported or instantiated from the string (STYLE §2.6). Classes that
//! exist in the original code but that ldm-rs cannot run yet are listed with the reason, so the error says so
//! instead of calling them unknown.

/// Where in a config a target appears.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// `model.target` of a diffusion model config.
    Model,
    /// `first_stage_config.target`, or `model.target` of a standalone first-stage config.
    FirstStage,
    /// `cond_stage_config.target`.
    CondStage,
    /// `unet_config.target`.
    Unet,
    /// `low_scale_config.target` of the x4 upscaler.
    LowScale,
}

/// The classes with a typed description in this module.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Target {
    LatentDiffusion,
    LatentInpaintDiffusion,
    LatentUpscaleDiffusion,
    AutoencoderKl,
    VqModel,
    VqModelInterface,
    IdentityFirstStage,
    UnetModel,
    FrozenClipEmbedder,
    FrozenOpenClipEmbedder,
    BertEmbedder,
    TransformerEmbedder,
    ClassEmbedder,
    SpatialRescaler,
    TorchIdentity,
    ImageConcatWithNoiseAugmentation,
    SimpleImageConcat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Entry {
    Known(Target),
    /// Exists in the original code; ldm-rs does not describe it yet (the reason is shown to the user).
    Unsupported(&'static str),
}

use Entry::{Known, Unsupported};
use Role as R;
use Target as C;

const DDPM: &str = "ldm.models.diffusion.ddpm.";
const AE: &str = "ldm.models.autoencoder.";
const ENC: &str = "ldm.modules.encoders.modules.";
const UPSCALING: &str = "ldm.modules.diffusionmodules.upscaling.";

/// `(role, module prefix, class name, entry)`.
const TABLE: &[(Role, &str, &str, Entry)] = &[
    (R::Model, DDPM, "LatentDiffusion", Known(C::LatentDiffusion)),
    // The original's Layout2ImgDiffusion only adds image logging to LatentDiffusion.
    (R::Model, DDPM, "Layout2ImgDiffusion", Known(C::LatentDiffusion)),
    (R::Model, DDPM, "LatentInpaintDiffusion", Known(C::LatentInpaintDiffusion)),
    (R::Model, DDPM, "LatentUpscaleDiffusion", Known(C::LatentUpscaleDiffusion)),
    (R::Model, DDPM, "DDPM", Unsupported("pixel-space DDPM without a first stage is not supported yet (a pixel-space model can be described as LatentDiffusion with IdentityFirstStage)")),
    (R::Model, DDPM, "LatentUpscaleFinetuneDiffusion", Unsupported("the fine-tuned upscaler (low-res image concatenation with patch reshuffling) is not supported yet")),
    (R::Model, DDPM, "LatentFinetuneDiffusion", Unsupported("the abstract fine-tuning base class is not a model of its own")),
    (R::Model, DDPM, "LatentDepth2ImageDiffusion", Unsupported("depth-conditioned SD 2 (MiDaS depth stage) is not supported yet")),
    (R::Model, DDPM, "LatentDepth4ImageDiffusion", Unsupported("depth-conditioned SD 2 (MiDaS depth stage) is not supported yet")),
    (R::Model, DDPM, "ImageEmbeddingConditionedLatentDiffusion", Unsupported("stable unCLIP (CLIP image-embedding conditioning) is not supported yet")),
    (R::FirstStage, AE, "AutoencoderKL", Known(C::AutoencoderKl)),
    (R::FirstStage, AE, "VQModel", Known(C::VqModel)),
    (R::FirstStage, AE, "VQModelInterface", Known(C::VqModelInterface)),
    (R::FirstStage, AE, "IdentityFirstStage", Known(C::IdentityFirstStage)),
    (R::FirstStage, AE, "VQModelTorch", Unsupported("VQModelTorch is not supported yet")),
    (R::Unet, "ldm.modules.diffusionmodules.openaimodel.", "UNetModel", Known(C::UnetModel)),
    (R::CondStage, ENC, "FrozenCLIPEmbedder", Known(C::FrozenClipEmbedder)),
    (R::CondStage, ENC, "FrozenOpenCLIPEmbedder", Known(C::FrozenOpenClipEmbedder)),
    (R::CondStage, ENC, "BERTEmbedder", Known(C::BertEmbedder)),
    (R::CondStage, ENC, "TransformerEmbedder", Known(C::TransformerEmbedder)),
    (R::CondStage, ENC, "ClassEmbedder", Known(C::ClassEmbedder)),
    (R::CondStage, ENC, "SpatialRescaler", Known(C::SpatialRescaler)),
    (R::CondStage, "torch.nn.", "Identity", Known(C::TorchIdentity)),
    (R::CondStage, ENC, "IdentityEncoder", Known(C::TorchIdentity)),
    (R::CondStage, ENC, "FrozenT5Embedder", Unsupported("T5 text encoders are not supported yet")),
    (R::CondStage, ENC, "FrozenCLIPT5Encoder", Unsupported("T5 text encoders are not supported yet")),
    (R::CondStage, ENC, "FrozenCLIPTextEmbedder", Unsupported("the OpenAI-`clip` package text embedder is not supported yet")),
    (R::CondStage, ENC, "FrozenClipImageEmbedder", Unsupported("CLIP image embedders are not supported yet")),
    (R::CondStage, ENC, "ClipImageEmbedder", Unsupported("CLIP image embedders are not supported yet")),
    (R::CondStage, ENC, "FrozenOpenCLIPImageEmbedder", Unsupported("CLIP image embedders are not supported yet")),
    (R::LowScale, UPSCALING, "ImageConcatWithNoiseAugmentation", Known(C::ImageConcatWithNoiseAugmentation)),
    (R::LowScale, UPSCALING, "SimpleImageConcat", Known(C::SimpleImageConcat)),
];

/// The entry for `target` in `role`, if the table has one.
pub(crate) fn lookup(role: Role, target: &str) -> Option<Entry> {
    TABLE
        .iter()
        .find(|(r, module, class, _)| {
            *r == role
                && target
                    .strip_prefix(module)
                    .is_some_and(|rest| rest == *class)
        })
        .map(|(_, _, _, e)| *e)
}

/// The full class name of `class` in `role` (for messages).
pub(crate) fn name_of(role: Role, class: Target) -> String {
    TABLE
        .iter()
        .find(|(r, _, _, e)| *r == role && *e == Known(class))
        .map(|(_, module, name, _)| format!("{module}{name}"))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_known_class_has_a_name_in_its_role() {
        for (role, class) in [
            (R::Model, C::LatentDiffusion),
            (R::Model, C::LatentInpaintDiffusion),
            (R::Model, C::LatentUpscaleDiffusion),
            (R::FirstStage, C::AutoencoderKl),
            (R::FirstStage, C::VqModel),
            (R::FirstStage, C::VqModelInterface),
            (R::FirstStage, C::IdentityFirstStage),
            (R::Unet, C::UnetModel),
            (R::CondStage, C::ClassEmbedder),
            (R::LowScale, C::SimpleImageConcat),
        ] {
            let name = name_of(role, class);
            assert_eq!(lookup(role, &name), Some(Known(class)), "{name}");
        }
        assert_eq!(
            name_of(R::Model, C::LatentDiffusion),
            "ldm.models.diffusion.ddpm.LatentDiffusion"
        );
    }

    #[test]
    fn lookup_is_exact_and_per_role() {
        assert_eq!(
            lookup(R::Model, "ldm.models.autoencoder.AutoencoderKL"),
            None
        );
        assert_eq!(
            lookup(R::Model, "ldm.models.diffusion.ddpm.LatentDiffusionX"),
            None
        );
        assert_eq!(
            lookup(R::Model, "x.ldm.models.diffusion.ddpm.LatentDiffusion"),
            None
        );
        assert!(matches!(
            lookup(
                R::Model,
                "ldm.models.diffusion.ddpm.LatentDepth2ImageDiffusion"
            ),
            Some(Unsupported(_))
        ));
    }
}
