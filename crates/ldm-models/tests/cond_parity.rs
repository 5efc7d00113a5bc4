//! Parity of `ldm_models::cond` with the original CompVis code, and its input errors.
//!
//! References: fixtures/cond/, made by tools/fixtures/make_cond.py from CompVis/latent-diffusion@a506df5
//! (`ClassEmbedder`, `SpatialRescaler`) and CompVis/taming-transformers@3ba01b2
//! (`ObjectsBoundingBoxConditionalBuilder`, the sflckr one-hot step), torch 2.15 CPU.
//! Tolerances: float outputs |x − y| ≤ max(1e-4·|x + y|, 1e-5); one-hot maps and token ids exact.
mod common;

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use ldm_models::cond::{
    interpolate, ClassEmbedder, ClassEmbedderConfig, CondError, LayoutBuilder, LayoutConfig,
    LayoutObject, ObjectClass, ResizeMethod, SemanticMap, SpatialRescaler, SpatialRescalerConfig,
};
use serde_json::Value;

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn cases() -> Result<Value, Box<dyn std::error::Error>> {
    let text = std::fs::read_to_string(common::fixture("cond/cases.json"))?;
    Ok(serde_json::from_str(&text)?)
}

fn weights() -> Result<VarBuilder<'static>, Box<dyn std::error::Error>> {
    let w = common::load("cond/weights.safetensors")?;
    Ok(VarBuilder::from_tensors(w, DType::F32, &Device::Cpu))
}

fn err_text<T: std::fmt::Debug>(r: Result<T, CondError>) -> String {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn class_embedder_matches_original() -> TestResult {
    let refs = common::load("cond/ref.safetensors")?;
    let cfg = ClassEmbedderConfig::from_original(Some(11), 8);
    assert_eq!(
        cfg.null_class, None,
        "only 1001-row tables get the cin256-v2 null class"
    );
    let cfg = ClassEmbedderConfig {
        null_class: Some(10),
        ..cfg
    };
    let ce = ClassEmbedder::new(&cfg, weights()?.pp("class_embedder.cond_stage_model"))?;
    let labels: Vec<usize> = refs["class_embedder.labels"]
        .to_vec1::<i64>()?
        .into_iter()
        .map(|l| l as usize)
        .collect();
    let out = ce.forward(&labels)?;
    common::assert_close(
        "class_embedder.out",
        &out,
        &refs["class_embedder.out"],
        1e-4,
        1e-5,
    )?;
    // the unconditional context is the null row, shaped like a conditional one
    let uc = ce.unconditional(2)?;
    assert_eq!(uc.dims(), &[2, 1, 8]);
    let row = out.narrow(0, 2, 1)?; // label 10 = the null class
    common::assert_close("class_embedder.null", &uc.narrow(0, 0, 1)?, &row, 0.0, 0.0)?;
    Ok(())
}

#[test]
fn class_index_out_of_range_is_an_error_naming_it() -> TestResult {
    let cfg = ClassEmbedderConfig::from_original(Some(11), 8);
    let ce = ClassEmbedder::new(&cfg, weights()?.pp("class_embedder.cond_stage_model"))?;
    let e = err_text(ce.forward(&[3, 11]));
    assert!(
        e.contains("class index 11") && e.contains("11 classes"),
        "{e}"
    );
    let e = err_text(ce.unconditional(1));
    assert!(e.contains("no unconditional"), "{e}");
    assert_eq!(ClassEmbedderConfig::cin256_v2().null_class, Some(1000));
    assert_eq!(
        ClassEmbedderConfig::from_original(None, 512).null_class,
        None
    );
    Ok(())
}

fn rescaler_config(v: &Value) -> Result<SpatialRescalerConfig, Box<dyn std::error::Error>> {
    Ok(serde_json::from_value(v.clone())?)
}

#[test]
fn spatial_rescaler_matches_original_for_every_method() -> TestResult {
    let refs = common::load("cond/ref.safetensors")?;
    let vb = weights()?;
    let cases = cases()?;
    let list = cases["rescaler"].as_array().ok_or("rescaler cases")?;
    let mut methods = std::collections::BTreeSet::new();
    for case in list {
        let name = case["name"].as_str().ok_or("name")?;
        let cfg = rescaler_config(&case["config"])?;
        methods.insert(cfg.method.name());
        let m = SpatialRescaler::new(&cfg, vb.pp(format!("rescaler.{name}.cond_stage_model")))?;
        let x = &refs[case["input"].as_str().ok_or("input")?];
        let y = m.forward(x)?;
        common::assert_close(name, &y, &refs[&format!("rescaler.{name}.out")], 1e-4, 1e-5)?;
    }
    assert_eq!(
        methods.len(),
        6,
        "all six interpolation modes are covered: {methods:?}"
    );
    Ok(())
}

#[test]
fn interpolate_refuses_wrong_ranks_and_empty_outputs() -> TestResult {
    let x = Tensor::zeros((1, 2, 4, 4), DType::F32, &Device::Cpu)?;
    let e = err_text(interpolate(&x, ResizeMethod::Linear, 0.5));
    assert!(e.contains("`linear` cannot resize a 4-D tensor"), "{e}");
    let e = err_text(interpolate(&x, ResizeMethod::Bilinear, 0.1));
    assert!(e.contains("leaves nothing"), "{e}");
    let e = err_text(interpolate(&x, ResizeMethod::Bicubic, -1.0));
    assert!(e.contains("positive"), "{e}");
    Ok(())
}

#[test]
fn semantic_png_to_one_hot_matches_original() -> TestResult {
    let refs = common::load("cond/ref.safetensors")?;
    let maps = [
        SemanticMap::load(&common::fixture("cond/seg_grey.png"))?,
        SemanticMap::load(&common::fixture("cond/seg_palette.png"))?,
    ];
    let oh = SemanticMap::one_hot(&maps, 182, &Device::Cpu)?;
    common::assert_close("semantic.onehot", &oh, &refs["semantic.onehot"], 0.0, 0.0)?;
    // and through the semantic-synthesis rescaler (2 bilinear halvings, 182 -> 3)
    let cfg = SpatialRescalerConfig::semantic_synthesis();
    let m = SpatialRescaler::new(&cfg, weights()?.pp("rescaler.semantic.cond_stage_model"))?;
    common::assert_close(
        "semantic.rescaled",
        &m.forward(&oh)?,
        &refs["rescaler.semantic.out"],
        1e-4,
        1e-5,
    )?;
    Ok(())
}

#[test]
fn bad_semantic_maps_get_clear_errors() -> TestResult {
    let e = err_text(
        SemanticMap::load(&common::fixture("cond/seg_bad_label.png")).and_then(|m| m.check(182)),
    );
    assert!(
        e.contains("label 200 at (x 7, y 5)") && e.contains("182 classes"),
        "{e}"
    );
    let e = err_text(SemanticMap::load(&common::fixture("cond/not_an_image.png")));
    assert!(
        e.contains("not_an_image.png") && e.contains("not a PNG"),
        "{e}"
    );
    let e = err_text(SemanticMap::load(&common::fixture("cond/seg_rgb.png")));
    assert!(e.contains("Rgb PNG is not a label map"), "{e}");
    let e = err_text(SemanticMap::load(Path::new("/nonexistent/map.png")));
    assert!(e.contains("cannot read"), "{e}");
    let a = SemanticMap::from_labels(2, 1, vec![0, 1], "a")?;
    let b = SemanticMap::from_labels(1, 2, vec![0, 1], "b")?;
    let e = err_text(SemanticMap::one_hot(&[a, b], 4, &Device::Cpu));
    assert!(e.contains("differ in size"), "{e}");
    Ok(())
}

fn layout_builder(cases: &Value, name: &str) -> Result<LayoutBuilder, Box<dyn std::error::Error>> {
    let cfg: LayoutConfig = serde_json::from_value(cases["layout_configs"][name].clone())?;
    Ok(LayoutBuilder::new(cfg, None)?)
}

#[test]
fn layout_tokens_match_taming_builder_exactly() -> TestResult {
    let cases = cases()?;
    let list = cases["layout"].as_array().ok_or("layout cases")?;
    assert!(list.len() >= 15);
    for case in list {
        let b = layout_builder(&cases, case["config"].as_str().ok_or("config")?)?;
        let objects: Vec<LayoutObject> = serde_json::from_value(case["objects"].clone())?;
        let want: Vec<u32> = serde_json::from_value(case["ids"].clone())?;
        let got = b.build(&objects)?;
        assert_eq!(got, want, "{} / {}", case["config"], case["boxes"]);
        assert_eq!(got.len(), b.config().sequence_length());
        if objects.is_empty() {
            assert_eq!(b.unconditional(), want);
        }
    }
    let b = layout_builder(&cases, "openimages")?;
    assert_eq!(
        b.config().sequence_length(),
        92,
        "layout2img-openimages256 max_seq_len"
    );
    let t = b.build_batch(&[vec![], vec![]], &Device::Cpu)?;
    assert_eq!(t.dims(), &[2, 92]);
    Ok(())
}

#[test]
fn layout_json_names_and_errors() -> TestResult {
    let cfg = LayoutConfig {
        no_object_classes: 3,
        no_max_objects: 2,
        no_tokens: 64,
        encode_crop: true,
        use_group_parameter: true,
        use_additional_parameters: false,
    };
    let names = vec!["sky".to_string(), "Car".to_string(), "tree".to_string()];
    let b = LayoutBuilder::new(cfg.clone(), Some(names))?;
    let objs = LayoutObject::parse_json(
        r#"[{"class": "car", "box": [0, 0, 1, 0.5], "group_of": true}, {"class": 2, "box": [0.5, 0.5, 1, 1]}]"#,
    )?;
    assert_eq!(objs[0].class, ObjectClass::Name("car".into()));
    // grid 8x8: (0,0) -> 0, (1,0.5) -> round(3.5)=4 -> 4*8+7 = 39; (0.5,0.5) -> 4*8+4 = 36 (ties to even)
    assert_eq!(b.build(&objs)?, vec![1 + 3, 0, 39, 2, 36, 63, 0, 63]);
    let bad = |json: &str| err_text(LayoutObject::parse_json(json).and_then(|o| b.build(&o)));
    let e = bad(r#"[{"class": 0, "box": [0.1, 0.2, 1.2, 0.5]}]"#);
    assert!(
        e.contains("layout object 0") && e.contains("outside [0, 1]"),
        "{e}"
    );
    let e = bad(
        r#"[{"class": 0, "box": [0.1, 0.2, 0.3, 0.5]}, {"class": 0, "box": [0.6, 0.2, 0.3, 0.5]}]"#,
    );
    assert!(
        e.contains("layout object 1") && e.contains("x1 < x0"),
        "{e}"
    );
    let e = bad(r#"[{"class": 3, "box": [0, 0, 1, 1]}]"#);
    assert!(
        e.contains("class 3 is out of range") && e.contains("3 classes"),
        "{e}"
    );
    let e = bad(r#"[{"class": "dog", "box": [0, 0, 1, 1]}]"#);
    assert!(e.contains("unknown class `dog`"), "{e}");
    let e = bad(
        r#"[{"class": 0, "box": [0,0,1,1]}, {"class": 0, "box": [0,0,1,1]}, {"class": 0, "box": [0,0,1,1]}]"#,
    );
    assert!(e.contains("3 objects") && e.contains("at most 2"), "{e}");
    let e = bad(r#"[{"class": 0, "bbox": [0,0,1,1]}]"#);
    assert!(e.starts_with("layout JSON:"), "{e}");
    let unnamed = LayoutBuilder::new(cfg, None)?;
    let e = err_text(unnamed.build(&[LayoutObject::new(
        ObjectClass::Name("sky".into()),
        [0.0, 0.0, 1.0, 1.0],
    )]));
    assert!(e.contains("no class-name list"), "{e}");
    Ok(())
}

// ---- the conditioning inputs of the end-to-end tiny LDM fixtures (tools/fixtures/make_ldm_tiny.py)

fn model_weights(dir: &str) -> Result<VarBuilder<'static>, Box<dyn std::error::Error>> {
    let w = common::load(&format!("{dir}/model.safetensors"))?;
    Ok(VarBuilder::from_tensors(w, DType::F32, &Device::Cpu).pp("cond_stage_model"))
}

#[test]
fn cin_tiny_class_context_and_null_class_match() -> TestResult {
    let refs = common::load("ldm-cin-tiny/ref.safetensors")?;
    let cfg = ClassEmbedderConfig::from_original(Some(1001), 16);
    assert_eq!(cfg.null_class, Some(1000));
    let ce = ClassEmbedder::new(&cfg, model_weights("ldm-cin-tiny")?)?;
    for case in ["cfg", "nocfg"] {
        let labels: Vec<usize> = refs[&format!("{case}.labels")]
            .to_vec1::<i64>()?
            .into_iter()
            .map(|l| l as usize)
            .collect();
        let c = ce.forward(&labels)?;
        common::assert_close(case, &c, &refs[&format!("{case}.context")], 1e-4, 1e-5)?;
    }
    let uc = ce.unconditional(2)?;
    common::assert_close("cfg.uc_context", &uc, &refs["cfg.uc_context"], 1e-4, 1e-5)?;
    Ok(())
}

#[test]
fn semantic_tiny_map_to_concat_conditioning_matches() -> TestResult {
    let refs = common::load("ldm-semantic-tiny/ref.safetensors")?;
    let m = SpatialRescaler::new(
        &SpatialRescalerConfig::semantic_synthesis(),
        model_weights("ldm-semantic-tiny")?,
    )?;
    let map = |f: &str| SemanticMap::load(&common::fixture(&format!("ldm-semantic-tiny/{f}")));
    for (case, files) in [
        ("map0", vec!["map0.png"]),
        ("batch2", vec!["map0.png", "map1.png"]),
    ] {
        let maps = files
            .iter()
            .map(|f| map(f))
            .collect::<Result<Vec<_>, _>>()?;
        let oh = SemanticMap::one_hot(&maps, 182, &Device::Cpu)?; // [B, 182, 32, 32]
        let c = m.forward(&oh)?; // [B, 3, 8, 8]
        common::assert_close(case, &c, &refs[&format!("{case}.cond")], 1e-4, 1e-5)?;
    }
    Ok(())
}

#[test]
fn layout_tiny_tokens_match() -> TestResult {
    let refs = common::load("ldm-layout-tiny/ref.safetensors")?;
    let text = std::fs::read_to_string(common::fixture("ldm-layout-tiny/cases.json"))?;
    let cases: Value = serde_json::from_str(&text)?;
    let cfg: LayoutConfig = serde_json::from_value(cases["layout_builder"].clone())?;
    let b = LayoutBuilder::new(cfg, None)?;
    for case in cases["cases"].as_array().ok_or("cases")? {
        let name = case["name"].as_str().ok_or("name")?;
        let layouts: Vec<Vec<LayoutObject>> = serde_json::from_value(case["layouts"].clone())?;
        let got = b
            .build_batch(&layouts, &Device::Cpu)?
            .to_dtype(DType::I64)?;
        let want = &refs[&format!("{name}.tokens")];
        assert_eq!(got.to_vec2::<i64>()?, want.to_vec2::<i64>()?, "{name}");
        if let Some(uc) = refs.get(&format!("{name}.uc_tokens")) {
            for row in uc.to_vec2::<i64>()? {
                let row: Vec<u32> = row.into_iter().map(|v| v as u32).collect();
                assert_eq!(b.unconditional(), row);
            }
        }
    }
    Ok(())
}
