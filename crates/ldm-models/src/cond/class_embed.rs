//! Class-label conditioning of the class-conditional ImageNet models (`cin256`, `cin256-v2`, `cin-ldm-vq-f8`):
//! `ldm.modules.encoders.modules.ClassEmbedder`, an `nn.Embedding(n_classes, embed_dim)` whose output for a
//! batch of labels is `[B, 1, embed_dim]` — a context of one token that the UNet's spatial transformers attend to
//! (`conditioning_key: crossattn`).
//!
//! Classifier-free guidance (Ho & Salimans 2021) needs an unconditional input. The original code has no
//! dedicated parameter for it: `cin256-v2.yaml` sets `n_classes: 1001`, one row more than ImageNet's 1000
//! classes, trained as the dropped-label class, and CompVis' `latent_imagenet_diffusion.ipynb` samples with
//! `uc = get_learned_conditioning({class_label: [1000] * n})` and `unconditional_guidance_scale = 3.0`:
//! `eps = eps(x, uc) + s · (eps(x, c) − eps(x, uc))`. The older `cin256` config (default `n_classes: 1000`) has no
//! such row and cannot be guided. [`ClassEmbedderConfig::from_original`] records this convention
//! (`null_class = Some(1000)` for 1001 rows); any other table states its null class explicitly.
use candle_core::{DType, Device, Tensor};
use candle_nn::{Embedding, Module, VarBuilder};
use serde::{Deserialize, Serialize};

use super::{CondError, Result};

/// `cond_stage_config.params` of a `ClassEmbedder` (`key` is a data-loader concern and not kept).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassEmbedderConfig {
    /// Rows of the embedding table (the original's `n_classes`, default 1000), including a null class if any.
    pub n_classes: usize,
    pub embed_dim: usize,
    /// The row used as "no class" for classifier-free guidance, when the model was trained with one.
    pub null_class: Option<usize>,
}

impl ClassEmbedderConfig {
    /// From the original YAML's `n_classes` (default 1000 when absent) and `embed_dim`. A table of 1001 rows is
    /// the cin256-v2 layout: ImageNet's classes 0..=999 and the null class 1000.
    pub fn from_original(n_classes: Option<usize>, embed_dim: usize) -> Self {
        let n_classes = n_classes.unwrap_or(1000);
        let null_class = (n_classes == 1001).then_some(1000);
        Self {
            n_classes,
            embed_dim,
            null_class,
        }
    }

    /// `configs/latent-diffusion/cin256-v2.yaml`: 1001 × 512, null class 1000.
    pub fn cin256_v2() -> Self {
        Self::from_original(Some(1001), 512)
    }
}

/// `ClassEmbedder`; key `embedding.weight` `[n_classes, embed_dim]` under `cond_stage_model`.
#[derive(Debug, Clone)]
pub struct ClassEmbedder {
    embedding: Embedding,
    config: ClassEmbedderConfig,
}

impl ClassEmbedder {
    /// `vb` at `cond_stage_model`.
    pub fn new(config: &ClassEmbedderConfig, vb: VarBuilder) -> Result<Self> {
        if let Some(null) = config.null_class {
            if null >= config.n_classes {
                return Err(CondError::Config(format!(
                    "null class {null} is outside the {} rows of the class embedding",
                    config.n_classes
                )));
            }
        }
        let table = candle_nn::embedding(config.n_classes, config.embed_dim, vb.pp("embedding"))?;
        // In the builder's dtype even when the loader keeps an f16 checkpoint's matrices as stored.
        let embedding = Embedding::new(table.embeddings().to_dtype(vb.dtype())?, config.embed_dim);
        Ok(Self {
            embedding,
            config: config.clone(),
        })
    }

    pub fn config(&self) -> &ClassEmbedderConfig {
        &self.config
    }

    fn device(&self) -> &Device {
        self.embedding.embeddings().device()
    }

    /// Labels → context `[B, 1, embed_dim]` (the original's `embedding(batch[key][:, None])`).
    pub fn forward(&self, labels: &[usize]) -> Result<Tensor> {
        let n_classes = self.config.n_classes;
        if let Some(&index) = labels.iter().find(|&&l| l >= n_classes) {
            return Err(CondError::ClassOutOfRange { index, n_classes });
        }
        let ids: Vec<u32> = labels.iter().map(|&l| l as u32).collect();
        let ids = Tensor::from_vec(ids, (labels.len(), 1), self.device())?; // [B, 1]
        Ok(self.embedding.forward(&ids)?) // [B, 1, D]
    }

    /// The null class, or an error naming the table size when the model has none.
    pub fn null_class(&self) -> Result<usize> {
        self.config.null_class.ok_or(CondError::NoNullClass {
            n_classes: self.config.n_classes,
        })
    }

    /// The unconditional context `[batch, 1, embed_dim]` for classifier-free guidance.
    pub fn unconditional(&self, batch: usize) -> Result<Tensor> {
        let null = self.null_class()?;
        self.forward(&vec![null; batch])
    }

    /// The embedding table `[n_classes, embed_dim]`.
    pub fn weight(&self) -> &Tensor {
        self.embedding.embeddings()
    }

    /// The dtype the table was loaded in.
    pub fn dtype(&self) -> DType {
        self.embedding.embeddings().dtype()
    }
}
