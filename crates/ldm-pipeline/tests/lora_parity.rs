//! Kohya LoRA files merged at load against diffusers (fixtures/lora from tools/fixtures/make_lora.py: torch 2.15.0,
//! diffusers 0.42.1, peft 0.22.0; the references are diffusers' `load_lora_weights` + `fuse_lora(lora_scale=0.7)`).
//! Tolerances |x−y| ≤ max(R·|x+y|, A): merged weights R = A = 1e-6; UNet output R = 1e-4, A = 1e-5; final
//! latents 1e-3; images 2/255.
use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use ldm_models::import::{self, KeyMap};
use ldm_pipeline::lora::{apply_loras, parse_lora_arg};
use ldm_pipeline::txt2img::txt2img;
use ldm_pipeline::{open, SdModels, ValidRequest};

type R<T = ()> = Result<T, Box<dyn std::error::Error>>;

fn fixture(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures")
        .join(p)
}

fn refs() -> R<HashMap<String, Tensor>> {
    Ok(candle_core::safetensors::load(
        fixture("lora/ref.safetensors"),
        &Device::Cpu,
    )?)
}

fn max_ratio(got: &Tensor, want: &Tensor, rel: f32, abs: f32) -> R<f32> {
    assert_eq!(got.dims(), want.dims());
    let g = got.flatten_all()?.to_vec1::<f32>()?;
    let w = want.flatten_all()?.to_vec1::<f32>()?;
    Ok(g.iter()
        .zip(&w)
        .map(|(a, b)| (a - b).abs() / (rel * (a + b).abs()).max(abs))
        .fold(0.0, f32::max))
}

/// diffusers key maps of a tiny model's folder (unet, text encoder), canonical prefixes included.
fn key_maps(model: &str, open_clip: bool) -> R<(KeyMap, KeyMap)> {
    let dir = fixture(&format!("{model}/diffusers"));
    let u = import::DiffusersUnetConfig::from_file(&dir.join("unet/config.json"))?;
    let unet = import::unet_key_map(&u)?.with_canonical_prefix(import::UNET_PREFIX);
    let c = import::DiffusersClipConfig::from_file(&dir.join("text_encoder/config.json"))?;
    let te = if open_clip {
        import::open_clip_key_map(&c)?.with_canonical_prefix(import::OPEN_CLIP_PREFIX)
    } else {
        import::clip_key_map(&c)?.with_canonical_prefix(import::CLIP_PREFIX)
    };
    Ok((unet, te))
}

/// Opens `model/form`, merges `lora` at 0.7 and compares every patched weight with diffusers' fused one.
/// `keys`: canonical keys patched (SD2 single files take q/k/v into one fused `in_proj_weight` per layer).
fn check_merged(
    model: &str,
    form: &str,
    tag: &str,
    open_clip: bool,
    keys: usize,
    weights: &[f64],
) -> R<SdModels> {
    let refs = refs()?;
    let mut opened = open(&fixture(&format!("{model}/{form}")), None)?;
    let lora = fixture(&format!("lora/{tag}.safetensors"));
    let loras: Vec<(PathBuf, f64)> = weights.iter().map(|w| (lora.clone(), *w)).collect();
    let report = apply_loras(&mut opened, &loras)?;
    let (unet_map, te_map) = key_maps(model, open_clip)?;
    let prefix = format!("{tag}.merged.");
    let mut checked = 0;
    let mut worst = 0f32;
    for (name, want) in refs.iter().filter(|(k, _)| k.starts_with(&prefix)) {
        let rest = &name[prefix.len()..];
        let (map, dkey) = match rest.split_once('.') {
            Some(("unet", k)) => (&unet_map, k),
            Some(("te", k)) => (&te_map, k),
            _ => panic!("unexpected reference `{name}`"),
        };
        let e = map
            .entry(dkey)
            .ok_or_else(|| format!("no map entry for {dkey}"))?;
        let full = opened.store.load(&e.canonical, DType::F32, &Device::Cpu)?;
        let got = match e.conversion.block() {
            Some((i, n)) => {
                let rows = full.dims()[0] / n;
                full.narrow(0, i * rows, rows)?
            }
            None => full,
        }
        .reshape(want.dims())?;
        let r = max_ratio(&got, want, 1e-6, 1e-6)?;
        assert!(
            r <= 1.0,
            "{tag} on {model}/{form}: `{dkey}` off by {r}× tolerance"
        );
        worst = worst.max(r);
        checked += 1;
    }
    assert_eq!(checked, 44, "references of {tag}");
    assert_eq!(report.modules_matched(), 44 * weights.len());
    assert_eq!(report.keys.len(), keys);
    eprintln!(
        "{tag} on {model}/{form}: {checked} merged weights, {} keys patched, worst {worst:.1e}× tolerance",
        report.keys.len()
    );
    Ok(SdModels::build(opened, &Device::Cpu)?)
}

#[test]
fn sd1_lora_merged_weights_match_diffusers_fuse_lora() -> R {
    check_merged("sd1-tiny", "model.safetensors", "sd1", false, 44, &[0.7])?;
    check_merged("sd1-tiny", "diffusers", "sd1", false, 44, &[0.7])?;
    Ok(())
}

/// Several files (here the same one twice, 0.3 + 0.4) add up.
#[test]
fn two_loras_add_up() -> R {
    check_merged(
        "sd1-tiny",
        "model.safetensors",
        "sd1",
        false,
        44,
        &[0.3, 0.4],
    )?;
    Ok(())
}

/// SD2: the text encoder's q/k/v modules land in row blocks of OpenCLIP's fused `in_proj_weight`.
#[test]
fn sd2_lora_merged_weights_match_diffusers_including_fused_in_proj() -> R {
    check_merged("sd2v-tiny", "model.safetensors", "sd2v", true, 40, &[0.7])?;
    check_merged("sd2v-tiny", "diffusers", "sd2v", false, 44, &[0.7])?;
    Ok(())
}

#[test]
fn sd1_lora_unet_output_and_txt2img_match_diffusers() -> R {
    let models = check_merged("sd1-tiny", "model.safetensors", "sd1", false, 44, &[0.7])?;
    let refs = refs()?;
    let base = candle_core::safetensors::load(fixture("sd1-tiny/ref.safetensors"), &Device::Cpu)?;
    let out = models
        .unet
        .forward(&base["unet.x"], &base["unet.t"], &base["unet.ctx"])?;
    let r = max_ratio(&out, &refs["sd1.unet.out"], 1e-4, 1e-5)?;
    assert!(r <= 1.0, "UNet output off by {r}× tolerance");

    let case: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("lora/case.json"))?)?;
    let c = &case["txt2img"];
    let req = ValidRequest {
        prompt: c["prompt"].as_str().unwrap_or_default().into(),
        negative_prompt: String::new(),
        steps: 5,
        cfg_scale: 5.0,
        sampler: "euler".parse()?,
        karras: false,
        eta: 0.0,
        width: 32,
        height: 32,
        seed: 42,
        batch: 1,
        noise: None,
        decode: Default::default(),
    };
    let got = txt2img(&models, &req, &mut |_, _| {})?;
    let lat = max_ratio(&got.latents, &refs["sd1.txt2img.latents"], 1e-3, 1e-3)?;
    let img = (&got.images - &refs["sd1.txt2img.image"])?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()?
        * 255.0;
    eprintln!("UNet {r:.3}× tol, latents {lat:.3}× tol, image {img:.4}/255");
    assert!(lat <= 1.0, "latents off by {lat}× tolerance");
    assert!(img <= 2.0, "image off by {img}/255");
    Ok(())
}

#[test]
fn lora_flag_values_parse() {
    assert_eq!(
        parse_lora_arg("a/b.safetensors:0.7"),
        (PathBuf::from("a/b.safetensors"), 0.7)
    );
    assert_eq!(
        parse_lora_arg("a/b.safetensors"),
        (PathBuf::from("a/b.safetensors"), 1.0)
    );
    assert_eq!(parse_lora_arg("x.st:-1.5"), (PathBuf::from("x.st"), -1.5));
}
