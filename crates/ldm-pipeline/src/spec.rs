//! What a checkpoint is: its family and the typed configs of its components. Built from the original YAML
//! (explicit `--config`, or `<stem>.yaml` beside the file as AUTOMATIC1111 does), a named preset, or a diffusers
//! folder's `config.json` files. Sizes come from configs and tensor shapes, never from constants in the pipeline.
use ldm_core::weights::WeightStore;
use ldm_models::autoencoder::{AutoencoderKlConfig, DdConfig};
use ldm_models::original_config::{
    self as original, OpenClipLayer, OriginalConfig, OriginalFirstStage, OriginalTextEncoder,
    Parameterization,
};
use ldm_models::text::{Activation, TextConfig, TextLayout, TextOutput};
use ldm_models::unet::UnetConfig;
use ldm_sampling::{BetaSchedule, PredictionType, SchedulerConfig};

use crate::error::{PipelineError, Result};

/// Stable Diffusion generations ldm-rs recognises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// SD 1.x: OpenAI CLIP ViT-L text encoder (HF layout), last hidden state.
    Sd1,
    /// SD 2.x: OpenCLIP ViT-H text tower, penultimate layer.
    Sd2,
}

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Family::Sd1 => "SD 1.x",
            Family::Sd2 => "SD 2.x",
        }
    }
}

pub const UNET_PREFIX: &str = "model.diffusion_model";
pub const VAE_PREFIX: &str = "first_stage_model";
pub const CLIP_PREFIX: &str = "cond_stage_model.transformer.text_model";
pub const OPEN_CLIP_PREFIX: &str = "cond_stage_model.model";

/// A checkpoint's family and component configs.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    pub family: Family,
    pub unet: UnetConfig,
    pub vae: AutoencoderKlConfig,
    pub text: TextConfig,
    pub text_layout: TextLayout,
    /// Latent scale factor (`scale_factor` / `scaling_factor`): z_unet = scale · z_vae.
    pub latent_scale: f64,
    pub scheduler: SchedulerConfig,
    /// Where the text encoder's weights live in the canonical key tree.
    pub text_prefix: String,
}

impl ModelSpec {
    pub fn prediction(&self) -> PredictionType {
        self.scheduler.prediction_type
    }
    /// Whether the UNet takes mask + masked-image latents beside the noisy latent (9-channel inpainting).
    pub fn is_inpainting(&self) -> bool {
        self.unet.in_channels == self.unet.out_channels + self.vae.embed_dim + 1
    }
    /// The first stage's downsampling factor f.
    pub fn vae_factor(&self) -> usize {
        self.vae.ddconfig.downsample_factor()
    }
    /// Image sides must be multiples of this: f times the UNet's total downsampling.
    pub fn size_multiple(&self) -> usize {
        self.vae_factor() * self.unet.size_multiple()
    }
    pub fn latent_channels(&self) -> usize {
        self.unet.out_channels
    }
    pub fn describe(&self) -> String {
        let pred = match self.prediction() {
            PredictionType::Epsilon => "eps",
            PredictionType::VPrediction => "v",
        };
        let kind = if self.is_inpainting() {
            " inpainting"
        } else {
            ""
        };
        format!("{}{kind}, {pred}-prediction", self.family.name())
    }
}

/// The family an original YAML describes, from its text encoder.
pub fn original_family(cfg: &OriginalConfig) -> Option<Family> {
    match cfg.text() {
        Some(OriginalTextEncoder::Clip { .. }) => Some(Family::Sd1),
        Some(OriginalTextEncoder::OpenClip { .. }) => Some(Family::Sd2),
        _ => None,
    }
}

/// The family of a single file, from its keys.
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
        return Err("a latent diffusion model without a known text encoder (no cond_stage_model.transformer.text_model.* \
                    or cond_stage_model.model.*)"
            .into());
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
        };
        if let Some(c) = unet_in_channels(store) {
            unet.in_channels = c;
        }
        let text = text_config(store, prefix, layout, None, activation, output)?;
        Ok(Self {
            family,
            unet,
            vae: AutoencoderKlConfig::sd(),
            text,
            text_layout: layout,
            latent_scale: 0.18215,
            scheduler: match family {
                Family::Sd1 => SchedulerConfig::sd_default(),
                Family::Sd2 => SchedulerConfig::sd_v_default(),
            },
            text_prefix: prefix.to_string(),
        })
    }

    /// From an original inference YAML.
    pub fn from_original(cfg: &OriginalConfig, store: &WeightStore, origin: &str) -> Result<Self> {
        let bad = |reason: String| PipelineError::Model(format!("config {origin}: {reason}"));
        if let original::DiffusionKind::Upscale { .. } = cfg.kind {
            return Err(bad(format!(
                "`{}` is not wired into the pipeline yet",
                cfg.kind.target()
            )));
        }
        let u = &cfg.unet;
        let heads = u.heads;
        let attention_levels = UnetConfig::attention_levels_from_resolutions(
            &u.attention_resolutions,
            u.channel_mult.len(),
        )
        .map_err(|e| bad(e.to_string()))?;
        let unet = UnetConfig {
            in_channels: u.in_channels,
            out_channels: u.out_channels,
            model_channels: u.model_channels,
            channel_mult: u.channel_mult.clone(),
            num_res_blocks: u
                .uniform_res_blocks()
                .ok_or_else(|| bad("per-level num_res_blocks are not supported yet".into()))?,
            attention_levels,
            heads,
            transformer_depth: u.transformer_depth,
            context_dim: Some(
                u.single_context_dim()
                    .ok_or_else(|| bad("unet_config has no single context_dim".into()))?,
            ),
            use_linear_in_transformer: u.use_linear_in_transformer,
            num_groups: 32,
            ..UnetConfig::sd_v1()
        };
        unet.validate().map_err(|e| bad(e.to_string()))?;
        let (embed_dim, f) = match &cfg.first_stage {
            OriginalFirstStage::Kl(kl) => (kl.embed_dim, &kl.ddconfig),
            other => {
                let target = other.target();
                return Err(bad(format!(
                    "first stage `{target}` is not supported here yet"
                )));
            }
        };
        let vae = AutoencoderKlConfig {
            embed_dim,
            ddconfig: DdConfig {
                ch: f.ch,
                out_ch: f.out_ch,
                ch_mult: f.ch_mult.clone(),
                num_res_blocks: f.num_res_blocks,
                attn_resolutions: f.attn_resolutions.clone(),
                in_channels: f.in_channels,
                resolution: f.resolution,
                z_channels: f.z_channels,
                double_z: f.double_z,
                num_groups: 32,
                attn_type: Default::default(),
            },
        };
        let (family, layout, prefix, activation, output, heads) = match cfg.text() {
            Some(OriginalTextEncoder::Clip { num_heads, .. }) => (
                Family::Sd1,
                TextLayout::Hf,
                CLIP_PREFIX,
                Activation::QuickGelu,
                TextOutput::Last,
                *num_heads,
            ),
            Some(OriginalTextEncoder::OpenClip {
                layer, num_heads, ..
            }) => {
                let output = match layer {
                    OpenClipLayer::Last => TextOutput::Last,
                    OpenClipLayer::Penultimate => TextOutput::PENULTIMATE,
                };
                (
                    Family::Sd2,
                    TextLayout::OpenClip,
                    OPEN_CLIP_PREFIX,
                    Activation::Gelu,
                    output,
                    *num_heads,
                )
            }
            _ => {
                return Err(bad(
                    "no CLIP/OpenCLIP cond_stage_config: ldm-rs's txt2img needs one".into(),
                ))
            }
        };
        let text = text_config(store, prefix, layout, heads, activation, output)?;
        if cfg.beta_schedule != original::BetaSchedule::Linear {
            return Err(bad(format!(
                "beta_schedule {:?} is not supported yet",
                cfg.beta_schedule
            )));
        }
        let scheduler = SchedulerConfig {
            num_train_timesteps: cfg.timesteps,
            beta_start: Some(cfg.linear_start),
            beta_end: Some(cfg.linear_end),
            beta_schedule: BetaSchedule::ScaledLinear,
            prediction_type: match cfg.parameterization {
                Parameterization::Eps => PredictionType::Epsilon,
                Parameterization::V => PredictionType::VPrediction,
                Parameterization::X0 => {
                    return Err(bad("x0-parameterization is not supported yet".into()))
                }
            },
            ..SchedulerConfig::sd_default()
        };
        Ok(Self {
            family,
            unet,
            vae,
            text,
            text_layout: layout,
            latent_scale: cfg.scale_factor,
            scheduler,
            text_prefix: prefix.to_string(),
        })
    }
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
    let Some(rest) = key.strip_prefix(&format!("{}.", spec.text_prefix)) else {
        return false;
    };
    match spec.text_layout {
        TextLayout::Hf => rest == "embeddings.position_ids",
        TextLayout::OpenClip => {
            if rest == "text_projection" || rest == "logit_scale" || rest == "attn_mask" {
                return true;
            }
            // Blocks past the ones the configured output runs.
            let active = spec.text.active_layers();
            rest.strip_prefix("transformer.resblocks.")
                .and_then(|r| r.split('.').next())
                .and_then(|n| n.parse::<usize>().ok())
                .is_some_and(|n| n >= active)
        }
    }
}
