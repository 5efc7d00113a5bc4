//! The networks of a checkpoint, built strictly from its weights: the UNet, the first stage, and whatever
//! conditions the UNet (text encoder with its tokenizer, class embedder, layout encoder, semantic-map rescaler).
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use ldm_core::weights::StrictLoader;
use ldm_models::autoencoder::{AutoencoderKl, FirstStage, VqModel};
use ldm_models::cond::{ClassEmbedder, LayoutBuilder, LayoutObject, SpatialRescaler};
use ldm_models::text::{TextTransformer, XTransformer};
use ldm_models::tokenizer::{BertTokenizer, ClipTokenizer};
use ldm_models::unet::Unet;

use crate::compute::Compute;
use crate::error::{PipelineError, Result};
use crate::load::Opened;
use crate::source::CheckpointForm;
use crate::spec::{
    ignorable_single_file_key, ConcatSpec, CondSpec, FirstStageSpec, ModelSpec, TextSpec,
    COND_PREFIX, UNET_PREFIX, VAE_PREFIX, X_TRANSFORMER_PREFIX,
};

/// A prompt tokenizer.
#[derive(Debug, Clone)]
pub enum Tokenizer {
    /// CLIP BPE (SD 1.x/2.x).
    Clip(ClipTokenizer),
    /// BERT WordPiece (the paper's LDM-BERT).
    Bert(BertTokenizer),
}

/// The networks that turn a request's condition into the UNet's context.
pub enum CondModel {
    Clip {
        tokenizer: ClipTokenizer,
        text: TextTransformer,
        max_len: usize,
    },
    Bert {
        tokenizer: BertTokenizer,
        text: XTransformer,
        max_len: usize,
    },
    Class(ClassEmbedder),
    Layout {
        builder: LayoutBuilder,
        encoder: XTransformer,
    },
    None,
}

/// Every network of one checkpoint, with its configs. Read-only once built: all per-request state lives in the
/// request's own stack frame (STYLE P3).
pub struct SdModels {
    pub spec: ModelSpec,
    pub cond: CondModel,
    /// The semantic-synthesis models' `SpatialRescaler` (one-hot map → concatenated channels).
    pub rescaler: Option<SpatialRescaler>,
    pub unet: Unet,
    pub first_stage: FirstStage,
    pub device: Device,
    pub dtype: DType,
}

/// The networks of an LDM checkpoint (the same type: SD checkpoints are LDMs).
pub type Models = SdModels;

impl SdModels {
    /// Builds every component from `opened` in f32 on `device`, then fails with every missing, mis-shaped and
    /// unexpected tensor of all components at once.
    pub fn build(opened: Opened, device: &Device) -> Result<Self> {
        Self::build_on(
            opened,
            &Compute {
                device: device.clone(),
                dtype: DType::F32,
            },
        )
    }

    /// [`SdModels::build`] with every weight converted to `compute.dtype` (as it is read) on
    /// `compute.device`. The pipelines keep their sampler state in f32 and cast at the networks' inputs and
    /// outputs ([`crate::compute`]). In f32 on the CPU, an fp16/bf16 checkpoint's matrices and kernels stay in
    /// their stored dtype (half the memory of widening them at load); Linear and Conv2d widen them per pass, with
    /// identical results.
    pub fn build_on(opened: Opened, compute: &Compute) -> Result<Self> {
        let device = &compute.device;
        let keep = device.is_cpu() && compute.dtype == DType::F32;
        let loader = StrictLoader::new(opened.store.clone()).keep_stored_dtype(keep);
        let vb = loader.var_builder(compute.dtype, device);
        let single_file = !matches!(opened.form, CheckpointForm::Diffusers(_));
        let models = Self::build_with(opened.spec, opened.tokenizer, vb, device)?;
        loader.finish(&|k| single_file && ignorable_single_file_key(&models.spec, k))?;
        Ok(models)
    }

    /// Builds every component of `spec` from `vb` under the canonical (CompVis) key names. Training passes a
    /// `VarMap`-backed builder here, so the same networks get trainable weights.
    pub fn build_with(
        spec: ModelSpec,
        tokenizer: Option<Tokenizer>,
        vb: VarBuilder,
        device: &Device,
    ) -> Result<Self> {
        let dtype = vb.dtype();
        let model = |e: candle_core::Error| PipelineError::Model(e.to_string());
        let cond_model = |e: ldm_models::cond::CondError| PipelineError::Model(e.to_string());
        let cond = match (&spec.cond, tokenizer) {
            (
                CondSpec::Text(TextSpec::Clip {
                    config,
                    layout,
                    prefix,
                }),
                Some(Tokenizer::Clip(tokenizer)),
            ) => CondModel::Clip {
                tokenizer,
                text: TextTransformer::load(vb.pp(prefix), config, *layout).map_err(model)?,
                max_len: config.max_positions,
            },
            (CondSpec::Text(TextSpec::Bert(config)), Some(Tokenizer::Bert(tokenizer))) => {
                CondModel::Bert {
                    tokenizer,
                    text: XTransformer::load(vb.pp(X_TRANSFORMER_PREFIX), config).map_err(model)?,
                    max_len: config.max_seq_len,
                }
            }
            (CondSpec::Text(_), _) => {
                return Err(PipelineError::Model(
                    "the text encoder and the tokenizer found do not belong together".into(),
                ))
            }
            (CondSpec::Class(c), _) => {
                CondModel::Class(ClassEmbedder::new(c, vb.pp(COND_PREFIX)).map_err(cond_model)?)
            }
            (CondSpec::Layout { encoder, builder }, _) => CondModel::Layout {
                builder: LayoutBuilder::new(builder.clone(), None).map_err(cond_model)?,
                encoder: XTransformer::load(vb.pp(X_TRANSFORMER_PREFIX), encoder).map_err(model)?,
            },
            (CondSpec::None, _) => CondModel::None,
        };
        let rescaler = match &spec.concat {
            ConcatSpec::Semantic(r) => {
                Some(SpatialRescaler::new(r, vb.pp(COND_PREFIX)).map_err(cond_model)?)
            }
            _ => None,
        };
        let unet = Unet::new(vb.pp(UNET_PREFIX), &spec.unet).map_err(model)?;
        let first_stage = match &spec.first_stage {
            FirstStageSpec::Kl(c) => {
                FirstStage::Kl(AutoencoderKl::new(c, vb.pp(VAE_PREFIX)).map_err(model)?)
            }
            FirstStageSpec::Vq(c) => {
                FirstStage::Vq(VqModel::new(c, vb.pp(VAE_PREFIX)).map_err(model)?)
            }
            FirstStageSpec::Identity { channels } => FirstStage::Identity {
                channels: *channels,
            },
        };
        Ok(Self {
            spec,
            cond,
            rescaler,
            unet,
            first_stage,
            device: device.clone(),
            dtype,
        })
    }

    /// Token ids of `prompt`, padded/truncated to the text model's context length.
    pub fn token_ids(&self, prompt: &str) -> Result<Vec<u32>> {
        let tok = |e: ldm_models::tokenizer::TokenizerError| PipelineError::Model(e.to_string());
        match &self.cond {
            CondModel::Clip {
                tokenizer, max_len, ..
            } => tokenizer.encode_padded(prompt, *max_len).map_err(tok),
            CondModel::Bert {
                tokenizer, max_len, ..
            } => tokenizer.encode_padded(prompt, *max_len).map_err(tok),
            _ => Err(self.no_prompts()),
        }
    }

    fn no_prompts(&self) -> PipelineError {
        PipelineError::invalid(
            "prompt",
            format!(
                "this model ({}) is not conditioned on text",
                self.spec.describe()
            ),
        )
    }

    /// The UNet's context for each prompt: [N, max_len, hidden].
    pub fn encode_prompts(&self, prompts: &[&str]) -> Result<Tensor> {
        let mut ids = Vec::new();
        for p in prompts {
            ids.extend(self.token_ids(p)?);
        }
        let n = prompts.len();
        match &self.cond {
            CondModel::Clip { text, max_len, .. } => {
                let ids = Tensor::from_vec(ids, (n, *max_len), &self.device)?;
                Ok(text.forward(&ids)?)
            }
            CondModel::Bert { text, max_len, .. } => {
                let ids = Tensor::from_vec(ids, (n, *max_len), &self.device)?;
                Ok(text.forward(&ids)?)
            }
            _ => Err(self.no_prompts()),
        }
    }

    /// The UNet's context for class labels ([N, 1, D]), checked against the embedding table.
    pub fn encode_classes(&self, labels: &[usize]) -> Result<Tensor> {
        match &self.cond {
            CondModel::Class(c) => c
                .forward(labels)
                .map_err(|e| PipelineError::invalid("class", e.to_string())),
            _ => Err(PipelineError::invalid(
                "class",
                format!(
                    "this model ({}) is not class-conditional",
                    self.spec.describe()
                ),
            )),
        }
    }

    /// The unconditional context of a class-conditional model ([N, 1, D]): its null class.
    pub fn null_class_context(&self, n: usize) -> Result<Tensor> {
        match &self.cond {
            CondModel::Class(c) => c
                .unconditional(n)
                .map_err(|e| PipelineError::invalid("cfg_scale", e.to_string())),
            _ => Err(PipelineError::invalid(
                "class",
                "this model is not class-conditional",
            )),
        }
    }

    /// The UNet's context for layouts ([N, L, D]); `None` entries are the empty (unconditional) layout.
    pub fn encode_layouts(&self, layouts: &[Option<&[LayoutObject]>]) -> Result<Tensor> {
        let CondModel::Layout { builder, encoder } = &self.cond else {
            return Err(PipelineError::invalid(
                "boxes",
                format!(
                    "this model ({}) is not a layout-to-image model",
                    self.spec.describe()
                ),
            ));
        };
        let mut ids = Vec::new();
        for l in layouts {
            let row = match l {
                Some(objects) => builder
                    .build(objects)
                    .map_err(|e| PipelineError::invalid("boxes", e.to_string()))?,
                None => builder.unconditional(),
            };
            ids.extend(row);
        }
        let len = builder.config().sequence_length();
        let ids = Tensor::from_vec(ids, (layouts.len(), len), &self.device)?;
        Ok(encoder.forward(&ids)?)
    }
}
