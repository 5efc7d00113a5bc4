//! One test per translation rule of the LDM UNets beyond SD txt2img: diffusers `UNet2DModel` (LDMPipeline,
//! LDMSuperResolutionPipeline) and the `UNet2DConditionModel` options of the x4 upscaler (`num_class_embeds`,
//! `only_cross_attention`), on small configs written here (diffusers 0.42.1 semantics, see
//! `import/diffusers_unet2d.rs`).
use candle_core::{DType, Device, Tensor};
use ldm_models::import::{
    unet2d_key_map, unet_key_map, Conversion, DiffusersUnet2dConfig, DiffusersUnetConfig,
    ImportError, KeyMap,
};
use ldm_models::unet::{HeadSpec, UnetConfig};
use serde_json::{json, Value};

/// An LDM-celebahq-like tiny UNet2DModel; `patch` overrides entries.
fn cfg2d(patch: Value) -> DiffusersUnet2dConfig {
    let mut v = json!({
        "in_channels": 3, "out_channels": 3, "block_out_channels": [32, 64], "layers_per_block": 1,
        "down_block_types": ["DownBlock2D", "AttnDownBlock2D"], "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
        "attention_head_dim": 8, "norm_num_groups": 32, "_class_name": "UNet2DModel", "sample_size": 16
    });
    for (k, x) in patch.as_object().expect("patch object") {
        v[k] = x.clone();
    }
    DiffusersUnet2dConfig::from_json(&v.to_string()).expect("config json")
}

fn unet2d(patch: Value) -> UnetConfig {
    cfg2d(patch).arch().expect("arch").unet
}

fn refused2d(patch: Value) -> ImportError {
    cfg2d(patch).arch().expect_err("must be refused")
}

fn field_of(e: &ImportError) -> &'static str {
    match e {
        ImportError::Unsupported { field, .. } => field,
        ImportError::Inconsistent { .. } => "(inconsistent)",
        _ => "(other)",
    }
}

fn shape(m: &KeyMap, d: &str) -> (Vec<usize>, String, Vec<usize>) {
    let e = m.entry(d).unwrap_or_else(|| panic!("`{d}` is not mapped"));
    (
        e.diffusers_shape.clone(),
        e.canonical.clone(),
        e.canonical_shape.clone(),
    )
}

#[test]
fn unet2d_translates_the_ldm_layout() {
    let u = unet2d(json!({}));
    assert_eq!(
        (u.in_channels, u.out_channels, u.model_channels),
        (3, 3, 32)
    );
    assert_eq!(
        (u.channel_mult.clone(), u.num_res_blocks, u.num_groups),
        (vec![1, 2], 1, 32)
    );
    assert_eq!(
        u.attention_levels,
        vec![1],
        "Attn* blocks are attention levels"
    );
    assert_eq!(u.context_dim, None, "UNet2DModel has no cross-attention");
    assert!(u.conv_resample && !u.resblock_updown && !u.use_scale_shift_norm);
    assert_eq!(u.num_classes, None);
    assert!(cfg2d(json!({})).arch().expect("arch").ignored.is_empty());
}

#[test]
fn unet2d_attention_head_dim_is_a_width_and_null_is_one_head() {
    assert_eq!(unet2d(json!({})).heads, HeadSpec::Dim(8));
    assert_eq!(
        unet2d(json!({"attention_head_dim": null})).heads,
        HeadSpec::Count(1)
    );
    // absent: diffusers' default 8
    let mut v: Value = serde_json::from_str(r#"{"block_out_channels": [32, 64],
        "down_block_types": ["DownBlock2D", "AttnDownBlock2D"], "up_block_types": ["AttnUpBlock2D", "UpBlock2D"]}"#)
    .expect("json");
    v["layers_per_block"] = json!(2);
    let c = DiffusersUnet2dConfig::from_json(&v.to_string()).expect("config");
    let u = c.arch().expect("arch").unet;
    assert_eq!(
        (u.heads, u.num_res_blocks, u.in_channels),
        (HeadSpec::Dim(8), 2, 3)
    );
}

#[test]
fn unet2d_mirrored_attention_is_required() {
    let e = refused2d(json!({"up_block_types": ["UpBlock2D", "UpBlock2D"]}));
    assert_eq!(field_of(&e), "(inconsistent)", "{e}");
    let e = refused2d(json!({"down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"]}));
    assert_eq!(field_of(&e), "down_block_types", "{e}");
}

#[test]
fn unet2d_resnet_resampling_is_resblock_updown() {
    let u = unet2d(json!({
        "down_block_types": ["ResnetDownsampleBlock2D", "AttnDownBlock2D"],
        "downsample_type": "resnet", "upsample_type": "resnet"
    }));
    assert!(u.resblock_updown);
    let m = unet2d_key_map(&cfg2d(json!({
        "down_block_types": ["ResnetDownsampleBlock2D", "AttnDownBlock2D"],
        "downsample_type": "resnet", "upsample_type": "resnet"
    })))
    .expect("map");
    // level 0's downsampler is input block 2 (a ResBlock), level 1's upsampler output block 1 slot 2
    assert_eq!(
        shape(&m, "down_blocks.0.downsamplers.0.conv1.weight").1,
        "input_blocks.2.0.in_layers.2.weight"
    );
    assert_eq!(
        shape(&m, "up_blocks.0.upsamplers.0.time_emb_proj.weight").1,
        "output_blocks.1.2.emb_layers.1.weight"
    );
    // the final level's AttnDownBlock2D has no downsampler, so `downsample_type` alone decides nothing there;
    // a conv-resampling first level with resnet upsampling is mixed and refused
    let e = refused2d(json!({"upsample_type": "resnet"}));
    assert_eq!(field_of(&e), "down_block_types", "{e}");
    let e = refused2d(json!({"downsample_type": "fir"}));
    assert_eq!(field_of(&e), "downsample_type", "{e}");
}

#[test]
fn unet2d_scale_shift_doubles_the_time_projection() {
    let patch = json!({"resnet_time_scale_shift": "scale_shift", "attn_norm_num_groups": 32});
    assert!(unet2d(patch.clone()).use_scale_shift_norm);
    let m = unet2d_key_map(&cfg2d(patch)).expect("map");
    let (d, c, _) = shape(&m, "down_blocks.1.resnets.0.time_emb_proj.weight");
    assert_eq!(
        (d, c.as_str()),
        (vec![128, 128], "input_blocks.3.0.emb_layers.1.weight")
    );
    // without attn_norm_num_groups diffusers' mid-block attention would have no GroupNorm
    let e = refused2d(json!({"resnet_time_scale_shift": "scale_shift"}));
    assert_eq!(field_of(&e), "attn_norm_num_groups", "{e}");
    let e = refused2d(json!({"attn_norm_num_groups": 16}));
    assert_eq!(field_of(&e), "attn_norm_num_groups", "{e}");
    let e = refused2d(json!({"resnet_time_scale_shift": "spatial"}));
    assert_eq!(field_of(&e), "resnet_time_scale_shift", "{e}");
}

#[test]
fn unet2d_middle_block_must_have_attention() {
    assert_eq!(
        field_of(&refused2d(json!({"add_attention": false}))),
        "mid_block_type"
    );
    assert_eq!(
        field_of(&refused2d(json!({"mid_block_type": null}))),
        "mid_block_type"
    );
}

#[test]
fn unet2d_class_embedding_is_label_emb() {
    let patch = json!({"num_class_embeds": 10});
    assert_eq!(unet2d(patch.clone()).num_classes, Some(10));
    let m = unet2d_key_map(&cfg2d(patch)).expect("map");
    assert_eq!(
        shape(&m, "class_embedding.weight"),
        (vec![10, 128], "label_emb.weight".into(), vec![10, 128])
    );
    for (field, value) in [
        ("class_embed_type", json!("timestep")),
        ("time_embedding_type", json!("fourier")),
        ("flip_sin_to_cos", json!(false)),
        ("center_input_sample", json!(true)),
    ] {
        let e = refused2d(json!({ field: value }));
        assert_eq!(field_of(&e), field, "{e}");
    }
}

#[test]
fn unet2d_attention_names_and_fused_qkv() {
    let m = unet2d_key_map(&cfg2d(json!({}))).expect("map");
    assert_eq!(
        shape(&m, "down_blocks.1.attentions.0.group_norm.weight").1,
        "input_blocks.3.1.norm.weight"
    );
    assert_eq!(
        shape(&m, "mid_block.attentions.0.to_out.0.weight"),
        (
            vec![64, 64],
            "middle_block.1.proj_out.weight".into(),
            vec![64, 64, 1]
        )
    );
    let e = m.entry("up_blocks.0.attentions.1.to_k.bias").expect("to_k");
    assert_eq!(e.canonical, "output_blocks.1.1.qkv.bias");
    assert_eq!(
        e.conversion,
        Conversion::HeadBlock {
            index: 1,
            count: 3,
            heads: 8
        }
    );
}

/// QKVAttentionLegacy orders the fused rows head, then q/k/v, then row: with 2 heads of width 2 on 4 channels,
/// q is rows [0, 1, 6, 7], k rows [2, 3, 8, 9], v rows [4, 5, 10, 11].
#[test]
fn legacy_qkv_rows_are_head_interleaved() -> Result<(), ImportError> {
    let u = UnetConfig {
        in_channels: 1,
        out_channels: 1,
        model_channels: 4,
        channel_mult: vec![1],
        num_res_blocks: 1,
        attention_levels: vec![],
        heads: HeadSpec::Dim(2),
        num_groups: 4,
        ..UnetConfig::ldm_vq4_uncond()
    };
    let m = ldm_models::import::unet2d_key_map_for(&u)?;
    let dev = Device::Cpu;
    let synthetic = |shape: &[usize], start: f32| -> Result<Tensor, ImportError> {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|i| start + i as f32).collect();
        Ok(Tensor::from_vec(v, shape, &dev)?)
    };
    let canonical: Vec<(String, Tensor)> = m
        .canonical_manifest()
        .into_iter()
        .map(|(k, s)| {
            // qkv.bias holds its row numbers; everything else arbitrary
            let t = synthetic(&s, 0.0)?;
            Ok((k, t))
        })
        .collect::<Result<_, ImportError>>()?;
    let d = m.to_diffusers(canonical.clone())?;
    let get = |k: &str| -> Vec<f32> {
        let t = &d.iter().find(|(n, _)| n == k).expect("key").1;
        t.to_dtype(DType::F32)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1())
            .expect("values")
    };
    assert_eq!(get("mid_block.attentions.0.to_q.bias"), [0., 1., 6., 7.]);
    assert_eq!(get("mid_block.attentions.0.to_k.bias"), [2., 3., 8., 9.]);
    assert_eq!(get("mid_block.attentions.0.to_v.bias"), [4., 5., 10., 11.]);
    // weights [12, 4, 1]: row r holds 4r .. 4r+3; to_v row 2 is canonical row 10
    assert_eq!(
        &get("mid_block.attentions.0.to_v.weight")[8..12],
        [40., 41., 42., 43.]
    );
    // and back, exactly
    let back = m.to_canonical(d)?;
    for ((k, a), (k2, b)) in back.iter().zip(&canonical) {
        assert_eq!(k, k2);
        let diff = (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        assert_eq!(diff, 0.0, "{k}");
    }
    // the new attention order splits q, k, v first: one head group
    let new_order = UnetConfig {
        use_new_attention_order: true,
        ..u
    };
    let m = ldm_models::import::unet2d_key_map_for(&new_order)?;
    let e = m.entry("mid_block.attentions.0.to_q.weight").expect("to_q");
    assert_eq!(
        e.conversion,
        Conversion::HeadBlock {
            index: 0,
            count: 3,
            heads: 1
        }
    );
    Ok(())
}

/// An SD1-like tiny UNet2DConditionModel; `patch` overrides entries.
fn cond(patch: Value) -> DiffusersUnetConfig {
    let mut v = json!({
        "in_channels": 7, "out_channels": 4, "block_out_channels": [32, 64], "layers_per_block": 1,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "attention_head_dim": 2, "cross_attention_dim": 16, "norm_num_groups": 32
    });
    for (k, x) in patch.as_object().expect("patch object") {
        v[k] = x.clone();
    }
    DiffusersUnetConfig::from_json(&v.to_string()).expect("config json")
}

#[test]
fn only_cross_attention_makes_attn1_read_the_context() {
    let c = cond(json!({"only_cross_attention": [true, false]}));
    let a = c.arch().expect("arch");
    assert_eq!(a.disable_self_attentions, vec![true, false]);
    assert!(
        !a.disable_middle_self_attn,
        "a per-level list leaves the middle block alone"
    );
    let m = unet_key_map(&c).expect("map");
    // level 0 (down block 0, up block 1): attn1 keys/values come from the 16-wide context
    assert_eq!(
        shape(
            &m,
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k.weight"
        )
        .0,
        vec![32, 16]
    );
    assert_eq!(
        shape(
            &m,
            "up_blocks.1.attentions.1.transformer_blocks.0.attn1.to_v.weight"
        )
        .0,
        vec![32, 16]
    );
    assert_eq!(
        shape(
            &m,
            "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k.weight"
        )
        .0,
        vec![64, 64]
    );
    assert_eq!(
        shape(
            &m,
            "mid_block.attentions.0.transformer_blocks.0.attn1.to_k.weight"
        )
        .0,
        vec![64, 64]
    );
    let u = UnetConfig::try_from(&a).expect("config");
    assert_eq!(u.disable_self_attentions, Some(vec![true, false]));
    assert!(u.self_attention_disabled(Some(0)) && !u.self_attention_disabled(Some(1)));
}

#[test]
fn a_single_only_cross_attention_flag_covers_the_middle_block() {
    let a = cond(json!({"only_cross_attention": true}))
        .arch()
        .expect("arch");
    assert_eq!(
        (
            a.disable_self_attentions.clone(),
            a.disable_middle_self_attn
        ),
        (vec![true, true], true)
    );
    let a = cond(json!({"only_cross_attention": true, "mid_block_only_cross_attention": false}))
        .arch()
        .expect("arch");
    assert!(!a.disable_middle_self_attn);
    let m = unet_key_map(&cond(json!({"only_cross_attention": true}))).expect("map");
    assert_eq!(
        shape(
            &m,
            "mid_block.attentions.0.transformer_blocks.0.attn1.to_k.weight"
        )
        .0,
        vec![64, 16]
    );
}

#[test]
fn num_class_embeds_becomes_num_classes() {
    let a = cond(json!({"num_class_embeds": 1000}))
        .arch()
        .expect("arch");
    let u = UnetConfig::try_from(&a).expect("config");
    assert_eq!(u.num_classes, Some(1000));
    assert_eq!(u.context_dim, Some(16));
    assert_eq!(
        u.disable_self_attentions, None,
        "no level disables self-attention"
    );
}

#[test]
fn per_level_res_blocks_do_not_make_a_unet_config() {
    let a = cond(json!({"layers_per_block": [1, 2]}))
        .arch()
        .expect("arch");
    let e = UnetConfig::try_from(&a).expect_err("per-level");
    assert!(e.to_string().contains("num_res_blocks"), "{e}");
}

#[test]
fn unet_config_validation_names_the_new_fields() {
    let bad = |u: UnetConfig| u.validate().expect_err("invalid").to_string();
    let base = UnetConfig::sd_x4_upscaler();
    assert!(bad(UnetConfig {
        disable_self_attentions: Some(vec![true]),
        ..base.clone()
    })
    .contains("disable_self_attentions"));
    assert!(bad(UnetConfig {
        num_attention_blocks: Some(vec![3, 3, 3, 3]),
        ..base.clone()
    })
    .contains("num_attention_blocks"));
    assert!(bad(UnetConfig {
        context_dim: None,
        ..base.clone()
    })
    .contains("disable_self_attentions"));
    assert!(bad(UnetConfig {
        num_classes: Some(0),
        ..base
    })
    .contains("num_classes"));
}
