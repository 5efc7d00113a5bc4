//! The fixtures' YAML files (written in the layout of the original v1/v2 inference configs) parse as expected.
use ldm_models::original_config::{OriginalConfig, OriginalTextEncoder, Parameterization};
use std::path::PathBuf;

fn fixture(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures")
        .join(p)
}

#[test]
fn fixture_yamls_parse() -> Result<(), Box<dyn std::error::Error>> {
    let sd1 = OriginalConfig::load(&fixture("sd1-tiny/model.yaml"))?;
    assert_eq!(sd1.parameterization, Parameterization::Eps);
    assert_eq!(sd1.scale_factor, 0.25);
    assert_eq!(
        (
            sd1.unet.model_channels,
            sd1.unet.num_heads,
            sd1.unet.context_dim
        ),
        (32, 2, Some(16))
    );
    assert_eq!(
        sd1.text,
        Some(OriginalTextEncoder::Clip { num_heads: Some(2) })
    );
    let v = OriginalConfig::load(&fixture("sd2v-tiny/model.yaml"))?;
    assert_eq!(v.parameterization, Parameterization::V);
    assert!(v.unet.use_linear_in_transformer);
    assert!(
        matches!(v.text, Some(OriginalTextEncoder::OpenClip { ref layer, .. }) if layer == "penultimate")
    );
    let inp = OriginalConfig::load(&fixture("sd1-inpaint-tiny/model.yaml"))?;
    assert_eq!(inp.unet.in_channels, 9);
    assert_eq!(inp.conditioning_key.as_deref(), Some("hybrid"));
    Ok(())
}
