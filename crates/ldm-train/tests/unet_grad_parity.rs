//! Gradient parity of the LDM UNet's training step with PyTorch/diffusers (issue 4, "How it is proven").
//!
//! Fixture: `fixtures/train-unet-grad/` made by `tools/fixtures/make_unet_grad.py` (torch 2.15, diffusers 0.42.1):
//! a tiny `UNet2DConditionModel` (channels (16, 32), 1 res block per level, cross-attention at both levels
//! and in the middle, 2 heads, context 8×32, 8 GroupNorm groups) with random fp16-rounded weights under the
//! original names, a batch z0 `[2, 4, 16, 16]`, the training noise and timesteps drawn by
//! `torch.Generator().manual_seed(1234)` (`randn`, then `randint`), the ε- and v-prediction MSE losses and
//! torch's gradients of every parameter.
//!
//! Claims and tolerances:
//! - `DiffusionObjective::sample_training_input` with `TorchRng::new(1234)` draws torch's ε and t exactly, and
//!   z_t within |x − y| ≤ 1e-6 (√ᾱ rounding: f64-then-f32 here, f32 `** 0.5` in torch).
//! - The losses: relative error ≤ 1e-5 (the bar).
//! - Every gradient element of every parameter tensor p: |x − y| ≤ max(1e-3·|x + y|, 1e-4·max|y_p|). The
//!   relative part is the 1e-3. The floor is relative to the tensor's own largest gradient because
//!   an element close to zero is a sum that cancels: its f32 rounding error scales with the summands (the
//!   tensor's scale), not with the tiny result, and gradient scales differ by orders of magnitude across
//!   tensors, so one absolute A cannot fit all. The script checks torch's own f32 gradients against f64
//!   under this same bar: worst 0.03 of it.
//! - One AdamW step (lr 1e-2, β (0.9, 0.999), ε 1e-8, weight decay 0.1) on the ε-loss gradients: see
//!   `adamw.*` in the fixture (compared where an AdamW is available to this crate).
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use ldm_core::rng::TorchRng;
use ldm_models::unet::{HeadSpec, Unet, UnetConfig};
use ldm_sampling::schedule::{BetaSchedule, Schedule};
use ldm_train::diffusion::{DiffusionObjective, Prediction};
use std::path::PathBuf;

const SEED: u64 = 1234;
const LOSS_REL: f64 = 1e-5;
const GRAD_R: f32 = 1e-3;
const GRAD_FLOOR: f32 = 1e-4;

type TestResult = std::result::Result<(), Box<dyn std::error::Error>>;

fn fixture(file: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/train-unet-grad")
        .join(file);
    assert!(
        path.exists(),
        "missing fixture {} (made by tools/fixtures/make_unet_grad.py)",
        path.display()
    );
    path
}

fn config() -> UnetConfig {
    UnetConfig {
        in_channels: 4,
        out_channels: 4,
        model_channels: 16,
        channel_mult: vec![1, 2],
        num_res_blocks: 1,
        attention_levels: vec![0, 1],
        heads: HeadSpec::Count(2),
        transformer_depth: 1,
        context_dim: Some(32),
        use_linear_in_transformer: false,
        num_groups: 8,
        ..UnetConfig::sd_v1()
    }
}

/// A trainable UNet whose variables hold the fixture's weights; fails on any missing or unused weight.
fn trainable_unet(dev: &Device) -> Result<(Unet, Vec<(String, Var)>), Box<dyn std::error::Error>> {
    let varmap = VarMap::new();
    let unet = Unet::new(VarBuilder::from_varmap(&varmap, DType::F32, dev), &config())?;
    let weights = candle_core::safetensors::load(fixture("model.safetensors"), dev)?;
    let mut vars: Vec<(String, Var)> = varmap
        .data()
        .lock()
        .map_err(|_| "poisoned varmap")?
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    let missing: Vec<&str> = vars
        .iter()
        .filter(|(k, _)| !weights.contains_key(k))
        .map(|(k, _)| k.as_str())
        .collect();
    assert!(missing.is_empty(), "weights missing from the fixture: {missing:?}");
    assert_eq!(vars.len(), weights.len(), "unused weights in the fixture");
    for (k, var) in &vars {
        var.set(&weights[k].to_dtype(DType::F32)?)?;
    }
    Ok((unet, vars))
}

fn objective(prediction: Prediction) -> DiffusionObjective {
    let schedule =
        Schedule::new(BetaSchedule::ScaledLinear, 0.00085, 0.012, 1000).expect("SD schedule");
    DiffusionObjective::new(schedule, prediction)
}

fn scalar(t: &Tensor) -> Result<f64, candle_core::Error> {
    Ok(f64::from(t.flatten_all()?.to_vec1::<f32>()?[0]))
}

fn flat(t: &Tensor) -> Result<Vec<f32>, candle_core::Error> {
    t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
}

/// Worst |x − y| / max(R·|x + y|, floor·max|y|) over the elements (≤ 1 passes), and the largest |x − y|.
fn grad_error(x: &[f32], y: &[f32]) -> (f32, f32) {
    let scale = y.iter().fold(0f32, |m, v| m.max(v.abs()));
    let floor = (GRAD_FLOOR * scale).max(f32::MIN_POSITIVE);
    x.iter().zip(y).fold((0f32, 0f32), |(w, d), (&a, &b)| {
        let diff = (a - b).abs();
        (w.max(diff / (GRAD_R * (a + b).abs()).max(floor)), d.max(diff))
    })
}

#[test]
fn unet_eps_and_v_loss_gradients_match_torch() -> TestResult {
    let dev = Device::Cpu;
    let reference = candle_core::safetensors::load(fixture("ref.safetensors"), &dev)?;
    let r = |k: &str| -> Result<&Tensor, String> {
        reference.get(k).ok_or_else(|| format!("ref.safetensors has no `{k}`"))
    };
    let (unet, vars) = trainable_unet(&dev)?;
    let z0 = r("z0")?;
    let context = r("context")?;

    // The batch: torch's randn then randint from the same seed.
    let eps_obj = objective(Prediction::Epsilon);
    let input = eps_obj.sample_training_input(z0, &mut TorchRng::new(SEED))?;
    let want_t: Vec<usize> = r("t")?.to_vec1::<i64>()?.iter().map(|&t| t as usize).collect();
    assert_eq!(input.timesteps, want_t, "timesteps differ from torch.randint");
    assert_eq!(flat(&input.eps)?, flat(r("eps")?)?, "noise differs from torch.randn");
    let zt_err = flat(&input.z_t)?
        .iter()
        .zip(flat(r("z_t")?)?)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(zt_err <= 1e-6, "z_t: max |x − y| = {zt_err:e}");

    let mut report = vec![format!("z_t max abs err {zt_err:.3e}")];
    let v_obj = objective(Prediction::V);
    for (name, obj, grad_prefix) in [("eps", &eps_obj, "grad."), ("v", &v_obj, "grad_v.")] {
        let input = obj.training_input(z0, &input.eps, &input.timesteps)?;
        let pred = unet.forward(&input.z_t, &input.t, context)?;
        let loss = obj.loss(&pred, &input.target)?;
        let (ours, theirs) = (scalar(&loss)?, scalar(r(&format!("loss.{name}"))?)?);
        let rel = (ours - theirs).abs() / theirs.abs();
        assert!(rel <= LOSS_REL, "loss.{name}: {ours} vs torch {theirs} (rel {rel:e})");
        report.push(format!("loss.{name} {ours:.8} vs {theirs:.8}: rel err {rel:.3e}"));

        let grads = loss.backward()?;
        let (mut worst, mut worst_abs, mut worst_name, mut compared) = (0f32, 0f32, String::new(), 0);
        for (k, var) in &vars {
            let Some(want) = reference.get(&format!("{grad_prefix}{k}")) else {
                continue;
            };
            let got = grads
                .get(var.as_tensor())
                .ok_or_else(|| format!("no gradient for `{k}`"))?;
            assert_eq!(got.dims(), want.dims(), "gradient shape of `{k}`");
            let (ratio, abs) = grad_error(&flat(got)?, &flat(want)?);
            assert!(
                ratio <= 1.0,
                "{name}-loss gradient of `{k}`: {ratio:.3} × the tolerance (max |x − y| {abs:e})"
            );
            compared += 1;
            worst_abs = worst_abs.max(abs);
            if ratio > worst {
                (worst, worst_name) = (ratio, k.clone());
            }
        }
        let expected = if name == "eps" { vars.len() } else { 4 };
        assert_eq!(compared, expected, "{name}: gradients compared");
        report.push(format!(
            "{name}: {compared} gradients, worst {worst:.3} of the bar at `{worst_name}`, max |x − y| {worst_abs:.3e}"
        ));
    }
    eprintln!("{}", report.join("\n"));
    Ok(())
}
