//! Every way a LoRA file can fail to apply gives an error that names the file, the module and the problem, and
//! leaves the weights unpatched. Files are written here; the model is fixtures/sd1-tiny (attn weights [32, 32]).
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use ldm_models::lora::{LoraError, ShapeError};
use ldm_pipeline::lora::apply_loras;
use ldm_pipeline::{open, PipelineError};

type R<T = ()> = Result<T, Box<dyn std::error::Error>>;

const Q: &str = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q";
const Q_KEY: &str = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight";

fn model() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/sd1-tiny/model.safetensors")
}

fn write(dir: &Path, name: &str, tensors: &[(&str, Vec<usize>)]) -> R<PathBuf> {
    let map: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(k, s)| {
            Ok((
                k.to_string(),
                Tensor::ones(s.as_slice(), DType::F32, &Device::Cpu)?,
            ))
        })
        .collect::<R<_>>()?;
    let path = dir.join(name);
    candle_core::safetensors::save(&map, &path)?;
    Ok(path)
}

fn lora(module: &str, down: Vec<usize>, up: Vec<usize>) -> Vec<(String, Vec<usize>)> {
    vec![
        (format!("{module}.lora_down.weight"), down),
        (format!("{module}.lora_up.weight"), up),
        (format!("{module}.alpha"), vec![]),
    ]
}

/// Applies `tensors` as a LoRA file to sd1-tiny; returns the LoRA error, checking that `to_q` was not patched.
fn fail(tensors: Vec<(String, Vec<usize>)>) -> R<LoraError> {
    let dir = tempfile::tempdir()?;
    let t: Vec<(&str, Vec<usize>)> = tensors
        .iter()
        .map(|(k, s)| (k.as_str(), s.clone()))
        .collect();
    let path = write(dir.path(), "x.safetensors", &t)?;
    let mut opened = open(&model(), None)?;
    let before = opened.store.load(Q_KEY, DType::F32, &Device::Cpu)?;
    let err = match apply_loras(&mut opened, &[(path, 1.0)]) {
        Ok(r) => return Err(format!("applied: {r:?}").into()),
        Err(PipelineError::Lora(e)) => *e,
        Err(e) => return Err(format!("not a LoRA error: {e}").into()),
    };
    let after = opened.store.load(Q_KEY, DType::F32, &Device::Cpu)?;
    let d = (after - before)?.abs()?.max_all()?.to_scalar::<f32>()?;
    assert_eq!(d, 0.0, "a failing file patched `{Q_KEY}`");
    eprintln!("{err}");
    Ok(err)
}

#[test]
fn unknown_module_names_are_listed() -> R {
    let mut t = lora(Q, vec![2, 32], vec![32, 2]);
    t.extend(lora(
        "lora_unet_no_such_block_to_q",
        vec![2, 32],
        vec![32, 2],
    ));
    t.extend(lora(
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
        vec![2, 16],
        vec![16, 2],
    ));
    match fail(t)? {
        LoraError::UnknownModules { modules, .. } => assert_eq!(
            modules,
            [
                "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
                "lora_unet_no_such_block_to_q"
            ]
        ),
        e => panic!("{e}"),
    }
    Ok(())
}

#[test]
fn rank_mismatch_between_up_and_down() -> R {
    match fail(lora(Q, vec![2, 32], vec![32, 3]))? {
        LoraError::RankMismatch {
            module, down, up, ..
        } => {
            assert_eq!((module.as_str(), down, up), (Q, 2, 3))
        }
        e => panic!("{e}"),
    }
    Ok(())
}

#[test]
fn delta_not_matching_the_base_weight() -> R {
    match fail(lora(Q, vec![2, 16], vec![32, 2]))? {
        LoraError::Shape(e) => {
            let ShapeError {
                module,
                key,
                lora,
                base,
                ..
            } = *e;
            assert_eq!(module, Q);
            assert_eq!(key, Q_KEY);
            assert_eq!((lora, base), (vec![32, 16], vec![32, 32]));
        }
        e => panic!("{e}"),
    }
    // the q block of SD2's fused in_proj is checked the same way; a 3x3 LoRA on a 1x1 conv too
    let proj_in = "lora_unet_down_blocks_0_attentions_0_proj_in";
    match fail(lora(proj_in, vec![2, 32, 3, 3], vec![32, 2, 1, 1]))? {
        LoraError::Shape(e) => {
            assert_eq!((e.lora, e.base), (vec![32, 32, 3, 3], vec![32, 32, 1, 1]))
        }
        e => panic!("{e}"),
    }
    Ok(())
}

#[test]
fn missing_up_or_bad_alpha() -> R {
    let t = vec![(format!("{Q}.lora_down.weight"), vec![2, 32])];
    match fail(t)? {
        LoraError::Module { module, reason, .. } => {
            assert_eq!(module, Q);
            assert!(reason.contains("lora_up.weight"), "{reason}");
        }
        e => panic!("{e}"),
    }
    let mut t = lora(Q, vec![2, 32], vec![32, 2]);
    t[2].1 = vec![2];
    assert!(matches!(fail(t)?, LoraError::Module { reason, .. } if reason.contains("alpha")));
    Ok(())
}

#[test]
fn a_checkpoint_is_not_a_lora() -> R {
    let mut opened = open(&model(), None)?;
    match apply_loras(&mut opened, &[(model(), 1.0)]) {
        Err(PipelineError::Lora(e)) => assert!(matches!(*e, LoraError::NotLora { .. }), "{e}"),
        other => panic!("{:?}", other.map(|_| ())),
    }
    Ok(())
}

#[test]
fn lycoris_and_peft_files_are_refused_by_kind() -> R {
    let cases: [(&str, &[&str]); 5] = [
        (
            "LoHa",
            &["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"],
        ),
        ("LoKr", &["lokr_w1", "lokr_w2", "alpha"]),
        (
            "Tucker",
            &["lora_down.weight", "lora_up.weight", "lora_mid.weight"],
        ),
        (
            "DoRA",
            &["lora_down.weight", "lora_up.weight", "dora_scale"],
        ),
        ("PEFT", &[]),
    ];
    for (kind, parts) in cases {
        let mut t: Vec<(String, Vec<usize>)> = parts
            .iter()
            .map(|p| (format!("{Q}.{p}"), vec![2, 2]))
            .collect();
        if kind == "PEFT" {
            t = vec![
                (
                    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"
                        .into(),
                    vec![2, 32],
                ),
                (
                    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight"
                        .into(),
                    vec![32, 2],
                ),
            ];
        }
        match fail(t)? {
            LoraError::Unsupported { kind: k, .. } => assert!(k.contains(kind), "{kind}: {k}"),
            e => panic!("{kind}: {e}"),
        }
    }
    Ok(())
}

/// A1111's LDM-style names patch the same weight as kohya's diffusers-style names.
#[test]
fn ldm_style_names_patch_the_same_weight() -> R {
    let dir = tempfile::tempdir()?;
    let ldm = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q";
    let mut got = Vec::new();
    for (i, m) in [Q, ldm].into_iter().enumerate() {
        let t = lora(m, vec![2, 32], vec![32, 2]);
        let t: Vec<(&str, Vec<usize>)> = t.iter().map(|(k, s)| (k.as_str(), s.clone())).collect();
        let path = write(dir.path(), &format!("{i}.safetensors"), &t)?;
        let mut opened = open(&model(), None)?;
        let report = apply_loras(&mut opened, &[(path, 0.5)])?;
        assert_eq!(report.keys.iter().collect::<Vec<_>>(), [Q_KEY]);
        got.push(opened.store.load(Q_KEY, DType::F32, &Device::Cpu)?);
    }
    let base = open(&model(), None)?
        .store
        .load(Q_KEY, DType::F32, &Device::Cpu)?;
    // ones: up @ down = 2 everywhere, alpha 1 / rank 2, weight 0.5 -> +0.5
    let want = (base + 0.5)?;
    for g in got {
        let d = (g - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(d <= 1e-6, "{d}");
    }
    Ok(())
}

/// Each module scales by its own alpha / rank; a module without `alpha` uses scale 1 (kohya, A1111, ComfyUI).
#[test]
fn per_module_alpha_and_missing_alpha() -> R {
    let dir = tempfile::tempdir()?;
    let k = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k";
    let k_key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_k.weight";
    let mut map: HashMap<String, Tensor> = HashMap::new();
    let ones = |s: &[usize]| Tensor::ones(s, DType::F32, &Device::Cpu);
    map.insert(format!("{Q}.lora_down.weight"), ones(&[4, 32])?);
    map.insert(format!("{Q}.lora_up.weight"), ones(&[32, 4])?);
    map.insert(format!("{Q}.alpha"), Tensor::new(8f32, &Device::Cpu)?); // 8 / 4 = 2
    map.insert(format!("{k}.lora_down.weight"), ones(&[2, 32])?);
    map.insert(format!("{k}.lora_up.weight"), ones(&[32, 2])?); // no alpha: scale 1
    let path = dir.path().join("a.safetensors");
    candle_core::safetensors::save(&map, &path)?;
    let mut opened = open(&model(), None)?;
    let base = open(&model(), None)?;
    apply_loras(&mut opened, &[(path, 0.25)])?;
    // up @ down of ones = rank everywhere: q 0.25·2·4 = 2, k 0.25·1·2 = 0.5
    for (key, add) in [(Q_KEY, 2.0), (k_key, 0.5)] {
        let want = (base.store.load(key, DType::F32, &Device::Cpu)? + add)?;
        let got = opened.store.load(key, DType::F32, &Device::Cpu)?;
        let d = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(d <= 1e-6, "{key}: {d}");
    }
    Ok(())
}
