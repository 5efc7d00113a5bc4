//! The (key, shape) manifest a UNet config asks for, without allocating weights.
//!
//! Building the model through a recording VarBuilder backend lists exactly the tensors the module tree
//! reads, so a strict loader can report missing and unused keys (STYLE P6) and a test can compare the
//! manifest with a real checkpoint header (STYLE §2.5.5).
use super::{Unet, UnetConfig};
use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use std::sync::{Arc, Mutex};

type KeyList = Arc<Mutex<Vec<(String, Vec<usize>)>>>;

/// A VarBuilder backend that records each request and answers with a zero-memory view.
struct Recorder(KeyList);

fn poisoned<T>(_: T) -> candle_core::Error {
    candle_core::Error::Msg("UNet key recorder: lock poisoned".into())
}

impl SimpleBackend for Recorder {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> Result<Tensor> {
        self.0
            .lock()
            .map_err(poisoned)?
            .push((name.to_string(), s.dims().to_vec()));
        Tensor::zeros((), dtype, dev)?.broadcast_as(s) // stride-0 view: no memory per weight
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> Result<Tensor> {
        candle_core::bail!("UNet key recorder: `{name}` requested without a shape")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

/// Every `(key, shape)` the UNet of `config` reads, relative to `model.diffusion_model`, sorted by key.
pub fn unet_keys(config: &UnetConfig) -> Result<Vec<(String, Vec<usize>)>> {
    let keys = KeyList::default();
    let backend: Box<dyn SimpleBackend> = Box::new(Recorder(keys.clone()));
    Unet::new(
        VarBuilder::from_backend(backend, DType::F32, Device::Cpu),
        config,
    )?;
    let mut keys = keys.lock().map_err(poisoned)?.clone();
    keys.sort();
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Counts from diffusers 0.42.1: `UNet2DConditionModel` with the SD1.5 / SD2.1 configs has 686 tensors
    // (the original checkpoints map 1:1) and these parameter totals.
    #[test]
    fn sd_presets_have_the_real_key_counts() -> Result<()> {
        for (cfg, params) in [
            (UnetConfig::sd_v1(), SD1_PARAMS),
            (UnetConfig::sd_v2(), SD2_PARAMS),
        ] {
            let keys = unet_keys(&cfg)?;
            assert_eq!(keys.len(), 686);
            let total: usize = keys.iter().map(|(_, s)| s.iter().product::<usize>()).sum();
            assert_eq!(total, params);
        }
        Ok(())
    }

    // The original `UNetModel` built from x4-upscaling.yaml (Stability-AI/stablediffusion @ cf1d67a) on the meta
    // device: 687 tensors (SD2's 686 + label_emb.weight [1000, 1024]), 473,398,020 parameters.
    #[test]
    fn x4_upscaler_preset_has_the_original_key_count() -> Result<()> {
        let keys = unet_keys(&UnetConfig::sd_x4_upscaler())?;
        assert_eq!(keys.len(), 687);
        let total: usize = keys.iter().map(|(_, s)| s.iter().product::<usize>()).sum();
        assert_eq!(total, 473_398_020);
        let label = keys.iter().find(|(k, _)| k == "label_emb.weight");
        assert_eq!(label.map(|(_, s)| s.as_slice()), Some(&[1000, 1024][..]));
        Ok(())
    }

    const SD1_PARAMS: usize = 859_520_964;
    const SD2_PARAMS: usize = 865_910_724;
}
