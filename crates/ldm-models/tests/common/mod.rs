//! Helpers shared by the parity tests: fixture paths and the |x−y| ≤ max(R·|x+y|, A) comparison.
use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Result, Tensor};

pub fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures")
        .join(rel)
}

pub fn load(rel: &str) -> Result<HashMap<String, Tensor>> {
    let path = fixture(rel);
    assert!(
        path.exists(),
        "fixture {} is missing (see FIXTURE_CONTRACT / tools/fixtures/make_sd_tiny.py)",
        path.display()
    );
    candle_core::safetensors::load(&path, &Device::Cpu)
}

/// Asserts |x−y| ≤ max(R·|x+y|, A) elementwise and returns the largest |x−y|.
pub fn assert_close(name: &str, got: &Tensor, want: &Tensor, r: f32, a: f32) -> Result<f32> {
    assert_eq!(got.dims(), want.dims(), "{name}: shape");
    let x = got.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let y = want.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let mut max_err = 0f32;
    for (i, (x, y)) in x.iter().zip(&y).enumerate() {
        let err = (x - y).abs();
        assert!(
            err <= (r * (x + y).abs()).max(a),
            "{name}[{i}]: got {x}, want {y} (|diff| {err})"
        );
        max_err = max_err.max(err);
    }
    eprintln!("{name}: max |diff| {max_err:.3e} over {} values", x.len());
    Ok(max_err)
}
