//! Training recipes: TOML files that say what to train on what data, and how.
//!
//! The network itself is described the way the LDM code base describes it — an original-style YAML (the
//! `model:` section of `configs/latent-diffusion/*.yaml` or `configs/autoencoder/*.yaml`), read through the
//! same typed table as inference — so a trained model is exported with that YAML beside it and loads in every
//! inference command. The recipe adds the data and the optimisation settings:
//!
//! ```toml
//! model = "fashion-ldm.yaml"            # relative to this file
//! first_stage = "../ae/model.safetensors" # a trained autoencoder (not for a pixel-space, f = 1 model)
//! [data]
//! mnist = "/usr/share/dataset-fashion-mnist"   # or: folder = "images/"
//! size = 32
//! [train]
//! steps = 20000
//! batch_size = 32
//! lr = 1e-4
//! ema_decay = 0.9999
//! cond_drop = 0.1
//! ```
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Result, TrainError};

/// How labels are read from an image folder.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LabelSource {
    /// First-level sub-folder names, sorted, are the classes.
    Subfolders,
    /// A CSV/TSV file of `filename,label` lines (relative to the recipe).
    Csv(PathBuf),
}

/// Where the training images come from.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataRecipe {
    /// A folder of png/jpg/webp images (captions from same-stem `.txt` files).
    pub folder: Option<PathBuf>,
    /// A folder holding MNIST / Fashion-MNIST IDX files (`train-images-idx3-ubyte[.gz]`, ...).
    pub mnist: Option<PathBuf>,
    pub labels: Option<LabelSource>,
    /// Training size in pixels (square). Images are resized (shorter side) and cropped to it.
    pub size: usize,
    /// Require every image to have the training size instead of resizing.
    #[serde(default)]
    pub no_resize: bool,
    #[serde(default = "yes")]
    pub random_flip: bool,
    /// Random crop instead of centre crop.
    #[serde(default)]
    pub random_crop: bool,
    /// Fraction of the data held out for evaluation (the autoencoder's PSNR/SSIM).
    #[serde(default = "default_holdout")]
    pub holdout: f64,
}

fn yes() -> bool {
    true
}
fn default_holdout() -> f64 {
    0.02
}

/// How the learning rate moves after warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LrDecay {
    #[default]
    Constant,
    Cosine,
}

/// Optimisation settings shared by the trainers.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSettings {
    pub steps: u64,
    pub batch_size: usize,
    /// Micro-batches per optimiser step (the effective batch is `batch_size · grad_accum`).
    #[serde(default = "one")]
    pub grad_accum: usize,
    pub lr: f64,
    #[serde(default)]
    pub warmup_steps: u64,
    #[serde(default)]
    pub lr_decay: LrDecay,
    /// AdamW's decoupled weight decay (torch's default 0.01, which the LDM code base uses).
    #[serde(default = "default_wd")]
    pub weight_decay: f64,
    #[serde(default = "default_betas")]
    pub betas: (f64, f64),
    #[serde(default = "default_eps")]
    pub adam_eps: f64,
    /// Clip the global gradient norm to this value.
    pub clip_grad_norm: Option<f64>,
    /// Keep an exponential moving average of the weights with this decay (LDM: 0.9999).
    pub ema_decay: Option<f64>,
    /// Probability of replacing the condition by the null condition (classifier-free guidance training).
    #[serde(default)]
    pub cond_drop: f64,
    #[serde(default)]
    pub seed: u64,
    #[serde(default = "default_ckpt_every")]
    pub checkpoint_every: u64,
    /// Step checkpoints kept besides `last.safetensors` (0 = only the last).
    #[serde(default = "default_keep")]
    pub keep_checkpoints: usize,
    /// Write a sample (or reconstruction) grid every so many steps (0 = only at the end).
    #[serde(default)]
    pub sample_every: u64,
    #[serde(default = "default_log_every")]
    pub log_every: u64,
    /// Encode the data set once with the first stage and train from the cached latents.
    #[serde(default = "yes")]
    pub cache_latents: bool,
}

fn one() -> usize {
    1
}
fn default_wd() -> f64 {
    0.01
}
fn default_betas() -> (f64, f64) {
    (0.9, 0.999)
}
fn default_eps() -> f64 {
    1e-8
}
fn default_ckpt_every() -> u64 {
    500
}
fn default_keep() -> usize {
    2
}
fn default_log_every() -> u64 {
    10
}

/// Sampling settings for the grids written during training.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SampleSettings {
    #[serde(default = "default_sample_steps")]
    pub steps: usize,
    #[serde(default = "default_grid")]
    pub count: usize,
    #[serde(default = "default_cfg")]
    pub cfg_scale: f64,
    /// Prompts for text-conditioned models (cycled over the grid).
    #[serde(default)]
    pub prompts: Vec<String>,
}

fn default_sample_steps() -> usize {
    50
}
fn default_grid() -> usize {
    16
}
fn default_cfg() -> f64 {
    1.0
}

impl Default for SampleSettings {
    fn default() -> Self {
        Self {
            steps: default_sample_steps(),
            count: default_grid(),
            cfg_scale: default_cfg(),
            prompts: Vec::new(),
        }
    }
}

/// Which weights a LoRA adapts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoraTargetSet {
    /// The `to_q`/`to_k`/`to_v`/`to_out.0` projections of every self- and cross-attention of the UNet's
    /// transformer blocks (kohya's and the LoRA paper's choice for SD).
    #[default]
    Attention,
}

/// Storage type of the saved LoRA file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoraDtype {
    /// kohya's usual `--save_precision fp16`.
    #[default]
    F16,
    Bf16,
    F32,
}

/// `[lora]`: train low-rank adapters on a frozen `init` model instead of the whole UNet; the result is a
/// kohya/AUTOMATIC1111 LoRA file (`lora.safetensors`) for `--lora FILE[:WEIGHT]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraRecipe {
    /// r (kohya's `network_dim`).
    #[serde(default = "default_lora_rank")]
    pub rank: usize,
    /// α (kohya's `network_alpha`): the change is scaled by α / r.
    #[serde(default = "one_f")]
    pub alpha: f64,
    #[serde(default)]
    pub targets: LoraTargetSet,
    #[serde(default)]
    pub save_dtype: LoraDtype,
}

fn default_lora_rank() -> usize {
    4
}

impl LoraRecipe {
    pub fn validate(&self) -> Result<()> {
        if self.rank == 0 || self.rank > 1024 {
            return Err(TrainError::invalid(
                "lora.rank",
                format!("{} (must be 1..=1024)", self.rank),
            ));
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return Err(TrainError::invalid(
                "lora.alpha",
                format!("{} (must be positive)", self.alpha),
            ));
        }
        Ok(())
    }
}

/// `[masks]`: the random masks of inpainting training (SD inpainting's recipe: synthetic masks, and in a
/// quarter of the examples everything masked). Each example is either fully masked (probability `full`) or
/// gets `boxes` (a range) rectangles, each side a uniform fraction in [`min_side`, `max_side`] of the image's.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaskSettings {
    #[serde(default = "default_full_mask")]
    pub full: f64,
    #[serde(default = "default_boxes")]
    pub boxes: (usize, usize),
    #[serde(default = "default_min_side")]
    pub min_side: f64,
    #[serde(default = "default_max_side")]
    pub max_side: f64,
}

fn default_full_mask() -> f64 {
    0.25
}
fn default_boxes() -> (usize, usize) {
    (1, 3)
}
fn default_min_side() -> f64 {
    0.1
}
fn default_max_side() -> f64 {
    0.5
}

impl Default for MaskSettings {
    fn default() -> Self {
        Self {
            full: default_full_mask(),
            boxes: default_boxes(),
            min_side: default_min_side(),
            max_side: default_max_side(),
        }
    }
}

impl MaskSettings {
    pub fn validate(&self) -> Result<()> {
        if !(0.0..=1.0).contains(&self.full) {
            return Err(TrainError::invalid(
                "masks.full",
                format!("{} is not a probability", self.full),
            ));
        }
        let (lo, hi) = self.boxes;
        if lo == 0 || lo > hi || hi > 64 {
            return Err(TrainError::invalid(
                "masks.boxes",
                format!("[{lo}, {hi}] is not a range of box counts in 1..=64"),
            ));
        }
        if !(self.min_side > 0.0 && self.min_side <= self.max_side && self.max_side <= 1.0) {
            return Err(TrainError::invalid(
                "masks.min_side",
                format!(
                    "[{}, {}] is not a range of side fractions in (0, 1]",
                    self.min_side, self.max_side
                ),
            ));
        }
        Ok(())
    }
}

/// `ldm train`: a latent diffusion model on a trained first stage.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LdmRecipe {
    /// Original-style model YAML (architecture, schedule, conditioning, latent scale).
    pub model: PathBuf,
    /// The trained first stage (an exported autoencoder, or a full LDM/SD checkpoint holding one).
    pub first_stage: Option<PathBuf>,
    /// Start from these weights (fine-tuning) instead of a random initialisation.
    pub init: Option<PathBuf>,
    pub data: DataRecipe,
    pub train: TrainSettings,
    #[serde(default)]
    pub sample: SampleSettings,
    /// Fine-tune LoRA adapters of `init` instead of the whole UNet.
    pub lora: Option<LoraRecipe>,
    /// Random masks for inpainting models.
    #[serde(default)]
    pub masks: MaskSettings,
}

/// Loss settings of autoencoder training (LDM's `LPIPSWithDiscriminator` / `VQLPIPSWithDiscriminator`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AutoencoderLoss {
    #[serde(default = "default_kl_weight")]
    pub kl_weight: f64,
    #[serde(default = "default_disc_weight")]
    pub disc_weight: f64,
    /// The step at which the adversarial loss switches on.
    #[serde(default)]
    pub disc_start: u64,
    #[serde(default = "one_f")]
    pub perceptual_weight: f64,
    #[serde(default = "one_f")]
    pub codebook_weight: f64,
    /// torchvision's VGG16 weights (`vgg16-397923af.pth`) for LPIPS.
    pub vgg16: Option<PathBuf>,
    /// The LPIPS heads (`lpips` package: `weights/v0.1/vgg.pth`).
    pub lpips: Option<PathBuf>,
    /// Learning rate of the discriminator (defaults to the autoencoder's).
    pub disc_lr: Option<f64>,
    #[serde(default = "default_disc_layers")]
    pub disc_layers: usize,
    #[serde(default = "default_disc_channels")]
    pub disc_channels: usize,
}

fn default_kl_weight() -> f64 {
    1e-6
}
fn default_disc_weight() -> f64 {
    0.5
}
fn one_f() -> f64 {
    1.0
}
fn default_disc_layers() -> usize {
    3
}
fn default_disc_channels() -> usize {
    64
}

impl Default for AutoencoderLoss {
    fn default() -> Self {
        Self {
            kl_weight: default_kl_weight(),
            disc_weight: default_disc_weight(),
            disc_start: 0,
            perceptual_weight: 1.0,
            codebook_weight: 1.0,
            vgg16: None,
            lpips: None,
            disc_lr: None,
            disc_layers: default_disc_layers(),
            disc_channels: default_disc_channels(),
        }
    }
}

/// `ldm train-autoencoder`: a KL or VQ first stage.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AutoencoderRecipe {
    /// Original-style autoencoder YAML (`configs/autoencoder/*.yaml` layout: ddconfig, embed_dim, n_embed).
    pub model: PathBuf,
    pub data: DataRecipe,
    pub train: TrainSettings,
    #[serde(default)]
    pub loss: AutoencoderLoss,
}

fn read_toml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<(T, PathBuf)> {
    let text = std::fs::read_to_string(path).map_err(|e| TrainError::io(path, e))?;
    let value: T = toml::from_str(&text).map_err(|e| TrainError::Recipe {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let base = path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    Ok((value, base))
}

fn rebase(base: &Path, p: &mut PathBuf) {
    if p.is_relative() {
        *p = base.join(&*p);
    }
}

impl DataRecipe {
    fn rebase(&mut self, base: &Path) {
        for p in [&mut self.folder, &mut self.mnist].into_iter().flatten() {
            rebase(base, p);
        }
        if let Some(LabelSource::Csv(p)) = &mut self.labels {
            rebase(base, p);
        }
    }

    pub fn validate(&self) -> Result<()> {
        match (&self.folder, &self.mnist) {
            (Some(_), Some(_)) | (None, None) => {
                return Err(TrainError::invalid(
                    "data",
                    "name exactly one source: `folder` or `mnist`",
                ))
            }
            (None, Some(_)) if self.labels.is_some() => {
                return Err(TrainError::invalid(
                    "data.labels",
                    "MNIST files carry their own labels",
                ))
            }
            _ => {}
        }
        if self.size == 0 || self.size > 8192 {
            return Err(TrainError::invalid(
                "data.size",
                format!("{} px is not a usable training size", self.size),
            ));
        }
        if !(0.0..0.5).contains(&self.holdout) {
            return Err(TrainError::invalid(
                "data.holdout",
                format!("{} is not a fraction in [0, 0.5)", self.holdout),
            ));
        }
        Ok(())
    }
}

impl TrainSettings {
    pub fn validate(&self) -> Result<()> {
        let bad = |field, reason: String| Err(TrainError::invalid(field, reason));
        if self.steps == 0 {
            return bad("train.steps", "must be at least 1".into());
        }
        if self.batch_size == 0 || self.grad_accum == 0 {
            return bad(
                "train.batch_size",
                "batch_size and grad_accum must be at least 1".into(),
            );
        }
        if !(self.lr.is_finite() && self.lr > 0.0 && self.lr < 1.0) {
            return bad("train.lr", format!("{} is not a learning rate", self.lr));
        }
        let (b1, b2) = self.betas;
        if !((0.0..1.0).contains(&b1) && (0.0..1.0).contains(&b2)) {
            return bad(
                "train.betas",
                format!("{:?} must lie in [0, 1)", self.betas),
            );
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            return bad("train.weight_decay", format!("{}", self.weight_decay));
        }
        if let Some(c) = self.clip_grad_norm {
            if !(c > 0.0 && c.is_finite()) {
                return bad("train.clip_grad_norm", format!("{c} must be positive"));
            }
        }
        if let Some(d) = self.ema_decay {
            if !(0.0..1.0).contains(&d) {
                return bad("train.ema_decay", format!("{d} must lie in [0, 1)"));
            }
        }
        if !(0.0..=1.0).contains(&self.cond_drop) {
            return bad(
                "train.cond_drop",
                format!("{} is not a probability", self.cond_drop),
            );
        }
        if self.checkpoint_every == 0 || self.log_every == 0 {
            return bad(
                "train.checkpoint_every",
                "checkpoint_every and log_every must be at least 1".into(),
            );
        }
        Ok(())
    }
}

impl LdmRecipe {
    /// Reads and checks a recipe; relative paths are taken from the recipe's folder.
    pub fn load(path: &Path) -> Result<Self> {
        let (mut r, base): (Self, _) = read_toml(path)?;
        for p in [Some(&mut r.model), r.first_stage.as_mut(), r.init.as_mut()]
            .into_iter()
            .flatten()
        {
            rebase(&base, p);
        }
        r.data.rebase(&base);
        r.data.validate()?;
        r.train.validate()?;
        r.masks.validate()?;
        if r.sample.steps == 0 || r.sample.count == 0 {
            return Err(TrainError::invalid(
                "sample",
                "steps and count must be at least 1",
            ));
        }
        if let Some(l) = &r.lora {
            l.validate()?;
            if r.init.is_none() {
                return Err(TrainError::invalid(
                    "lora",
                    "LoRA fine-tuning adapts an existing model: name it with `init = \"model.safetensors\"`",
                ));
            }
        }
        Ok(r)
    }
}

impl AutoencoderRecipe {
    pub fn load(path: &Path) -> Result<Self> {
        let (mut r, base): (Self, _) = read_toml(path)?;
        rebase(&base, &mut r.model);
        for p in [r.loss.vgg16.as_mut(), r.loss.lpips.as_mut()]
            .into_iter()
            .flatten()
        {
            rebase(&base, p);
        }
        r.data.rebase(&base);
        r.data.validate()?;
        r.train.validate()?;
        if r.loss.vgg16.is_some() != r.loss.lpips.is_some() {
            return Err(TrainError::invalid(
                "loss.vgg16",
                "LPIPS needs both the VGG16 weights (`vgg16`) and the LPIPS heads (`lpips`)",
            ));
        }
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, text: &str) -> PathBuf {
        let p = dir.join("r.toml");
        std::fs::write(&p, text).expect("write recipe");
        p
    }

    const OK: &str = r#"
model = "m.yaml"
first_stage = "/abs/ae.safetensors"
[data]
mnist = "data"
size = 32
[train]
steps = 10
batch_size = 4
lr = 1e-4
cond_drop = 0.1
"#;

    #[test]
    fn a_recipe_loads_with_defaults_and_paths_relative_to_it() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| TrainError::io("tempdir", e))?;
        let r = LdmRecipe::load(&write(dir.path(), OK))?;
        assert_eq!(r.model, dir.path().join("m.yaml"));
        assert_eq!(r.first_stage, Some(PathBuf::from("/abs/ae.safetensors")));
        assert_eq!(r.data.mnist, Some(dir.path().join("data")));
        assert_eq!((r.train.grad_accum, r.train.weight_decay), (1, 0.01));
        assert!(r.data.random_flip);
        assert_eq!(r.sample.steps, 50);
        Ok(())
    }

    #[test]
    fn bad_recipes_name_the_field() {
        let dir = tempfile::tempdir().expect("tempdir");
        for (edit, field) in [
            (
                OK.replace("cond_drop = 0.1", "cond_drop = 1.5"),
                "cond_drop",
            ),
            (OK.replace("steps = 10", "steps = 0"), "train.steps"),
            (OK.replace("lr = 1e-4", "lr = -1.0"), "train.lr"),
            (OK.replace("size = 32", "size = 0"), "data.size"),
            (OK.replace("mnist = \"data\"", ""), "exactly one source"),
            (
                OK.replace("lr = 1e-4", "lr = 1e-4\nlearning_rate = 1"),
                "unknown field",
            ),
            (format!("{OK}[lora]\nrank = 4\n"), "init = "),
            (
                format!("init = \"i.safetensors\"\n{OK}[lora]\nrank = 0\n"),
                "lora.rank",
            ),
            (
                format!("init = \"i.safetensors\"\n{OK}[lora]\nrank = 4\nranks = 2\n"),
                "unknown field",
            ),
        ] {
            let err = LdmRecipe::load(&write(dir.path(), &edit))
                .expect_err(field)
                .to_string();
            assert!(err.contains(field), "{err}");
        }
    }
}
