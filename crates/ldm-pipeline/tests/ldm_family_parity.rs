//! End-to-end parity of the original CompVis LDMs (single file + original YAML) with the references of
//! tools/fixtures/make_ldm_tiny.py (original `LatentDiffusion` + `DDIMSampler`, torch 2.15 CPU) and
//! tools/fixtures/make_vq_tiny.py (diffusers 0.42.1 `LDMPipeline`): class-conditional (cin, with and without
//! guidance), semantic synthesis, layout-to-image (with and without guidance) and unconditional.
//! Tolerances (the bar): final latents |x−y| ≤ max(1e-3·|x+y|, 1e-3), images max abs ≤ 2/255.
use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use ldm_models::cond::{LayoutObject, SemanticMap};
use ldm_pipeline::{open, sample, sample_with_rng, Condition, GenerateRequest, SdModels};
use serde_json::Value;

type R<T = ()> = Result<T, Box<dyn std::error::Error>>;

fn fixture(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures")
        .join(p)
}

fn load(dir: &str) -> R<(SdModels, Vec<Value>, HashMap<String, Tensor>)> {
    let models = SdModels::build(
        open(&fixture(&format!("{dir}/model.safetensors")), None)?,
        &Device::Cpu,
    )?;
    let cases: Value = serde_json::from_str(&std::fs::read_to_string(fixture(&format!(
        "{dir}/cases.json"
    )))?)?;
    let cases = cases["cases"].as_array().ok_or("cases")?.clone();
    let refs =
        candle_core::safetensors::load(fixture(&format!("{dir}/ref.safetensors")), &Device::Cpu)?;
    Ok((models, cases, refs))
}

/// Writes `t` as a float32 `.npy` in a temp dir (the request's fixed-noise input).
fn noise_file(dir: &tempfile::TempDir, name: &str, t: &Tensor) -> R<PathBuf> {
    let path = dir.path().join(format!("{name}.npy"));
    let data: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    ldm_core::npy::write_npy_f32(&path, t.dims(), &data)?;
    Ok(path)
}

fn max_abs(a: &Tensor, b: &Tensor) -> R<f32> {
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

/// Worst |x−y| / max(1e-3·|x+y|, 1e-3) over the tensor.
fn rel_ratio(a: &Tensor, b: &Tensor) -> R<f32> {
    let a: Vec<f32> = a.flatten_all()?.to_vec1()?;
    let b: Vec<f32> = b.flatten_all()?.to_vec1()?;
    if a.len() != b.len() {
        return Err(format!("lengths {} vs {}", a.len(), b.len()).into());
    }
    Ok(a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs() / (1e-3 * (x + y).abs()).max(1e-3))
        .fold(0f32, f32::max))
}

/// Gives back stored normal draws in order.
struct Replay(std::vec::IntoIter<f32>);

impl ldm_core::rng::NoiseRng for Replay {
    fn randn(&mut self, n: usize) -> Vec<f32> {
        let out: Vec<f32> = self.0.by_ref().take(n).collect();
        assert_eq!(
            out.len(),
            n,
            "the reference holds fewer draws than the run asks for"
        );
        out
    }
}

fn request(c: &Value, noise: Option<PathBuf>) -> R<GenerateRequest> {
    Ok(GenerateRequest {
        prompt: String::new(),
        negative_prompt: String::new(),
        steps: c["steps"].as_u64().ok_or("steps")? as usize,
        cfg_scale: c["guidance_scale"].as_f64().unwrap_or(1.0),
        sampler: c["sampler"].as_str().unwrap_or("ddim").into(),
        karras: false,
        eta: c["eta"].as_f64().ok_or("eta")?,
        width: Some(c["width"].as_u64().unwrap_or(32) as usize),
        height: Some(c["height"].as_u64().unwrap_or(32) as usize),
        seed: c["seed"].as_u64(),
        batch: c["batch"].as_u64().ok_or("batch")? as usize,
        noise,
        tile_vae: None,
    })
}

/// Runs `cond` for case `c` from its stored noise and checks latents and image against the references.
fn check_case(
    models: &SdModels,
    refs: &HashMap<String, Tensor>,
    c: &Value,
    cond: Condition,
    fixed_noise: bool,
) -> R<(f32, f32)> {
    let name = c["name"].as_str().ok_or("name")?;
    let name = &format!("{}{name}", c["ref_prefix"].as_str().unwrap_or(""));
    let tmp = tempfile::tempdir()?;
    let noise = if fixed_noise {
        Some(noise_file(&tmp, name, &refs[&format!("{name}.noise")])?)
    } else {
        None
    };
    let req = request(c, noise)?.validate(&models.spec, 0)?;
    let out = match refs.get(&format!("{name}.step_noise")) {
        // A reference whose step noise came from another generator: replay the stored draws.
        Some(steps) => {
            let mut draws: Vec<f32> = Vec::new();
            if !fixed_noise {
                draws.extend(
                    refs[&format!("{name}.noise")]
                        .flatten_all()?
                        .to_vec1::<f32>()?,
                );
            }
            draws.extend(steps.flatten_all()?.to_vec1::<f32>()?);
            let mut rng = Replay(draws.into_iter());
            sample_with_rng(models, &req, &cond, &mut rng, &mut |_, _| {})?
        }
        None => sample(models, &req, &cond, &mut |_, _| {})?,
    };
    let lat = rel_ratio(&out.latents, &refs[&format!("{name}.latents")])?;
    let img = max_abs(&out.images, &refs[&format!("{name}.image")])? * 255.0;
    eprintln!("{name}: latents {lat:.3}× tolerance, image max abs {img:.4}/255");
    assert!(lat <= 1.0, "{name}: latents off by {lat}× the tolerance");
    assert!(img <= 2.0, "{name}: image off by {img}/255");
    Ok((lat, img))
}

#[test]
fn class_conditional_matches_compvis_ddim_with_and_without_guidance() -> R {
    let (models, cases, refs) = load("ldm-cin-tiny")?;
    for c in &cases {
        let labels: Vec<usize> = c["class_labels"]
            .as_array()
            .ok_or("labels")?
            .iter()
            .map(|v| v.as_u64().unwrap_or(0) as usize)
            .collect();
        check_case(&models, &refs, c, Condition::Classes(labels), true)?;
    }
    Ok(())
}

#[test]
fn semantic_synthesis_matches_compvis_ddim() -> R {
    let (models, cases, refs) = load("ldm-semantic-tiny")?;
    for c in &cases {
        let maps = c["maps"]
            .as_array()
            .ok_or("maps")?
            .iter()
            .map(|m| {
                SemanticMap::load(&fixture(&format!(
                    "ldm-semantic-tiny/{}",
                    m.as_str().unwrap_or("")
                )))
            })
            .collect::<Result<Vec<_>, _>>()?;
        check_case(&models, &refs, c, Condition::Semantic(maps), true)?;
    }
    Ok(())
}

#[test]
fn layout_to_image_matches_compvis_ddim_with_and_without_guidance() -> R {
    let (models, cases, refs) = load("ldm-layout-tiny")?;
    for c in &cases {
        let layouts = c["layouts"]
            .as_array()
            .ok_or("layouts")?
            .iter()
            .map(|l| LayoutObject::parse_json(&l.to_string()))
            .collect::<Result<Vec<_>, _>>()?;
        check_case(&models, &refs, c, Condition::Layout(layouts), true)?;
    }
    Ok(())
}

#[test]
fn unconditional_matches_diffusers_ldm_pipeline_single_file() -> R {
    let (models, cases, refs) = load("ldm-uncond-tiny")?;
    let mut n = 0;
    for c in &cases {
        // With η > 0 diffusers' LDMPipeline draws the step noise from torch's global generator, not the
        // pipeline's: those cases replay the stored step noise.
        let fixed = c["fixed_noise"].as_bool() == Some(true);
        let mut c = c.clone();
        c["sampler"] = "ddim".into();
        c["ref_prefix"] = "ldm.".into();
        check_case(&models, &refs, &c, Condition::None, fixed)?;
        n += 1;
    }
    assert_eq!(n, 4);
    Ok(())
}

#[test]
fn wrong_conditions_are_named_errors() -> R {
    let (models, cases, _) = load("ldm-cin-tiny")?;
    let req = request(&cases[0], None)?.validate(&models.spec, 1)?;
    let err = |cond: Condition| -> String {
        match sample(&models, &req, &cond, &mut |_, _| {}) {
            Ok(_) => "no error".into(),
            Err(e) => e.to_string(),
        }
    };
    let e = err(Condition::Classes(vec![1001]));
    assert!(e.contains("1001"), "{e}");
    let e = err(Condition::Classes(vec![1, 2, 3]));
    assert!(e.contains("batch of 2"), "{e}");
    let e = err(Condition::None);
    assert!(e.contains("class label"), "{e}");
    Ok(())
}

#[test]
fn original_ldm_without_its_yaml_asks_for_it() -> R {
    let tmp = tempfile::tempdir()?;
    let file = tmp.path().join("cin.safetensors");
    std::fs::copy(fixture("ldm-cin-tiny/model.safetensors"), &file)?;
    let e = match open(&file, None) {
        Ok(_) => return Err("opened without a config".into()),
        Err(e) => e.to_string(),
    };
    assert!(
        e.contains("config.yaml") && e.contains("cin.safetensors"),
        "{e}"
    );
    // With the YAML beside it, it opens.
    std::fs::copy(
        fixture("ldm-cin-tiny/model.yaml"),
        tmp.path().join("cin.yaml"),
    )?;
    assert!(open(&file, None).is_ok());
    Ok(())
}
