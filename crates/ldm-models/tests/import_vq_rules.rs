//! One test per naming rule of the diffusers `VQModel` key map (`import::diffusers_vq`), on small configs written
//! here, plus the config translation and the properties every map must have (injective, exact round trip).
use std::collections::HashSet;

use candle_core::{DType, Device, Tensor};
use ldm_models::autoencoder::{AttnType, VqModelConfig};
use ldm_models::import::{vq_key_map, Conversion, DiffusersVqConfig, ImportError, KeyMap};
use serde_json::{json, Value};

/// A 3-level VQModel with attention in the coarsest level; `patch` overrides entries.
fn cfg(patch: Value) -> DiffusersVqConfig {
    let mut v = json!({
        "block_out_channels": [32, 64, 64], "layers_per_block": 1, "latent_channels": 3, "num_vq_embeddings": 16,
        "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "AttnDownEncoderBlock2D"],
        "up_block_types": ["AttnUpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"]
    });
    for (k, x) in patch.as_object().expect("patch object") {
        v[k] = x.clone();
    }
    DiffusersVqConfig::from_json(&v.to_string()).expect("config json")
}

fn map(patch: Value) -> KeyMap {
    vq_key_map(&cfg(patch)).expect("vq map")
}

fn no_attention() -> Value {
    json!({"down_block_types": vec!["DownEncoderBlock2D"; 3], "up_block_types": vec!["UpDecoderBlock2D"; 3],
           "mid_block_add_attention": false})
}

fn key<'a>(m: &'a KeyMap, d: &str) -> &'a str {
    m.canonical_key(d)
        .unwrap_or_else(|| panic!("`{d}` is not mapped"))
}

fn shapes(m: &KeyMap, d: &str) -> (Vec<usize>, Vec<usize>, Conversion) {
    let e = m
        .entries()
        .iter()
        .find(|e| e.diffusers == d)
        .unwrap_or_else(|| panic!("`{d}` is not mapped"));
    (
        e.diffusers_shape.clone(),
        e.canonical_shape.clone(),
        e.conversion,
    )
}

#[test]
fn quantizer_and_its_convs_keep_their_names() {
    let m = map(json!({"latent_channels": 4, "vq_embed_dim": 3}));
    assert_eq!(
        key(&m, "quantize.embedding.weight"),
        "quantize.embedding.weight"
    );
    assert_eq!(
        shapes(&m, "quantize.embedding.weight"),
        (vec![16, 3], vec![16, 3], Conversion::Identity)
    );
    // quant_conv: z_channels (latent_channels) -> embed_dim (vq_embed_dim); post_quant_conv back
    assert_eq!(shapes(&m, "quant_conv.weight").0, vec![3, 4, 1, 1]);
    assert_eq!(shapes(&m, "post_quant_conv.weight").0, vec![4, 3, 1, 1]);
    // double_z is false: the encoder emits z_channels, not twice as many
    assert_eq!(shapes(&m, "encoder.conv_out.weight").0, vec![4, 64, 3, 3]);
    assert_eq!(shapes(&m, "decoder.conv_in.weight").0, vec![64, 4, 3, 3]);
}

#[test]
fn vq_embed_dim_defaults_to_latent_channels() {
    let a = cfg(json!({"vq_embed_dim": null})).arch().expect("arch");
    assert_eq!((a.z_channels, a.embed_dim, a.n_embed), (3, 3, 16));
}

#[test]
fn encoder_level_resnets_downsamplers_and_attention() {
    let m = map(json!({"layers_per_block": 2}));
    assert_eq!(
        key(&m, "encoder.down_blocks.1.resnets.0.conv_shortcut.weight"),
        "encoder.down.1.block.0.nin_shortcut.weight"
    );
    assert_eq!(
        key(&m, "encoder.down_blocks.2.resnets.1.norm1.bias"),
        "encoder.down.2.block.1.norm1.bias"
    );
    assert_eq!(
        key(&m, "encoder.down_blocks.0.downsamplers.0.conv.weight"),
        "encoder.down.0.downsample.conv.weight"
    );
    assert!(m
        .canonical_key("encoder.down_blocks.2.downsamplers.0.conv.weight")
        .is_none());
    for j in 0..2 {
        assert_eq!(
            key(
                &m,
                &format!("encoder.down_blocks.2.attentions.{j}.group_norm.weight")
            ),
            format!("encoder.down.2.attn.{j}.norm.weight")
        );
        assert_eq!(
            shapes(
                &m,
                &format!("encoder.down_blocks.2.attentions.{j}.to_out.0.weight")
            ),
            (vec![64, 64], vec![64, 64, 1, 1], Conversion::Reshape)
        );
    }
    assert!(m
        .canonical_key("encoder.down_blocks.1.attentions.0.to_q.weight")
        .is_none());
}

#[test]
fn decoder_levels_are_reversed_and_attention_follows_the_level() {
    let m = map(json!({}));
    // up_blocks.0 is level 2 (the coarsest, with attention): num_res_blocks + 1 = 2 attention blocks
    for j in 0..2 {
        assert_eq!(
            key(&m, &format!("decoder.up_blocks.0.attentions.{j}.to_k.bias")),
            format!("decoder.up.2.attn.{j}.k.bias")
        );
        assert_eq!(
            key(&m, &format!("decoder.up_blocks.2.resnets.{j}.conv2.weight")),
            format!("decoder.up.0.block.{j}.conv2.weight")
        );
    }
    assert_eq!(
        key(&m, "decoder.up_blocks.0.upsamplers.0.conv.weight"),
        "decoder.up.2.upsample.conv.weight"
    );
    assert!(m
        .canonical_key("decoder.up_blocks.2.upsamplers.0.conv.weight")
        .is_none());
    assert_eq!(
        shapes(&m, "decoder.up_blocks.2.resnets.0.conv_shortcut.weight").0,
        vec![32, 64, 1, 1]
    );
    assert!(m
        .canonical_key("decoder.up_blocks.1.attentions.0.to_q.weight")
        .is_none());
}

#[test]
fn mid_attention_is_optional_and_legacy_names_load() {
    let m = map(json!({}));
    for (d, c) in [
        ("group_norm", "norm"),
        ("to_q", "q"),
        ("to_k", "k"),
        ("to_v", "v"),
        ("to_out.0", "proj_out"),
    ] {
        assert_eq!(
            key(&m, &format!("encoder.mid_block.attentions.0.{d}.weight")),
            format!("encoder.mid.attn_1.{c}.weight")
        );
    }
    assert_eq!(
        key(&m, "decoder.mid_block.attentions.0.proj_attn.weight"),
        "decoder.mid.attn_1.proj_out.weight"
    );
    assert_eq!(
        key(&m, "decoder.up_blocks.0.attentions.1.query.bias"),
        "decoder.up.2.attn.1.q.bias"
    );
    assert_eq!(
        key(&m, "encoder.mid_block.resnets.1.conv1.weight"),
        "encoder.mid.block_2.conv1.weight"
    );

    let none = map(no_attention());
    assert!(none.entries().iter().all(|e| !e.canonical.contains("attn")));
    assert_eq!(
        key(&none, "decoder.mid_block.resnets.0.norm1.weight"),
        "decoder.mid.block_1.norm1.weight"
    );
    assert_eq!(none.len() + 2 * 10 + 3 * 10, map(json!({})).len()); // 2 mid + 3 level attention blocks fewer
}

#[test]
fn config_translates_to_the_original_vq_model() {
    let a = cfg(json!({"scaling_factor": 1.0})).arch().expect("arch");
    assert_eq!(a.ch, 32);
    assert_eq!(a.ch_mult, vec![1, 2, 2]);
    assert_eq!(a.attention_levels, vec![2]);
    assert!(a.mid_attention);
    assert_eq!(a.scaling_factor, 1.0);
    let c = VqModelConfig::from(&a);
    assert_eq!(c.downsample_factor(), 4);
    assert_eq!(c.ddconfig.attn_type, AttnType::Vanilla);
    assert!(!c.ddconfig.double_z);
    assert_eq!(
        c.ddconfig.attn_resolutions,
        vec![c.ddconfig.resolution >> 2]
    );

    let none = VqModelConfig::from(&cfg(no_attention()).arch().expect("arch"));
    assert_eq!(none.ddconfig.attn_type, AttnType::None);
    assert!(none.ddconfig.attn_resolutions.is_empty());
    let unknown = cfg(json!({"some_new_flag": 3})).arch().expect("arch");
    assert_eq!(unknown.ignored, vec!["some_new_flag".to_string()]);
}

#[test]
fn configs_the_original_cannot_express_are_refused() {
    let refused = |patch: Value| cfg(patch).arch().expect_err("must be refused");
    for patch in [
        json!({"norm_type": "spatial"}),
        json!({"lookup_from_codebook": true}),
        json!({"act_fn": "gelu"}),
        json!({"mid_block_add_attention": false}), // but level 2 has attention
        json!({"down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownBlock2D"]}),
    ] {
        let err = refused(patch.clone());
        assert!(
            matches!(err, ImportError::Unsupported { .. }),
            "{patch}: {err}"
        );
    }
    for patch in [
        // attention in the decoder at another level than in the encoder
        json!({"up_block_types": ["UpDecoderBlock2D", "AttnUpDecoderBlock2D", "UpDecoderBlock2D"]}),
        json!({"block_out_channels": [32, 48, 64]}),
        json!({"up_block_types": ["UpDecoderBlock2D"]}),
        json!({"num_vq_embeddings": 0}),
    ] {
        let err = refused(patch.clone());
        assert!(
            matches!(err, ImportError::Inconsistent { .. }),
            "{patch}: {err}"
        );
    }
}

fn synthetic(m: &KeyMap) -> candle_core::Result<Vec<(String, Tensor)>> {
    let mut start = 0f32;
    m.diffusers_manifest()
        .into_iter()
        .map(|(k, shape)| {
            let n: usize = shape.iter().product();
            let t = Tensor::arange(start, start + n as f32, &Device::Cpu)?.reshape(shape)?;
            start += n as f32;
            Ok((k, t))
        })
        .collect()
}

#[test]
fn maps_are_injective_and_round_trip_exactly() -> Result<(), ImportError> {
    for m in [
        map(json!({})),
        map(no_attention()),
        map(json!({"layers_per_block": 2, "latent_channels": 4, "vq_embed_dim": 8})),
    ] {
        let canon: HashSet<&str> = m.entries().iter().map(|e| e.canonical.as_str()).collect();
        assert_eq!(
            canon.len(),
            m.len(),
            "two diffusers keys share a canonical key"
        );
        let input = synthetic(&m)?;
        let back = m.to_diffusers(m.to_canonical(input.clone())?)?;
        assert_eq!(back.len(), input.len());
        for ((k1, a), (k2, b)) in input.iter().zip(&back) {
            assert_eq!(k1, k2);
            let d = (a - b.to_dtype(DType::F32)?)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            assert_eq!(d, 0.0, "{k1}");
        }
    }
    Ok(())
}

#[test]
fn missing_and_stray_keys_are_reported_together() -> Result<(), ImportError> {
    let m = map(json!({}));
    let mut tensors = synthetic(&m)?;
    tensors.retain(|(k, _)| k != "quantize.embedding.weight");
    tensors.push((
        "quantize.used".to_string(),
        Tensor::zeros(4, DType::F32, &Device::Cpu)?,
    ));
    let Err(ImportError::Keys(r)) = m.to_canonical(tensors) else {
        panic!("must fail with a key report")
    };
    assert_eq!(r.missing.len(), 1);
    assert_eq!(r.missing[0].key, "quantize.embedding.weight");
    assert_eq!(r.missing[0].expected, vec![16, 3]);
    assert_eq!(r.unused, vec!["quantize.used".to_string()]);
    Ok(())
}
