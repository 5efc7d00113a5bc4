//! Shared test helpers: fixture loading (made by tools/fixtures/make_samplers.py), the analytic fake model the
//! fixtures were made with, and a noise source that replays recorded torch draws.
#![allow(dead_code)]

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use ldm_core::rng::NoiseRng;
use ldm_sampling::{NoisePredictor, Result, SchedulerConfig};

pub fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/samplers")
}

pub fn load_tensors(file: &str) -> HashMap<String, Tensor> {
    let path = fixture_dir().join(file);
    candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

pub fn load_meta() -> serde_json::Value {
    let path = fixture_dir().join("runs.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("runs.json is JSON")
}

pub fn vec_f64(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .and_then(|t| t.to_dtype(candle_core::DType::F64))
        .and_then(|t| t.to_vec1())
        .expect("tensor")
}

pub fn f32_list(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number"))
        .collect()
}

/// SD 1.5's scheduler config from the fixture with `overrides` merged in, parsed by the crate.
pub fn config_with(meta: &serde_json::Value, overrides: &serde_json::Value) -> SchedulerConfig {
    let mut cfg = meta["sd15_config"].clone();
    if let (Some(c), Some(o)) = (cfg.as_object_mut(), overrides.as_object()) {
        for (k, v) in o {
            c.insert(k.clone(), v.clone());
        }
    }
    SchedulerConfig::from_json_str(&cfg.to_string()).expect("config parses")
}

/// The fixture's fake model: out = a(t) tanh(x) + b(t) x + c_row, recording every t it is given.
pub struct FakeModel {
    pub rows: Vec<f64>,
    pub calls: RefCell<Vec<f64>>,
}

impl FakeModel {
    pub fn new(rows: Vec<f64>) -> Self {
        Self {
            rows,
            calls: RefCell::new(Vec::new()),
        }
    }
}

impl NoisePredictor for FakeModel {
    fn predict(&self, x_in: &Tensor, t: f64) -> Result<Tensor> {
        self.calls.borrow_mut().push(t);
        let a = 0.8 + 0.2 * (t / 150.0).cos();
        let b = 0.3 * (t / 250.0 + 0.5).sin();
        let rows = Tensor::from_vec(self.rows.clone(), (self.rows.len(), 1, 1, 1), x_in.device())?
            .to_dtype(x_in.dtype())?;
        Ok(((x_in.tanh()? * a)? + (x_in * b)?)?.broadcast_add(&rows)?)
    }
}

/// Replays recorded `torch.randn` draws in order.
pub struct ReplayRng {
    pub draws: Vec<Vec<f32>>,
    pub next: usize,
}

impl ReplayRng {
    pub fn new(draws: Vec<Vec<f32>>) -> Self {
        Self { draws, next: 0 }
    }
}

impl NoiseRng for ReplayRng {
    fn randn(&mut self, n: usize) -> Vec<f32> {
        let d = self.draws.get(self.next).cloned().unwrap_or_default();
        self.next += 1;
        assert_eq!(
            d.len(),
            n,
            "draw {} has {} values, sampler asked for {n}",
            self.next - 1,
            d.len()
        );
        d
    }
}

/// Worst ratio |x−y| / max(R·|x+y|, A) over the elements (≤ 1 passes), and the worst absolute error.
pub fn tolerance_ratio(x: &[f64], y: &[f64], r: f64, a: f64) -> (f64, f64) {
    assert_eq!(x.len(), y.len());
    x.iter()
        .zip(y)
        .fold((0.0f64, 0.0f64), |(worst, abs), (&x, &y)| {
            let err = (x - y).abs();
            (worst.max(err / (r * (x + y).abs()).max(a)), abs.max(err))
        })
}
