//! LoRA fine-tuning (Hu et al. 2021) of a frozen Stable Diffusion UNet, saved in the kohya / AUTOMATIC1111
//! format that `ldm txt2img --lora FILE[:WEIGHT]` (and A1111, ComfyUI, diffusers) apply.
//!
//! Each targeted weight W0 `[out, in(, k, k)]` becomes W = W0 + (α / r) · U · D with trainable
//! D = `lora_down` `[r, in(, k, k)]` (Kaiming-uniform like `torch.nn.Linear` and kohya: U(±1/√fan_in)) and
//! U = `lora_up` `[out, r(, 1, 1)]` (zeros, so training starts from the base model exactly).
//!
//! | symbol | here |
//! |---|---|
//! | r, α | [`LoraSet::rank`], [`LoraSet::alpha`] |
//! | D, U | [`LoraLayer::down`], [`LoraLayer::up`] (`candle_core::Var`, f32) |
//! | W0 | the frozen base tensors of [`LoraBackend`] |
//!
//! The model is rebuilt from [`LoraBackend::var_builder`] for every step: the backend hands out the frozen base
//! tensors unchanged and, for targeted keys, W0 + (α / r)·U·D as a graph tensor of the current `Var` values, so
//! `loss.backward()` reaches U and D and the optimiser's in-place updates are seen by the next build.
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Shape, Tensor, Var};
use ldm_core::rng::TorchRng;
use ldm_core::weights::WeightStore;
use ldm_models::import::UNET_PREFIX;
use ldm_models::lora::LoraTargets;

use crate::error::{Result, TrainError};

/// One trained low-rank pair on one canonical weight.
#[derive(Debug, Clone)]
pub struct LoraLayer {
    /// Canonical key of the weight it changes.
    pub key: String,
    /// Kohya module name written to the file.
    pub name: String,
    /// `[r, in]` or `[r, in, k, k]`
    pub down: Var,
    /// `[out, r]` or `[out, r, 1, 1]`
    pub up: Var,
    /// Shape of the base weight.
    pub shape: Vec<usize>,
}

impl LoraLayer {
    /// (α / r) · U · D in the base weight's shape, as a graph tensor (f32).
    pub fn delta(&self, scale: f64) -> Result<Tensor> {
        let (out, r) = (self.up.dims()[0], self.up.dims()[1]);
        let up = self.up.as_tensor().reshape((out, r))?;
        let down = self.down.as_tensor().flatten_from(1)?;
        Ok((up.matmul(&down)? * scale)?.reshape(self.shape.as_slice())?)
    }
}

/// LoRA settings (kohya's `network_dim`, `network_alpha`) and the seed of the `lora_down` initialisation.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraConfig {
    /// r
    pub rank: usize,
    /// α: the change is scaled by α / r
    pub alpha: f64,
    pub seed: u64,
}

impl Default for LoraConfig {
    /// kohya sd-scripts' defaults: `network_dim` 4, `network_alpha` 1.
    fn default() -> Self {
        Self {
            rank: 4,
            alpha: 1.0,
            seed: 0,
        }
    }
}

/// The trainable LoRA pairs of one model.
#[derive(Debug, Clone)]
pub struct LoraSet {
    pub rank: usize,
    pub alpha: f64,
    layers: Vec<LoraLayer>,
}

impl LoraSet {
    /// The default targets: every `attn1`/`attn2` `to_q`/`to_k`/`to_v`/`to_out.0` weight of the UNet's
    /// transformer blocks in `store`, in key order.
    pub fn default_keys(store: &WeightStore) -> Vec<String> {
        const ENDS: [&str; 4] = [
            "to_q.weight",
            "to_k.weight",
            "to_v.weight",
            "to_out.0.weight",
        ];
        store
            .keys_under(UNET_PREFIX)
            .filter(|k| k.contains(".transformer_blocks."))
            .filter(|k| k.contains(".attn1.") || k.contains(".attn2."))
            .filter(|k| ENDS.iter().any(|e| k.ends_with(e)))
            .map(|k| format!("{UNET_PREFIX}{k}"))
            .collect()
    }

    /// New pairs of rank `config.rank` on `keys` (canonical weight keys of `store`, each with a kohya name in
    /// `targets`): D drawn from U(±1/√fan_in) by a torch-compatible generator seeded with `config.seed`, U zero.
    pub fn new(
        store: &WeightStore,
        targets: &LoraTargets,
        keys: &[String],
        config: &LoraConfig,
        device: &Device,
    ) -> Result<Self> {
        let LoraConfig { rank, alpha, seed } = *config;
        if rank == 0 {
            return Err(TrainError::invalid("lora rank", "must be at least 1"));
        }
        if !(alpha.is_finite() && alpha > 0.0) {
            return Err(TrainError::invalid(
                "lora alpha",
                format!("{alpha} (must be positive)"),
            ));
        }
        if keys.is_empty() {
            return Err(TrainError::invalid("lora targets", "no weights to adapt"));
        }
        let mut rng = TorchRng::new(seed);
        let mut layers = Vec::with_capacity(keys.len());
        for key in keys {
            let shape = store
                .shape(key)
                .ok_or_else(|| TrainError::invalid("lora targets", format!("no weight `{key}`")))?
                .to_vec();
            if !matches!(shape.len(), 2 | 4) {
                return Err(TrainError::invalid(
                    "lora targets",
                    format!("`{key}` has shape {shape:?}, not a linear or conv weight"),
                ));
            }
            let name = targets
                .kohya_name(key)
                .ok_or_else(|| {
                    TrainError::invalid(
                        "lora targets",
                        format!("`{key}` has no kohya module name (a fused or unknown weight)"),
                    )
                })?
                .to_string();
            let (out, inp) = (shape[0], shape[1]);
            let kernel: Vec<usize> = shape[2..].to_vec();
            let fan_in = inp * kernel.iter().product::<usize>();
            let bound = 1.0 / (fan_in as f32).sqrt();
            let values: Vec<f32> = rng
                .rand(rank * fan_in)
                .into_iter()
                .map(|u| (2.0 * u - 1.0) * bound)
                .collect();
            let mut down_shape = vec![rank, inp];
            down_shape.extend_from_slice(&kernel);
            let mut up_shape = vec![out, rank];
            up_shape.extend(kernel.iter().map(|_| 1));
            let down = Var::from_tensor(&Tensor::from_vec(values, down_shape, device)?)?;
            let up = Var::zeros(up_shape, DType::F32, device)?;
            layers.push(LoraLayer {
                key: key.clone(),
                name,
                down,
                up,
                shape,
            });
        }
        Ok(Self {
            rank,
            alpha,
            layers,
        })
    }

    /// α / r
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }

    pub fn layers(&self) -> &[LoraLayer] {
        &self.layers
    }

    /// Every trainable variable (down, up of each layer), for the optimiser.
    pub fn vars(&self) -> Vec<Var> {
        self.layers
            .iter()
            .flat_map(|l| [l.down.clone(), l.up.clone()])
            .collect()
    }
}

/// A `VarBuilder` backend over frozen base tensors (read once from a [`WeightStore`]) that returns
/// W0 + (α / r)·U·D for the keys a [`LoraSet`] targets.
#[derive(Clone)]
pub struct LoraBackend {
    base: Arc<HashMap<String, Tensor>>,
    patches: Arc<HashMap<String, LoraLayer>>,
    scale: f64,
    dtype: DType,
    device: Device,
}

impl LoraBackend {
    /// Reads every tensor of `store` under `prefix` (e.g. [`UNET_PREFIX`]) as `dtype` on `device`, once.
    pub fn new(
        store: &WeightStore,
        prefix: &str,
        set: &LoraSet,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let mut base = HashMap::new();
        for rel in store.keys_under(prefix) {
            let key = format!("{prefix}{rel}");
            let t = store.load(&key, dtype, device)?;
            base.insert(key, t);
        }
        let mut patches = HashMap::new();
        for l in set.layers() {
            if !base.contains_key(&l.key) {
                return Err(TrainError::invalid(
                    "lora targets",
                    format!("`{}` is not under `{prefix}`", l.key),
                ));
            }
            patches.insert(l.key.clone(), l.clone());
        }
        Ok(Self {
            base: Arc::new(base),
            patches: Arc::new(patches),
            scale: set.scale(),
            dtype,
            device: device.clone(),
        })
    }

    /// A fresh builder rooted at the canonical key root (position it with `.pp("model.diffusion_model")`).
    pub fn var_builder(&self) -> candle_nn::VarBuilder<'static> {
        candle_nn::VarBuilder::from_backend(Box::new(self.clone()), self.dtype, self.device.clone())
    }

    /// The tensor the model gets for `key`.
    pub fn tensor(&self, key: &str) -> candle_core::Result<Tensor> {
        let w0 = self
            .base
            .get(key)
            .ok_or_else(|| candle_core::Error::CannotFindTensor {
                path: key.to_string(),
            })?;
        match self.patches.get(key) {
            None => Ok(w0.clone()),
            Some(l) => {
                let delta = l.delta(self.scale).map_err(candle_core::Error::wrap)?;
                (w0.to_dtype(DType::F32)? + delta.to_device(w0.device())?)?.to_dtype(w0.dtype())
            }
        }
    }
}

impl candle_nn::var_builder::SimpleBackend for LoraBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.tensor(name)?;
        if t.dims() != s.dims() {
            return Err(candle_core::Error::UnexpectedShape {
                msg: format!("weight `{name}`"),
                expected: s,
                got: t.shape().clone(),
            });
        }
        t.to_dtype(dtype)?.to_device(dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.tensor(name)?.to_dtype(dtype)?.to_device(dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.base.contains_key(name)
    }
}

/// Writes `set` as a kohya LoRA (`<name>.lora_down.weight`, `<name>.lora_up.weight` in `dtype` (F16 or F32),
/// `<name>.alpha` f32 scalar) with kohya's `ss_network_module`/`ss_network_dim`/`ss_network_alpha` metadata
/// plus `metadata`, atomically and deterministically (tensors and metadata in key order).
pub fn save_kohya(
    path: &Path,
    set: &LoraSet,
    metadata: &HashMap<String, String>,
    dtype: DType,
) -> Result<()> {
    if !matches!(dtype, DType::F16 | DType::F32 | DType::BF16) {
        return Err(TrainError::invalid(
            "lora dtype",
            format!("{dtype:?} (use f16, bf16 or f32)"),
        ));
    }
    let mut tensors: Vec<(String, Tensor)> = Vec::with_capacity(3 * set.layers.len());
    let alpha = Tensor::new(set.alpha as f32, &Device::Cpu)?;
    for l in &set.layers {
        let cpu = |v: &Var| -> Result<Tensor> {
            Ok(v.as_tensor()
                .detach()
                .to_device(&Device::Cpu)?
                .to_dtype(dtype)?)
        };
        tensors.push((format!("{}.lora_down.weight", l.name), cpu(&l.down)?));
        tensors.push((format!("{}.lora_up.weight", l.name), cpu(&l.up)?));
        tensors.push((format!("{}.alpha", l.name), alpha.clone()));
    }
    let mut meta = HashMap::from([
        ("ss_network_module".to_string(), "networks.lora".to_string()),
        ("ss_network_dim".to_string(), set.rank.to_string()),
        ("ss_network_alpha".to_string(), format!("{}", set.alpha)),
    ]);
    meta.extend(metadata.iter().map(|(k, v)| (k.clone(), v.clone())));
    // A sorted map and our own writer: the same adapters give the same bytes (the safetensors crate writes a
    // HashMap's metadata in a per-process order), and the file is written atomically.
    let meta: std::collections::BTreeMap<String, String> = meta.into_iter().collect();
    let refs: Vec<(String, &Tensor)> = tensors.iter().map(|(k, t)| (k.clone(), t)).collect();
    crate::checkpoint::save_safetensors(path, &refs, &meta)
}
