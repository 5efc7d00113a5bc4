//! LDM BERT text encoder (x_transformer `TransformerWrapper`, CompVis `BERTEmbedder`) parity with the original
//! PyTorch module on `fixtures/ldmbert-tiny` (tools/fixtures/make_ldmbert.py: torch 2.15, diffusers 0.42.1,
//! transformers 5.25; fp16 weights, fp32 references from the rounded weights; CompVis' TransformerWrapper and
//! diffusers' LDMBertModel agree exactly there). Both forms: the original single file and the diffusers folder
//! through `ldmbert_key_map`. Tolerance per element: |x − y| ≤ max(1e-4·|x + y|, 1e-5).
use std::collections::HashMap;

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;
use ldm_models::import::{ldmbert_key_map, DiffusersLdmBertConfig, LDMBERT_PREFIX};
use ldm_models::text::x_transformer::UNUSED_KEYS;
use ldm_models::text::{XTransformer, XTransformerConfig};
use ldm_models::tokenizer::BertTokenizer;

mod common;
use common::{assert_close, fixture, load};

fn tiny() -> XTransformerConfig {
    XTransformerConfig {
        vocab_size: 30522,
        max_seq_len: 77,
        dim: 8,
        depth: 2,
        heads: 8,
        dim_head: 64,
        ff_inner: 32,
    }
}

/// Canonical tensors (prefix stripped) -> config inferred from shapes -> model -> `hidden` vs `ref`.
fn check(name: &str, canonical: HashMap<String, Tensor>) -> Result<f32> {
    let cfg = XTransformerConfig::infer(|k| canonical.get(k).map(|t| t.dims().to_vec()), None)
        .map_err(candle_core::Error::wrap)?;
    assert_eq!(cfg, tiny(), "{name}: config inferred from shapes");
    let vb = VarBuilder::from_tensors(canonical, DType::F32, &Device::Cpu);
    let model = XTransformer::load(vb, &cfg)?;
    let refs = load("ldmbert-tiny/ref.safetensors")?;
    let hidden = model.forward(&refs["ids"])?;
    assert_close(
        &format!("{name} hidden"),
        &hidden,
        &refs["hidden"],
        1e-4,
        1e-5,
    )
}

#[test]
fn single_file_matches_compvis_transformer_wrapper() -> Result<()> {
    let weights = load("ldmbert-tiny/model.safetensors")?;
    let mut canonical = HashMap::new();
    for (k, t) in weights {
        let rel = k
            .strip_prefix(LDMBERT_PREFIX)
            .unwrap_or_else(|| panic!("key {k} outside the prefix"));
        canonical.insert(rel.to_string(), t);
    }
    for k in UNUSED_KEYS {
        assert!(canonical.contains_key(*k), "original files carry {k}");
    }
    check("model.safetensors", canonical)?;
    Ok(())
}

#[test]
fn diffusers_folder_maps_to_the_same_model() -> Result<()> {
    let cfg =
        DiffusersLdmBertConfig::from_file(&fixture("ldmbert-tiny/diffusers/bert/config.json"))
            .map_err(candle_core::Error::wrap)?;
    let arch = cfg.arch().map_err(candle_core::Error::wrap)?;
    assert!(
        arch.ignored.is_empty(),
        "unexpected config entries {:?}",
        arch.ignored
    );
    assert_eq!(XTransformerConfig::from(&arch), tiny());
    let map = ldmbert_key_map(&cfg).map_err(candle_core::Error::wrap)?;
    let diffusers = load("ldmbert-tiny/diffusers/bert/model.safetensors")?;
    let canonical: HashMap<String, Tensor> = map
        .to_canonical(diffusers)
        .map_err(candle_core::Error::wrap)?
        .into_iter()
        .collect();
    // the mapped tensors equal the single file's, bit for bit
    let single = load("ldmbert-tiny/model.safetensors")?;
    assert_eq!(canonical.len(), single.len());
    for (k, t) in &canonical {
        let s = &single[&format!("{LDMBERT_PREFIX}{k}")];
        let d = (t.to_dtype(DType::F32)? - s.to_dtype(DType::F32)?)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert_eq!(d, 0.0, "{k}");
    }
    check("diffusers/bert", canonical)?;
    Ok(())
}

#[test]
fn tokenizer_gives_the_reference_ids() -> Result<()> {
    let refs = load("ldmbert-tiny/ref.safetensors")?;
    let want = refs["ids"].to_dtype(DType::U32)?.to_vec2::<u32>()?;
    let text = std::fs::read_to_string(fixture("ldmbert-tiny/cases.json"))?;
    let cases: serde_json::Value = serde_json::from_str(&text).map_err(candle_core::Error::wrap)?;
    let prompts = cases["prompts"].as_array().expect("prompts");
    assert_eq!(prompts.len(), want.len());
    let tok = BertTokenizer::builtin();
    for (p, w) in prompts.iter().zip(&want) {
        assert_eq!(&tok.encode_for_model(p.as_str().expect("prompt")), w, "{p}");
    }
    Ok(())
}

#[test]
fn bad_ids_are_errors() -> Result<()> {
    let weights = load("ldmbert-tiny/model.safetensors")?;
    let vb = VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu);
    let model = XTransformer::load(vb.pp("cond_stage_model.transformer"), &tiny())?;
    let too_big = Tensor::new(&[[101u32, 30522]], &Device::Cpu)?;
    assert!(model.forward(&too_big).is_err());
    let too_long = Tensor::zeros((1, 78), DType::U32, &Device::Cpu)?;
    assert!(model.forward(&too_long).is_err());
    let out = model.forward(&Tensor::new(&[[101u32, 102]], &Device::Cpu)?)?;
    assert_eq!(out.dims(), &[1, 2, 8]);
    Ok(())
}

/// The end-to-end fixture's text conditioning (`fixtures/ldm-txt2img-tiny`, diffusers `LDMTextToImagePipeline`):
/// the pipeline's token ids and `bert(ids)[0]` for every case, and the empty prompt CFG uses.
#[test]
fn txt2img_fixture_context_matches() -> Result<()> {
    let dir = "ldm-txt2img-tiny/diffusers";
    let cfg = DiffusersLdmBertConfig::from_file(&fixture(&format!("{dir}/bert/config.json")))
        .map_err(candle_core::Error::wrap)?;
    let map = ldmbert_key_map(&cfg).map_err(candle_core::Error::wrap)?;
    let tensors = load(&format!("{dir}/bert/model.safetensors"))?;
    let canonical = map
        .to_canonical(tensors)
        .map_err(candle_core::Error::wrap)?;
    let arch = cfg.arch().map_err(candle_core::Error::wrap)?;
    let vb = VarBuilder::from_tensors(canonical.into_iter().collect(), DType::F32, &Device::Cpu);
    let model = XTransformer::load(vb, &XTransformerConfig::from(&arch))?;
    let tok = BertTokenizer::from_dir(&fixture(&format!("{dir}/tokenizer")))
        .map_err(candle_core::Error::wrap)?;
    let text = std::fs::read_to_string(fixture("ldm-txt2img-tiny/cases.json"))?;
    let cases: serde_json::Value = serde_json::from_str(&text).map_err(candle_core::Error::wrap)?;
    let refs = load("ldm-txt2img-tiny/ref.safetensors")?;
    let mut batches: Vec<(String, Vec<String>)> = vec![("text.uncond".into(), vec![String::new()])];
    for c in cases["cases"].as_array().expect("cases") {
        let prompts = c["prompts"].as_array().expect("prompts").iter();
        batches.push((
            format!("txt2img.{}", c["name"].as_str().expect("name")),
            prompts
                .map(|p| p.as_str().expect("prompt").to_string())
                .collect(),
        ));
    }
    for (name, prompts) in batches {
        let ids: Vec<Vec<u32>> = prompts.iter().map(|p| tok.encode_for_model(p)).collect();
        let want_ids = refs[&format!("{name}.ids").replace("text.uncond.ids", "text.uncond_ids")]
            .to_dtype(DType::U32)?
            .to_vec2::<u32>()?;
        assert_eq!(ids, want_ids, "{name} ids");
        let ids = Tensor::new(ids, &Device::Cpu)?;
        let key = format!("{name}.context").replace("text.uncond.context", "text.uncond_context");
        assert_close(&key, &model.forward(&ids)?, &refs[&key], 1e-4, 1e-5)?;
    }
    Ok(())
}

/// The end-to-end fixture's other components go through the existing diffusers importers strictly (every tensor
/// mapped, none unused), so the pipeline test can build the whole model from the folder.
#[test]
fn txt2img_fixture_unet_and_vqvae_map_strictly() {
    use ldm_models::import::{
        component_files, unet_key_map, vae_key_map, DiffusersUnetConfig, DiffusersVaeConfig,
    };
    let dir = fixture("ldm-txt2img-tiny/diffusers");
    let unet = component_files(&dir, "unet").expect("unet files");
    let cfg = DiffusersUnetConfig::from_file(&unet.config).expect("unet config");
    let arch = cfg.arch().expect("unet arch");
    assert_eq!(arch.context_dim, 8);
    let tensors =
        candle_core::safetensors::load(&unet.weights, &Device::Cpu).expect("unet weights");
    let n = tensors.len();
    let mapped = unet_key_map(&cfg)
        .expect("unet map")
        .to_canonical(tensors)
        .expect("unet tensors map");
    assert_eq!(mapped.len(), n);
    let vqvae = component_files(&dir, "vqvae").expect("vqvae files");
    let cfg = DiffusersVaeConfig::from_file(&vqvae.config).expect("vae config");
    let tensors =
        candle_core::safetensors::load(&vqvae.weights, &Device::Cpu).expect("vae weights");
    let mapped = vae_key_map(&cfg)
        .expect("vae map")
        .to_canonical(tensors)
        .expect("vae tensors map");
    assert!(mapped.iter().any(|(k, _)| k.starts_with("decoder.up.3.")));
}

/// Records every (name, shape) the loader asks for and answers with a broadcast zero (no allocation), so the
/// full-size model can be "loaded" without weights.
struct Recorder(std::sync::Mutex<Vec<(String, Vec<usize>)>>);

impl candle_nn::var_builder::SimpleBackend for &Recorder {
    fn get(
        &self,
        s: candle_core::Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> Result<Tensor> {
        if let Ok(mut seen) = self.0.lock() {
            seen.push((name.to_string(), s.dims().to_vec()));
        }
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }
    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> Result<Tensor> {
        candle_core::bail!("unexpected unchecked get of {name}")
    }
    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

/// Key manifest of the paper's full-size encoder (`txt2img-1p4B-eval.yaml`: n_embed 1280, n_layer 32), taken from
/// CompVis' `TransformerWrapper` and diffusers' `LDMBertModel` (default config) built on the meta device
/// (`make_ldmbert.py`): the key map's two sides, the shapes the config is inferred from and the tensors the
/// loader requests all agree with it.
#[test]
fn full_size_manifest_matches_map_inference_and_loader() -> Result<()> {
    type Manifest = Vec<(String, Vec<usize>)>;
    let text = std::fs::read_to_string(fixture("ldmbert-tiny/manifest_1p4b.json"))?;
    let doc: serde_json::Value = serde_json::from_str(&text).map_err(candle_core::Error::wrap)?;
    let read = |side: &str| -> Manifest {
        serde_json::from_value(doc[side].clone()).expect("manifest list")
    };
    let (canonical, diffusers) = (read("canonical"), read("diffusers"));
    let cfg = DiffusersLdmBertConfig::from_json(&doc["diffusers_config"].to_string())
        .map_err(candle_core::Error::wrap)?;
    let map = ldmbert_key_map(&cfg).map_err(candle_core::Error::wrap)?;
    let sorted = |mut m: Manifest| {
        m.sort();
        m
    };
    assert_eq!(sorted(map.diffusers_manifest()), sorted(diffusers.clone()));
    assert_eq!(sorted(map.canonical_manifest()), sorted(canonical.clone()));
    // defaults of DiffusersLdmBertConfig are the same model
    let defaults = DiffusersLdmBertConfig::from_json("{}").map_err(candle_core::Error::wrap)?;
    let defaults = ldmbert_key_map(&defaults).map_err(candle_core::Error::wrap)?;
    assert_eq!(sorted(defaults.diffusers_manifest()), sorted(diffusers));

    let shapes: HashMap<String, Vec<usize>> = canonical.iter().cloned().collect();
    let inferred = XTransformerConfig::infer(|k| shapes.get(k).cloned(), None)
        .map_err(candle_core::Error::wrap)?;
    assert_eq!(inferred, XTransformerConfig::ldm_txt2img_1p4b());

    let recorder = Recorder(std::sync::Mutex::new(Vec::new()));
    let vb = VarBuilder::from_backend(Box::new(&recorder), DType::F32, Device::Cpu);
    XTransformer::load(vb, &inferred)?;
    let requested = recorder.0.lock().expect("recorder").clone();
    let expected: Manifest = canonical
        .into_iter()
        .filter(|(k, _)| !UNUSED_KEYS.contains(&k.as_str()))
        .collect();
    assert_eq!(sorted(requested), sorted(expected));
    Ok(())
}
