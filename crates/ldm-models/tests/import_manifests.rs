//! Key manifests of the real SD1.5 and SD2.1 (STYLE 2.5 item 5): the diffusers key maps built from the published
//! `config.json` files must expect exactly the diffusers classes' `(key, shape)` lists and produce exactly the
//! original LDM checkpoints' `(key, shape)` lists. Exact comparison, no weights needed.
//!
//! Manifests: `fixtures/manifests/{sd15,sd21,deep-unet}.json`, made by `tools/fixtures/make_key_manifests.py` (torch 2.15.0,
//! diffusers 0.42.1, transformers 5.25.0, Stability-AI/stablediffusion cf1d67a6 on torch's meta device).
//! The config literals below reproduce the published `unet/`, `vae/`, `text_encoder/config.json` of
//! runwayml/stable-diffusion-v1-5 and stabilityai/stable-diffusion-2-1 (written from those files' known
//! contents; no download is possible here). Their weight-relevant entries are checked against the configs the
//! Python script instantiated.
use std::collections::BTreeMap;
use std::path::PathBuf;

use ldm_models::import::{
    clip_key_map, open_clip_key_map, unet_key_map, vae_key_map, DiffusersClipConfig,
    DiffusersUnetConfig, DiffusersVaeConfig, Heads, KeyMap, CLIP_PREFIX, OPEN_CLIP_PREFIX,
    UNET_PREFIX, VAE_PREFIX,
};
use serde_json::Value;

const SD15_UNET: &str = r#"{
  "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0", "act_fn": "silu",
  "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": false,
  "cross_attention_dim": 768,
  "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
  "downsample_padding": 1, "flip_sin_to_cos": true, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
  "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
  "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
}"#;

const SD21_UNET: &str = r#"{
  "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.10.0.dev0", "act_fn": "silu",
  "attention_head_dim": [5, 10, 20, 20], "block_out_channels": [320, 640, 1280, 1280],
  "center_input_sample": false, "cross_attention_dim": 1024,
  "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
  "downsample_padding": 1, "dual_cross_attention": false, "flip_sin_to_cos": true, "freq_shift": 0,
  "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
  "num_class_embeds": null, "only_cross_attention": false, "out_channels": 4, "sample_size": 96,
  "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
  "upcast_attention": true, "use_linear_projection": true
}"#;

const VAE: &str = r#"{
  "_class_name": "AutoencoderKL", "_diffusers_version": "0.6.0", "act_fn": "silu",
  "block_out_channels": [128, 256, 512, 512],
  "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
  "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3,
  "sample_size": 512,
  "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"]
}"#;

const SD15_TEXT: &str = r#"{
  "_name_or_path": "openai/clip-vit-large-patch14", "architectures": ["CLIPTextModel"], "attention_dropout": 0.0,
  "bos_token_id": 0, "dropout": 0.0, "eos_token_id": 2, "hidden_act": "quick_gelu", "hidden_size": 768,
  "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 3072, "layer_norm_eps": 1e-05,
  "max_position_embeddings": 77, "model_type": "clip_text_model", "num_attention_heads": 12,
  "num_hidden_layers": 12, "pad_token_id": 1, "projection_dim": 768, "torch_dtype": "float32",
  "transformers_version": "4.22.0.dev0", "vocab_size": 49408
}"#;

const SD21_TEXT: &str = r#"{
  "_name_or_path": "hf-models/stable-diffusion-v2-768x768/text_encoder", "architectures": ["CLIPTextModel"],
  "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0, "eos_token_id": 2, "hidden_act": "gelu",
  "hidden_size": 1024, "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 4096,
  "layer_norm_eps": 1e-05, "max_position_embeddings": 77, "model_type": "clip_text_model",
  "num_attention_heads": 16, "num_hidden_layers": 23, "pad_token_id": 1, "projection_dim": 512,
  "torch_dtype": "float32", "transformers_version": "4.25.0.dev0", "vocab_size": 49408
}"#;

fn manifest(name: &str) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/manifests")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("manifest json")
}

fn key_shapes(v: &Value) -> BTreeMap<String, Vec<usize>> {
    v.as_array()
        .expect("list")
        .iter()
        .map(|kv| {
            let key = kv[0].as_str().expect("key").to_string();
            let shape = kv[1]
                .as_array()
                .expect("shape")
                .iter()
                .map(|d| d.as_u64().expect("dim") as usize)
                .collect();
            (key, shape)
        })
        .collect()
}

/// The literal config agrees with the one the script used on every entry the script set.
fn same_config(literal: &str, script: &Value) {
    let literal: Value = serde_json::from_str(literal).expect("literal json");
    for (k, v) in script.as_object().expect("config object") {
        assert_eq!(&literal[k], v, "config entry `{k}`");
    }
}

/// Compares the map with a manifest component; canonical keys the map omits must be ones it ignores.
fn check(map: &KeyMap, component: &Value, expect_omitted: usize) {
    let diffusers: BTreeMap<_, _> = map.diffusers_manifest().into_iter().collect();
    assert_eq!(diffusers.len(), map.len(), "diffusers keys are unique");
    assert_eq!(diffusers, key_shapes(&component["diffusers"]));

    let canonical: BTreeMap<_, _> = map.canonical_manifest().into_iter().collect();
    let mut original = key_shapes(&component["original"]);
    let omitted: Vec<String> = original
        .keys()
        .filter(|k| !canonical.contains_key(*k))
        .cloned()
        .collect();
    assert_eq!(omitted.len(), expect_omitted, "omitted: {omitted:?}");
    for k in &omitted {
        assert!(
            map.ignores_canonical(k),
            "`{k}` is neither mapped nor ignored"
        );
        original.remove(k);
    }
    assert_eq!(canonical, original);
}

#[test]
fn sd15_unet_map_matches_real_key_manifest() {
    let m = manifest("sd15.json");
    same_config(SD15_UNET, &m["unet"]["config"]);
    let cfg = DiffusersUnetConfig::from_json(SD15_UNET).expect("config");
    let arch = cfg.arch().expect("arch");
    assert_eq!(arch.heads, Heads::Count(8));
    assert_eq!(arch.attention_levels, vec![0, 1, 2]);
    assert_eq!(arch.channel_mult, vec![1, 2, 4, 4]);
    assert!(!arch.linear_projection);
    assert!(arch.ignored.is_empty(), "{:?}", arch.ignored);
    let map = unet_key_map(&cfg)
        .expect("map")
        .with_canonical_prefix(UNET_PREFIX);
    assert_eq!(map.len(), 686);
    check(&map, &m["unet"], 0);
}

#[test]
fn sd21_unet_map_matches_real_key_manifest() {
    let m = manifest("sd21.json");
    same_config(SD21_UNET, &m["unet"]["config"]);
    let cfg = DiffusersUnetConfig::from_json(SD21_UNET).expect("config");
    let arch = cfg.arch().expect("arch");
    assert_eq!(
        arch.heads,
        Heads::Dim(64),
        "[5, 10, 20, 20] heads over [320, 640, 1280, 1280] channels"
    );
    assert!(arch.linear_projection && arch.upcast_attention);
    assert_eq!(arch.context_dim, 1024);
    assert!(arch.ignored.is_empty(), "{:?}", arch.ignored);
    let map = unet_key_map(&cfg)
        .expect("map")
        .with_canonical_prefix(UNET_PREFIX);
    check(&map, &m["unet"], 0);
}

#[test]
fn sd_vae_map_matches_real_key_manifest() {
    for name in ["sd15.json", "sd21.json"] {
        let m = manifest(name);
        same_config(VAE, &m["vae"]["config"]);
        let cfg = DiffusersVaeConfig::from_json(VAE).expect("config");
        let arch = cfg.arch().expect("arch");
        assert_eq!(
            (arch.ch, arch.ch_mult.clone(), arch.num_res_blocks),
            (128, vec![1, 2, 4, 4], 2)
        );
        assert_eq!(arch.scaling_factor, 0.18215);
        let map = vae_key_map(&cfg)
            .expect("map")
            .with_canonical_prefix(VAE_PREFIX);
        assert_eq!(map.len(), 248);
        check(&map, &m["vae"], 0);
    }
}

#[test]
fn sd15_clip_map_matches_real_key_manifest() {
    let m = manifest("sd15.json");
    same_config(SD15_TEXT, &m["text"]["config"]);
    let cfg = DiffusersClipConfig::from_json(SD15_TEXT).expect("config");
    assert!(cfg.arch().expect("arch").ignored.is_empty());
    let map = clip_key_map(&cfg)
        .expect("map")
        .with_canonical_prefix(CLIP_PREFIX);
    check(&map, &m["text"], 0);
}

#[test]
fn sd21_open_clip_map_matches_real_key_manifest_except_unused_tail() {
    let m = manifest("sd21.json");
    same_config(SD21_TEXT, &m["text"]["config"]);
    let cfg = DiffusersClipConfig::from_json(SD21_TEXT).expect("config");
    let map = open_clip_key_map(&cfg)
        .expect("map")
        .with_canonical_prefix(OPEN_CLIP_PREFIX);
    // resblocks.23 (12 tensors), text_projection and logit_scale are not in a diffusers SD2 text encoder.
    check(&map, &m["text"], 14);
}

#[test]
fn deep_unet_map_matches_original_code_with_per_level_res_blocks() {
    // Per-level res blocks [2, 1, 3, 2], depth-2 transformers at levels 0, 2, 3, head width 16, class labels.
    let m = manifest("deep-unet.json");
    let cfg_json = m["unet"]["config"].to_string();
    let cfg = DiffusersUnetConfig::from_json(&cfg_json).expect("config");
    let arch = cfg.arch().expect("arch");
    assert_eq!(arch.heads, Heads::Dim(16));
    assert_eq!(
        (arch.res_blocks.clone(), arch.attention_levels.clone()),
        (vec![2, 1, 3, 2], vec![0, 2, 3])
    );
    assert_eq!(arch.num_classes, Some(3));
    let map = unet_key_map(&cfg)
        .expect("map")
        .with_canonical_prefix(UNET_PREFIX);
    check(&map, &m["unet"], 0);
}
