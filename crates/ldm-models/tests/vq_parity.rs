//! VQ first stage (`VqModel`) parity with diffusers `VQModel` (= CompVis `VQModelInterface`, checked by the
//! generator) on the tiny fixtures of `tools/fixtures/make_vq_tiny.py` (torch 2.15, diffusers 0.42.1; fp16
//! weights, fp32 references). Both forms: the original-key single file `model.safetensors` and the diffusers
//! folder `vqvae/` through the VQ key map. Tolerance, per element: |x − y| ≤ max(1e-4·|x + y|, 1e-5);
//! codebook indices exact. Also: the identity first stage, `FirstStage`, f = 1..32 shapes, clear errors.
use std::collections::HashMap;

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;
use ldm_models::autoencoder::{
    AttnType, DdConfig, Encoded, FirstStage, VectorQuantizer, VqModel, VqModelConfig,
};
use ldm_models::import::{component_files, vq_key_map_for, DiffusersVqConfig, VQ_PREFIX};

mod common;
#[allow(dead_code)] // this file uses the configuration only
mod kl_fixture;
use common::{assert_close, fixture, load};

const R: f32 = 1e-4;
const A: f32 = 1e-5;

/// The original configs of the two fixtures (their `model.yaml`).
fn fixture_config(model: &str) -> VqModelConfig {
    let (ch_mult, attn_resolutions, z_channels, n_embed, attn_type) = match model {
        "f4" => (vec![1, 1, 1], vec![8], 3, 64, AttnType::Vanilla),
        _ => (vec![1, 1, 1, 1], vec![], 4, 32, AttnType::None),
    };
    VqModelConfig {
        embed_dim: 3,
        n_embed,
        ddconfig: DdConfig {
            ch: 32,
            out_ch: 3,
            ch_mult,
            num_res_blocks: 1,
            attn_resolutions,
            in_channels: 3,
            resolution: 32,
            z_channels,
            double_z: false,
            num_groups: 32,
            attn_type,
        },
    }
}

fn single_file_model(model: &str) -> Result<VqModel> {
    let weights = load(&format!("vq-tiny/{model}/model.safetensors"))?;
    let vb = VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu);
    VqModel::new(&fixture_config(model), vb.pp("first_stage_model"))
}

/// The diffusers folder through its config.json and the VQ key map.
fn folder_model(model: &str) -> Result<VqModel> {
    folder_model_at(&format!("vq-tiny/{model}"))
}

/// The `vqvae/` component under the fixture directory `dir`.
fn folder_model_at(dir: &str) -> Result<VqModel> {
    let files = component_files(&fixture(dir), "vqvae").map_err(candle_core::Error::wrap)?;
    let arch = DiffusersVqConfig::from_file(&files.config)
        .and_then(|c| c.arch())
        .map_err(candle_core::Error::wrap)?;
    assert!(
        arch.ignored.is_empty(),
        "ignored entries {:?}",
        arch.ignored
    );
    let map = vq_key_map_for(&arch)
        .map_err(candle_core::Error::wrap)?
        .with_canonical_prefix(VQ_PREFIX);
    let tensors = candle_core::safetensors::load(&files.weights, &Device::Cpu)?;
    let canonical: HashMap<String, Tensor> = map
        .to_canonical(tensors)
        .map_err(candle_core::Error::wrap)?
        .into_iter()
        .collect();
    let config = VqModelConfig::from(&arch);
    let vb = VarBuilder::from_tensors(canonical, DType::F32, &Device::Cpu);
    VqModel::new(&config, vb.pp("first_stage_model"))
}

fn check_parity(name: &str, vq: &VqModel, model: &str) -> Result<()> {
    let refs = load(&format!("vq-tiny/{model}/ref.safetensors"))?;
    let h = vq.encode(&refs["image"])?;
    assert_close(&format!("{name} encode.h"), &h, &refs["encode.h"], R, A)?;
    let q = vq.quantize(&h)?;
    assert_eq!(
        q.indices
            .to_dtype(DType::I64)?
            .flatten_all()?
            .to_vec1::<i64>()?,
        refs["quantize.indices"].flatten_all()?.to_vec1::<i64>()?,
        "{name} quantize.indices"
    );
    assert_eq!(q.indices.dims(), refs["quantize.indices"].dims());
    assert_close(
        &format!("{name} quantize.z_q"),
        &q.z_q,
        &refs["quantize.z_q"],
        R,
        A,
    )?;
    let latent = &refs["decode.latent"];
    let ql = vq.quantize(latent)?;
    assert_eq!(
        ql.indices
            .to_dtype(DType::I64)?
            .flatten_all()?
            .to_vec1::<i64>()?,
        refs["decode.indices"].flatten_all()?.to_vec1::<i64>()?,
        "{name} decode.indices"
    );
    assert_close(
        &format!("{name} decode.z_q"),
        &ql.z_q,
        &refs["decode.z_q"],
        R,
        A,
    )?;
    let img = vq.decode(latent)?;
    assert_close(
        &format!("{name} decode.image"),
        &img,
        &refs["decode.image"],
        R,
        A,
    )?;
    let raw = vq.decode_unquantized(latent)?;
    assert_close(
        &format!("{name} decode_unquantized.image"),
        &raw,
        &refs["decode_unquantized.image"],
        R,
        A,
    )?;
    let from_codes = vq.decode_indices(&ql.indices)?;
    assert_close(
        &format!("{name} decode_indices"),
        &from_codes,
        &img,
        0.0,
        1e-6,
    )?;
    let round = vq.decode(&h)?;
    assert_close(
        &format!("{name} roundtrip.image"),
        &round,
        &refs["roundtrip.image"],
        R,
        A,
    )?;
    Ok(())
}

#[test]
fn vq_f4_with_attention_single_file_matches_diffusers() -> Result<()> {
    check_parity("f4 single file", &single_file_model("f4")?, "f4")
}

#[test]
fn vq_f4_with_attention_diffusers_folder_matches_diffusers() -> Result<()> {
    check_parity("f4 folder", &folder_model("f4")?, "f4")
}

#[test]
fn vq_f8_without_attention_single_file_matches_diffusers() -> Result<()> {
    check_parity(
        "f8-noattn single file",
        &single_file_model("f8-noattn")?,
        "f8-noattn",
    )
}

#[test]
fn vq_f8_without_attention_diffusers_folder_matches_diffusers() -> Result<()> {
    check_parity("f8-noattn folder", &folder_model("f8-noattn")?, "f8-noattn")
}

/// `ldm-uncond-tiny`: each case's final latents / scaling_factor, decoded (quantising) by either form of the
/// pipeline's VQModel, give the pipeline's image.
#[test]
fn ldm_uncond_final_latents_decode_to_the_pipeline_images() -> Result<()> {
    let refs = load("ldm-uncond-tiny/ref.safetensors")?;
    let weights = load("ldm-uncond-tiny/model.safetensors")?;
    let mut config = fixture_config("f4");
    config.n_embed = 16;
    let vb = VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu);
    let single = VqModel::new(&config, vb.pp("first_stage_model"))?;
    let folder = folder_model_at("ldm-uncond-tiny/diffusers")?;
    let scale = 20.0; // vqvae/config.json scaling_factor, model.yaml scale_factor
    for case in [
        "ddim-eta0-seed",
        "ddim-eta0-fixed",
        "ddim-eta1-fixed",
        "ddim-eta1-seed",
    ] {
        let z = (&refs[&format!("ldm.{case}.latents")] / scale)?;
        for (form, vq) in [("single file", &single), ("folder", &folder)] {
            let image = ((vq.decode(&z)? / 2.0)? + 0.5)?.clamp(0f32, 1f32)?;
            assert_close(
                &format!("ldm-uncond {case} image ({form})"),
                &image,
                &refs[&format!("ldm.{case}.image")],
                R,
                A,
            )?;
        }
    }
    Ok(())
}

#[test]
fn folder_configs_translate_to_the_original_architecture() -> Result<()> {
    for model in ["f4", "f8-noattn"] {
        let files = component_files(&fixture(&format!("vq-tiny/{model}")), "vqvae")
            .map_err(candle_core::Error::wrap)?;
        let arch = DiffusersVqConfig::from_file(&files.config)
            .and_then(|c| c.arch())
            .map_err(candle_core::Error::wrap)?;
        let got = VqModelConfig::from(&arch);
        let want = fixture_config(model);
        // resolution is nominal: compare the attention LEVELS, not the sizes
        let levels = |c: &VqModelConfig| -> Vec<usize> {
            (0..c.ddconfig.ch_mult.len())
                .filter(|i| {
                    c.ddconfig
                        .attn_resolutions
                        .contains(&(c.ddconfig.resolution >> i))
                })
                .collect()
        };
        assert_eq!(levels(&got), levels(&want), "{model}");
        let strip = |mut c: VqModelConfig| {
            c.ddconfig.resolution = 0;
            c.ddconfig.attn_resolutions.clear();
            c
        };
        assert_eq!(strip(got), strip(want), "{model}");
    }
    Ok(())
}

#[test]
fn first_stage_vq_decodes_quantised_and_encodes_deterministically() -> Result<()> {
    let refs = load("vq-tiny/f4/ref.safetensors")?;
    let fs = FirstStage::Vq(single_file_model("f4")?);
    assert_eq!(fs.downsample_factor(), 4);
    assert_eq!(fs.latent_channels(), 3);
    let enc = fs.encode(&refs["image"])?;
    assert!(!enc.is_stochastic());
    let noise = Tensor::ones(enc.mode().dims(), DType::F32, &Device::Cpu)?;
    assert_close(
        "FirstStage::Vq sample ignores noise",
        &enc.sample(&noise)?,
        &refs["encode.h"],
        R,
        A,
    )?;
    let img = fs.decode(&refs["decode.latent"])?;
    assert_close("FirstStage::Vq decode", &img, &refs["decode.image"], R, A)?;
    Ok(())
}

#[test]
fn identity_first_stage_is_pixel_space() -> Result<()> {
    let fs = FirstStage::Identity { channels: 3 };
    assert_eq!(fs.downsample_factor(), 1);
    assert_eq!(fs.latent_channels(), 3);
    let x = Tensor::randn(0f32, 1.0, (2, 3, 5, 7), &Device::Cpu)?;
    let enc = fs.encode(&x)?;
    assert!(matches!(enc, Encoded::Latent(_)));
    assert_close("identity encode", enc.mode(), &x, 0.0, 0.0)?;
    assert_close("identity decode", &fs.decode(&x)?, &x, 0.0, 0.0)?;
    let err = fs
        .decode(&Tensor::zeros((1, 4, 5, 7), DType::F32, &Device::Cpu)?)
        .expect_err("4 channels into a 3-channel identity");
    assert!(err.to_string().contains("expected 3"), "{err}");
    Ok(())
}

#[test]
fn every_factor_from_1_to_32_builds_with_the_right_shapes() -> Result<()> {
    let dev = Device::Cpu;
    for levels in 1..=6usize {
        for attn_type in [AttnType::Vanilla, AttnType::None] {
            let f = 1usize << (levels - 1);
            let ch_mult: Vec<usize> = (0..levels).map(|i| 1 + i % 2).collect();
            let config = VqModelConfig {
                embed_dim: 3,
                n_embed: 16,
                ddconfig: DdConfig {
                    ch: 32,
                    out_ch: 3,
                    ch_mult,
                    num_res_blocks: 1,
                    attn_resolutions: vec![64 >> (levels - 1)], // attention at the coarsest level
                    in_channels: 3,
                    resolution: 64,
                    z_channels: 4,
                    double_z: false,
                    num_groups: 32,
                    attn_type,
                },
            };
            assert_eq!(config.downsample_factor(), f);
            let vq = VqModel::new(&config, VarBuilder::zeros(DType::F32, &dev))?;
            let x = Tensor::zeros((1, 3, 2 * f, 3 * f), DType::F32, &dev)?;
            let h = vq.encode(&x)?;
            assert_eq!(h.dims(), &[1, 3, 2, 3], "f = {f}");
            assert_eq!(vq.quantize(&h)?.indices.dims(), &[1, 2, 3]);
            assert_eq!(vq.decode(&h)?.dims(), &[1, 3, 2 * f, 3 * f], "f = {f}");
            let fs = FirstStage::Vq(vq);
            assert_eq!(fs.downsample_factor(), f);
        }
    }
    for (preset, f, c) in [
        (VqModelConfig::ldm_vq_f4(), 4, 3),
        (VqModelConfig::ldm_vq_f4_noattn(), 4, 3),
        (VqModelConfig::ldm_vq_f8(), 8, 4),
        (VqModelConfig::ldm_vq_f8_n256(), 8, 4),
        (VqModelConfig::ldm_vq_f16(), 16, 8),
    ] {
        assert_eq!((preset.downsample_factor(), preset.embed_dim), (f, c));
    }
    Ok(())
}

#[test]
fn attn_type_none_has_no_attention_weights_and_parses_from_yaml_names() -> Result<()> {
    // attn_type none must not ask for mid.attn_1: build from only the tensors of the no-attention fixture.
    single_file_model("f8-noattn")?;
    let json = r#"{"ch": 32, "out_ch": 3, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [],
                   "in_channels": 3, "resolution": 32, "z_channels": 3, "double_z": false, "attn_type": "none"}"#;
    let dd: DdConfig = serde_json::from_str(json).map_err(candle_core::Error::wrap)?;
    assert_eq!(dd.attn_type, AttnType::None);
    let without: DdConfig = serde_json::from_str(&json.replace(r#", "attn_type": "none""#, ""))
        .map_err(candle_core::Error::wrap)?;
    assert_eq!(without.attn_type, AttnType::Vanilla, "absent means vanilla");
    let linear = serde_json::from_str::<DdConfig>(&json.replace("\"none\"", "\"linear\""));
    assert!(linear.is_err(), "linear attention is not implemented");
    Ok(())
}

#[test]
fn codebook_and_latent_channel_mismatches_are_clear_errors() -> Result<()> {
    // a config whose embed_dim (4) disagrees with the checkpoint's codebook [64, 3]
    let weights = load("vq-tiny/f4/model.safetensors")?;
    let vb = VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu);
    let mut config = fixture_config("f4");
    config.embed_dim = 4;
    let err = VqModel::new(&config, vb.pp("first_stage_model")).expect_err("embed_dim 4 vs 3");
    let msg = err.to_string();
    assert!(
        msg.contains("first_stage_model.quantize.embedding.weight")
            && msg.contains("[64, 3]")
            && msg.contains("embed_dim = 4"),
        "{msg}"
    );
    // and a codebook of another size
    let mut config = fixture_config("f4");
    config.n_embed = 128;
    let vb = VarBuilder::from_tensors(
        load("vq-tiny/f4/model.safetensors")?,
        DType::F32,
        &Device::Cpu,
    );
    let msg = VqModel::new(&config, vb.pp("first_stage_model"))
        .expect_err("n_embed 128 vs 64")
        .to_string();
    assert!(msg.contains("n_embed = 128"), "{msg}");
    eprintln!("codebook mismatch error: {msg}");

    let vq = single_file_model("f4")?;
    let wrong = Tensor::zeros((1, 4, 8, 8), DType::F32, &Device::Cpu)?;
    let msg = vq.decode(&wrong).expect_err("4-channel latent").to_string();
    assert!(
        msg.contains("4 channels") && msg.contains("embed_dim = 3"),
        "{msg}"
    );
    let msg = vq
        .quantize(&wrong)
        .expect_err("4-channel latent")
        .to_string();
    assert!(
        msg.contains("embed_dim = 3") && msg.contains("64 entries"),
        "{msg}"
    );
    let msg = vq
        .decode_unquantized(&wrong)
        .expect_err("4-channel latent")
        .to_string();
    assert!(msg.contains("expected embed_dim = 3"), "{msg}");
    let img = Tensor::zeros((1, 3, 30, 32), DType::F32, &Device::Cpu)?;
    assert!(vq.encode(&img).is_err(), "30 is not a multiple of f = 4");

    let mut kl_like = fixture_config("f4");
    kl_like.ddconfig.double_z = true;
    let msg = VqModel::new(&kl_like, VarBuilder::zeros(DType::F32, &Device::Cpu))
        .expect_err("double_z")
        .to_string();
    assert!(msg.contains("double_z"), "{msg}");
    let err = VectorQuantizer::new(0, 3, VarBuilder::zeros(DType::F32, &Device::Cpu))
        .expect_err("empty codebook");
    assert!(err.to_string().contains("empty codebook"), "{err}");
    Ok(())
}

#[test]
fn first_stage_kl_encodes_a_posterior_for_the_callers_noise() -> Result<()> {
    use ldm_models::autoencoder::AutoencoderKl;
    let config = kl_fixture::tiny_vae_config();
    let vb = VarBuilder::from_tensors(
        load("sd1-tiny/model.safetensors")?,
        DType::F32,
        &Device::Cpu,
    );
    let fs = FirstStage::Kl(AutoencoderKl::new(&config, vb.pp("first_stage_model"))?);
    assert_eq!((fs.downsample_factor(), fs.latent_channels()), (2, 4));
    let refs = load("sd1-tiny/ref.safetensors")?;
    let enc = fs.encode(&refs["vae.image"])?;
    assert!(enc.is_stochastic());
    let Encoded::Posterior(q) = &enc else {
        panic!("KL must give a posterior")
    };
    assert_close("FirstStage::Kl mode", enc.mode(), &refs["vae.mean"], R, A)?;
    let noise = Tensor::randn(0f32, 1.0, q.mean.dims(), &Device::Cpu)?;
    let want = (&refs["vae.mean"] + ((&refs["vae.logvar"] * 0.5)?.exp()? * &noise)?)?;
    assert_close("FirstStage::Kl sample", &enc.sample(&noise)?, &want, R, A)?;
    assert_close(
        "FirstStage::Kl decode",
        &fs.decode(&refs["vae.z"])?,
        &refs["vae.decoded"],
        R,
        A,
    )?;
    Ok(())
}
