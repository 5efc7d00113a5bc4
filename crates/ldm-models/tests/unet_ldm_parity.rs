//! Whole-UNet parity with the ORIGINAL `openaimodel.UNetModel` for the LDM layouts beyond SD txt2img, in both
//! checkpoint forms.
//!
//! Fixtures: `fixtures/ldm-unet-tiny/<variant>/` made by `tools/fixtures/make_unet_ldm.py` (torch 2.15.0,
//! diffusers 0.42.1, original code of CompVis/latent-diffusion @ a506df5 and Stability-AI/stablediffusion @ cf1d67a,
//! GroupNorm groups rebound to 8): `model.safetensors` (fp16, `model.diffusion_model.*`), `diffusers/unet/`
//! (`UNet2DModel` or `UNet2DConditionModel`, fp16, where diffusers can express the model) and `ref.safetensors`
//! (`x`, `t`, `ctx`?, `y`?, `out`: the original's fp32 output from the rounded weights; the script checks that
//! diffusers gives the same output to <= 2.3e-6).
//! Tolerance: |x − y| ≤ max(R·|x + y|, A), R = 1e-4, A = 1e-5. Measured (CPU): see the printed lines
//! (max |x − y| ≤ 2e-6 on every variant and form).
use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;
use ldm_models::import::{
    unet2d_key_map, unet_key_map, DiffusersUnet2dConfig, DiffusersUnetConfig, KeyMap,
};
use ldm_models::unet::keys::unet_keys;
use ldm_models::unet::{unet_from_vb, HeadSpec, OriginalUnetParams, UnetConfig};

const R: f32 = 1e-4;
const A: f32 = 1e-5;

fn dir(variant: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/ldm-unet-tiny")
        .join(variant);
    assert!(
        path.is_dir(),
        "missing fixture {} (made by tools/fixtures/make_unet_ldm.py)",
        path.display()
    );
    path
}

/// The common tiny layout: 16 channels, 8 groups, one res block, two levels, no attention, no context.
fn tiny() -> UnetConfig {
    UnetConfig {
        in_channels: 3,
        out_channels: 3,
        model_channels: 16,
        channel_mult: vec![1, 1],
        num_res_blocks: 1,
        attention_levels: vec![],
        num_groups: 8,
        ..UnetConfig::ldm_vq4_uncond()
    }
}

/// (a) unconditional, legacy attention with heads of 8 channels at both levels.
fn uncond() -> UnetConfig {
    UnetConfig {
        attention_levels: vec![0, 1],
        heads: HeadSpec::Dim(8),
        ..tiny()
    }
}

/// (b) 6-in / 3-out super-resolution UNet, attention at the deepest of 3 levels (attention_resolutions [8, 4]).
fn sr() -> UnetConfig {
    UnetConfig {
        in_channels: 6,
        channel_mult: vec![1, 1, 1],
        attention_levels: vec![2],
        heads: HeadSpec::Dim(4),
        ..tiny()
    }
}

/// (c) scale-shift norm, ResBlock up/down sampling, 2 heads at level 1.
fn scaleshift() -> UnetConfig {
    UnetConfig {
        in_channels: 4,
        out_channels: 4,
        attention_levels: vec![1],
        heads: HeadSpec::Count(2),
        use_scale_shift_norm: true,
        resblock_updown: true,
        ..tiny()
    }
}

/// (d) x4-upscaler layout: 7 in, noise-level labels (1000), attn1 on the context at level 1, linear proj.
fn x4() -> UnetConfig {
    UnetConfig {
        in_channels: 7,
        out_channels: 4,
        channel_mult: vec![1, 1, 1],
        attention_levels: vec![1, 2],
        heads: HeadSpec::Count(2),
        context_dim: Some(16),
        use_linear_in_transformer: true,
        num_classes: Some(1000),
        disable_self_attentions: Some(vec![true, true, false]),
        ..tiny()
    }
}

/// (e) class-conditional cross-attention (cin256 style): one 32-wide context token, one head.
fn cin() -> UnetConfig {
    UnetConfig {
        attention_levels: vec![1],
        heads: HeadSpec::Count(1),
        context_dim: Some(32),
        ..tiny()
    }
}

/// (f) original-only options: new attention order, no conv resampling, num_attention_blocks, class labels
/// without cross-attention, 4 heads, 2 res blocks.
fn options() -> UnetConfig {
    UnetConfig {
        in_channels: 4,
        out_channels: 4,
        num_res_blocks: 2,
        attention_levels: vec![0, 1],
        heads: HeadSpec::Count(4),
        use_new_attention_order: true,
        conv_resample: false,
        num_attention_blocks: Some(vec![1, 2]),
        num_classes: Some(10),
        ..tiny()
    }
}

struct Refs(HashMap<String, Tensor>);

impl Refs {
    fn load(variant: &str) -> Result<Self> {
        let path = dir(variant).join("ref.safetensors");
        Ok(Self(candle_core::safetensors::load(path, &Device::Cpu)?))
    }
    fn get(&self, k: &str) -> Option<&Tensor> {
        self.0.get(k)
    }
    fn req(&self, k: &str) -> &Tensor {
        self.0
            .get(k)
            .unwrap_or_else(|| panic!("ref.safetensors lacks `{k}`"))
    }
}

/// Runs the UNet of `vb` on the variant's inputs and checks the output; returns max |x − y|.
fn check_output(variant: &str, form: &str, vb: VarBuilder, cfg: &UnetConfig) -> Result<f32> {
    let unet = unet_from_vb(vb, cfg)?;
    let r = Refs::load(variant)?;
    let out = unet.forward_with(
        r.req("x"),
        &r.req("t").to_dtype(DType::F32)?,
        r.get("ctx"),
        r.get("y"),
    )?;
    let want = r.req("out");
    assert_eq!(out.dims(), want.dims());
    let g = out.flatten_all()?.to_vec1::<f32>()?;
    let w = want.flatten_all()?.to_vec1::<f32>()?;
    let (mut max_abs, mut worst) = (0f32, 0f32);
    for (x, y) in g.iter().zip(&w) {
        let d = (x - y).abs();
        max_abs = max_abs.max(d);
        worst = worst.max(d / (R * (x + y).abs()).max(A));
    }
    println!("{variant} ({form}): max |x-y| = {max_abs:.3e}, worst/tolerance = {worst:.3}");
    assert!(
        worst <= 1.0,
        "{variant} ({form}): output outside tolerance (R={R}, A={A})"
    );
    Ok(max_abs)
}

fn original_tensors(variant: &str) -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load(dir(variant).join("model.safetensors"), &Device::Cpu)
}

/// The original single file: its `unet_params.json` (the original constructor arguments) translates to `cfg`,
/// the module tree reads exactly its tensors, and the output matches.
fn check_original(variant: &str, cfg: &UnetConfig) -> Result<()> {
    let text = std::fs::read_to_string(dir(variant).join("unet_params.json")).expect("params");
    let json: serde_json::Value = serde_json::from_str(&text).expect("json");
    let params: OriginalUnetParams =
        serde_json::from_value(json["params"].clone()).expect("original params");
    let groups = json["num_groups"].as_u64().expect("num_groups") as usize;
    assert_eq!(
        params.to_config(groups).as_ref(),
        Ok(cfg),
        "{variant}: unet_params.json"
    );
    let file = original_tensors(variant)?;
    let mut in_file: Vec<(String, Vec<usize>)> = file
        .iter()
        .map(|(k, v)| {
            let k = k
                .strip_prefix("model.diffusion_model.")
                .unwrap_or_else(|| panic!("`{k}` lacks the prefix"));
            (k.to_string(), v.dims().to_vec())
        })
        .collect();
    in_file.sort();
    assert_eq!(unet_keys(cfg)?, in_file, "{variant}: key manifest");
    let path = dir(variant).join("model.safetensors");
    // SAFETY: the fixture file is not modified while mapped.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&path], DType::F32, &Device::Cpu)? };
    check_output(variant, "original", vb.pp("model.diffusion_model"), cfg)?;
    Ok(())
}

/// The diffusers folder: mapped strictly onto canonical names, it holds bit-identical tensors to the single
/// file, and the UNet built from the translated config gives the reference output.
fn check_diffusers(variant: &str, map: &KeyMap, cfg: &UnetConfig) -> Result<()> {
    let weights = dir(variant).join("diffusers/unet/diffusion_pytorch_model.safetensors");
    let diffusers = candle_core::safetensors::load(weights, &Device::Cpu)?;
    let canonical = map
        .with_canonical_prefix("model.diffusion_model.")
        .to_canonical(diffusers)
        .unwrap_or_else(|e| panic!("{variant}: {e}"));
    let original = original_tensors(variant)?;
    assert_eq!(canonical.len(), original.len(), "{variant}: tensor count");
    for (k, v) in &canonical {
        let o = original
            .get(k)
            .unwrap_or_else(|| panic!("{variant}: `{k}` not in the single file"));
        assert_eq!(v.dims(), o.dims(), "{variant}: `{k}` shape");
        let d = (v.to_dtype(DType::F32)? - o.to_dtype(DType::F32)?)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        assert_eq!(d, 0.0, "{variant}: `{k}` differs from the single file");
    }
    let tensors: HashMap<String, Tensor> = canonical
        .into_iter()
        .map(|(k, v)| Ok((k, v.to_dtype(DType::F32)?)))
        .collect::<Result<_>>()?;
    let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
    check_output(variant, "diffusers", vb.pp("model.diffusion_model"), cfg)?;
    Ok(())
}

/// `UNet2DModel` config.json → `UnetConfig`, which must equal `want` up to how the heads are written.
fn unet2d(variant: &str, want: &UnetConfig) -> (KeyMap, UnetConfig) {
    let path = dir(variant).join("diffusers/unet/config.json");
    let cfg = DiffusersUnet2dConfig::from_file(&path).expect("UNet2DModel config");
    let arch = cfg.arch().expect("UNet2DModel arch");
    assert!(arch.ignored.is_empty(), "{variant}: {:?}", arch.ignored);
    same_model(variant, &arch.unet, want);
    (unet2d_key_map(&cfg).expect("UNet2DModel map"), arch.unet)
}

/// `UNet2DConditionModel` config.json → `UnetConfig` (via `UnetArch`).
fn unet_cond(variant: &str, want: &UnetConfig) -> (KeyMap, UnetConfig) {
    let path = dir(variant).join("diffusers/unet/config.json");
    let cfg = DiffusersUnetConfig::from_file(&path).expect("UNet2DConditionModel config");
    let arch = cfg.arch().expect("UNet2DConditionModel arch");
    assert!(arch.ignored.is_empty(), "{variant}: {:?}", arch.ignored);
    let unet = UnetConfig::try_from(&arch).expect("UnetConfig from arch");
    same_model(variant, &unet, want);
    (unet_key_map(&cfg).expect("UNet2DConditionModel map"), unet)
}

fn same_model(variant: &str, got: &UnetConfig, want: &UnetConfig) {
    let widths: Vec<usize> = want
        .attention_levels
        .iter()
        .map(|&l| want.model_channels * want.channel_mult[l])
        .chain([want.model_channels * want.channel_mult[want.channel_mult.len() - 1]])
        .collect();
    for ch in widths {
        assert_eq!(
            got.heads.split(ch),
            want.heads.split(ch),
            "{variant}: heads at {ch} channels"
        );
    }
    let got = UnetConfig {
        heads: want.heads,
        ..got.clone()
    };
    assert_eq!(&got, want, "{variant}: translated config");
}

#[test]
fn uncond_legacy_attention_matches_original_in_both_forms() -> Result<()> {
    check_original("uncond", &uncond())?;
    let (map, cfg) = unet2d("uncond", &uncond());
    check_diffusers("uncond", &map, &cfg)
}

#[test]
fn sr_concat_unet_matches_original_in_both_forms() -> Result<()> {
    check_original("sr", &sr())?;
    let (map, cfg) = unet2d("sr", &sr());
    check_diffusers("sr", &map, &cfg)
}

#[test]
fn scale_shift_resblock_updown_matches_original_in_both_forms() -> Result<()> {
    check_original("scaleshift", &scaleshift())?;
    let (map, cfg) = unet2d("scaleshift", &scaleshift());
    check_diffusers("scaleshift", &map, &cfg)
}

#[test]
fn x4_upscaler_layout_matches_original_in_both_forms() -> Result<()> {
    check_original("x4", &x4())?;
    let (map, cfg) = unet_cond("x4", &x4());
    check_diffusers("x4", &map, &cfg)
}

#[test]
fn class_conditional_cross_attention_matches_original_in_both_forms() -> Result<()> {
    check_original("cin", &cin())?;
    let (map, cfg) = unet_cond("cin", &cin());
    check_diffusers("cin", &map, &cfg)
}

#[test]
fn original_only_options_match_original() -> Result<()> {
    check_original("options", &options())
}

/// The presets build exactly as many tensors and parameters as the original code builds from the released
/// yaml files (`preset_counts.json`, from the original `UNetModel` on the meta device).
#[test]
fn presets_match_the_released_configs_counts() -> Result<()> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/ldm-unet-tiny/preset_counts.json");
    let text = std::fs::read_to_string(&path).expect("preset_counts.json");
    let counts: serde_json::Value = serde_json::from_str(&text).expect("json");
    for (name, cfg) in [
        ("sd_x4_upscaler", UnetConfig::sd_x4_upscaler()),
        ("ldm_vq4_uncond", UnetConfig::ldm_vq4_uncond()),
        ("ldm_bsr_sr", UnetConfig::ldm_bsr_sr()),
        ("ldm_churches_kl8", UnetConfig::ldm_churches_kl8()),
        ("ldm_cin256_v2", UnetConfig::ldm_cin256_v2()),
    ] {
        let keys = unet_keys(&cfg)?;
        let params: usize = keys.iter().map(|(_, s)| s.iter().product::<usize>()).sum();
        let want = &counts[name];
        assert_eq!(
            keys.len() as u64,
            want["tensors"].as_u64().expect("tensors"),
            "{name}: tensors"
        );
        assert_eq!(
            params as u64,
            want["parameters"].as_u64().expect("parameters"),
            "{name}: parameters"
        );
    }
    Ok(())
}

/// Missing or unexpected conditioning inputs and out-of-range labels are errors, not panics.
#[test]
fn conditioning_inputs_are_checked() -> Result<()> {
    let dev = Device::Cpu;
    let path = dir("x4").join("model.safetensors");
    // SAFETY: the fixture file is not modified while mapped.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&path], DType::F32, &dev)? };
    let unet = unet_from_vb(vb.pp("model.diffusion_model"), &x4())?;
    let r = Refs::load("x4")?;
    let (x, t, ctx, y) = (
        r.req("x"),
        &r.req("t").to_dtype(DType::F32)?,
        r.req("ctx"),
        r.req("y"),
    );
    assert!(
        unet.forward_with(x, t, Some(ctx), None).is_err(),
        "labels required"
    );
    assert!(
        unet.forward_with(x, t, None, Some(y)).is_err(),
        "context required"
    );
    let bad = Tensor::new(&[3i64, 1000], &dev)?;
    let err = unet.forward_with(x, t, Some(ctx), Some(&bad));
    assert!(format!("{:?}", err.err()).contains("1000"), "label range");
    let float_labels = y.to_dtype(DType::F32)?;
    assert!(unet
        .forward_with(x, t, Some(ctx), Some(&float_labels))
        .is_err());
    // forward(x, t, ctx) is forward_with(x, t, Some(ctx), None): refused for a labelled model
    assert!(unet.forward(x, t, ctx).is_err());
    Ok(())
}

/// The UNets of the end-to-end upscaling fixtures load strictly from their diffusers folders.
#[test]
fn upscaling_fixture_unets_load_strictly() -> Result<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures");
    let load = |folder: &str, map: KeyMap, cfg: &UnetConfig| -> Result<()> {
        let weights = root
            .join(folder)
            .join("diffusion_pytorch_model.safetensors");
        let tensors = candle_core::safetensors::load(weights, &Device::Cpu)?;
        let canonical = map
            .to_canonical(tensors)
            .unwrap_or_else(|e| panic!("{folder}: {e}"));
        let tensors: HashMap<String, Tensor> = canonical
            .into_iter()
            .map(|(k, v)| Ok((k, v.to_dtype(DType::F32)?)))
            .collect::<Result<_>>()?;
        unet_from_vb(
            VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu),
            cfg,
        )?;
        Ok(())
    };
    let sr = DiffusersUnet2dConfig::from_file(&root.join("ldm-sr-tiny/diffusers/unet/config.json"))
        .expect("config");
    let arch = sr.arch().expect("arch");
    assert_eq!((arch.unet.in_channels, arch.unet.out_channels), (6, 3));
    load(
        "ldm-sr-tiny/diffusers/unet",
        unet2d_key_map(&sr).expect("map"),
        &arch.unet,
    )?;
    let x4 = DiffusersUnetConfig::from_file(&root.join("sd-x4-tiny/diffusers/unet/config.json"))
        .expect("config");
    let cfg = UnetConfig::try_from(&x4.arch().expect("arch")).expect("config");
    assert_eq!(
        (
            cfg.in_channels,
            cfg.num_classes,
            cfg.disable_self_attentions.clone()
        ),
        (7, Some(1000), Some(vec![true, true, false]))
    );
    load(
        "sd-x4-tiny/diffusers/unet",
        unet_key_map(&x4).expect("map"),
        &cfg,
    )
}
