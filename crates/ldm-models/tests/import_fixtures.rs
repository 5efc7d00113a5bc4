//! The decisive test of the diffusers key maps: the tiny fixtures hold the SAME weights twice, as a diffusers
//! folder and as an original single file (`fixtures/{sd1-tiny,sd2v-tiny}`, made by
//! `tools/fixtures/make_sd_tiny.py` with torch 2.15.0 / diffusers 0.42.1 / transformers 5.25.0, see
//! FIXTURE_CONTRACT.md). Mapping each folder component must give exactly the single file's keys under the
//! component's prefix (minus buffers and tensors the map declares unused), with bit-identical values after
//! conversion to f32 (tolerance 0), and mapping back must give exactly the folder's tensors.
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use ldm_models::import::{
    clip_key_map, component_files, open_clip_key_map, unet_key_map, vae_key_map,
    DiffusersClipConfig, DiffusersUnetConfig, DiffusersVaeConfig, KeyMap, CLIP_PREFIX,
    OPEN_CLIP_PREFIX, UNET_PREFIX, VAE_PREFIX,
};

fn fixture(model: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures")
        .join(model);
    assert!(
        dir.is_dir(),
        "fixture {} is missing (see FIXTURE_CONTRACT.md)",
        dir.display()
    );
    dir
}

fn load(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    let a = a
        .to_dtype(DType::F32)
        .expect("f32")
        .flatten_all()
        .expect("flat");
    let b = b
        .to_dtype(DType::F32)
        .expect("f32")
        .flatten_all()
        .expect("flat");
    let a = a.to_vec1::<f32>().expect("vec");
    let b = b.to_vec1::<f32>().expect("vec");
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(&b)
        .map(|(x, y)| {
            if x.to_bits() == y.to_bits() {
                0.0
            } else {
                (x - y).abs().max(f32::MIN_POSITIVE)
            }
        })
        .fold(0.0, f32::max)
}

/// Maps `component` of the folder and compares it with the single file's tensors under `prefix`.
fn check_component(
    model: &str,
    component: &str,
    weights: &str,
    map: &KeyMap,
    prefix: &str,
) -> usize {
    let dir = fixture(model);
    let files = component_files(&dir.join("diffusers"), component).expect("component files");
    assert_eq!(
        files.weights.file_name().and_then(|n| n.to_str()),
        Some(weights)
    );
    let diffusers = load(&files.weights);
    let single = load(&dir.join("model.safetensors"));

    let mapped = map
        .to_canonical(diffusers.clone())
        .unwrap_or_else(|e| panic!("{model}/{component}: {e}"));
    let mapped: BTreeMap<String, Tensor> = mapped.into_iter().collect();
    let part: BTreeMap<String, Tensor> = single
        .into_iter()
        .filter(|(k, _)| k.starts_with(prefix) && !map.ignores_canonical(k))
        .collect();
    assert_eq!(
        mapped.keys().collect::<Vec<_>>(),
        part.keys().collect::<Vec<_>>(),
        "{model}/{component} key sets"
    );
    for (k, v) in &mapped {
        let w = &part[k];
        assert_eq!(v.dims(), w.dims(), "{k}");
        assert_eq!(v.dtype(), w.dtype(), "{k}");
        assert_eq!(max_abs_diff(v, w), 0.0, "{k} differs");
    }

    let back = map
        .to_diffusers(part)
        .unwrap_or_else(|e| panic!("{model}/{component} back: {e}"));
    let expected: BTreeMap<String, Tensor> = diffusers
        .into_iter()
        .filter(|(k, _)| !map.ignores_diffusers(k))
        .collect();
    assert_eq!(
        back.len(),
        expected.len(),
        "{model}/{component} back: count"
    );
    for (k, v) in back {
        let w = expected
            .get(&k)
            .unwrap_or_else(|| panic!("back: unexpected `{k}`"));
        assert_eq!(v.dims(), w.dims(), "back {k}");
        assert_eq!(max_abs_diff(&v, w), 0.0, "back {k} differs");
    }
    mapped.len()
}

fn unet_map(model: &str) -> KeyMap {
    let cfg = DiffusersUnetConfig::from_file(&fixture(model).join("diffusers/unet/config.json"))
        .expect("unet config");
    let arch = cfg.arch().expect("unet arch");
    assert!(arch.ignored.is_empty(), "{:?}", arch.ignored);
    unet_key_map(&cfg)
        .expect("unet map")
        .with_canonical_prefix(UNET_PREFIX)
}

fn vae_map(model: &str) -> KeyMap {
    let cfg = DiffusersVaeConfig::from_file(&fixture(model).join("diffusers/vae/config.json"))
        .expect("vae config");
    let arch = cfg.arch().expect("vae arch");
    assert_eq!(
        arch.scaling_factor, 0.25,
        "the fixtures' deliberate latent scale"
    );
    assert!(arch.ignored.is_empty(), "{:?}", arch.ignored);
    vae_key_map(&cfg)
        .expect("vae map")
        .with_canonical_prefix(VAE_PREFIX)
}

fn text_config(model: &str) -> DiffusersClipConfig {
    let cfg =
        DiffusersClipConfig::from_file(&fixture(model).join("diffusers/text_encoder/config.json"))
            .expect("text config");
    assert!(cfg.arch().expect("text arch").ignored.is_empty());
    cfg
}

#[test]
fn sd1_tiny_unet_folder_maps_onto_single_file_exactly() {
    let n = check_component(
        "sd1-tiny",
        "unet",
        "diffusion_pytorch_model.safetensors",
        &unet_map("sd1-tiny"),
        UNET_PREFIX,
    );
    assert_eq!(n, 208);
}

#[test]
fn sd2v_tiny_unet_folder_maps_onto_single_file_exactly() {
    let n = check_component(
        "sd2v-tiny",
        "unet",
        "diffusion_pytorch_model.safetensors",
        &unet_map("sd2v-tiny"),
        UNET_PREFIX,
    );
    assert_eq!(n, 208);
}

#[test]
fn sd_tiny_vae_folders_map_onto_single_files_exactly() {
    for model in ["sd1-tiny", "sd2v-tiny"] {
        let n = check_component(
            model,
            "vae",
            "diffusion_pytorch_model.safetensors",
            &vae_map(model),
            VAE_PREFIX,
        );
        assert_eq!(n, 124);
    }
}

#[test]
fn sd1_tiny_clip_folder_maps_onto_single_file_exactly() {
    let map = clip_key_map(&text_config("sd1-tiny"))
        .expect("map")
        .with_canonical_prefix(CLIP_PREFIX);
    let n = check_component(
        "sd1-tiny",
        "text_encoder",
        "model.safetensors",
        &map,
        CLIP_PREFIX,
    );
    assert_eq!(n, 36, "all text weights; position_ids is a buffer");
}

#[test]
fn sd2v_tiny_open_clip_folder_maps_onto_single_file_except_unused_tail() {
    let map = open_clip_key_map(&text_config("sd2v-tiny"))
        .expect("map")
        .with_canonical_prefix(OPEN_CLIP_PREFIX);
    let n = check_component(
        "sd2v-tiny",
        "text_encoder",
        "model.safetensors",
        &map,
        OPEN_CLIP_PREFIX,
    );
    // 42 single-file tensors = 4 + 3 resblocks x 12 + text_projection + logit_scale; the folder has 2 resblocks.
    assert_eq!(n, 42 - 12 - 2);
}
