//! The original CompVis / Stability YAML configs (`configs/latent-diffusion/*.yaml`, `models/ldm/*/config.yaml`,
//! `configs/autoencoder/*.yaml`, `models/first_stage_models/*/config.yaml`, `v1-inference.yaml`, the SD 2 configs),
//! read as typed data.
//!
//! The original builds its models with `instantiate_from_config`, importing whatever class a `target:` string
//! names. Here a target is only looked up in a fixed table (`targets.rs`) that maps each known class name to a
//! Rust type; an unknown target is an error naming it and its section, and classes that exist in the original
//! but are not described yet (depth-to-image, unCLIP, ...) say so. Nothing here builds a model.
//!
//! | YAML section (under `model.params`)  | here                                           |
//! |--------------------------------------|------------------------------------------------|
//! | `model.target`                       | [`DiffusionKind`] (or a standalone [`OriginalFirstStage`]) |
//! | `linear_start`, `linear_end`, `timesteps`, `beta_schedule`, `parameterization`, `loss_type` | fields of [`OriginalConfig`] |
//! | `conditioning_key`, `concat_mode`, `cond_stage_config` | [`ConditioningKey`], resolved as the original does |
//! | `unet_config`                        | [`OriginalUnet`]                               |
//! | `first_stage_config`                 | [`OriginalFirstStage`]                         |
//! | `cond_stage_config`                  | [`OriginalCondStage`]                          |
//! | `low_scale_config` (x4 upscaler)     | [`LowScaleConfig`]                             |
//! | `lossconfig`, `scheduler_config`, `data`, `lightning`, logging keys | not read |
//!
//! Keys that no field reads and that are not known to be harmless (training, logging, checkpointing) are listed
//! in `ignored_keys` for the caller to log.
use std::path::Path;

use yaml_rust2::Yaml;

mod cond_stage;
mod first_stage;
mod targets;
mod unet;
mod yaml;

pub use cond_stage::{
    BertEmbedder, ClassEmbedder, ClipLayer, InterpolationMethod, OpenClipLayer, OriginalCondStage,
    OriginalTextEncoder, SpatialRescaler, TransformerEmbedder,
};
pub use first_stage::{AttnType, KlFirstStage, OriginalDdConfig, OriginalFirstStage, VqFirstStage};
pub use unet::{ContextDim, NumClasses, OriginalUnet};

use targets::{Entry, Role, Target};
use yaml::{Params, Parsed};

/// What is wrong with a config, naming the section (a dotted path such as `model.params.first_stage_config`) and
/// the key.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Problem {
    #[error("not valid YAML: {0}")]
    Yaml(String),
    #[error("{section}: unknown target `{target}`")]
    UnknownTarget { section: String, target: String },
    #[error("{section}: `{target}` is not supported: {reason}")]
    Unsupported {
        section: String,
        target: String,
        reason: &'static str,
    },
    #[error("{section}: missing `{key}`")]
    Missing { section: String, key: String },
    #[error("{section}: `{key}` must be {expected}, found {found}")]
    Type {
        section: String,
        key: String,
        expected: &'static str,
        found: String,
    },
    #[error("{section}: `{key}` = {value}: {reason}")]
    Value {
        section: String,
        key: String,
        value: String,
        reason: String,
    },
    #[error("describes a first stage alone (`{target}`), not a diffusion model")]
    FirstStageOnly { target: String },
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("config {origin}: {problem}")]
    Invalid { origin: String, problem: Problem },
}

impl ConfigError {
    /// The problem, for configs that were read.
    pub fn problem(&self) -> Option<&Problem> {
        match self {
            ConfigError::Invalid { problem, .. } => Some(problem),
            ConfigError::Read { .. } => None,
        }
    }
}

pub type Result<T> = std::result::Result<T, ConfigError>;

/// `parameterization`: what the UNet predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parameterization {
    /// The noise ε (default).
    Eps,
    /// The clean sample x₀ (some early LDM experiments).
    X0,
    /// v = √ᾱ·ε − √(1−ᾱ)·x₀ (SD 2 768-v, the x4 upscaler).
    V,
}

/// `loss_type`: the norm of the DDPM training loss (`DDPM.get_loss`), averaged over every element.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LossType {
    /// Mean squared error (default).
    #[default]
    L2,
    /// Mean absolute error (the paper's inpainting model, `models/ldm/inpainting_big`).
    L1,
}

/// `beta_schedule` of `make_beta_schedule`, under the original names. Beware: the original `linear` is linear in
/// √β (diffusers' `scaled_linear`), and `sqrt_linear` is linear in β (diffusers' `linear`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BetaSchedule {
    /// β_t = (√start + t/(T−1)·(√end − √start))², the default and the one every released LDM/SD uses.
    Linear,
    /// β_t = start + t/(T−1)·(end − start).
    SqrtLinear,
    /// β_t = (start + t/(T−1)·(end − start))^0.5.
    Sqrt,
    /// Nichol & Dhariwal's cosine schedule with offset `cosine_s`.
    Cosine,
    SquaredCosCapV2,
}

/// The DDPM noise schedule.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NoiseSchedule {
    pub beta_schedule: BetaSchedule,
    pub timesteps: usize,
    pub linear_start: f64,
    pub linear_end: f64,
    pub cosine_s: f64,
}

/// How the conditioning enters the UNet (`DiffusionWrapper`'s `conditioning_key`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConditioningKey {
    /// Channel concatenation with the input (`concat`: LDM-SR, semantic synthesis, LDM inpainting).
    Concat,
    /// Cross-attention context (`crossattn`: text, class labels, layouts).
    CrossAttn,
    /// Both (`hybrid`: SD inpainting).
    Hybrid,
    /// A vector added to the timestep embedding via the UNet's `label_emb` (`adm`).
    Adm,
    /// concat + crossattn + adm (`hybrid-adm`: the SD x4 upscaler, whose adm input is the noise level).
    HybridAdm,
    /// crossattn + adm (`crossattn-adm`: stable unCLIP).
    CrossAttnAdm,
}

impl ConditioningKey {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "concat" => Self::Concat,
            "crossattn" => Self::CrossAttn,
            "hybrid" => Self::Hybrid,
            "adm" => Self::Adm,
            "hybrid-adm" => Self::HybridAdm,
            "crossattn-adm" => Self::CrossAttnAdm,
            _ => return None,
        })
    }
    pub fn uses_concat(self) -> bool {
        matches!(self, Self::Concat | Self::Hybrid | Self::HybridAdm)
    }
    pub fn uses_crossattn(self) -> bool {
        matches!(
            self,
            Self::CrossAttn | Self::Hybrid | Self::HybridAdm | Self::CrossAttnAdm
        )
    }
    pub fn uses_adm(self) -> bool {
        matches!(self, Self::Adm | Self::HybridAdm | Self::CrossAttnAdm)
    }
}

/// `low_scale_config` of `LatentUpscaleDiffusion`: how the low-resolution image is prepared for concatenation.
#[derive(Debug, Clone, PartialEq)]
pub enum LowScaleConfig {
    /// `ImageConcatWithNoiseAugmentation`: the low-res image is noised to a level in `[0, max_noise_level)` with
    /// its own (image-space) schedule, and the level goes to the UNet as its class label.
    NoiseAugmentation {
        max_noise_level: usize,
        schedule: NoiseSchedule,
    },
    /// `SimpleImageConcat`: no noise, level 0.
    Simple,
}

/// The class of the diffusion model (`model.target`) and its class-specific parameters.
#[derive(Debug, Clone, PartialEq)]
pub enum DiffusionKind {
    /// `LatentDiffusion` (also the original's `Layout2ImgDiffusion`, which differs only in logging).
    Latent,
    /// `LatentInpaintDiffusion`: the first stage encodes the masked image, concatenated with the mask.
    Inpaint {
        /// Batch keys concatenated to the input, in order (default `[mask, masked_image]`).
        concat_keys: Vec<String>,
        /// Which of them is encoded by the first stage (default `masked_image`).
        masked_image_key: String,
    },
    /// `LatentUpscaleDiffusion` (SD x4 upscaler).
    Upscale {
        low_scale: LowScaleConfig,
        /// Batch key of the low-res image (default `LR`).
        low_scale_key: String,
    },
}

impl DiffusionKind {
    /// The original class name.
    pub fn target(&self) -> String {
        let class = match self {
            DiffusionKind::Latent => Target::LatentDiffusion,
            DiffusionKind::Inpaint { .. } => Target::LatentInpaintDiffusion,
            DiffusionKind::Upscale { .. } => Target::LatentUpscaleDiffusion,
        };
        targets::name_of(Role::Model, class)
    }
}

/// A diffusion model config (`model.target` one of the `LatentDiffusion` classes).
#[derive(Debug, Clone, PartialEq)]
pub struct OriginalConfig {
    pub kind: DiffusionKind,
    pub parameterization: Parameterization,
    /// The training loss's norm (default l2); no effect on inference.
    pub loss_type: LossType,
    pub beta_schedule: BetaSchedule,
    /// Number of training timesteps T (default 1000).
    pub timesteps: usize,
    /// Default 1e-4.
    pub linear_start: f64,
    /// Default 2e-2.
    pub linear_end: f64,
    /// Default 8e-3.
    pub cosine_s: f64,
    /// z_diffusion = scale_factor · z_first_stage (default 1). With `scale_by_std` the value in the checkpoint
    /// (buffer `scale_factor`, set from the first training batch) replaces it.
    pub scale_factor: f64,
    pub scale_by_std: bool,
    /// `None`: unconditional (the original's `conditioning_key = None`).
    pub conditioning_key: Option<ConditioningKey>,
    /// Batch key of the conditioning (default `image`): `caption`, `class_label`, `LR_image`, `segmentation`, ...
    pub cond_stage_key: String,
    /// Default `image`.
    pub first_stage_key: String,
    /// Training latent side (default 256).
    pub image_size: usize,
    /// Latent channels (default 3).
    pub channels: usize,
    pub unet: OriginalUnet,
    pub first_stage: OriginalFirstStage,
    pub cond_stage: OriginalCondStage,
    /// Keys read by no field and not known to be harmless, as dotted paths; for the caller to log.
    pub ignored_keys: Vec<String>,
}

/// A standalone first-stage config (`configs/autoencoder/*.yaml`, `models/first_stage_models/*/config.yaml`).
#[derive(Debug, Clone, PartialEq)]
pub struct OriginalAutoencoder {
    pub first_stage: OriginalFirstStage,
    pub ignored_keys: Vec<String>,
}

/// Any original config file.
#[derive(Debug, Clone, PartialEq)]
pub enum OriginalFile {
    Diffusion(Box<OriginalConfig>),
    FirstStage(OriginalAutoencoder),
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.display().to_string(),
        source,
    })
}

impl OriginalFile {
    pub fn load(path: &Path) -> Result<Self> {
        Self::parse(&read(path)?, &path.display().to_string())
    }

    /// Parses YAML text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self> {
        parse_file(text).map_err(|problem| ConfigError::Invalid {
            origin: origin.to_string(),
            problem,
        })
    }
}

impl OriginalConfig {
    /// Loads a diffusion model config; a standalone first-stage config is an error.
    pub fn load(path: &Path) -> Result<Self> {
        Self::parse(&read(path)?, &path.display().to_string())
    }

    pub fn parse(text: &str, origin: &str) -> Result<Self> {
        match OriginalFile::parse(text, origin)? {
            OriginalFile::Diffusion(c) => Ok(*c),
            OriginalFile::FirstStage(a) => Err(ConfigError::Invalid {
                origin: origin.to_string(),
                problem: Problem::FirstStageOnly {
                    target: a.first_stage.target(),
                },
            }),
        }
    }

    /// The text encoder, when the conditioning is text (or tokens).
    pub fn text(&self) -> Option<&OriginalTextEncoder> {
        match &self.cond_stage {
            OriginalCondStage::Text(t) => Some(t),
            _ => None,
        }
    }

    /// The DDPM schedule the model was trained with.
    pub fn schedule(&self) -> NoiseSchedule {
        NoiseSchedule {
            beta_schedule: self.beta_schedule,
            timesteps: self.timesteps,
            linear_start: self.linear_start,
            linear_end: self.linear_end,
            cosine_s: self.cosine_s,
        }
    }
}

fn parse_file(text: &str) -> Parsed<OriginalFile> {
    let docs = yaml::load(text)?;
    let root = docs
        .first()
        .ok_or_else(|| Problem::Yaml("empty document".into()))?;
    let model_yaml = match root {
        Yaml::Hash(_) => &root["model"],
        other => {
            return Err(Problem::Type {
                section: "(top level)".into(),
                key: "model".into(),
                expected: "a map with a `model:` section",
                found: yaml::describe(other),
            })
        }
    };
    if matches!(model_yaml, Yaml::BadValue | Yaml::Null) {
        return Err(Problem::Missing {
            section: "(top level)".into(),
            key: "model".into(),
        });
    }
    let model = Params::new("model", model_yaml)?;
    let target = model
        .opt_str("target")?
        .ok_or_else(|| model.missing("target"))?;
    let mut ignored = Vec::new();
    let params = model.sub("params")?;
    model.finish(&["base_learning_rate"], &mut ignored);
    let class = match targets::lookup(Role::Model, &target) {
        Some(Entry::Known(class)) => class,
        Some(Entry::Unsupported(reason)) => return Err(unsupported("model", &target, reason)),
        None => match targets::lookup(Role::FirstStage, &target) {
            Some(Entry::Known(class)) => {
                let first_stage = first_stage::parse(class, &params, &mut ignored)?;
                return Ok(OriginalFile::FirstStage(OriginalAutoencoder {
                    first_stage,
                    ignored_keys: ignored,
                }));
            }
            Some(Entry::Unsupported(reason)) => return Err(unsupported("model", &target, reason)),
            None => {
                return Err(Problem::UnknownTarget {
                    section: "model".into(),
                    target,
                })
            }
        },
    };
    diffusion(class, &params, ignored).map(|c| OriginalFile::Diffusion(Box::new(c)))
}

fn unsupported(section: &str, target: &str, reason: &'static str) -> Problem {
    Problem::Unsupported {
        section: section.into(),
        target: target.into(),
        reason,
    }
}

/// A `*_config:` entry: absent, a sentinel string, or a known class with its `params`.
enum Component<'a> {
    Absent,
    Sentinel(String),
    Class(Target, Params<'a>),
}

fn component<'a>(
    parent: &Params<'a>,
    key: &'static str,
    role: Role,
    ignored: &mut Vec<String>,
) -> Parsed<Component<'a>> {
    let Some(y) = parent.get(key) else {
        return Ok(Component::Absent);
    };
    let section = format!("{}.{key}", parent.section());
    match y {
        Yaml::String(s) => Ok(Component::Sentinel(s.clone())),
        Yaml::Hash(_) => {
            let c = Params::new(section.clone(), y)?;
            let target = c.opt_str("target")?.ok_or_else(|| c.missing("target"))?;
            let class = match targets::lookup(role, &target) {
                Some(Entry::Known(class)) => class,
                Some(Entry::Unsupported(reason)) => {
                    return Err(unsupported(&section, &target, reason))
                }
                None => return Err(Problem::UnknownTarget { section, target }),
            };
            // `DiffusionWrapper` pops this from `unet_config` itself; ldm-rs has no per-block context lists.
            if c.bool_or("sequential_crossattn", false)? {
                return Err(c.invalid(
                    "sequential_crossattn",
                    "true",
                    "per-block context lists are not supported",
                ));
            }
            let params = c.sub("params")?;
            c.finish(&[], ignored);
            Ok(Component::Class(class, params))
        }
        other => Err(parent.wrong(key, "a map with `target:` or a sentinel string", other)),
    }
}

fn required_class<'a>(
    parent: &Params<'a>,
    key: &'static str,
    role: Role,
    ignored: &mut Vec<String>,
) -> Parsed<(Target, Params<'a>)> {
    match component(parent, key, role, ignored)? {
        Component::Class(class, params) => Ok((class, params)),
        Component::Absent => Err(parent.missing(key)),
        Component::Sentinel(s) => Err(parent.invalid(
            key,
            format!("{s:?}"),
            "expected a map with `target:` (sentinel strings are for cond_stage_config only)",
        )),
    }
}

fn noise_schedule(p: &Params<'_>) -> Parsed<NoiseSchedule> {
    let beta_schedule = match p.str_or("beta_schedule", "linear")?.as_str() {
        "linear" => BetaSchedule::Linear,
        "sqrt_linear" => BetaSchedule::SqrtLinear,
        "sqrt" => BetaSchedule::Sqrt,
        "cosine" => BetaSchedule::Cosine,
        "squaredcos_cap_v2" => BetaSchedule::SquaredCosCapV2,
        other => {
            return Err(p.invalid(
                "beta_schedule",
                other,
                "expected linear, sqrt_linear, sqrt, cosine or squaredcos_cap_v2",
            ))
        }
    };
    let timesteps = p.usize_or("timesteps", 1000)?;
    if timesteps == 0 {
        return Err(p.invalid("timesteps", "0", "must be positive"));
    }
    Ok(NoiseSchedule {
        beta_schedule,
        timesteps,
        linear_start: p.f64_or("linear_start", 1e-4)?,
        linear_end: p.f64_or("linear_end", 2e-2)?,
        cosine_s: p.f64_or("cosine_s", 8e-3)?,
    })
}

/// `model.params` keys with no effect on inference (training, logging, checkpoint loading).
const MODEL_HARMLESS: &[&str] = &[
    "num_timesteps_cond",
    "log_every_t",
    "monitor",
    "use_ema",
    "cond_stage_trainable",
    "scheduler_config",
    "ckpt_path",
    "ignore_keys",
    "load_only_unet",
    "clip_denoised",
    "original_elbo_weight",
    "v_posterior",
    "l_simple_weight",
    "learn_logvar",
    "logvar_init",
    "make_it_fit",
    "ucg_training",
    "reset_ema",
    "reset_num_ema_updates",
    "finetune_keys",
    "keep_finetune_dims",
    "c_concat_log_start",
    "c_concat_log_end",
    "use_positional_encodings",
    "noise_level_key",
];

fn diffusion(class: Target, p: &Params<'_>, mut ignored: Vec<String>) -> Parsed<OriginalConfig> {
    let parameterization = match p.str_or("parameterization", "eps")?.as_str() {
        "eps" => Parameterization::Eps,
        "x0" => Parameterization::X0,
        "v" => Parameterization::V,
        other => return Err(p.invalid("parameterization", other, "expected eps, x0 or v")),
    };
    let loss_type = match p.str_or("loss_type", "l2")?.as_str() {
        "l2" => LossType::L2,
        "l1" => LossType::L1,
        other => return Err(p.invalid("loss_type", other, "expected l2 or l1")),
    };
    for key in ["given_betas", "cond_stage_forward"] {
        if let Some(v) = p.get(key) {
            return Err(p.invalid(key, yaml::describe(v), "is not supported"));
        }
    }
    let schedule = noise_schedule(p)?;

    let (_, unet_params) = required_class(p, "unet_config", Role::Unet, &mut ignored)?;
    let unet = unet::parse(&unet_params, &mut ignored)?;
    let (fs_class, fs_params) =
        required_class(p, "first_stage_config", Role::FirstStage, &mut ignored)?;
    let first_stage = first_stage::parse(fs_class, &fs_params, &mut ignored)?;
    let cond_stage =
        match component(p, "cond_stage_config", Role::CondStage, &mut ignored)? {
            Component::Absent => return Err(p.missing("cond_stage_config")),
            Component::Sentinel(s) => match s.as_str() {
                "__is_unconditional__" => OriginalCondStage::Unconditional,
                "__is_first_stage__" => OriginalCondStage::FirstStage,
                _ => return Err(p.invalid(
                    "cond_stage_config",
                    format!("{s:?}"),
                    "expected `__is_unconditional__`, `__is_first_stage__` or a map with `target:`",
                )),
            },
            Component::Class(class, cp) => cond_stage::parse(class, &cp, &mut ignored)?,
        };

    // LatentDiffusion.__init__: an absent key means `concat` if `concat_mode` (default true) else `crossattn`;
    // an unconditional model has none, unless `force_null_conditioning`.
    let explicit = match p.opt_str("conditioning_key")? {
        None => None,
        Some(s) => Some(ConditioningKey::parse(&s).ok_or_else(|| {
            p.invalid(
                "conditioning_key",
                s.clone(),
                "expected concat, crossattn, hybrid, adm, hybrid-adm or crossattn-adm",
            )
        })?),
    };
    let concat_mode = p.bool_or("concat_mode", true)?;
    let force_null = p.bool_or("force_null_conditioning", false)?;
    let conditioning_key = if cond_stage == OriginalCondStage::Unconditional && !force_null {
        None
    } else {
        Some(explicit.unwrap_or(if concat_mode {
            ConditioningKey::Concat
        } else {
            ConditioningKey::CrossAttn
        }))
    };

    let kind = match class {
        Target::LatentInpaintDiffusion => {
            let concat_keys = p
                .opt_str_list("concat_keys")?
                .unwrap_or_else(|| vec!["mask".into(), "masked_image".into()]);
            let masked_image_key = p.str_or("masked_image_key", "masked_image")?;
            if !concat_keys.contains(&masked_image_key) {
                return Err(p.invalid(
                    "masked_image_key",
                    masked_image_key,
                    format!("is not among concat_keys {concat_keys:?}"),
                ));
            }
            DiffusionKind::Inpaint {
                concat_keys,
                masked_image_key,
            }
        }
        Target::LatentUpscaleDiffusion => {
            let (ls_class, lp) =
                required_class(p, "low_scale_config", Role::LowScale, &mut ignored)?;
            let low_scale = if ls_class == Target::ImageConcatWithNoiseAugmentation {
                if lp.get("noise_schedule_config").is_none() {
                    return Err(lp.missing("noise_schedule_config"));
                }
                let ns = lp.sub("noise_schedule_config")?;
                let schedule = noise_schedule(&ns)?;
                ns.finish(&[], &mut ignored);
                let max_noise_level = lp.usize_or("max_noise_level", 1000)?;
                if max_noise_level > schedule.timesteps {
                    return Err(lp.invalid(
                        "max_noise_level",
                        max_noise_level.to_string(),
                        format!("exceeds the schedule's {} timesteps", schedule.timesteps),
                    ));
                }
                LowScaleConfig::NoiseAugmentation {
                    max_noise_level,
                    schedule,
                }
            } else {
                LowScaleConfig::Simple
            };
            lp.finish(&["to_cuda"], &mut ignored);
            DiffusionKind::Upscale {
                low_scale,
                low_scale_key: p.str_or("low_scale_key", "LR")?,
            }
        }
        _ => DiffusionKind::Latent,
    };

    let cfg = OriginalConfig {
        kind,
        parameterization,
        loss_type,
        beta_schedule: schedule.beta_schedule,
        timesteps: schedule.timesteps,
        linear_start: schedule.linear_start,
        linear_end: schedule.linear_end,
        cosine_s: schedule.cosine_s,
        scale_factor: p.f64_or("scale_factor", 1.0)?,
        scale_by_std: p.bool_or("scale_by_std", false)?,
        conditioning_key,
        cond_stage_key: p.str_or("cond_stage_key", "image")?,
        first_stage_key: p.str_or("first_stage_key", "image")?,
        image_size: p.usize_or("image_size", 256)?,
        channels: p.usize_or("channels", 3)?,
        unet,
        first_stage,
        cond_stage,
        ignored_keys: Vec::new(),
    };
    p.finish(MODEL_HARMLESS, &mut ignored);
    Ok(OriginalConfig {
        ignored_keys: ignored,
        ..cfg
    })
}

#[cfg(test)]
mod tests;
