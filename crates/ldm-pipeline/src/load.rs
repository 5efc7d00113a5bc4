//! Opening a checkpoint in any of its forms into a [`WeightStore`] under canonical keys plus a [`ModelSpec`].
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ldm_core::weights::{SafetensorsFile, WeightStore};
use ldm_models::autoencoder::{AutoencoderKlConfig, DdConfig};
use ldm_models::import::{self, Conversion, KeyMap};
use ldm_models::original_config::OriginalFile;
use ldm_models::text::{Activation, TextConfig, TextLayout, TextOutput};
use ldm_models::tokenizer::{BertTokenizer, ClipTokenizer, Pad};
use ldm_models::unet::UnetConfig;
use ldm_sampling::{PredictionType, SchedulerConfig};

use crate::error::{PipelineError, Result};
use crate::models::Tokenizer;
use crate::source::{detect_form, CheckpointForm};
use crate::spec::{
    detect_family, ConcatSpec, CondSpec, Family, FirstStageSpec, ModelSpec, TextSpec, CLIP_PREFIX,
};

/// How the user overrides the config: a YAML file or a preset name.
#[derive(Debug, Clone, PartialEq)]
pub enum ConfigOverride {
    Yaml(PathBuf),
    /// A family preset, with the prediction type when the name states it.
    Preset(Family, Option<PredictionType>),
}

impl ConfigOverride {
    /// `--config` value: a preset named after the original inference YAMLs (`v1-inference`, `v2-inference`
    /// for SD 2.x base ε-models, `v2-inference-v` for the 768-v models; `sd1`, `sd2-base`, `sd2-v` alike) or a path
    /// to a YAML file.
    pub fn parse(value: &str) -> Self {
        use PredictionType::{Epsilon, VPrediction};
        match value {
            "sd1" | "v1-inference" | "v1-inference.yaml" => Self::Preset(Family::Sd1, None),
            "sd2-base" | "v2-inference" | "v2-inference.yaml" => {
                Self::Preset(Family::Sd2, Some(Epsilon))
            }
            "sd2-v" | "v2-inference-v" | "v2-inference-v.yaml" => {
                Self::Preset(Family::Sd2, Some(VPrediction))
            }
            _ => Self::Yaml(PathBuf::from(value)),
        }
    }
}

/// A checkpoint opened for inference: weights under canonical keys (not yet read for single files), the
/// component configs and the tokenizer.
pub struct Opened {
    pub form: CheckpointForm,
    pub store: Arc<WeightStore>,
    pub spec: ModelSpec,
    /// The prompt tokenizer, for text-conditioned models.
    pub tokenizer: Option<Tokenizer>,
    /// Where the spec came from, for `ldm info`.
    pub config_source: String,
}

/// Opens `path` (single-file safetensors or ckpt, or a diffusers folder).
pub fn open(path: &Path, config: Option<&ConfigOverride>) -> Result<Opened> {
    let form = detect_form(path)?;
    match &form {
        CheckpointForm::Diffusers(dir) => {
            match crate::load_diffusers::open_pipeline_folder(dir, &form)? {
                Some(opened) => Ok(opened),
                None => open_diffusers(dir, form.clone()),
            }
        }
        CheckpointForm::Safetensors(p) => {
            let file = Arc::new(SafetensorsFile::open(p)?);
            let mut store = WeightStore::new(p.display().to_string());
            store.add_file(&file, "");
            finish_single_file(form, store, config)
        }
        CheckpointForm::Ckpt(p) => {
            let ckpt = ldm_core::ckpt::read_ckpt(p)?;
            let mut store = WeightStore::new(p.display().to_string());
            for (k, t) in ckpt.tensors {
                store.insert(&k, t);
            }
            finish_single_file(form, store, config)
        }
    }
}

fn finish_single_file(
    form: CheckpointForm,
    store: WeightStore,
    config: Option<&ConfigOverride>,
) -> Result<Opened> {
    let path = form.path().to_path_buf();
    let detected = detect_family(&store);
    let mismatch = |described: Family, found: Family| PipelineError::Unsupported {
        path: path.clone(),
        reason: format!(
            "the config describes {} but the weights are {}",
            described.name(),
            found.name()
        ),
    };
    let from_yaml = |y: &Path| -> Result<(ModelSpec, String)> {
        let cfg = match OriginalFile::load(y)? {
            OriginalFile::Diffusion(cfg) => cfg,
            OriginalFile::FirstStage(_) => {
                return Err(PipelineError::Unsupported {
                    path: y.to_path_buf(),
                    reason: "this is a first-stage (autoencoder) config, not a diffusion model's"
                        .into(),
                })
            }
        };
        let described = crate::spec::original_family(&cfg);
        match &detected {
            // Without a text encoder the weights say nothing the YAML could contradict.
            Ok(found) if *found != described && *found != Family::Ldm => {
                return Err(mismatch(described, *found))
            }
            Err(reason) if described != Family::Ldm => {
                return Err(PipelineError::Unsupported {
                    path: path.clone(),
                    reason: reason.clone(),
                })
            }
            _ => {}
        }
        Ok((
            ModelSpec::from_original(&cfg, &store, &y.display().to_string())?,
            y.display().to_string(),
        ))
    };
    let beside = path.with_extension("yaml");
    let (spec, config_source) = match config {
        Some(ConfigOverride::Yaml(y)) => from_yaml(y)?,
        None if beside.is_file() => from_yaml(&beside)?,
        _ => {
            let family = detected.map_err(|reason| PipelineError::Unsupported {
                path: path.clone(),
                reason,
            })?;
            if family == Family::Ldm {
                return Err(PipelineError::Unsupported {
                    path: path.clone(),
                    reason: crate::spec::LDM_NEEDS_CONFIG.into(),
                });
            }
            match config {
                Some(ConfigOverride::Preset(f, _)) if *f != family => {
                    return Err(mismatch(*f, family))
                }
                Some(ConfigOverride::Preset(f, prediction)) => {
                    let mut spec = ModelSpec::preset(*f, &store)?;
                    if let Some(p) = prediction {
                        spec.scheduler.prediction_type = *p;
                    }
                    (spec, format!("preset {}", f.name()))
                }
                _ => (
                    ModelSpec::preset(family, &store)?,
                    format!("preset {} (detected)", family.name()),
                ),
            }
        }
    };
    let tokenizer = builtin_tokenizer(&spec)?;
    Ok(Opened {
        form,
        store: Arc::new(store),
        spec,
        tokenizer,
        config_source,
    })
}

/// The built-in tokenizer of a text-conditioned model.
pub fn builtin_tokenizer(spec: &ModelSpec) -> Result<Option<Tokenizer>> {
    Ok(match &spec.cond {
        CondSpec::Text(TextSpec::Clip { layout, .. }) => {
            let t = ClipTokenizer::builtin();
            Some(Tokenizer::Clip(match layout {
                TextLayout::Hf => t,
                TextLayout::OpenClip => t
                    .with_padding(Pad::sd2())
                    .map_err(|e| PipelineError::Model(e.to_string()))?,
            }))
        }
        CondSpec::Text(TextSpec::Bert(_)) => Some(Tokenizer::Bert(BertTokenizer::builtin())),
        _ => None,
    })
}

fn add_mapped(store: &mut WeightStore, path: &Path, map: &KeyMap) -> Result<()> {
    let file = Arc::new(SafetensorsFile::open(path)?);
    let mut unknown = Vec::new();
    for name in file.names() {
        match map.entry(name) {
            Some(e) => {
                let reshape = match e.conversion {
                    Conversion::Identity => None,
                    Conversion::Reshape => Some(e.canonical_shape.clone()),
                    Conversion::RowBlock { .. } | Conversion::HeadBlock { .. } => {
                        return Err(PipelineError::Model(format!(
                            "{}: `{name}` needs a fused tensor",
                            path.display()
                        )))
                    }
                };
                store.add_from_file(&e.canonical, &file, name, reshape);
            }
            None if map.ignores_diffusers(name) => {}
            None => unknown.push(name.to_string()),
        }
    }
    if !unknown.is_empty() {
        unknown.sort();
        return Err(PipelineError::Model(format!(
            "{}: {} tensors its config.json does not describe (first: `{}`)",
            path.display(),
            unknown.len(),
            unknown[0]
        )));
    }
    Ok(())
}

fn open_diffusers(dir: &Path, form: CheckpointForm) -> Result<Opened> {
    let model_err =
        |e: import::ImportError| PipelineError::Model(format!("{}: {e}", dir.display()));
    let unet_files = import::component_files(dir, "unet").map_err(model_err)?;
    let vae_files = import::component_files(dir, "vae").map_err(model_err)?;
    let text_files = import::component_files(dir, "text_encoder").map_err(model_err)?;
    let unet_cfg = import::DiffusersUnetConfig::from_file(&unet_files.config).map_err(model_err)?;
    let vae_cfg = import::DiffusersVaeConfig::from_file(&vae_files.config).map_err(model_err)?;
    let text_cfg = import::DiffusersClipConfig::from_file(&text_files.config).map_err(model_err)?;
    let ua = unet_cfg.arch().map_err(model_err)?;
    let va = vae_cfg.arch().map_err(model_err)?;
    let ca = text_cfg.arch().map_err(model_err)?;

    let mut store = WeightStore::new(dir.display().to_string());
    let unet_map = import::unet_key_map_for(&ua)
        .map_err(model_err)?
        .with_canonical_prefix(import::UNET_PREFIX);
    let vae_map = import::vae_key_map_for(&va)
        .map_err(model_err)?
        .with_canonical_prefix(import::VAE_PREFIX);
    let clip_map = import::clip_key_map_for(&ca)
        .map_err(model_err)?
        .with_canonical_prefix(import::CLIP_PREFIX);
    add_mapped(&mut store, &unet_files.weights, &unet_map)?;
    add_mapped(&mut store, &vae_files.weights, &vae_map)?;
    add_mapped(&mut store, &text_files.weights, &clip_map)?;

    let unet = UnetConfig::try_from(&ua)
        .map_err(|e| PipelineError::Model(format!("{}: {e}", dir.display())))?;
    let vae = AutoencoderKlConfig {
        embed_dim: va.embed_dim,
        ddconfig: DdConfig {
            ch: va.ch,
            out_ch: va.out_channels,
            ch_mult: va.ch_mult.clone(),
            num_res_blocks: va.num_res_blocks,
            attn_resolutions: vec![],
            in_channels: va.in_channels,
            resolution: 256,
            z_channels: va.z_channels,
            double_z: true,
            num_groups: va.norm_groups,
            attn_type: Default::default(),
        },
    };
    let (family, activation) = match ca.activation {
        import::Activation::QuickGelu => (Family::Sd1, Activation::QuickGelu),
        import::Activation::Gelu => (Family::Sd2, Activation::Gelu),
    };
    let text = TextConfig {
        vocab_size: ca.vocab_size,
        hidden: ca.hidden_size,
        layers: ca.layers,
        heads: ca.heads,
        intermediate: ca.intermediate_size,
        max_positions: ca.max_positions,
        activation,
        output: TextOutput::Last,
    };
    let sched_path = dir.join("scheduler/scheduler_config.json");
    let scheduler = if sched_path.is_file() {
        let text =
            std::fs::read_to_string(&sched_path).map_err(|e| PipelineError::io(&sched_path, e))?;
        SchedulerConfig::from_json_str(&text)
            .map_err(|e| PipelineError::Model(format!("{}: {e}", sched_path.display())))?
    } else {
        SchedulerConfig::sd_default()
    };
    let first_stage = FirstStageSpec::Kl(vae);
    let concat = if unet.in_channels == unet.out_channels + first_stage.latent_channels() + 1 {
        ConcatSpec::Inpaint(crate::spec::InpaintConcat::Sd)
    } else {
        ConcatSpec::None
    };
    let spec = ModelSpec {
        family,
        unet,
        first_stage,
        cond: CondSpec::Text(TextSpec::Clip {
            config: text,
            layout: TextLayout::Hf,
            prefix: CLIP_PREFIX.to_string(),
        }),
        concat,
        latent_scale: va.scaling_factor,
        sample_size: None,
        scheduler,
    };
    let tok_dir = dir.join("tokenizer");
    let tokenizer = if tok_dir.is_dir() {
        Some(Tokenizer::Clip(
            ClipTokenizer::from_dir_or_builtin(&tok_dir)
                .map_err(|e| PipelineError::Model(format!("{}: {e}", tok_dir.display())))?,
        ))
    } else {
        builtin_tokenizer(&spec)?
    };
    Ok(Opened {
        form,
        store: Arc::new(store),
        spec,
        tokenizer,
        config_source: format!("{}/*/config.json", dir.display()),
    })
}
