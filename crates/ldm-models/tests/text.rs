//! CLIP / OpenCLIP text encoder parity with diffusers + transformers on the tiny fixtures of
//! `tools/fixtures/make_sd_tiny.py` (torch 2.15, diffusers 0.42.1, transformers 5.25; references in fp32
//! from the stored fp16/bf16 weights). `text.hidden` is what the pipeline feeds the UNet: SD1 the last
//! hidden state, SD2 the penultimate block + final LayerNorm.
//! Tolerance, per element: |x − y| ≤ max(1e-4·|x + y|, 1e-5).
use std::collections::HashMap;

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;
use ldm_models::text::{Activation, TextConfig, TextLayout, TextOutput, TextTransformer};

mod common;
use common::{assert_close, load};

/// The tiny text encoders of FIXTURE_CONTRACT.md.
fn tiny(layers: usize, activation: Activation, output: TextOutput) -> TextConfig {
    TextConfig {
        vocab_size: 49408,
        hidden: 16,
        layers,
        heads: 2,
        intermediate: 32,
        max_positions: 77,
        activation,
        output,
    }
}

/// Loads `file`, infers its config (checking it equals `expected`), runs `text.ids` and compares with `text.hidden`.
fn check(
    model: &str,
    file: &str,
    prefix: &str,
    layout: TextLayout,
    expected: TextConfig,
) -> Result<()> {
    let weights = load(&format!("{model}/{file}"))?;
    let shapes: HashMap<String, Vec<usize>> = weights
        .iter()
        .map(|(k, t)| (k.clone(), t.dims().to_vec()))
        .collect();
    let inferred = TextConfig::infer(
        layout,
        |k| shapes.get(&format!("{prefix}.{k}")).cloned(),
        Some(2),
        expected.activation,
        expected.output,
    )
    .map_err(candle_core::Error::wrap)?;
    assert_eq!(
        inferred, expected,
        "{model}/{file}: config inferred from shapes"
    );
    let vb = VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu);
    let encoder = TextTransformer::load(vb.pp(prefix), &expected, layout)?;
    let refs = load(&format!("{model}/ref.safetensors"))?;
    let hidden = encoder.forward(&refs["text.ids"])?;
    assert_close(
        &format!("{model}/{file} text.hidden"),
        &hidden,
        &refs["text.hidden"],
        1e-4,
        1e-5,
    )?;
    Ok(())
}

#[test]
fn sd1_single_file_clip_matches_transformers() -> Result<()> {
    let cfg = tiny(2, Activation::QuickGelu, TextOutput::Last);
    check(
        "sd1-tiny",
        "model.safetensors",
        "cond_stage_model.transformer.text_model",
        TextLayout::Hf,
        cfg,
    )
}

#[test]
fn sd1_diffusers_text_encoder_matches_transformers() -> Result<()> {
    let cfg = tiny(2, Activation::QuickGelu, TextOutput::Last);
    check(
        "sd1-tiny",
        "diffusers/text_encoder/model.safetensors",
        "text_model",
        TextLayout::Hf,
        cfg,
    )
}

#[test]
fn sd2_single_file_open_clip_penultimate_matches_diffusers() -> Result<()> {
    let cfg = tiny(3, Activation::Gelu, TextOutput::PENULTIMATE);
    check(
        "sd2v-tiny",
        "model.safetensors",
        "cond_stage_model.model",
        TextLayout::OpenClip,
        cfg,
    )
}

#[test]
fn sd2_diffusers_text_encoder_last_layer_matches_diffusers() -> Result<()> {
    let cfg = tiny(2, Activation::Gelu, TextOutput::Last);
    check(
        "sd2v-tiny",
        "diffusers/text_encoder/model.safetensors",
        "text_model",
        TextLayout::Hf,
        cfg,
    )
}

#[test]
fn causal_mask_makes_earlier_states_independent_of_later_tokens() -> Result<()> {
    let weights = load("sd1-tiny/model.safetensors")?;
    let vb = VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu);
    let cfg = tiny(2, Activation::QuickGelu, TextOutput::Last);
    let encoder = TextTransformer::load_hf(vb.pp("cond_stage_model.transformer.text_model"), &cfg)?;
    let a = Tensor::new(&[[49406u32, 320, 1125, 539, 49407]], &Device::Cpu)?;
    let b = Tensor::new(&[[49406u32, 320, 1125, 9, 12]], &Device::Cpu)?;
    let (ha, hb) = (encoder.forward(&a)?, encoder.forward(&b)?);
    let diff = (ha.narrow(1, 0, 3)? - hb.narrow(1, 0, 3)?)?
        .abs()?
        .max_all()?
        .to_vec0::<f32>()?;
    assert_eq!(diff, 0.0, "positions 0..3 must not see tokens 3..5");
    let later = (ha.narrow(1, 3, 2)? - hb.narrow(1, 3, 2)?)?
        .abs()?
        .max_all()?
        .to_vec0::<f32>()?;
    assert!(later > 1e-3, "positions 3..5 must depend on their tokens");
    Ok(())
}

#[test]
fn forward_rejects_out_of_range_ids_and_long_prompts() -> Result<()> {
    let cfg = tiny(2, Activation::QuickGelu, TextOutput::Last);
    let encoder = TextTransformer::load_hf(VarBuilder::zeros(DType::F32, &Device::Cpu), &cfg)?;
    assert!(encoder
        .forward(&Tensor::new(&[[49408u32]], &Device::Cpu)?)
        .is_err());
    assert!(encoder
        .forward(&Tensor::new(&[[-1i64]], &Device::Cpu)?)
        .is_err());
    assert!(encoder
        .forward(&Tensor::zeros((1, 78), DType::U32, &Device::Cpu)?)
        .is_err());
    Ok(())
}

#[test]
fn load_rejects_skipping_every_block() {
    let cfg = tiny(2, Activation::Gelu, TextOutput::SkipLast(2));
    assert!(
        TextTransformer::load_open_clip(VarBuilder::zeros(DType::F32, &Device::Cpu), &cfg).is_err()
    );
}
