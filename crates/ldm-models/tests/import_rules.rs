//! One test per naming rule of the diffusers key maps, on small configs written here, plus properties that must
//! hold for any config: injectivity and an exact round trip of synthetic tensors.
use std::collections::HashSet;

use candle_core::{DType, Device, Tensor};
use ldm_models::import::{
    clip_key_map, open_clip_key_map, unet_key_map, vae_key_map, Conversion, DiffusersClipConfig,
    DiffusersUnetConfig, DiffusersVaeConfig, Heads, ImportError, KeyMap,
};
use serde_json::{json, Value};

/// SD1-like tiny UNet; `patch` overrides entries.
fn unet_cfg(patch: Value) -> DiffusersUnetConfig {
    let mut v = json!({
        "in_channels": 4, "out_channels": 4, "block_out_channels": [32, 64], "layers_per_block": 1,
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "attention_head_dim": 2, "cross_attention_dim": 16, "norm_num_groups": 32
    });
    for (k, x) in patch.as_object().expect("patch object") {
        v[k] = x.clone();
    }
    DiffusersUnetConfig::from_json(&v.to_string()).expect("config json")
}

fn unet(patch: Value) -> KeyMap {
    unet_key_map(&unet_cfg(patch)).expect("unet map")
}

fn vae(patch: Value) -> KeyMap {
    let mut v =
        json!({"block_out_channels": [32, 64], "layers_per_block": 1, "latent_channels": 4});
    for (k, x) in patch.as_object().expect("patch object") {
        v[k] = x.clone();
    }
    let n = v["block_out_channels"].as_array().map_or(0, Vec::len);
    v["down_block_types"] = json!(vec!["DownEncoderBlock2D"; n]);
    v["up_block_types"] = json!(vec!["UpDecoderBlock2D"; n]);
    vae_key_map(&DiffusersVaeConfig::from_json(&v.to_string()).expect("config json"))
        .expect("vae map")
}

fn clip_cfg() -> DiffusersClipConfig {
    DiffusersClipConfig::from_json(
        r#"{"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "vocab_size": 10}"#,
    )
    .expect("config json")
}

fn key<'a>(m: &'a KeyMap, d: &str) -> &'a str {
    m.canonical_key(d)
        .unwrap_or_else(|| panic!("`{d}` is not mapped"))
}

fn shape_of(m: &KeyMap, d: &str) -> (Vec<usize>, Vec<usize>) {
    let e = m
        .entries()
        .iter()
        .find(|e| e.diffusers == d)
        .unwrap_or_else(|| panic!("`{d}` is not mapped"));
    (e.diffusers_shape.clone(), e.canonical_shape.clone())
}

// ---------------------------------------------------------------- UNet rules

#[test]
fn unet_time_embedding_conv_in_and_out_rules() {
    let m = unet(json!({}));
    assert_eq!(
        key(&m, "time_embedding.linear_1.weight"),
        "time_embed.0.weight"
    );
    assert_eq!(key(&m, "time_embedding.linear_2.bias"), "time_embed.2.bias");
    assert_eq!(
        shape_of(&m, "time_embedding.linear_1.weight").0,
        vec![128, 32]
    );
    assert_eq!(key(&m, "conv_in.weight"), "input_blocks.0.0.weight");
    assert_eq!(key(&m, "conv_norm_out.weight"), "out.0.weight");
    assert_eq!(key(&m, "conv_out.bias"), "out.2.bias");
}

#[test]
fn unet_resnet_parameter_renames() {
    let m = unet(json!({}));
    for (d, c) in [
        ("norm1.weight", "in_layers.0.weight"),
        ("conv1.weight", "in_layers.2.weight"),
        ("time_emb_proj.weight", "emb_layers.1.weight"),
        ("norm2.bias", "out_layers.0.bias"),
        ("conv2.weight", "out_layers.3.weight"),
    ] {
        assert_eq!(
            key(&m, &format!("down_blocks.0.resnets.0.{d}")),
            format!("input_blocks.1.0.{c}")
        );
    }
    // 32 -> 64 channels at level 1 needs a 1x1 shortcut; level 0 (32 -> 32) has none.
    assert_eq!(
        key(&m, "down_blocks.1.resnets.0.conv_shortcut.weight"),
        "input_blocks.3.0.skip_connection.weight"
    );
    assert_eq!(
        shape_of(&m, "down_blocks.1.resnets.0.conv_shortcut.weight").0,
        vec![64, 32, 1, 1]
    );
    assert!(m
        .canonical_key("down_blocks.0.resnets.0.conv_shortcut.weight")
        .is_none());
}

#[test]
fn unet_down_path_indices_follow_the_config() {
    // 3 levels, 2 res blocks: level i owns input blocks 1 + 3i, 2 + 3i, and 3 + 3i for its downsampler.
    let m = unet(json!({
        "block_out_channels": [32, 64, 64], "layers_per_block": 2,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]
    }));
    for i in 0..3 {
        for j in 0..2 {
            let b = 1 + i * 3 + j;
            assert_eq!(
                key(&m, &format!("down_blocks.{i}.resnets.{j}.conv1.weight")),
                format!("input_blocks.{b}.0.in_layers.2.weight")
            );
            if i == 1 {
                assert_eq!(
                    key(&m, &format!("down_blocks.{i}.attentions.{j}.norm.weight")),
                    format!("input_blocks.{b}.1.norm.weight")
                );
            }
        }
        let down = format!("down_blocks.{i}.downsamplers.0.conv.weight");
        if i < 2 {
            assert_eq!(
                key(&m, &down),
                format!("input_blocks.{}.0.op.weight", 3 + 3 * i)
            );
        } else {
            assert!(
                m.canonical_key(&down).is_none(),
                "no downsampler at the last level"
            );
        }
    }
    assert!(m
        .canonical_key("down_blocks.0.attentions.0.norm.weight")
        .is_none());
    assert!(!m
        .entries()
        .iter()
        .any(|e| e.canonical.starts_with("input_blocks.9.")));
}

#[test]
fn unet_up_path_indices_and_upsampler_slot() {
    let m = unet(json!({
        "block_out_channels": [32, 64, 64], "layers_per_block": 2,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]
    }));
    for u in 0..3 {
        for j in 0..3 {
            let b = u * 3 + j;
            assert_eq!(
                key(&m, &format!("up_blocks.{u}.resnets.{j}.norm2.weight")),
                format!("output_blocks.{b}.0.out_layers.0.weight")
            );
        }
    }
    assert_eq!(
        key(&m, "up_blocks.1.attentions.2.proj_out.weight"),
        "output_blocks.5.1.proj_out.weight"
    );
    // upsampler after the last res block of each level but the top one: slot 1 without attention, 2 with.
    assert_eq!(
        key(&m, "up_blocks.0.upsamplers.0.conv.weight"),
        "output_blocks.2.1.conv.weight"
    );
    assert_eq!(
        key(&m, "up_blocks.1.upsamplers.0.conv.bias"),
        "output_blocks.5.2.conv.bias"
    );
    assert!(m
        .canonical_key("up_blocks.2.upsamplers.0.conv.weight")
        .is_none());
    // skip concatenation widths: first up resnet of level 2 sees 64 (mid) + 64 (input block 8).
    assert_eq!(
        shape_of(&m, "up_blocks.0.resnets.0.conv1.weight").0,
        vec![64, 128, 3, 3]
    );
    // last up resnet of level 0 sees 32 + 32 (conv_in's output).
    assert_eq!(
        shape_of(&m, "up_blocks.2.resnets.2.conv1.weight").0,
        vec![32, 64, 3, 3]
    );
}

#[test]
fn unet_per_level_res_block_counts_shift_the_indices() {
    let m = unet(json!({"layers_per_block": [1, 3]}));
    assert_eq!(
        key(&m, "down_blocks.0.downsamplers.0.conv.weight"),
        "input_blocks.2.0.op.weight"
    );
    assert_eq!(
        key(&m, "down_blocks.1.resnets.2.conv1.weight"),
        "input_blocks.5.0.in_layers.2.weight"
    );
    // up path: level 1 first with 4 res blocks, then level 0 with 2.
    assert_eq!(
        key(&m, "up_blocks.0.upsamplers.0.conv.weight"),
        "output_blocks.3.1.conv.weight"
    );
    assert_eq!(
        key(&m, "up_blocks.1.resnets.1.conv1.weight"),
        "output_blocks.5.0.in_layers.2.weight"
    );
    assert_eq!(
        key(&m, "up_blocks.1.attentions.1.norm.weight"),
        "output_blocks.5.1.norm.weight"
    );
}

#[test]
fn unet_mid_block_rules() {
    let m = unet(json!({}));
    assert_eq!(
        key(&m, "mid_block.resnets.0.conv1.weight"),
        "middle_block.0.in_layers.2.weight"
    );
    assert_eq!(
        key(
            &m,
            "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight"
        ),
        "middle_block.1.transformer_blocks.0.attn2.to_k.weight"
    );
    assert_eq!(
        key(&m, "mid_block.resnets.1.conv2.bias"),
        "middle_block.2.out_layers.3.bias"
    );
}

#[test]
fn unet_transformer_internals_keep_their_names_and_shapes() {
    let m = unet(json!({"transformer_layers_per_block": 2}));
    let d = "down_blocks.0.attentions.0";
    for inner in [
        "norm.weight",
        "proj_in.weight",
        "proj_out.bias",
        "transformer_blocks.1.attn1.to_q.weight",
        "transformer_blocks.1.attn1.to_out.0.bias",
        "transformer_blocks.0.attn2.to_v.weight",
        "transformer_blocks.0.ff.net.0.proj.weight",
        "transformer_blocks.0.ff.net.2.weight",
        "transformer_blocks.0.norm3.bias",
    ] {
        assert_eq!(
            key(&m, &format!("{d}.{inner}")),
            format!("input_blocks.1.1.{inner}")
        );
    }
    assert_eq!(
        shape_of(&m, &format!("{d}.transformer_blocks.0.attn2.to_k.weight")).0,
        vec![32, 16]
    );
    assert_eq!(
        shape_of(
            &m,
            &format!("{d}.transformer_blocks.0.ff.net.0.proj.weight")
        )
        .0,
        vec![256, 32]
    );
    assert!(
        m.canonical_key(&format!("{d}.transformer_blocks.0.attn1.to_q.bias"))
            .is_none(),
        "q/k/v have no bias"
    );
    assert!(m
        .canonical_key(&format!("{d}.transformer_blocks.2.norm1.weight"))
        .is_none());
}

#[test]
fn unet_proj_in_is_a_1x1_conv_or_a_linear_on_both_sides() {
    let conv = unet(json!({}));
    let (d, c) = shape_of(&conv, "down_blocks.0.attentions.0.proj_in.weight");
    assert_eq!((d, c), (vec![32, 32, 1, 1], vec![32, 32, 1, 1]));
    let linear = unet(json!({"use_linear_projection": true}));
    let (d, c) = shape_of(&linear, "up_blocks.1.attentions.0.proj_out.weight");
    assert_eq!((d, c), (vec![32, 32], vec![32, 32]));
    assert!(
        linear
            .entries()
            .iter()
            .all(|e| e.conversion == Conversion::Identity),
        "UNet values never change"
    );
}

#[test]
fn unet_class_embedding_becomes_label_emb() {
    let m = unet(json!({"num_class_embeds": 1000}));
    assert_eq!(key(&m, "class_embedding.weight"), "label_emb.weight");
    assert_eq!(shape_of(&m, "class_embedding.weight").0, vec![1000, 128]);
}

#[test]
fn unet_heads_are_counts_or_widths() {
    assert_eq!(
        unet_cfg(json!({})).arch().expect("arch").heads,
        Heads::Count(2)
    );
    // SD2 style: one count per level, constant width 8.
    let a = unet_cfg(json!({"attention_head_dim": [4, 8]}))
        .arch()
        .expect("arch");
    assert_eq!(a.heads, Heads::Dim(8));
    assert_eq!(a.heads.count(64), 8);
    // a constant count written as a list stays a count when the widths differ.
    assert_eq!(
        unet_cfg(json!({"attention_head_dim": [2, 2]}))
            .arch()
            .expect("arch")
            .heads,
        Heads::Count(2)
    );
    let bad =
        unet_cfg(json!({"attention_head_dim": [2, 4], "block_out_channels": [32, 96]})).arch();
    assert!(
        matches!(
            bad,
            Err(ImportError::Unsupported {
                field: "attention_head_dim",
                ..
            })
        ),
        "{bad:?}"
    );
    let bad = unet_cfg(json!({"attention_head_dim": 3})).arch();
    assert!(
        matches!(bad, Err(ImportError::Inconsistent { .. })),
        "{bad:?}"
    );
}

#[test]
fn unet_arch_translates_the_sd1_tiny_layout() {
    let a = unet_cfg(json!({"upcast_attention": true, "sample_size": 16, "_class_name": "UNet2DConditionModel", "new_thing": 1}))
        .arch()
        .expect("arch");
    assert_eq!(
        (
            a.model_channels,
            a.channel_mult.clone(),
            a.res_blocks.clone()
        ),
        (32, vec![1, 2], vec![1, 1])
    );
    assert_eq!(
        (
            a.attention_levels.clone(),
            a.transformer_depth.clone(),
            a.context_dim
        ),
        (vec![0], vec![1, 1], 16)
    );
    assert!(a.upcast_attention && !a.linear_projection);
    assert_eq!(
        a.ignored,
        vec!["new_thing".to_string()],
        "unknown entries are reported, known harmless ones not"
    );
}

#[test]
fn unet_configs_the_original_cannot_express_are_refused() {
    let refused = |patch: Value| unet_cfg(patch).arch().expect_err("must be refused");
    assert!(matches!(
        refused(json!({"flip_sin_to_cos": false})),
        ImportError::Unsupported {
            field: "flip_sin_to_cos",
            ..
        }
    ));
    assert!(matches!(
        refused(json!({"class_embed_type": "projection"})),
        ImportError::Unsupported {
            field: "class_embed_type",
            ..
        }
    ));
    assert!(matches!(
        refused(json!({"num_attention_heads": 4})),
        ImportError::Unsupported {
            field: "num_attention_heads",
            ..
        }
    ));
    assert!(matches!(
        refused(json!({"mid_block_type": null})),
        ImportError::Unsupported {
            field: "mid_block_type",
            ..
        }
    ));
    assert!(matches!(
        refused(json!({"down_block_types": ["SimpleCrossAttnDownBlock2D", "DownBlock2D"]})),
        ImportError::Unsupported { .. }
    ));
    // attention on the down path but not on its mirror
    assert!(matches!(
        refused(json!({"up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]})),
        ImportError::Inconsistent { .. }
    ));
    assert!(matches!(
        refused(json!({"block_out_channels": [32, 48]})),
        ImportError::Inconsistent { .. }
    ));
    assert!(matches!(
        refused(json!({"layers_per_block": [1, 1, 1]})),
        ImportError::Inconsistent { .. }
    ));
    let err = refused(json!({"norm_eps": 1e-6}));
    assert!(err.to_string().contains("norm_eps"), "{err}");
}

// ---------------------------------------------------------------- VAE rules

#[test]
fn vae_encoder_rules() {
    let m = vae(json!({"layers_per_block": 2}));
    assert_eq!(key(&m, "encoder.conv_in.weight"), "encoder.conv_in.weight");
    assert_eq!(
        key(&m, "encoder.down_blocks.1.resnets.1.norm2.bias"),
        "encoder.down.1.block.1.norm2.bias"
    );
    assert_eq!(
        key(&m, "encoder.down_blocks.1.resnets.0.conv_shortcut.weight"),
        "encoder.down.1.block.0.nin_shortcut.weight"
    );
    assert_eq!(
        key(&m, "encoder.down_blocks.0.downsamplers.0.conv.weight"),
        "encoder.down.0.downsample.conv.weight"
    );
    assert!(m
        .canonical_key("encoder.down_blocks.1.downsamplers.0.conv.weight")
        .is_none());
    assert_eq!(
        key(&m, "encoder.mid_block.resnets.0.conv1.weight"),
        "encoder.mid.block_1.conv1.weight"
    );
    assert_eq!(
        key(&m, "encoder.mid_block.resnets.1.conv2.bias"),
        "encoder.mid.block_2.conv2.bias"
    );
    assert_eq!(
        key(&m, "encoder.conv_norm_out.weight"),
        "encoder.norm_out.weight"
    );
    assert_eq!(shape_of(&m, "encoder.conv_out.weight").0, vec![8, 64, 3, 3]);
    assert_eq!(key(&m, "quant_conv.weight"), "quant_conv.weight");
    assert_eq!(shape_of(&m, "post_quant_conv.weight").0, vec![4, 4, 1, 1]);
}

#[test]
fn vae_decoder_levels_are_reversed() {
    let m = vae(json!({"block_out_channels": [32, 64, 128]}));
    for u in 0..3 {
        for j in 0..2 {
            assert_eq!(
                key(
                    &m,
                    &format!("decoder.up_blocks.{u}.resnets.{j}.conv1.weight")
                ),
                format!("decoder.up.{}.block.{j}.conv1.weight", 2 - u)
            );
        }
    }
    assert_eq!(
        key(&m, "decoder.up_blocks.0.upsamplers.0.conv.weight"),
        "decoder.up.2.upsample.conv.weight"
    );
    assert_eq!(
        key(&m, "decoder.up_blocks.1.upsamplers.0.conv.bias"),
        "decoder.up.1.upsample.conv.bias"
    );
    assert!(m
        .canonical_key("decoder.up_blocks.2.upsamplers.0.conv.weight")
        .is_none());
    assert_eq!(
        key(&m, "decoder.up_blocks.1.resnets.0.conv_shortcut.weight"),
        "decoder.up.1.block.0.nin_shortcut.weight"
    );
    assert_eq!(
        shape_of(&m, "decoder.up_blocks.1.resnets.0.conv_shortcut.weight").0,
        vec![64, 128, 1, 1]
    );
    assert_eq!(
        key(&m, "decoder.conv_norm_out.bias"),
        "decoder.norm_out.bias"
    );
}

#[test]
fn vae_mid_attention_linear_becomes_1x1_conv_and_legacy_names_load() {
    let m = vae(json!({}));
    for (d, c) in [
        ("group_norm", "norm"),
        ("to_q", "q"),
        ("to_k", "k"),
        ("to_v", "v"),
        ("to_out.0", "proj_out"),
    ] {
        assert_eq!(
            key(&m, &format!("decoder.mid_block.attentions.0.{d}.bias")),
            format!("decoder.mid.attn_1.{c}.bias")
        );
    }
    let e = m
        .entries()
        .iter()
        .find(|e| e.diffusers == "encoder.mid_block.attentions.0.to_out.0.weight")
        .expect("entry");
    assert_eq!(
        (
            e.diffusers_shape.clone(),
            e.canonical_shape.clone(),
            e.conversion
        ),
        (vec![64, 64], vec![64, 64, 1, 1], Conversion::Reshape)
    );
    assert_eq!(
        key(&m, "encoder.mid_block.attentions.0.query.weight"),
        "encoder.mid.attn_1.q.weight"
    );
    assert_eq!(
        key(&m, "decoder.mid_block.attentions.0.proj_attn.bias"),
        "decoder.mid.attn_1.proj_out.bias"
    );
}

#[test]
fn vae_configs_the_original_cannot_express_are_refused() {
    let refused = |v: Value| {
        let mut base = json!({"block_out_channels": [32], "down_block_types": ["DownEncoderBlock2D"], "up_block_types": ["UpDecoderBlock2D"]});
        for (k, x) in v.as_object().expect("object") {
            base[k] = x.clone();
        }
        DiffusersVaeConfig::from_json(&base.to_string())
            .expect("json")
            .arch()
            .expect_err("must be refused")
    };
    assert!(matches!(
        refused(json!({"mid_block_add_attention": false})),
        ImportError::Unsupported { .. }
    ));
    assert!(matches!(
        refused(json!({"latents_mean": [0.0, 0.0, 0.0, 0.0]})),
        ImportError::Unsupported { .. }
    ));
    assert!(matches!(
        refused(json!({"up_block_types": ["AttnUpDecoderBlock2D"]})),
        ImportError::Unsupported { .. }
    ));
    assert!(matches!(
        refused(json!({"down_block_types": []})),
        ImportError::Inconsistent { .. }
    ));
}

// ---------------------------------------------------------------- CLIP rules

#[test]
fn clip_names_are_identical_below_the_prefix_and_unprefixed_names_load() {
    let m = clip_key_map(&clip_cfg()).expect("map");
    assert_eq!(m.len(), 4 + 2 * 16);
    for e in m.entries() {
        assert_eq!(e.diffusers, e.canonical);
        assert!(e.diffusers.starts_with("text_model."));
    }
    assert_eq!(
        key(&m, "encoder.layers.1.mlp.fc2.weight"),
        "text_model.encoder.layers.1.mlp.fc2.weight"
    );
    assert!(
        m.ignores_diffusers("text_model.embeddings.position_ids")
            && m.ignores_diffusers("embeddings.position_ids")
    );
    let bad = DiffusersClipConfig::from_json(r#"{"hidden_act": "relu"}"#)
        .expect("json")
        .arch();
    assert!(matches!(
        bad,
        Err(ImportError::Unsupported {
            field: "hidden_act",
            ..
        })
    ));
}

#[test]
fn open_clip_fuses_q_k_v_rows_in_order() -> Result<(), ImportError> {
    let m = open_clip_key_map(&clip_cfg())?;
    assert_eq!(
        key(&m, "text_model.embeddings.position_embedding.weight"),
        "positional_embedding"
    );
    assert_eq!(
        key(&m, "text_model.encoder.layers.1.layer_norm2.bias"),
        "transformer.resblocks.1.ln_2.bias"
    );
    assert_eq!(
        key(&m, "text_model.encoder.layers.0.mlp.fc1.weight"),
        "transformer.resblocks.0.mlp.c_fc.weight"
    );
    assert_eq!(
        key(&m, "text_model.final_layer_norm.weight"),
        "ln_final.weight"
    );
    assert_eq!(
        m.diffusers_keys("transformer.resblocks.0.attn.in_proj_weight"),
        [
            "text_model.encoder.layers.0.self_attn.q_proj.weight",
            "text_model.encoder.layers.0.self_attn.k_proj.weight",
            "text_model.encoder.layers.0.self_attn.v_proj.weight"
        ]
    );
    assert!(
        m.ignores_canonical("transformer.resblocks.2.attn.in_proj_weight")
            && m.ignores_canonical("logit_scale")
    );

    let tensors = synthetic(&m)?;
    let q = tensors
        .iter()
        .find(|(k, _)| k == "text_model.encoder.layers.0.self_attn.k_proj.bias")
        .map(|(_, t)| t.clone());
    let out = m.to_canonical(tensors)?;
    let fused = &out
        .iter()
        .find(|(k, _)| k == "transformer.resblocks.0.attn.in_proj_bias")
        .expect("fused")
        .1;
    assert_eq!(fused.dims(), &[24]);
    let k_rows = fused.narrow(0, 8, 8)?.to_vec1::<f32>()?;
    assert_eq!(k_rows, q.expect("k bias").to_vec1::<f32>()?);
    Ok(())
}

// ---------------------------------------------------------------- properties

/// Distinct values for every expected diffusers tensor (its entry index, then counting).
fn synthetic(m: &KeyMap) -> candle_core::Result<Vec<(String, Tensor)>> {
    m.diffusers_manifest()
        .into_iter()
        .enumerate()
        .map(|(i, (k, shape))| {
            let n: usize = shape.iter().product();
            let start = (i * 1000) as f32;
            let t =
                Tensor::arange(start, start + n as f32, &Device::Cpu)?.reshape(shape.as_slice())?;
            Ok((k, t))
        })
        .collect()
}

fn all_maps() -> Vec<(&'static str, KeyMap)> {
    vec![
        ("unet sd1-like", unet(json!({}))),
        (
            "unet sd2-like",
            unet(
                json!({"attention_head_dim": [4, 8], "use_linear_projection": true, "num_class_embeds": 3}),
            ),
        ),
        (
            "unet deep",
            unet(json!({
                "block_out_channels": [32, 64, 64, 128], "layers_per_block": [2, 1, 3, 2], "transformer_layers_per_block": [1, 2, 1, 3],
                "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"]
            })),
        ),
        (
            "vae",
            vae(json!({"block_out_channels": [32, 64, 64], "layers_per_block": 2})),
        ),
        ("clip", clip_key_map(&clip_cfg()).expect("clip")),
        (
            "open clip",
            open_clip_key_map(&clip_cfg()).expect("open clip"),
        ),
    ]
}

#[test]
fn every_map_is_injective() {
    for (name, m) in all_maps() {
        let diffusers: HashSet<&str> = m.entries().iter().map(|e| e.diffusers.as_str()).collect();
        assert_eq!(
            diffusers.len(),
            m.len(),
            "{name}: a diffusers key appears twice"
        );
        let targets: HashSet<(String, Option<usize>)> = m
            .entries()
            .iter()
            .map(|e| match e.conversion {
                Conversion::RowBlock { index, .. } => (e.canonical.clone(), Some(index)),
                _ => (e.canonical.clone(), None),
            })
            .collect();
        assert_eq!(
            targets.len(),
            m.len(),
            "{name}: two diffusers keys map onto one canonical tensor"
        );
    }
}

#[test]
fn every_map_round_trips_synthetic_tensors_exactly() -> Result<(), ImportError> {
    for (name, m) in all_maps() {
        let input = synthetic(&m)?;
        let canonical = m.to_canonical(input.clone())?;
        assert_eq!(canonical.len(), m.canonical_manifest().len(), "{name}");
        for ((k, t), (mk, shape)) in canonical.iter().zip(m.canonical_manifest()) {
            assert_eq!((k, t.dims()), (&mk, shape.as_slice()), "{name}");
        }
        let back = m.to_diffusers(canonical)?;
        assert_eq!(back.len(), input.len(), "{name}");
        for ((k, t), (ik, it)) in back.iter().zip(&input) {
            assert_eq!(k, ik, "{name}");
            let diff = (t.to_dtype(DType::F32)? - it)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            assert_eq!(diff, 0.0, "{name}: {k}");
        }
    }
    Ok(())
}

#[test]
fn missing_and_stray_unet_keys_are_reported_together() -> Result<(), ImportError> {
    let m = unet(json!({}));
    let mut ts = synthetic(&m)?;
    ts.retain(|(k, _)| !k.starts_with("mid_block.resnets.1."));
    ts.push((
        "lora.up.weight".to_string(),
        Tensor::zeros(1, DType::F32, &Device::Cpu)?,
    ));
    let Err(ImportError::Keys(r)) = m.to_canonical(ts) else {
        panic!("must fail with a key report")
    };
    assert_eq!(
        r.missing.len(),
        10,
        "norm1/2, conv1/2 and time_emb_proj weights and biases"
    );
    assert_eq!(r.unused, vec!["lora.up.weight".to_string()]);
    Ok(())
}
