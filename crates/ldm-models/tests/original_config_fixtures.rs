//! The fixtures' YAML files (written in the layout of the original v1/v2 inference configs) parse as expected.
use ldm_models::original_config::{
    ConditioningKey, DiffusionKind, OpenClipLayer, OriginalConfig, OriginalTextEncoder,
    Parameterization,
};
use ldm_models::unet::HeadSpec;
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
            sd1.unet.heads,
            sd1.unet.single_context_dim()
        ),
        (32, HeadSpec::Count(2), Some(16))
    );
    assert!(matches!(
        sd1.text(),
        Some(OriginalTextEncoder::Clip {
            num_heads: Some(2),
            ..
        })
    ));
    let v = OriginalConfig::load(&fixture("sd2v-tiny/model.yaml"))?;
    assert_eq!(v.parameterization, Parameterization::V);
    assert!(v.unet.use_linear_in_transformer);
    assert!(matches!(
        v.text(),
        Some(OriginalTextEncoder::OpenClip {
            layer: OpenClipLayer::Penultimate,
            ..
        })
    ));
    let inp = OriginalConfig::load(&fixture("sd1-inpaint-tiny/model.yaml"))?;
    assert_eq!(inp.unet.in_channels, 9);
    assert!(matches!(inp.kind, DiffusionKind::Inpaint { .. }));
    assert_eq!(inp.conditioning_key, Some(ConditioningKey::Hybrid));
    for c in [&sd1, &v, &inp] {
        assert!(c.ignored_keys.is_empty(), "{:?}", c.ignored_keys);
    }
    Ok(())
}
