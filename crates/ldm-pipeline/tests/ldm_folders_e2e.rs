//! End-to-end runs of the LDM pipelines' diffusers folders through the public task functions (`sample`,
//! `txt2img`), against diffusers 0.42.1's own pipelines (tools/fixtures/make_upscale_e2e.py, make_ldmbert.py):
//! `LDMSuperResolutionPipeline` (seeded, and η = 1 with its global-RNG step noise replayed),
//! `StableDiffusionUpscalePipeline` (seeded: the low-res augmentation noise is drawn before z_T, CFG and
//! noise levels 20 and 100), and `LDMTextToImagePipeline` (LDM-BERT; seeded, a batch of two prompts, η = 0.5
//! replayed). Tolerances (the bar): final latents |x−y| ≤ max(1e-3·|x+y|, 1e-3), images ≤ 2/255.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use ldm_pipeline::txt2img::{txt2img, txt2img_with_rng, Generated};
use ldm_pipeline::{open, sample, sample_with_rng, Condition, GenerateRequest, SdModels};
use serde_json::Value;

type R<T = ()> = Result<T, Box<dyn std::error::Error>>;

fn fixture(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures")
        .join(p)
}

fn refs(dir: &str) -> R<HashMap<String, Tensor>> {
    Ok(candle_core::safetensors::load(
        fixture(&format!("{dir}/ref.safetensors")),
        &Device::Cpu,
    )?)
}

fn cases(dir: &str, key: &str) -> R<Vec<Value>> {
    let v: Value = serde_json::from_str(&std::fs::read_to_string(fixture(&format!(
        "{dir}/cases.json"
    )))?)?;
    Ok(v[key].as_array().ok_or("cases")?.clone())
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

fn replay(parts: &[&Tensor]) -> R<Replay> {
    let mut v = Vec::new();
    for t in parts {
        v.extend(t.flatten_all()?.to_vec1::<f32>()?);
    }
    Ok(Replay(v.into_iter()))
}

fn check(name: &str, out: &Generated, latents: &Tensor, image: &Tensor) -> R {
    let a: Vec<f32> = out.latents.flatten_all()?.to_vec1()?;
    let b: Vec<f32> = latents.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    assert_eq!(a.len(), b.len(), "{name}: latent sizes");
    let ratio = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs() / (1e-3 * (x + y).abs()).max(1e-3))
        .fold(0f32, f32::max);
    let img = (&out.images - image)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()?
        * 255.0;
    eprintln!("{name}: latents {ratio:.3}× tolerance, image max abs {img:.4}/255");
    assert!(ratio <= 1.0, "{name}: latents {ratio}× the tolerance");
    assert!(img <= 2.0, "{name}: image off by {img}/255");
    Ok(())
}

fn request(c: &Value, side: usize, prompt: &str) -> R<GenerateRequest> {
    Ok(GenerateRequest {
        prompt: prompt.into(),
        negative_prompt: c["negative_prompt"].as_str().unwrap_or("").into(),
        steps: c["steps"].as_u64().ok_or("steps")? as usize,
        cfg_scale: c["guidance_scale"].as_f64().unwrap_or(1.0),
        sampler: "ddim".into(),
        eta: c["eta"].as_f64().unwrap_or(0.0),
        width: Some(side),
        height: Some(side),
        seed: c["seed"].as_u64(),
        batch: c["batch"].as_u64().unwrap_or(1) as usize,
        ..GenerateRequest::default()
    })
}

#[test]
fn ldm_super_resolution_matches_diffusers() -> R {
    let models = SdModels::build(open(&fixture("ldm-sr-tiny/diffusers"), None)?, &Device::Cpu)?;
    let r = refs("ldm-sr-tiny")?;
    for c in cases("ldm-sr-tiny", "upscale")? {
        let name = c["name"].as_str().ok_or("name")?;
        let lowres = &r[&format!("{name}.lowres")];
        let req = request(&c, 64, "")?.validate(&models.spec, 0)?;
        let cond = Condition::LowRes {
            image: lowres.clone(),
            noise_level: 0,
        };
        let out = match r.get(&format!("{name}.step_noise")) {
            Some(steps) => {
                let mut rng = replay(&[&r[&format!("{name}.noise")], steps])?;
                sample_with_rng(&models, &req, &cond, &mut rng, &mut |_, _| {})?
            }
            None => sample(&models, &req, &cond, &mut |_, _| {})?,
        };
        check(
            name,
            &out,
            &r[&format!("{name}.latents")],
            &r[&format!("{name}.image")],
        )?;
    }
    Ok(())
}

/// sd-x4-tiny/diffusers with sd1-tiny's text encoder and tokenizer linked in (the fixture does not duplicate them).
fn assemble_x4(tmp: &Path) -> R<PathBuf> {
    let dir = tmp.join("sd-x4");
    std::fs::create_dir_all(&dir)?;
    for e in std::fs::read_dir(fixture("sd-x4-tiny/diffusers"))? {
        let e = e?;
        std::os::unix::fs::symlink(e.path().canonicalize()?, dir.join(e.file_name()))?;
    }
    for c in ["text_encoder", "tokenizer"] {
        std::os::unix::fs::symlink(
            fixture("sd1-tiny/diffusers").join(c).canonicalize()?,
            dir.join(c),
        )?;
    }
    Ok(dir)
}

#[test]
fn sd_x4_upscaler_matches_diffusers_from_seeds() -> R {
    let tmp = tempfile::tempdir()?;
    let models = SdModels::build(open(&assemble_x4(tmp.path())?, None)?, &Device::Cpu)?;
    let r = refs("sd-x4-tiny")?;
    for c in cases("sd-x4-tiny", "upscale")? {
        let name = c["name"].as_str().ok_or("name")?;
        let req = request(&c, 64, c["prompt"].as_str().unwrap_or(""))?.validate(&models.spec, 0)?;
        let cond = Condition::LowRes {
            image: r[&format!("{name}.lowres")].clone(),
            noise_level: c["noise_level"].as_u64().ok_or("noise_level")? as usize,
        };
        let out = sample(&models, &req, &cond, &mut |_, _| {})?;
        check(
            name,
            &out,
            &r[&format!("{name}.latents")],
            &r[&format!("{name}.image")],
        )?;
    }
    // Above the model's max noise level: a named error.
    let req = request(&cases("sd-x4-tiny", "upscale")?[0], 64, "x")?.validate(&models.spec, 0)?;
    let cond = Condition::LowRes {
        image: r["cfg5.lowres"].clone(),
        noise_level: 351,
    };
    let e = sample(&models, &req, &cond, &mut |_, _| {})
        .err()
        .ok_or("no error")?;
    assert!(e.to_string().contains("max_noise_level 350"), "{e}");
    Ok(())
}

#[test]
fn ldm_bert_text_to_image_matches_diffusers() -> R {
    let models = SdModels::build(
        open(&fixture("ldm-txt2img-tiny/diffusers"), None)?,
        &Device::Cpu,
    )?;
    let r = refs("ldm-txt2img-tiny")?;
    let tmp = tempfile::tempdir()?;
    for c in cases("ldm-txt2img-tiny", "cases")? {
        let name = c["name"].as_str().ok_or("name")?;
        let prompts: Vec<&str> = c["prompts"]
            .as_array()
            .ok_or("prompts")?
            .iter()
            .filter_map(|p| p.as_str())
            .collect();
        let key = |k: &str| format!("txt2img.{name}.{k}");
        if prompts.len() > 1 {
            // One prompt per image: each image from its row of the batch's noise (η = 0 is deterministic).
            let noise = &r[&key("noise")];
            for (i, p) in prompts.iter().enumerate() {
                let row = noise.narrow(0, i, 1)?;
                let path = tmp.path().join(format!("{name}-{i}.npy"));
                ldm_core::npy::write_npy_f32(
                    &path,
                    row.dims(),
                    &row.flatten_all()?.to_vec1::<f32>()?,
                )?;
                let mut g = request(&c, 64, p)?;
                g.batch = 1;
                g.noise = Some(path);
                let out = txt2img(&models, &g.validate(&models.spec, 0)?, &mut |_, _| {})?;
                check(
                    &format!("{name}[{i}]"),
                    &out,
                    &r[&key("latents")].narrow(0, i, 1)?,
                    &r[&key("image")].narrow(0, i, 1)?,
                )?;
            }
            continue;
        }
        let req = request(&c, 64, prompts[0])?.validate(&models.spec, 0)?;
        let out = match r.get(&key("step_noise")) {
            Some(steps) => {
                let mut rng = replay(&[&r[&key("noise")], steps])?;
                txt2img_with_rng(&models, &req, &mut rng, &mut |_, _| {})?
            }
            None => txt2img(&models, &req, &mut |_, _| {})?,
        };
        check(name, &out, &r[&key("latents")], &r[&key("image")])?;
    }
    Ok(())
}

/// The same LDM-BERT model as an original single file + `txt2img-1p4B-eval`-shaped YAML (written here from the
/// folder's canonical tensors): the YAML path reads the same sizes and the run gives bit-identical latents.
#[test]
fn ldm_bert_single_file_with_original_yaml_equals_the_folder() -> R {
    let folder = open(&fixture("ldm-txt2img-tiny/diffusers"), None)?;
    let tmp = tempfile::tempdir()?;
    let file = tmp.path().join("model.safetensors");
    let mut tensors = HashMap::new();
    for k in folder.store.keys() {
        tensors.insert(
            k.to_string(),
            folder.store.load(k, DType::F32, &Device::Cpu)?,
        );
    }
    candle_core::safetensors::save(&tensors, &file)?;
    std::fs::copy(
        fixture("ldm-txt2img-tiny/model.yaml"),
        tmp.path().join("model.yaml"),
    )?;
    let single = open(&file, None)?;
    assert_eq!(
        single.spec.cond, folder.spec.cond,
        "text encoder from the YAML + shapes"
    );
    // `resolution` only places attention levels (none here); diffusers' config does not carry it.
    let norm = |f: &ldm_pipeline::spec::FirstStageSpec| match f {
        ldm_pipeline::spec::FirstStageSpec::Kl(c) => {
            let mut c = c.clone();
            c.ddconfig.resolution = 0;
            Some(c)
        }
        _ => None,
    };
    assert_eq!(
        norm(&single.spec.first_stage),
        norm(&folder.spec.first_stage)
    );
    assert!(norm(&single.spec.first_stage).is_some());
    assert_eq!(single.spec.latent_scale, folder.spec.latent_scale);
    let a = SdModels::build(folder, &Device::Cpu)?;
    let b = SdModels::build(single, &Device::Cpu)?;
    let c = &cases("ldm-txt2img-tiny", "cases")?[0];
    let p = c["prompts"][0].as_str().ok_or("prompt")?;
    let req = request(c, 64, p)?.validate(&a.spec, 0)?;
    let x = txt2img(&a, &req, &mut |_, _| {})?;
    let y = txt2img(&b, &req, &mut |_, _| {})?;
    let d = (&x.latents - &y.latents)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()?;
    assert_eq!(d, 0.0);
    Ok(())
}
