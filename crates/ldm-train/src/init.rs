//! Reproducible initial weights: a `VarMap` backend that draws each new variable from a generator seeded by the
//! run's seed and the variable's name, with the distribution the layer asks for (candle's init hints:
//! Kaiming, uniform, normal, constant). candle's own `VarMap` draws from a thread-local generator, so two runs of
//! the same recipe would start from different weights; with this backend a recipe and a seed fix the run.
use candle_core::{DType, Device, Result, Shape, Tensor, Var};
use candle_nn::init::NormalOrUniform;
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder, VarMap};
use ldm_core::rng::{NoiseRng, TorchRng};

/// A `VarMap` whose new variables come from seeded generators (one per variable name).
#[derive(Clone)]
pub struct SeededVarMap {
    varmap: VarMap,
    seed: u64,
}

/// FNV-1a of the name, so a variable's values do not depend on the order layers are built in.
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

fn draw(init: Init, shape: &Shape, rng: &mut TorchRng) -> Vec<f32> {
    let n = shape.elem_count();
    let uniform = |rng: &mut TorchRng, lo: f64, up: f64| -> Vec<f32> {
        rng.rand(n)
            .into_iter()
            .map(|u| (lo + (up - lo) * u as f64) as f32)
            .collect()
    };
    let normal = |rng: &mut TorchRng, mean: f64, std: f64| -> Vec<f32> {
        rng.randn(n)
            .into_iter()
            .map(|z| (mean + std * z as f64) as f32)
            .collect()
    };
    match init {
        Init::Const(c) => vec![c as f32; n],
        Init::Uniform { lo, up } => uniform(rng, lo, up),
        Init::Randn { mean, stdev } => normal(rng, mean, stdev),
        Init::Kaiming {
            dist,
            fan,
            non_linearity,
        } => {
            let std = non_linearity.gain() / (fan.for_shape(shape).max(1) as f64).sqrt();
            match dist {
                NormalOrUniform::Uniform => {
                    let bound = 3f64.sqrt() * std;
                    uniform(rng, -bound, bound)
                }
                NormalOrUniform::Normal => normal(rng, 0.0, std),
            }
        }
    }
}

impl SeededVarMap {
    pub fn new(varmap: VarMap, seed: u64) -> Self {
        Self { varmap, seed }
    }

    /// A `VarBuilder` creating its variables in this map.
    pub fn var_builder(&self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self.clone()), dtype, device.clone())
    }
}

impl SimpleBackend for SeededVarMap {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let mut data = self
            .varmap
            .data()
            .lock()
            .map_err(|_| candle_core::Error::Msg("the VarMap lock is poisoned".into()))?;
        if let Some(v) = data.get(name) {
            if v.shape() != &s {
                candle_core::bail!("shape mismatch on {name}: {s:?} <> {:?}", v.shape());
            }
            return Ok(v.as_tensor().clone());
        }
        let mut rng = TorchRng::new(self.seed ^ name_hash(name));
        let values = draw(h, &s, &mut rng);
        let var = Var::from_tensor(&Tensor::from_vec(values, s, dev)?.to_dtype(dtype)?)?;
        let t = var.as_tensor().clone();
        data.insert(name.to_string(), var);
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> Result<Tensor> {
        candle_core::bail!("`{name}`: a seeded VarMap creates variables only with a shape")
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.varmap
            .data()
            .lock()
            .map(|d| d.contains_key(name))
            .unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_weights_in_any_build_order() -> Result<()> {
        let dev = Device::Cpu;
        let build = |order: &[&str], seed| -> Result<Vec<Vec<f32>>> {
            let vm = VarMap::new();
            let vb = SeededVarMap::new(vm, seed).var_builder(DType::F32, &dev);
            for name in order {
                vb.get_with_hints((8, 4, 3, 3), name, candle_nn::init::DEFAULT_KAIMING_NORMAL)?;
            }
            ["a", "b"]
                .iter()
                .map(|n| vb.get((8, 4, 3, 3), n)?.flatten_all()?.to_vec1::<f32>())
                .collect()
        };
        let x = build(&["a", "b"], 1)?;
        assert_eq!(x, build(&["b", "a"], 1)?);
        assert_ne!(x, build(&["a", "b"], 2)?);
        assert_ne!(x[0], x[1]);
        // Kaiming normal with ReLU gain over fan-in 36: std √2/6.
        let v = &x[0];
        let std = (v.iter().map(|a| (a * a) as f64).sum::<f64>() / v.len() as f64).sqrt();
        assert!((std - 2f64.sqrt() / 6.0).abs() < 0.05, "{std}");
        Ok(())
    }
}
