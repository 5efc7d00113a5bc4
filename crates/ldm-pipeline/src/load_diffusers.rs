//! Diffusers folders of the LDM pipelines, dispatched on `model_index.json`'s `_class_name`:
//!
//! | `_class_name` | components | spec |
//! |---|---|---|
//! | `LDMPipeline` | `unet` (UNet2DModel), `vqvae` (VQModel or AutoencoderKL), `scheduler` | unconditional |
//! | `LDMSuperResolutionPipeline` | `unet` (UNet2DModel, latent + image channels in), `vqvae`, `scheduler` | low-res image concatenated, latent scale 1 |
//! | `LDMTextToImagePipeline` | `vqvae`, `bert` (LDMBertModel), `tokenizer` (BertTokenizer), `unet` (UNet2DConditionModel), `scheduler` | LDM-BERT text |
//! | `StableDiffusionUpscalePipeline` | `vae`, `text_encoder`, `tokenizer`, `unet` (class labels = noise level), `scheduler`, `low_res_scheduler` | CLIP text + noise-augmented low-res image |
//!
//! Every other class (StableDiffusion*, or no class) goes to the StableDiffusion loader in `load.rs`, provided
//! the folder has its `unet`, `vae` and `text_encoder`.
//!
//! Latent scale, as diffusers 0.42.1's pipelines apply it before decoding: the first stage's `scaling_factor`
//! (`LDMPipeline`, `LDMTextToImagePipeline`, the upscaler), except `LDMSuperResolutionPipeline`, which decodes its
//! latents unscaled whatever the VQModel config says (`self.vqvae.decode(latents)`).
//!
//! Weights are mapped strictly: every tensor of a component's file must be in its key map with the shape its
//! config implies, and every key of the map must be present; all problems of a component are named at once.
//! Fused canonical tensors (the legacy `qkv` of UNet2DModel attention) are assembled in memory; all other
//! tensors stay in their files until the models are built.
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use ldm_core::weights::{SafetensorsFile, WeightStore};
use ldm_models::autoencoder::{AutoencoderKlConfig, DdConfig, VqModelConfig};
use ldm_models::import::{self, Conversion, KeyMap, KeyReport, MissingKey, ShapeMismatch};
use ldm_models::text::{Activation, TextConfig, TextLayout, TextOutput, XTransformerConfig};
use ldm_models::tokenizer::{BertTokenizer, ClipTokenizer};
use ldm_models::unet::UnetConfig;
use ldm_sampling::SchedulerConfig;
use serde_json::Value;

use crate::error::{PipelineError, Result};
use crate::load::Opened;
use crate::models::Tokenizer;
use crate::source::CheckpointForm;
use crate::spec::{
    ConcatSpec, CondSpec, Family, FirstStageSpec, ModelSpec, NoiseAugSpec, TextSpec, CLIP_PREFIX,
};

/// The diffusers pipelines this module opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LdmPipelineClass {
    /// `LDMPipeline`: unconditional.
    Uncond,
    /// `LDMSuperResolutionPipeline`.
    SuperResolution,
    /// `LDMTextToImagePipeline`.
    TextToImage,
    /// `StableDiffusionUpscalePipeline` (the SD x4 upscaler).
    SdUpscale,
}

impl LdmPipelineClass {
    pub fn from_class_name(name: &str) -> Option<Self> {
        Some(match name {
            "LDMPipeline" => Self::Uncond,
            "LDMSuperResolutionPipeline" => Self::SuperResolution,
            "LDMTextToImagePipeline" => Self::TextToImage,
            "StableDiffusionUpscalePipeline" => Self::SdUpscale,
            _ => return None,
        })
    }
    pub fn class_name(self) -> &'static str {
        match self {
            Self::Uncond => "LDMPipeline",
            Self::SuperResolution => "LDMSuperResolutionPipeline",
            Self::TextToImage => "LDMTextToImagePipeline",
            Self::SdUpscale => "StableDiffusionUpscalePipeline",
        }
    }
    /// The components the pipeline needs (as `model_index.json` names them).
    pub fn components(self) -> &'static [&'static str] {
        match self {
            Self::Uncond | Self::SuperResolution => &["unet", "vqvae", "scheduler"],
            Self::TextToImage => &["vqvae", "bert", "tokenizer", "unet", "scheduler"],
            Self::SdUpscale => &[
                "vae",
                "text_encoder",
                "tokenizer",
                "unet",
                "scheduler",
                "low_res_scheduler",
            ],
        }
    }
}

/// Components the StableDiffusion loader needs.
const SD_COMPONENTS: &[&str] = &["unet", "vae", "text_encoder"];

/// `model_index.json`: the pipeline class and, per component, its `[library, class]` (null for absent ones).
#[derive(Debug, Clone)]
pub struct ModelIndex {
    pub class_name: Option<String>,
    entries: BTreeMap<String, Value>,
}

impl ModelIndex {
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join("model_index.json");
        let text = std::fs::read_to_string(&path).map_err(|e| PipelineError::io(&path, e))?;
        let entries: BTreeMap<String, Value> =
            serde_json::from_str(&text).map_err(|e| PipelineError::NotACheckpoint {
                path: path.clone(),
                reason: format!("model_index.json is not a JSON object: {e}"),
            })?;
        let class_name = entries
            .get("_class_name")
            .and_then(Value::as_str)
            .map(str::to_string);
        Ok(Self {
            class_name,
            entries,
        })
    }

    /// The class `model_index.json` gives component `name` (`["diffusers", "VQModel"]` → `VQModel`), `None`
    /// when the component is absent or null.
    pub fn component_class(&self, name: &str) -> Option<&str> {
        match self.entries.get(name)? {
            Value::Array(v) => v.get(1).and_then(Value::as_str),
            _ => None,
        }
    }

    pub fn has_component(&self, name: &str) -> bool {
        self.component_class(name).is_some()
    }

    /// A top-level entry (`max_noise_level`).
    pub fn value(&self, key: &str) -> Option<&Value> {
        self.entries.get(key)
    }
}

/// Opens `dir` if `model_index.json` names one of the LDM pipelines; `Ok(None)` hands a StableDiffusion folder
/// back to the StableDiffusion loader. A folder of another class that lacks the StableDiffusion components is
/// refused here, naming the class and what is missing.
pub(crate) fn open_pipeline_folder(dir: &Path, form: &CheckpointForm) -> Result<Option<Opened>> {
    let index = ModelIndex::read(dir)?;
    let class = index.class_name.as_deref().unwrap_or("");
    let Some(kind) = LdmPipelineClass::from_class_name(class) else {
        if !class.starts_with("StableDiffusion") {
            let missing: Vec<&str> = SD_COMPONENTS
                .iter()
                .copied()
                .filter(|c| !dir.join(c).join("config.json").is_file())
                .collect();
            if !missing.is_empty() {
                let shown = if class.is_empty() {
                    "no `_class_name`".to_string()
                } else {
                    format!("`_class_name` `{class}`")
                };
                return Err(PipelineError::Unsupported {
                    path: dir.to_path_buf(),
                    reason: format!(
                        "model_index.json has {shown}, which is not a pipeline ldm-rs knows (LDMPipeline, \
                         LDMSuperResolutionPipeline, LDMTextToImagePipeline, StableDiffusionUpscalePipeline, \
                         StableDiffusion*), and the folder lacks the StableDiffusion component(s) {}",
                        missing.join(", ")
                    ),
                });
            }
        }
        return Ok(None);
    };
    let folder = Folder {
        dir,
        index: &index,
        kind,
    };
    folder.check_components()?;
    let opened = match kind {
        LdmPipelineClass::Uncond | LdmPipelineClass::SuperResolution => folder.open_unet2d(form)?,
        LdmPipelineClass::TextToImage => folder.open_text_to_image(form)?,
        LdmPipelineClass::SdUpscale => folder.open_upscale(form)?,
    };
    Ok(Some(opened))
}

struct Folder<'a> {
    dir: &'a Path,
    index: &'a ModelIndex,
    kind: LdmPipelineClass,
}

/// What the first-stage component holds.
struct FirstStagePart {
    spec: FirstStageSpec,
    scaling_factor: f64,
}

impl Folder<'_> {
    fn unsupported(&self, reason: String) -> PipelineError {
        PipelineError::Unsupported {
            path: self.dir.to_path_buf(),
            reason: format!("{} folder: {reason}", self.kind.class_name()),
        }
    }

    fn import_err(&self, component: &str) -> impl Fn(import::ImportError) -> PipelineError + '_ {
        let dir = self.dir.join(component);
        move |e| PipelineError::Model(format!("{}: {e}", dir.display()))
    }

    fn check_components(&self) -> Result<()> {
        let missing: Vec<&str> = self
            .kind
            .components()
            .iter()
            .copied()
            .filter(|c| !self.index.has_component(c))
            .collect();
        if !missing.is_empty() {
            return Err(self.unsupported(format!(
                "model_index.json names no {} component (the pipeline needs {})",
                missing.join(", "),
                self.kind.components().join(", ")
            )));
        }
        Ok(())
    }

    fn files(&self, component: &str) -> Result<import::ComponentFiles> {
        import::component_files(self.dir, component).map_err(|e| {
            self.unsupported(format!(
                "component `{component}` ({}): {e}",
                self.index.component_class(component).unwrap_or("?")
            ))
        })
    }

    /// The class of a component: its `config.json`'s `_class_name`, else what `model_index.json` says.
    fn class_of(&self, component: &str, config: &Path) -> Result<String> {
        let text = std::fs::read_to_string(config).map_err(|e| PipelineError::io(config, e))?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| PipelineError::Model(format!("{}: not JSON: {e}", config.display())))?;
        v.get("_class_name")
            .and_then(Value::as_str)
            .or_else(|| self.index.component_class(component))
            .map(str::to_string)
            .ok_or_else(|| {
                self.unsupported(format!(
                    "component `{component}` states no class (no `_class_name` in its config.json, none in \
                     model_index.json)"
                ))
            })
    }

    fn scheduler(&self, component: &str) -> Result<SchedulerConfig> {
        let path = self.dir.join(component).join("scheduler_config.json");
        if !path.is_file() {
            return Err(self.unsupported(format!(
                "no {component}/scheduler_config.json (the noise schedule of LDM models is not a preset)"
            )));
        }
        let text = std::fs::read_to_string(&path).map_err(|e| PipelineError::io(&path, e))?;
        SchedulerConfig::from_json_str(&text)
            .map_err(|e| PipelineError::Model(format!("{}: {e}", path.display())))
    }

    /// The first stage from `component` (VQModel or AutoencoderKL), its weights added to `store`.
    fn first_stage(&self, component: &str, store: &mut WeightStore) -> Result<FirstStagePart> {
        let files = self.files(component)?;
        let err = self.import_err(component);
        match self.class_of(component, &files.config)?.as_str() {
            "VQModel" => {
                let arch = import::DiffusersVqConfig::from_file(&files.config)
                    .and_then(|c| c.arch())
                    .map_err(&err)?;
                let map = import::vq_key_map_for(&arch)
                    .map_err(&err)?
                    .with_canonical_prefix(import::VQ_PREFIX);
                add_component(store, &files.weights, &map, &|_| false)?;
                Ok(FirstStagePart {
                    spec: FirstStageSpec::Vq(VqModelConfig::from(&arch)),
                    scaling_factor: arch.scaling_factor,
                })
            }
            "AutoencoderKL" => {
                let arch = import::DiffusersVaeConfig::from_file(&files.config)
                    .and_then(|c| c.arch())
                    .map_err(&err)?;
                let map = import::vae_key_map_for(&arch)
                    .map_err(&err)?
                    .with_canonical_prefix(import::VAE_PREFIX);
                add_component(store, &files.weights, &map, &|_| false)?;
                Ok(FirstStagePart {
                    spec: FirstStageSpec::Kl(kl_config(&arch)),
                    scaling_factor: arch.scaling_factor,
                })
            }
            other => Err(self.unsupported(format!(
                "component `{component}` is a {other}; expected VQModel or AutoencoderKL"
            ))),
        }
    }

    fn expect_class(&self, component: &str, config: &Path, want: &str) -> Result<()> {
        let class = self.class_of(component, config)?;
        if class != want {
            return Err(self.unsupported(format!(
                "component `{component}` is a {class}; the pipeline needs a {want}"
            )));
        }
        Ok(())
    }

    /// `UNet2DModel` weights into `store`; its config.
    fn unet2d(&self, store: &mut WeightStore) -> Result<UnetConfig> {
        let files = self.files("unet")?;
        self.expect_class("unet", &files.config, "UNet2DModel")?;
        let err = self.import_err("unet");
        let arch = import::DiffusersUnet2dConfig::from_file(&files.config)
            .and_then(|c| c.arch())
            .map_err(&err)?;
        let map = import::unet2d_key_map_for(&arch.unet)
            .map_err(&err)?
            .with_canonical_prefix(import::UNET_PREFIX);
        add_component(store, &files.weights, &map, &|_| false)?;
        Ok(arch.unet)
    }

    /// `UNet2DConditionModel` weights into `store`; its config.
    fn unet_cond(&self, store: &mut WeightStore) -> Result<UnetConfig> {
        let files = self.files("unet")?;
        self.expect_class("unet", &files.config, "UNet2DConditionModel")?;
        let err = self.import_err("unet");
        let arch = import::DiffusersUnetConfig::from_file(&files.config)
            .and_then(|c| c.arch())
            .map_err(&err)?;
        let map = import::unet_key_map_for(&arch)
            .map_err(&err)?
            .with_canonical_prefix(import::UNET_PREFIX);
        add_component(store, &files.weights, &map, &|_| false)?;
        self.unet_config(&arch)
    }

    fn unet_config(&self, ua: &import::UnetArch) -> Result<UnetConfig> {
        UnetConfig::try_from(ua).map_err(|e| self.unsupported(format!("unet: {e}")))
    }

    /// Checks the UNet against the first stage: latent channels out, latent + `concat` channels in.
    fn check_channels(
        &self,
        unet: &UnetConfig,
        first: &FirstStageSpec,
        concat: usize,
    ) -> Result<()> {
        let latent = first.latent_channels();
        if unet.out_channels != latent {
            return Err(self.unsupported(format!(
                "the UNet outputs {} channels but the first stage's latent has {latent}",
                unet.out_channels
            )));
        }
        if unet.in_channels != latent + concat {
            return Err(self.unsupported(format!(
                "the UNet takes {} input channels; expected latent ({latent}) + concatenated ({concat}) = {}",
                unet.in_channels,
                latent + concat
            )));
        }
        Ok(())
    }

    fn finish(
        &self,
        form: &CheckpointForm,
        store: WeightStore,
        spec: ModelSpec,
        tokenizer: Option<Tokenizer>,
    ) -> Opened {
        Opened {
            form: form.clone(),
            store: Arc::new(store),
            spec,
            tokenizer,
            config_source: format!(
                "{}/*/config.json ({})",
                self.dir.display(),
                self.kind.class_name()
            ),
        }
    }

    /// `LDMPipeline` and `LDMSuperResolutionPipeline`.
    fn open_unet2d(&self, form: &CheckpointForm) -> Result<Opened> {
        let mut store = WeightStore::new(self.dir.display().to_string());
        let unet = self.unet2d(&mut store)?;
        let first = self.first_stage("vqvae", &mut store)?;
        let scheduler = self.scheduler("scheduler")?;
        if unet.num_classes.is_some() {
            return Err(self.unsupported(
                "a class-conditional UNet2DModel (`num_class_embeds`): the pipeline passes no class labels"
                    .into(),
            ));
        }
        let (concat, latent_scale) = match self.kind {
            LdmPipelineClass::SuperResolution => {
                self.check_channels(&unet, &first.spec, image_channels(&first.spec))?;
                // diffusers decodes the SR latents without any scaling.
                (ConcatSpec::LowRes { noise_aug: None }, 1.0)
            }
            _ => {
                self.check_channels(&unet, &first.spec, 0)?;
                (ConcatSpec::None, first.scaling_factor)
            }
        };
        let spec = ModelSpec {
            family: Family::Ldm,
            unet,
            first_stage: first.spec,
            cond: CondSpec::None,
            concat,
            latent_scale,
            sample_size: None,
            scheduler,
        };
        Ok(self.finish(form, store, spec, None))
    }

    /// `LDMTextToImagePipeline`.
    fn open_text_to_image(&self, form: &CheckpointForm) -> Result<Opened> {
        let mut store = WeightStore::new(self.dir.display().to_string());
        let unet = self.unet_cond(&mut store)?;
        let first = self.first_stage("vqvae", &mut store)?;
        let scheduler = self.scheduler("scheduler")?;

        let files = self.files("bert")?;
        let err = self.import_err("bert");
        let arch = import::DiffusersLdmBertConfig::from_file(&files.config)
            .and_then(|c| c.arch())
            .map_err(&err)?;
        let map = import::ldmbert_key_map_for(&arch)
            .map_err(&err)?
            .with_canonical_prefix(import::LDMBERT_PREFIX);
        // The language-model head (`to_logits`) is in every LDMBertModel file and read by no encoder.
        let lm_head = format!("{}to_logits.", import::LDMBERT_PREFIX);
        add_component(&mut store, &files.weights, &map, &|k| {
            k.starts_with(&lm_head)
        })?;
        let encoder = XTransformerConfig::from(&arch);
        if unet.context_dim != Some(encoder.dim) {
            return Err(self.unsupported(format!(
                "the UNet's cross_attention_dim {:?} differs from the LDMBert width {}",
                unet.context_dim, encoder.dim
            )));
        }
        self.check_channels(&unet, &first.spec, 0)?;
        let tok_dir = self.dir.join("tokenizer");
        let tokenizer = BertTokenizer::from_dir_or_builtin(&tok_dir)
            .map_err(|e| PipelineError::Model(format!("{}: {e}", tok_dir.display())))?;
        let spec = ModelSpec {
            family: Family::Ldm,
            unet,
            first_stage: first.spec,
            cond: CondSpec::Text(TextSpec::Bert(encoder)),
            concat: ConcatSpec::None,
            latent_scale: first.scaling_factor,
            sample_size: None,
            scheduler,
        };
        Ok(self.finish(form, store, spec, Some(Tokenizer::Bert(tokenizer))))
    }

    /// `StableDiffusionUpscalePipeline`.
    fn open_upscale(&self, form: &CheckpointForm) -> Result<Opened> {
        let mut store = WeightStore::new(self.dir.display().to_string());
        let unet = self.unet_cond(&mut store)?;
        let first = self.first_stage("vae", &mut store)?;
        let scheduler = self.scheduler("scheduler")?;
        let low_res = self.scheduler("low_res_scheduler")?;
        let max_noise_level = match self.index.value("max_noise_level") {
            None | Some(Value::Null) => 350, // the pipeline's default
            Some(v) => v
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .ok_or_else(|| {
                    self.unsupported(format!(
                        "model_index.json: max_noise_level {v} is not a non-negative integer"
                    ))
                })?,
        };
        match unet.num_classes {
            Some(n) if n > max_noise_level => {}
            other => {
                return Err(self.unsupported(format!(
                    "the UNet's class embedding (num_class_embeds {other:?}) cannot take noise levels up to \
                     max_noise_level {max_noise_level}"
                )))
            }
        }
        if max_noise_level >= low_res.num_train_timesteps {
            return Err(self.unsupported(format!(
                "max_noise_level {max_noise_level} is past the low-res schedule's {} steps",
                low_res.num_train_timesteps
            )));
        }

        let files = self.files("text_encoder")?;
        let err = self.import_err("text_encoder");
        let ca = import::DiffusersClipConfig::from_file(&files.config)
            .and_then(|c| c.arch())
            .map_err(&err)?;
        let map = import::clip_key_map_for(&ca)
            .map_err(&err)?
            .with_canonical_prefix(import::CLIP_PREFIX);
        add_component(&mut store, &files.weights, &map, &|_| false)?;
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
        if unet.context_dim != Some(text.hidden) {
            return Err(self.unsupported(format!(
                "the UNet's cross_attention_dim {:?} differs from the text encoder's width {}",
                unet.context_dim, text.hidden
            )));
        }
        self.check_channels(&unet, &first.spec, image_channels(&first.spec))?;
        let tok_dir = self.dir.join("tokenizer");
        let tokenizer = ClipTokenizer::from_dir_or_builtin(&tok_dir)
            .map_err(|e| PipelineError::Model(format!("{}: {e}", tok_dir.display())))?;
        let spec = ModelSpec {
            family,
            unet,
            first_stage: first.spec,
            cond: CondSpec::Text(TextSpec::Clip {
                config: text,
                layout: TextLayout::Hf,
                prefix: CLIP_PREFIX.to_string(),
            }),
            concat: ConcatSpec::LowRes {
                noise_aug: Some(NoiseAugSpec {
                    max_noise_level,
                    schedule: low_res,
                }),
            },
            latent_scale: first.scaling_factor,
            sample_size: None,
            scheduler,
        };
        Ok(self.finish(form, store, spec, Some(Tokenizer::Clip(tokenizer))))
    }
}

/// Channels of the images the first stage makes (what a low-res image concatenated to the latent has).
fn image_channels(first: &FirstStageSpec) -> usize {
    match first {
        FirstStageSpec::Kl(c) => c.ddconfig.out_ch,
        FirstStageSpec::Vq(c) => c.ddconfig.out_ch,
        FirstStageSpec::Identity { channels } => *channels,
    }
}

/// The original `AutoencoderKL` a diffusers `AutoencoderKL` describes (its levels have no attention).
fn kl_config(va: &import::VaeArch) -> AutoencoderKlConfig {
    AutoencoderKlConfig {
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
    }
}

/// Adds the tensors of the diffusers file `path` to `store` under their canonical names, strictly: every tensor
/// in `map` with its diffusers shape, every key of `map` present. Canonical keys for which `skip` holds (heads no
/// inference model reads) are checked but not added. Fused tensors are assembled in memory, in the file's dtype.
pub fn add_component(
    store: &mut WeightStore,
    path: &Path,
    map: &KeyMap,
    skip: &dyn Fn(&str) -> bool,
) -> Result<()> {
    let file = Arc::new(SafetensorsFile::open(path)?);
    let mut report = KeyReport {
        naming: "diffusers",
        ..KeyReport::default()
    };
    let mut present = std::collections::HashSet::new();
    let mut fused = std::collections::BTreeSet::new();
    for name in file.names() {
        let Some(e) = map.entry(name) else {
            if !map.ignores_diffusers(name) {
                report.unused.push(name.to_string());
            }
            continue;
        };
        present.insert(e.diffusers.clone());
        let found = file.shape(name).unwrap_or(&[]).to_vec();
        if found != e.diffusers_shape {
            report.shape.push(ShapeMismatch {
                key: name.to_string(),
                expected: e.diffusers_shape.clone(),
                found,
            });
            continue;
        }
        if skip(&e.canonical) {
            continue;
        }
        match e.conversion {
            Conversion::Identity => store.add_from_file(&e.canonical, &file, name, None),
            Conversion::Reshape => {
                store.add_from_file(&e.canonical, &file, name, Some(e.canonical_shape.clone()))
            }
            Conversion::RowBlock { .. } | Conversion::HeadBlock { .. } => {
                fused.insert(e.canonical.clone());
            }
        }
    }
    for e in map.entries() {
        if !present.contains(&e.diffusers) {
            report.missing.push(MissingKey {
                key: e.diffusers.clone(),
                expected: e.diffusers_shape.clone(),
            });
        }
    }
    if !report.is_empty() {
        report.unused.sort();
        return Err(PipelineError::Model(format!(
            "{}: {}",
            path.display(),
            import::ImportError::Keys(Box::new(report))
        )));
    }
    // Every part is present with its shape: assemble the fused tensors.
    for canonical in &fused {
        let mut parts: Vec<(String, Conversion, Vec<usize>)> = map
            .diffusers_keys(canonical)
            .iter()
            .filter_map(|d| map.entry(d))
            .map(|e| (e.diffusers.clone(), e.conversion, e.canonical_shape.clone()))
            .collect();
        parts.sort_by_key(|(_, c, _)| c.block().map(|b| b.0));
        let tensors = parts
            .iter()
            .map(|(d, ..)| file.load(d))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let Some((_, conversion, shape)) = parts.first() else {
            continue;
        };
        let t = fuse(&tensors, conversion, shape).map_err(|e| {
            PipelineError::Model(format!("{}: fusing `{canonical}`: {e}", path.display()))
        })?;
        store.insert(canonical, t);
    }
    Ok(())
}

/// The canonical tensor of `canonical_shape` made of `parts` (in block order), as `KeyMap::to_canonical` does.
fn fuse(
    parts: &[candle_core::Tensor],
    conversion: &Conversion,
    canonical_shape: &[usize],
) -> std::result::Result<candle_core::Tensor, String> {
    let count = match conversion {
        Conversion::RowBlock { count, .. } | Conversion::HeadBlock { count, .. } => *count,
        _ => return Err("not a fused tensor".into()),
    };
    if parts.len() != count {
        return Err(format!("{} of {count} blocks", parts.len()));
    }
    let t = match conversion {
        Conversion::HeadBlock { heads, .. } => {
            let dim0 = canonical_shape.first().copied().unwrap_or(0);
            let rest: usize = canonical_shape.iter().skip(1).product();
            let rows = dim0 / (heads * count).max(1);
            let blocks = parts
                .iter()
                .map(|p| p.reshape((*heads, 1, rows, rest)))
                .collect::<candle_core::Result<Vec<_>>>()
                .map_err(|e| e.to_string())?;
            candle_core::Tensor::cat(&blocks, 1)
                .and_then(|t| t.reshape(canonical_shape))
                .map_err(|e| e.to_string())?
        }
        _ => candle_core::Tensor::cat(parts, 0)
            .and_then(|t| t.reshape(canonical_shape))
            .map_err(|e| e.to_string())?,
    };
    Ok(t)
}
