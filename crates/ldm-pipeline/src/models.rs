//! The networks of a Stable Diffusion checkpoint, built strictly from its weights.
use candle_core::{DType, Device, Tensor};
use ldm_core::weights::StrictLoader;
use ldm_models::autoencoder::AutoencoderKl;
use ldm_models::text::TextTransformer;
use ldm_models::tokenizer::ClipTokenizer;
use ldm_models::unet::Unet;

use crate::error::{PipelineError, Result};
use crate::load::Opened;
use crate::source::CheckpointForm;
use crate::spec::{ignorable_single_file_key, ModelSpec, UNET_PREFIX, VAE_PREFIX};

/// Text encoder, UNet and autoencoder of one checkpoint, with its tokenizer and configs. Read-only once built:
/// all per-request state lives in the request's own stack frame (STYLE P3).
pub struct SdModels {
    pub spec: ModelSpec,
    pub tokenizer: ClipTokenizer,
    pub text: TextTransformer,
    pub unet: Unet,
    pub vae: AutoencoderKl,
    pub device: Device,
    pub dtype: DType,
}

impl SdModels {
    /// Builds every component from `opened`, then fails with every missing, mis-shaped and unexpected tensor
    /// of all components at once.
    pub fn build(opened: Opened, device: &Device) -> Result<Self> {
        let dtype = DType::F32;
        let loader = StrictLoader::new(opened.store.clone());
        let vb = loader.var_builder(dtype, device);
        let spec = opened.spec;
        let model = |e: candle_core::Error| PipelineError::Model(e.to_string());
        let text = TextTransformer::load(vb.pp(&spec.text_prefix), &spec.text, spec.text_layout)
            .map_err(model)?;
        let unet = Unet::new(vb.pp(UNET_PREFIX), &spec.unet).map_err(model)?;
        let vae = AutoencoderKl::new(&spec.vae, vb.pp(VAE_PREFIX)).map_err(model)?;
        let single_file = !matches!(opened.form, CheckpointForm::Diffusers(_));
        loader.finish(&|k| single_file && ignorable_single_file_key(&spec, k))?;
        Ok(Self {
            spec,
            tokenizer: opened.tokenizer,
            text,
            unet,
            vae,
            device: device.clone(),
            dtype,
        })
    }

    /// Token ids of `prompt`, padded/truncated to the text model's context length.
    pub fn token_ids(&self, prompt: &str) -> Result<Vec<u32>> {
        self.tokenizer
            .encode_padded(prompt, self.spec.text.max_positions)
            .map_err(|e| PipelineError::Model(e.to_string()))
    }

    /// The UNet's context for each prompt: [N, max_positions, hidden].
    pub fn encode_prompts(&self, prompts: &[&str]) -> Result<Tensor> {
        let mut ids = Vec::new();
        for p in prompts {
            ids.extend(self.token_ids(p)?);
        }
        let ids = Tensor::from_vec(
            ids,
            (prompts.len(), self.spec.text.max_positions),
            &self.device,
        )?;
        Ok(self.text.forward(&ids)?)
    }
}
