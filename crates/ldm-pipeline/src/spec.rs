//! What a checkpoint is: its family and the typed configs of its components. Built from the original YAML
//! (explicit `--config`, or `<stem>.yaml` beside the file as AUTOMATIC1111 does), a named preset, or a diffusers
//! folder's `config.json` files. Sizes come from configs and tensor shapes, never from constants in the pipeline.
use ldm_core::weights::WeightStore;
use ldm_models::autoencoder::{AttnType, AutoencoderKlConfig, DdConfig, VqModelConfig};
use ldm_models::cond::{ClassEmbedderConfig, LayoutConfig, ResizeMethod, SpatialRescalerConfig};
use ldm_models::original_config::{
    self as original, AttnType as OriginalAttnType, BetaSchedule as OriginalBeta, ClipLayer,
    DiffusionKind, LowScaleConfig, NoiseSchedule, NumClasses, OpenClipLayer, OriginalCondStage,
    OriginalConfig, OriginalDdConfig, OriginalFirstStage, OriginalTextEncoder, OriginalUnet,
    Parameterization,
};
use ldm_models::text::{Activation, TextConfig, TextLayout, TextOutput, XTransformerConfig};
use ldm_models::unet::UnetConfig;
use ldm_sampling::{BetaSchedule, PredictionType, SchedulerConfig};

use crate::error::{PipelineError, Result};

/// Model families ldm-rs recognises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// SD 1.x: OpenAI CLIP ViT-L text encoder (HF layout), last hidden state.
    Sd1,
    /// SD 2.x: OpenCLIP ViT-H text tower, penultimate layer.
    Sd2,
    /// An original CompVis latent-diffusion model (Rombach et al. 2022): unconditional, class-conditional,
    /// LDM-BERT text, layout, semantic, super-resolution or inpainting.
    Ldm,
}

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Family::Sd1 => "SD 1.x",
            Family::Sd2 => "SD 2.x",
            Family::Ldm => "LDM",
        }
    }
}

pub const UNET_PREFIX: &str = "model.diffusion_model";
pub const VAE_PREFIX: &str = "first_stage_model";
pub const CLIP_PREFIX: &str = "cond_stage_model.transformer.text_model";
pub const OPEN_CLIP_PREFIX: &str = "cond_stage_model.model";
/// The cond stage's root: `ClassEmbedder`, `SpatialRescaler`, and (under `.transformer`) LDM-BERT.
pub const COND_PREFIX: &str = "cond_stage_model";
pub const X_TRANSFORMER_PREFIX: &str = "cond_stage_model.transformer";

/// The first stage E/D.
#[derive(Debug, Clone, PartialEq)]
pub enum FirstStageSpec {
    Kl(AutoencoderKlConfig),
    Vq(VqModelConfig),
    /// Pixel space (f = 1, the paper's LDM-1).
    Identity {
        channels: usize,
    },
}

impl FirstStageSpec {
    pub fn factor(&self) -> usize {
        match self {
            Self::Kl(c) => c.ddconfig.downsample_factor(),
            Self::Vq(c) => c.ddconfig.downsample_factor(),
            Self::Identity { .. } => 1,
        }
    }
    /// Channels of the images it encodes and decodes.
    pub fn image_channels(&self) -> usize {
        match self {
            Self::Kl(c) => c.ddconfig.in_channels,
            Self::Vq(c) => c.ddconfig.in_channels,
            Self::Identity { channels } => *channels,
        }
    }
    pub fn latent_channels(&self) -> usize {
        match self {
            Self::Kl(c) => c.embed_dim,
            Self::Vq(c) => c.embed_dim,
            Self::Identity { channels } => *channels,
        }
    }
    pub fn name(&self) -> &'static str {
        match self {
            Self::Kl(_) => "KL",
            Self::Vq(_) => "VQ",
            Self::Identity { .. } => "identity",
        }
    }
}

/// A text encoder and where its weights live.
#[derive(Debug, Clone, PartialEq)]
pub enum TextSpec {
    /// CLIP (SD 1.x) or OpenCLIP (SD 2.x) with the CLIP BPE tokenizer.
    Clip {
        config: TextConfig,
        layout: TextLayout,
        prefix: String,
    },
    /// The paper's transformer trained from scratch, on BERT WordPiece tokens (`BERTEmbedder`).
    Bert(XTransformerConfig),
}

/// What the UNet's cross-attention (or class embedding) is conditioned on.
#[derive(Debug, Clone, PartialEq)]
pub enum CondSpec {
    Text(TextSpec),
    /// `ClassEmbedder`: one context token per class label.
    Class(ClassEmbedderConfig),
    /// Layout boxes quantised into tokens and encoded by a `BERTEmbedder` without tokenizer.
    Layout {
        encoder: XTransformerConfig,
        builder: LayoutConfig,
    },
    /// Unconditional (or conditioned only by concatenation).
    None,
}

/// The x4 upscaler's noise augmentation of the low-res image (`ImageConcatWithNoiseAugmentation`).
#[derive(Debug, Clone, PartialEq)]
pub struct NoiseAugSpec {
    pub max_noise_level: usize,
    /// The low-res image's own DDPM schedule.
    pub schedule: SchedulerConfig,
}

/// How an inpainting UNet's concatenated channels are made, and in which order they follow the latent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InpaintConcat {
    /// Stable Diffusion inpainting (diffusers' `StableDiffusionInpaintPipeline`): [x_t; m; scale·z(masked
    /// image)], the mask m ∈ {0, 1} first, the masked image (repainted pixels 0, mid-grey) encoded by a posterior
    /// sample and scaled.
    Sd,
    /// The paper's own inpainting model (CompVis `models/ldm/inpainting_big`, `cond_stage_config:
    /// __is_first_stage__`, `scripts/inpaint.py`): [x_t; E(masked image); m], the masked image (repainted pixels
    /// −1, black) first, encoded deterministically by the first stage (VQ: the pre-quantisation latent, no
    /// scale), then the mask in {−1, 1} (the script maps every input from [0, 1] to [−1, 1]).
    Ldm,
}

impl InpaintConcat {
    /// Whether the mask channel comes before the masked-image latents.
    pub fn mask_first(self) -> bool {
        self == InpaintConcat::Sd
    }
}

/// Channels concatenated to the UNet's latent input.
#[derive(Debug, Clone, PartialEq)]
pub enum ConcatSpec {
    None,
    /// Mask (1 channel) and masked-image latents: SD and LDM inpainting (order and encoding per variant).
    Inpaint(InpaintConcat),
    /// A low-resolution image in pixels at the latent's size: LDM-SR (`torch.nn.Identity` cond stage) and the
    /// SD x4 upscaler (noise-augmented, the noise level as the UNet's class label).
    LowRes {
        noise_aug: Option<NoiseAugSpec>,
    },
    /// A one-hot semantic map through a `SpatialRescaler`.
    Semantic(SpatialRescalerConfig),
}

/// A checkpoint's family and component configs.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    pub family: Family,
    pub unet: UnetConfig,
    pub first_stage: FirstStageSpec,
    pub cond: CondSpec,
    pub concat: ConcatSpec,
    /// Latent scale factor (`scale_factor` / `scaling_factor`): z_unet = scale · z_first_stage.
    pub latent_scale: f64,
    /// The latent side the model was trained at (the original YAML's `image_size`), which sets the default
    /// output size (`sample_size · f`, as diffusers takes the UNet's `sample_size`); None: 64 latents.
    pub sample_size: Option<usize>,
    pub scheduler: SchedulerConfig,
}

impl ModelSpec {
    pub fn prediction(&self) -> PredictionType {
        self.scheduler.prediction_type
    }
    /// Whether the UNet takes mask + masked-image latents beside the noisy latent (inpainting models).
    pub fn is_inpainting(&self) -> bool {
        matches!(self.concat, ConcatSpec::Inpaint(_))
    }
    /// The inpainting variant, for inpainting models.
    pub fn inpaint_concat(&self) -> Option<InpaintConcat> {
        match self.concat {
            ConcatSpec::Inpaint(v) => Some(v),
            _ => None,
        }
    }
    /// The first stage's downsampling factor f.
    pub fn vae_factor(&self) -> usize {
        self.first_stage.factor()
    }
    /// Image sides must be multiples of this: f times the UNet's total downsampling.
    pub fn size_multiple(&self) -> usize {
        self.vae_factor() * self.unet.size_multiple()
    }
    pub fn latent_channels(&self) -> usize {
        self.unet.out_channels
    }
    /// The CLIP/OpenCLIP text encoder, if this model has one.
    pub fn clip(&self) -> Option<(&TextConfig, TextLayout, &str)> {
        match &self.cond {
            CondSpec::Text(TextSpec::Clip {
                config,
                layout,
                prefix,
            }) => Some((config, *layout, prefix.as_str())),
            _ => None,
        }
    }
    /// Whether prompts condition this model.
    pub fn takes_prompt(&self) -> bool {
        matches!(self.cond, CondSpec::Text(_))
    }
    /// What conditions the model, in words.
    pub fn conditioning(&self) -> String {
        let cond = match &self.cond {
            CondSpec::Text(TextSpec::Clip {
                layout: TextLayout::Hf,
                ..
            }) => "CLIP text".to_string(),
            CondSpec::Text(TextSpec::Clip { .. }) => "OpenCLIP text".to_string(),
            CondSpec::Text(TextSpec::Bert(_)) => "LDM-BERT text".to_string(),
            CondSpec::Class(c) => format!("class label (0..{})", c.n_classes),
            CondSpec::Layout { builder, .. } => format!(
                "layout ({} classes, up to {} boxes)",
                builder.no_object_classes, builder.no_max_objects
            ),
            CondSpec::None => "none".to_string(),
        };
        let concat = match &self.concat {
            ConcatSpec::None => "",
            ConcatSpec::Inpaint(_) => " + mask and masked image",
            ConcatSpec::LowRes { noise_aug: None } => " + low-res image",
            ConcatSpec::LowRes { noise_aug: Some(_) } => " + noise-augmented low-res image",
            ConcatSpec::Semantic(_) => " + semantic map",
        };
        format!("{cond}{concat}")
    }
    pub fn describe(&self) -> String {
        let pred = match self.prediction() {
            PredictionType::Epsilon => "eps",
            PredictionType::VPrediction => "v",
        };
        let kind = match &self.concat {
            ConcatSpec::Inpaint(_) => " inpainting",
            ConcatSpec::LowRes { .. } => " upscaler",
            ConcatSpec::Semantic(_) => " semantic synthesis",
            ConcatSpec::None => match &self.cond {
                CondSpec::Class(_) => " class-conditional",
                CondSpec::Layout { .. } => " layout-to-image",
                CondSpec::None => " unconditional",
                CondSpec::Text(_) => "",
            },
        };
        format!(
            "{}{kind}, {pred}-prediction, {}-f{} first stage",
            self.family.name(),
            self.first_stage.name(),
            self.vae_factor()
        )
    }
}

/// The family an original YAML describes, from its cond stage.
pub fn original_family(cfg: &OriginalConfig) -> Family {
    match cfg.text() {
        Some(OriginalTextEncoder::Clip { .. }) => Family::Sd1,
        Some(OriginalTextEncoder::OpenClip { .. }) => Family::Sd2,
        _ => Family::Ldm,
    }
}

/// Why an original LDM checkpoint cannot be opened without its YAML.
pub const LDM_NEEDS_CONFIG: &str = "an original latent-diffusion checkpoint without a CLIP/OpenCLIP text encoder; \
     its architecture is not in the weights: pass its config.yaml with --config, or put <name>.yaml beside it";

/// The family of a single file, from its keys: SD 1.x/2.x by their text encoders, [`Family::Ldm`] for any other
/// latent diffusion model (whose architecture only its YAML gives).
pub fn detect_family(store: &WeightStore) -> std::result::Result<Family, String> {
    if store.contains(&format!("{CLIP_PREFIX}.embeddings.token_embedding.weight")) {
        return Ok(Family::Sd1);
    }
    if store.contains(&format!("{OPEN_CLIP_PREFIX}.token_embedding.weight")) {
        return Ok(Family::Sd2);
    }
    if store
        .keys()
        .any(|k| k.starts_with("conditioner.embedders."))
    {
        return Err(
            "an SDXL checkpoint (conditioner.embedders.*), which ldm-rs does not support yet"
                .into(),
        );
    }
    if store
        .keys()
        .any(|k| k.starts_with("model.diffusion_model."))
    {
        return Ok(Family::Ldm);
    }
    let first: Vec<&str> = store.keys().take(3).collect();
    Err(format!(
        "no Stable Diffusion weights found (no model.diffusion_model.*; first keys: {first:?})"
    ))
}

fn text_config(
    store: &WeightStore,
    prefix: &str,
    layout: TextLayout,
    heads: Option<usize>,
    activation: Activation,
    output: TextOutput,
) -> Result<TextConfig> {
    let shape_of = |k: &str| store.shape(&format!("{prefix}.{k}")).map(|s| s.to_vec());
    TextConfig::infer(layout, shape_of, heads, activation, output)
        .map_err(|e| PipelineError::Model(format!("{}: {e}", store.origin())))
}

fn unet_in_channels(store: &WeightStore) -> Option<usize> {
    store
        .shape(&format!("{UNET_PREFIX}.input_blocks.0.0.weight"))
        .and_then(|s| s.get(1).copied())
}

impl ModelSpec {
    /// The preset of `family` (SD's published sizes), with the text encoder's sizes and the UNet's input
    /// channels read from the tensors. SD 2.x defaults to v-prediction, as diffusers' single-file loader does
    /// (the 768-v models are the common SD 2.x files); `--config v2-inference` selects ε for the 512 base models.
    pub fn preset(family: Family, store: &WeightStore) -> Result<Self> {
        let (mut unet, layout, prefix, activation, output) = match family {
            Family::Sd1 => (
                UnetConfig::sd_v1(),
                TextLayout::Hf,
                CLIP_PREFIX,
                Activation::QuickGelu,
                TextOutput::Last,
            ),
            Family::Sd2 => (
                UnetConfig::sd_v2(),
                TextLayout::OpenClip,
                OPEN_CLIP_PREFIX,
                Activation::Gelu,
                TextOutput::PENULTIMATE,
            ),
            Family::Ldm => {
                return Err(PipelineError::Model(format!(
                    "{}: original LDM checkpoints have no preset; pass their config.yaml",
                    store.origin()
                )))
            }
        };
        if let Some(c) = unet_in_channels(store) {
            unet.in_channels = c;
        }
        let text = text_config(store, prefix, layout, None, activation, output)?;
        let first_stage = FirstStageSpec::Kl(AutoencoderKlConfig::sd());
        let concat = inpaint_by_channels(&unet, first_stage.latent_channels());
        Ok(Self {
            family,
            unet,
            first_stage,
            cond: CondSpec::Text(TextSpec::Clip {
                config: text,
                layout,
                prefix: prefix.to_string(),
            }),
            concat,
            latent_scale: 0.18215,
            sample_size: None,
            scheduler: match family {
                Family::Sd2 => SchedulerConfig::sd_v_default(),
                _ => SchedulerConfig::sd_default(),
            },
        })
    }

    /// From an original inference YAML (any model of the LDM paper or SD 1.x/2.x).
    pub fn from_original(cfg: &OriginalConfig, store: &WeightStore, origin: &str) -> Result<Self> {
        let bad = |reason: String| PipelineError::Model(format!("config {origin}: {reason}"));
        let family = original_family(cfg);
        let unet = unet_from_original(&cfg.unet).map_err(bad)?;
        let first_stage = first_stage_from_original(&cfg.first_stage).map_err(bad)?;
        let latent_c = first_stage.latent_channels();
        let crossattn = cfg.conditioning_key.is_some_and(|k| k.uses_crossattn());
        let concat_key = cfg.conditioning_key.is_some_and(|k| k.uses_concat());
        let mut concat = ConcatSpec::None;
        let cond = match &cfg.cond_stage {
            OriginalCondStage::Unconditional => CondSpec::None,
            OriginalCondStage::Text(t) => {
                if !crossattn {
                    return Err(bad("a text cond stage without cross-attention".into()));
                }
                match t {
                    OriginalTextEncoder::Clip {
                        num_heads, layer, ..
                    } => {
                        let output = match layer {
                            ClipLayer::Last => TextOutput::Last,
                            ClipLayer::Hidden(i) if *i < 0 => {
                                TextOutput::SkipLast((-*i - 1) as usize)
                            }
                            other => {
                                return Err(bad(format!("CLIP layer {other:?} is not supported")))
                            }
                        };
                        let config = text_config(
                            store,
                            CLIP_PREFIX,
                            TextLayout::Hf,
                            *num_heads,
                            Activation::QuickGelu,
                            output,
                        )?;
                        CondSpec::Text(TextSpec::Clip {
                            config,
                            layout: TextLayout::Hf,
                            prefix: CLIP_PREFIX.into(),
                        })
                    }
                    OriginalTextEncoder::OpenClip {
                        layer, num_heads, ..
                    } => {
                        let output = match layer {
                            OpenClipLayer::Last => TextOutput::Last,
                            OpenClipLayer::Penultimate => TextOutput::PENULTIMATE,
                        };
                        let config = text_config(
                            store,
                            OPEN_CLIP_PREFIX,
                            TextLayout::OpenClip,
                            *num_heads,
                            Activation::Gelu,
                            output,
                        )?;
                        CondSpec::Text(TextSpec::Clip {
                            config,
                            layout: TextLayout::OpenClip,
                            prefix: OPEN_CLIP_PREFIX.into(),
                        })
                    }
                    OriginalTextEncoder::Bert(b) => {
                        let encoder = x_transformer_config(store).or_else(|e| {
                            // A model about to be trained from scratch has no weights yet: the YAML's
                            // parameters and the paper's defaults describe it.
                            if store.keys_under(X_TRANSFORMER_PREFIX).next().is_none() {
                                Ok(XTransformerConfig::paper(
                                    b.vocab_size,
                                    b.max_seq_len,
                                    b.n_embed,
                                    b.n_layer,
                                ))
                            } else {
                                Err(e)
                            }
                        })?;
                        check_x(&encoder, b.n_embed, b.n_layer, b.vocab_size, b.max_seq_len)
                            .map_err(bad)?;
                        if b.use_tokenizer {
                            CondSpec::Text(TextSpec::Bert(encoder))
                        } else {
                            let builder = layout_builder(b, cfg).map_err(bad)?;
                            CondSpec::Layout { encoder, builder }
                        }
                    }
                    OriginalTextEncoder::Transformer(t) => {
                        let encoder = x_transformer_config(store)?;
                        check_x(&encoder, t.n_embed, t.n_layer, t.vocab_size, t.max_seq_len)
                            .map_err(bad)?;
                        return Err(bad(
                            "a TransformerEmbedder cond stage (token ids from a data pipeline ldm-rs does not know)"
                                .into(),
                        ));
                    }
                }
            }
            OriginalCondStage::Class(c) => {
                if !crossattn {
                    return Err(bad("a ClassEmbedder without cross-attention".into()));
                }
                let mut class = ClassEmbedderConfig::from_original(Some(c.n_classes), c.embed_dim);
                if c.ucg_rate > 0.0 {
                    // Trained with label dropout: the last row is the null class.
                    class.null_class = Some(c.n_classes.checked_sub(1).ok_or_else(|| {
                        bad("a ClassEmbedder with ucg_rate > 0 needs a null-class row".into())
                    })?);
                }
                CondSpec::Class(class)
            }
            OriginalCondStage::SpatialRescaler(r) => {
                if !concat_key {
                    return Err(bad(
                        "a SpatialRescaler cond stage without concatenation".into()
                    ));
                }
                concat = ConcatSpec::Semantic(rescaler_from_original(r));
                CondSpec::None
            }
            OriginalCondStage::Identity => {
                if !concat_key {
                    return Err(bad("an identity cond stage without concatenation".into()));
                }
                concat = ConcatSpec::LowRes { noise_aug: None };
                CondSpec::None
            }
            OriginalCondStage::FirstStage => {
                // The paper's inpainting model: the masked image encoded by the first stage and the mask,
                // concatenated (latent + latent + 1 input channels).
                if !concat_key || crossattn {
                    return Err(bad(
                        "a `__is_first_stage__` cond stage is supported for concatenation (inpainting) only".into(),
                    ));
                }
                if unet.in_channels != 2 * latent_c + 1 {
                    return Err(bad(format!(
                        "a `__is_first_stage__` concat model must be an inpainting model with 2 × {latent_c} + 1 \
                         UNet input channels (latent, masked-image latent, mask); this UNet takes {}",
                        unet.in_channels
                    )));
                }
                concat = ConcatSpec::Inpaint(InpaintConcat::Ldm);
                CondSpec::None
            }
        };
        match &cfg.kind {
            DiffusionKind::Latent => {}
            DiffusionKind::Inpaint { .. } => concat = ConcatSpec::Inpaint(InpaintConcat::Sd),
            DiffusionKind::Upscale { low_scale, .. } => {
                let noise_aug = match low_scale {
                    LowScaleConfig::NoiseAugmentation {
                        max_noise_level,
                        schedule,
                    } => Some(NoiseAugSpec {
                        max_noise_level: *max_noise_level,
                        schedule: scheduler_from_schedule(schedule, PredictionType::Epsilon)
                            .map_err(bad)?,
                    }),
                    LowScaleConfig::Simple => None,
                };
                concat = ConcatSpec::LowRes { noise_aug };
            }
        }
        if concat == ConcatSpec::None
            && concat_key
            && inpaint_by_channels(&unet, latent_c) == ConcatSpec::Inpaint(InpaintConcat::Sd)
        {
            concat = ConcatSpec::Inpaint(InpaintConcat::Sd);
        }
        let prediction = match cfg.parameterization {
            Parameterization::Eps => PredictionType::Epsilon,
            Parameterization::V => PredictionType::VPrediction,
            Parameterization::X0 => {
                return Err(bad(
                    "x0-parameterised models (`parameterization: x0`) are not supported yet".into(),
                ))
            }
        };
        let scheduler = scheduler_from_schedule(&cfg.schedule(), prediction).map_err(bad)?;
        // `scale_by_std` models store the scale they computed in training as a buffer.
        let latent_scale = if cfg.scale_by_std {
            scalar(store, "scale_factor").unwrap_or(cfg.scale_factor)
        } else {
            cfg.scale_factor
        };
        let spec = Self {
            family,
            unet,
            first_stage,
            cond,
            concat,
            latent_scale,
            sample_size: Some(cfg.image_size),
            scheduler,
        };
        spec.check_channels().map_err(bad)?;
        Ok(spec)
    }

    /// The UNet's input channels must be the latent's plus what is concatenated.
    fn check_channels(&self) -> std::result::Result<(), String> {
        let latent = self.first_stage.latent_channels();
        if self.unet.out_channels != latent {
            return Err(format!(
                "the UNet outputs {} channels but the first stage's latent has {latent}",
                self.unet.out_channels
            ));
        }
        let extra = match &self.concat {
            ConcatSpec::None => 0,
            ConcatSpec::Inpaint(_) => latent + 1,
            ConcatSpec::LowRes { .. } => self.unet.in_channels.saturating_sub(latent),
            ConcatSpec::Semantic(r) => r.out_channels.unwrap_or(r.in_channels),
        };
        if self.unet.in_channels != latent + extra {
            return Err(format!(
                "the UNet takes {} input channels, but latent ({latent}) + concatenated ({extra}) make {}",
                self.unet.in_channels,
                latent + extra
            ));
        }
        Ok(())
    }
}

fn inpaint_by_channels(unet: &UnetConfig, latent: usize) -> ConcatSpec {
    if unet.in_channels == unet.out_channels + latent + 1 {
        ConcatSpec::Inpaint(InpaintConcat::Sd)
    } else {
        ConcatSpec::None
    }
}

fn scalar(store: &WeightStore, key: &str) -> Option<f64> {
    let t = store
        .load(key, candle_core::DType::F64, &candle_core::Device::Cpu)
        .ok()?;
    t.flatten_all()
        .ok()?
        .to_vec1::<f64>()
        .ok()?
        .first()
        .copied()
}

/// The original's β schedule as a scheduler config for diffusers-equivalent samplers.
fn scheduler_from_schedule(
    s: &NoiseSchedule,
    prediction: PredictionType,
) -> std::result::Result<SchedulerConfig, String> {
    let beta_schedule = match s.beta_schedule {
        OriginalBeta::Linear => BetaSchedule::ScaledLinear,
        OriginalBeta::Cosine if (s.cosine_s - 8e-3).abs() < 1e-12 => BetaSchedule::SquaredcosCapV2,
        other => return Err(format!("beta_schedule {other:?} is not supported yet")),
    };
    Ok(SchedulerConfig {
        num_train_timesteps: s.timesteps,
        beta_start: Some(s.linear_start),
        beta_end: Some(s.linear_end),
        beta_schedule,
        prediction_type: prediction,
        ..SchedulerConfig::sd_default()
    })
}

fn unet_from_original(u: &OriginalUnet) -> std::result::Result<UnetConfig, String> {
    if u.dims != 2 {
        return Err(format!(
            "unet_config: dims {} (only 2-D UNets exist in LDM)",
            u.dims
        ));
    }
    if u.n_embed.is_some() || u.adm_in_channels.is_some() {
        return Err("unet_config: n_embed/adm_in_channels models are not supported".into());
    }
    let num_res_blocks = u.uniform_res_blocks().ok_or_else(|| {
        format!(
            "unet_config: per-level num_res_blocks {:?}",
            u.num_res_blocks
        )
    })?;
    let context_dim = if u.use_spatial_transformer {
        Some(u.single_context_dim().ok_or_else(|| {
            "unet_config: a spatial transformer needs one context_dim".to_string()
        })?)
    } else {
        None
    };
    let num_classes = match &u.num_classes {
        None => None,
        Some(NumClasses::Count(n)) => Some(*n),
        Some(other) => {
            return Err(format!(
                "unet_config: num_classes {other:?} is not supported"
            ))
        }
    };
    let cfg = UnetConfig {
        in_channels: u.in_channels,
        out_channels: u.out_channels,
        model_channels: u.model_channels,
        channel_mult: u.channel_mult.clone(),
        num_res_blocks,
        attention_levels: u.attention_levels(),
        heads: u.heads,
        transformer_depth: u.transformer_depth,
        context_dim,
        use_linear_in_transformer: u.use_linear_in_transformer,
        num_groups: 32,
        use_new_attention_order: u.use_new_attention_order,
        use_scale_shift_norm: u.use_scale_shift_norm,
        resblock_updown: u.resblock_updown,
        conv_resample: u.conv_resample,
        num_classes,
        disable_self_attentions: u.disable_self_attentions.clone(),
        disable_middle_self_attn: u.disable_middle_self_attn,
        num_attention_blocks: u.num_attention_blocks.clone(),
    };
    cfg.validate().map_err(|e| e.to_string())?;
    Ok(cfg)
}

fn ddconfig_from_original(d: &OriginalDdConfig) -> std::result::Result<DdConfig, String> {
    if !d.resamp_with_conv || d.tanh_out || d.give_pre_end {
        return Err("first_stage_config: resamp_with_conv false / tanh_out / give_pre_end are not supported".into());
    }
    let attn_type = match d.attn_type {
        OriginalAttnType::Vanilla => AttnType::Vanilla,
        OriginalAttnType::None => AttnType::None,
        OriginalAttnType::Linear => {
            return Err("first_stage_config: attn_type `linear` is not supported yet".into())
        }
    };
    Ok(DdConfig {
        ch: d.ch,
        out_ch: d.out_ch,
        ch_mult: d.ch_mult.clone(),
        num_res_blocks: d.num_res_blocks,
        attn_resolutions: d.attn_resolutions.clone(),
        in_channels: d.in_channels,
        resolution: d.resolution,
        z_channels: d.z_channels,
        double_z: d.double_z,
        num_groups: 32,
        attn_type,
    })
}

pub fn first_stage_from_original(
    f: &OriginalFirstStage,
) -> std::result::Result<FirstStageSpec, String> {
    Ok(match f {
        OriginalFirstStage::Kl(kl) => FirstStageSpec::Kl(AutoencoderKlConfig {
            embed_dim: kl.embed_dim,
            ddconfig: ddconfig_from_original(&kl.ddconfig)?,
        }),
        OriginalFirstStage::Vq(vq) => {
            if vq.remap.is_some() {
                return Err("first_stage_config: VQ codebook `remap` is not supported yet".into());
            }
            if !vq.interface {
                return Err(
                    "first_stage_config: a plain VQModel (quantising in encode) as first stage; LDMs use VQModelInterface"
                        .into(),
                );
            }
            FirstStageSpec::Vq(VqModelConfig {
                embed_dim: vq.embed_dim,
                n_embed: vq.n_embed,
                ddconfig: ddconfig_from_original(&vq.ddconfig)?,
            })
        }
        OriginalFirstStage::Identity => FirstStageSpec::Identity { channels: 3 },
    })
}

fn rescaler_from_original(r: &original::SpatialRescaler) -> SpatialRescalerConfig {
    use original::InterpolationMethod as M;
    SpatialRescalerConfig {
        n_stages: r.n_stages,
        method: match r.method {
            M::Nearest => ResizeMethod::Nearest,
            M::Linear => ResizeMethod::Linear,
            M::Bilinear => ResizeMethod::Bilinear,
            M::Trilinear => ResizeMethod::Trilinear,
            M::Bicubic => ResizeMethod::Bicubic,
            M::Area => ResizeMethod::Area,
        },
        multiplier: r.multiplier,
        in_channels: r.in_channels,
        out_channels: r.out_channels,
        bias: r.bias,
    }
}

fn x_transformer_config(store: &WeightStore) -> Result<XTransformerConfig> {
    let shape_of = |k: &str| {
        store
            .shape(&format!("{X_TRANSFORMER_PREFIX}.{k}"))
            .map(|s| s.to_vec())
    };
    XTransformerConfig::infer(shape_of, None)
        .map_err(|e| PipelineError::Model(format!("{}: {e}", store.origin())))
}

fn check_x(
    x: &XTransformerConfig,
    n_embed: usize,
    n_layer: usize,
    vocab: usize,
    max_len: usize,
) -> std::result::Result<(), String> {
    let config = (n_embed, n_layer, vocab, max_len);
    let weights = (x.dim, x.depth, x.vocab_size, x.max_seq_len);
    if config != weights {
        return Err(format!(
            "cond_stage_config says (n_embed, n_layer, vocab_size, max_seq_len) = {config:?}, the weights {weights:?}"
        ));
    }
    Ok(())
}

/// The layout tokeniser of a `BERTEmbedder(use_tokenizer=False)` layout model: the token count is the
/// encoder's vocabulary, the object count follows from the sequence length (2 crop tokens + 3 per object),
/// the number of object classes comes from the ldm-rs extension key `cond_stage_config.params.no_object_classes`
/// (default 601, Open Images' boxable classes, which the released layout2img-openimages256 model uses).
fn layout_builder(
    b: &original::BertEmbedder,
    _cfg: &OriginalConfig,
) -> std::result::Result<LayoutConfig, String> {
    let classes = b.no_object_classes.unwrap_or(601);
    let mut layout = LayoutConfig::openimages_layout2img(classes);
    layout.no_tokens = b.vocab_size;
    if let Some(extra) = b.use_additional_parameters {
        layout.use_additional_parameters = extra;
    }
    if b.max_seq_len < 2 || !(b.max_seq_len - 2).is_multiple_of(3) {
        return Err(format!(
            "a layout encoder's max_seq_len {} is not 2 crop tokens + 3 per object",
            b.max_seq_len
        ));
    }
    layout.no_max_objects = (b.max_seq_len - 2) / 3;
    Ok(layout)
}

/// Keys of real single files that no inference component reads: the DDPM schedule buffers (recomputed from the
/// config), EMA copies, and text-model parts outside the used layers.
pub fn ignorable_single_file_key(spec: &ModelSpec, key: &str) -> bool {
    const SCHEDULE_BUFFERS: &[&str] = &[
        "betas",
        "alphas_cumprod",
        "alphas_cumprod_prev",
        "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod",
        "log_one_minus_alphas_cumprod",
        "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod",
        "posterior_variance",
        "posterior_log_variance_clipped",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
        "logvar",
    ];
    if SCHEDULE_BUFFERS.contains(&key)
        || key.starts_with("model_ema.")
        || key.starts_with("first_stage_model.loss.")
    {
        return true;
    }
    // `__is_first_stage__`: the original registers the first stage a second time as `cond_stage_model`, so
    // its checkpoints hold every first-stage tensor twice; the first stage is built from `first_stage_model.*`.
    if spec.inpaint_concat() == Some(InpaintConcat::Ldm) && key.starts_with("cond_stage_model.") {
        return true;
    }
    if SCHEDULE_BUFFERS.contains(&key)
        || key == "scale_factor"
        || key.starts_with("first_stage_model.quantize.used")
        || key.starts_with("cond_stage_model.transformer.to_logits.")
        || key.starts_with("model.diffusion_model.") && key.ends_with("_ema")
    {
        return true;
    }
    let Some((text, layout, prefix)) = spec.clip() else {
        return false;
    };
    let Some(rest) = key.strip_prefix(&format!("{prefix}.")) else {
        return false;
    };
    match layout {
        TextLayout::Hf => rest == "embeddings.position_ids",
        TextLayout::OpenClip => {
            if rest == "text_projection" || rest == "logit_scale" || rest == "attn_mask" {
                return true;
            }
            // Blocks past the ones the configured output runs.
            let active = text.active_layers();
            rest.strip_prefix("transformer.resblocks.")
                .and_then(|r| r.split('.').next())
                .and_then(|n| n.parse::<usize>().ok())
                .is_some_and(|n| n >= active)
        }
    }
}
