//! Train-side LoRA: the trainable pairs, the patched model build and the kohya file they are saved as, against
//! the inference side (`ldm_models::lora::apply_loras`). Model: fixtures/sd1-tiny (tools/fixtures/make_sd_tiny.py).
//! Tolerances |x−y| ≤ max(R·|x+y|, A): merged weights R = A = 1e-6 (f32 sums of the same products); gradients
//! R = 1e-5, A = 1e-6; UNet outputs R = 1e-4, A = 1e-5.
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{DType, Device, Shape, Tensor, Var};
use ldm_core::rng::{NoiseRng, TorchRng};
use ldm_core::weights::{SafetensorsFile, StrictLoader, WeightStore};
use ldm_models::import::UNET_PREFIX;
use ldm_models::lora::{apply_loras, read_lora, LoraTargets};
use ldm_models::unet::{HeadSpec, Unet, UnetConfig};
use ldm_train::lora::{save_kohya, LoraBackend, LoraConfig, LoraSet};

type R<T = ()> = Result<T, Box<dyn std::error::Error>>;

fn sd1_store() -> R<WeightStore> {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/sd1-tiny/model.safetensors");
    let file = Arc::new(SafetensorsFile::open(&path)?);
    let mut store = WeightStore::new(path.display().to_string());
    store.add_file(&file, "");
    Ok(store)
}

fn lora_cfg(rank: usize, alpha: f64, seed: u64) -> LoraConfig {
    LoraConfig { rank, alpha, seed }
}

/// fixtures/sd1-tiny's UNet (model.yaml).
fn sd1_tiny_unet() -> UnetConfig {
    UnetConfig {
        in_channels: 4,
        out_channels: 4,
        model_channels: 32,
        channel_mult: vec![1, 2],
        num_res_blocks: 1,
        attention_levels: vec![0],
        heads: HeadSpec::Count(2),
        transformer_depth: 1,
        context_dim: Some(16),
        use_linear_in_transformer: false,
        num_groups: 32,
        ..UnetConfig::sd_v1()
    }
}

/// Seeded N(0, std²) values (torch's CPU generator), so every run sees the same numbers.
fn randn(seed: u64, std: f32, shape: impl Into<Shape>) -> R<Tensor> {
    let shape = shape.into();
    let v: Vec<f32> = TorchRng::new(seed)
        .randn(shape.elem_count())
        .into_iter()
        .map(|x| x * std)
        .collect();
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
}

fn max_ratio(got: &Tensor, want: &Tensor, rel: f32, abs: f32) -> R<f32> {
    assert_eq!(got.dims(), want.dims());
    let g = got.flatten_all()?.to_vec1::<f32>()?;
    let w = want.flatten_all()?.to_vec1::<f32>()?;
    Ok(g.iter()
        .zip(&w)
        .map(|(a, b)| (a - b).abs() / (rel * (a + b).abs()).max(abs))
        .fold(0.0, f32::max))
}

fn max_abs(a: &Tensor, b: &Tensor) -> R<f32> {
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

/// A set on the default targets with random (non-zero) up matrices, as after some training.
fn trained_set(store: &WeightStore, rank: usize, alpha: f64) -> R<(LoraTargets, LoraSet)> {
    let cfg = sd1_tiny_unet();
    let targets = LoraTargets::for_model(store, Some(&cfg), None);
    let keys = LoraSet::default_keys(store);
    let set = LoraSet::new(
        store,
        &targets,
        &keys,
        &lora_cfg(rank, alpha, 7),
        &Device::Cpu,
    )?;
    for (i, l) in set.layers().iter().enumerate() {
        l.up.set(&randn(100 + i as u64, 0.5, l.up.shape())?)?;
    }
    Ok((targets, set))
}

/// W0 + (alpha / r) · up @ down, computed directly from the values.
fn expected(store: &WeightStore, key: &str, up: &Tensor, down: &Tensor, scale: f64) -> R<Tensor> {
    let w0 = store.load(key, DType::F32, &Device::Cpu)?;
    let (out, r) = (up.dims()[0], up.dims()[1]);
    let d = up
        .reshape((out, r))?
        .matmul(&down.flatten_from(1)?)?
        .reshape(w0.dims())?;
    Ok((w0 + (d * scale)?)?)
}

#[test]
fn default_targets_and_init() -> R {
    let store = sd1_store()?;
    let targets = LoraTargets::for_model(&store, Some(&sd1_tiny_unet()), None);
    let keys = LoraSet::default_keys(&store);
    // transformers at input_blocks.1, middle_block.1, output_blocks.2 and .3: 2 attentions x 4 projections each
    assert_eq!(keys.len(), 32);
    let set = LoraSet::new(&store, &targets, &keys, &lora_cfg(4, 4.0, 7), &Device::Cpu)?;
    let again = LoraSet::new(&store, &targets, &keys, &lora_cfg(4, 4.0, 7), &Device::Cpu)?;
    for (l, m) in set.layers().iter().zip(again.layers()) {
        assert_eq!(l.up.as_tensor().abs()?.max_all()?.to_scalar::<f32>()?, 0.0);
        let fan_in = l.shape[1..].iter().product::<usize>() as f32;
        let d = l.down.as_tensor().abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(
            d <= 1.0 / fan_in.sqrt() && d > 0.5 / fan_in.sqrt(),
            "{}: {d}",
            l.key
        );
        assert_eq!(
            max_abs(l.down.as_tensor(), m.down.as_tensor())?,
            0.0,
            "seeded init is reproducible"
        );
    }
    let names: Vec<&str> = set.layers().iter().map(|l| l.name.as_str()).collect();
    assert!(names.contains(&"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"));
    assert!(names.contains(&"lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0"));
    assert!(names.contains(&"lora_unet_up_blocks_1_attentions_1_transformer_blocks_0_attn2_to_v"));
    Ok(())
}

/// save_kohya → read back → merged at inference equals W0 + (alpha/r)·up@down, in f32 and f16.
#[test]
fn saved_kohya_file_merges_to_the_trained_weights() -> R {
    let store = sd1_store()?;
    let (targets, set) = trained_set(&store, 4, 2.0)?;
    let dir = tempfile::tempdir()?;
    for dtype in [DType::F32, DType::F16] {
        let path = dir.path().join(format!("{dtype:?}.safetensors"));
        let meta = HashMap::from([("ss_base_model_version".into(), "sd_v1".into())]);
        save_kohya(&path, &set, &meta, dtype)?;
        let file = read_lora(&path)?;
        assert_eq!(file.modules.len(), 32);
        assert_eq!(file.metadata["ss_network_dim"], "4");
        assert_eq!(file.metadata["ss_network_alpha"], "2");
        assert_eq!(file.metadata["ss_base_model_version"], "sd_v1");
        assert!(file
            .modules
            .iter()
            .all(|m| m.alpha == Some(2.0) && m.rank() == 4 && m.down.dims().len() == 2));

        let mut merged = sd1_store()?;
        let report = apply_loras(&mut merged, &targets, &[(path, 1.0)])?;
        assert_eq!(report.keys.len(), 32);
        let mut worst = 0f32;
        for l in set.layers() {
            let round = |v: &Var| v.as_tensor().to_dtype(dtype)?.to_dtype(DType::F32);
            let want = expected(&store, &l.key, &round(&l.up)?, &round(&l.down)?, 0.5)?;
            let got = merged.load(&l.key, DType::F32, &Device::Cpu)?;
            let r = max_ratio(&got, &want, 1e-6, 1e-6)?;
            assert!(r <= 1.0, "{dtype:?} {}: {r}× tolerance", l.key);
            worst = worst.max(r);
        }
        eprintln!("{dtype:?}: 32 merged weights, worst {worst:.2e}× tolerance");
    }
    Ok(())
}

/// The patched tensor is a graph of the Vars: for L = Σ W ⊙ G, ∂L/∂U = s·G·Dᵀ and ∂L/∂D = s·Uᵀ·G.
#[test]
fn patched_weights_give_analytic_gradients_to_up_and_down() -> R {
    let store = sd1_store()?;
    let (_, set) = trained_set(&store, 2, 1.0)?;
    let backend = LoraBackend::new(&store, UNET_PREFIX, &set, DType::F32, &Device::Cpu)?;
    let s = set.scale();
    let mut worst = 0f32;
    for (i, l) in set.layers().iter().enumerate() {
        let w = backend.tensor(&l.key)?;
        let g = randn(200 + i as u64, 1.0, w.shape())?;
        let loss = (&w * &g)?.sum_all()?;
        let grads = loss.backward()?;
        let g_up = grads.get(l.up.as_tensor()).ok_or("no gradient for up")?;
        let g_down = grads
            .get(l.down.as_tensor())
            .ok_or("no gradient for down")?;
        let g2 = g.flatten_from(1)?;
        let down = l.down.as_tensor().flatten_from(1)?;
        let up = l.up.as_tensor().flatten_from(1)?;
        let want_up = (g2.matmul(&down.t()?)? * s)?;
        let want_down = (up.t()?.matmul(&g2)? * s)?;
        let ru = max_ratio(&g_up.flatten_from(1)?, &want_up, 1e-5, 1e-6)?;
        let rd = max_ratio(&g_down.flatten_from(1)?, &want_down, 1e-5, 1e-6)?;
        assert!(
            ru <= 1.0 && rd <= 1.0,
            "{}: up {ru}×, down {rd}× tolerance",
            l.key
        );
        worst = worst.max(ru).max(rd);
    }
    eprintln!("gradients of 32 layers: worst {worst:.2e}× tolerance");
    Ok(())
}

/// At init (up = 0) the LoRA UNet is the base UNet; after training it is the UNet of the base model with
/// the saved file merged at inference.
#[test]
fn lora_unet_is_the_base_at_init_and_the_merged_model_after() -> R {
    let store = sd1_store()?;
    let cfg = sd1_tiny_unet();
    let dev = Device::Cpu;
    let x = randn(1, 1.0, (2, 4, 8, 8))?;
    let t = Tensor::new(&[999f32, 17.5], &dev)?;
    let ctx = randn(2, 1.0, (2, 5, 16))?;
    let run = |vb: candle_nn::VarBuilder<'static>| -> R<Tensor> {
        let unet = Unet::new(vb.pp("model.diffusion_model"), &cfg)?;
        Ok(unet.forward(&x, &t, &ctx)?)
    };
    let base = run(StrictLoader::new(Arc::new(sd1_store()?)).var_builder(DType::F32, &dev))?;

    let targets = LoraTargets::for_model(&store, Some(&cfg), None);
    let keys = LoraSet::default_keys(&store);
    let set = LoraSet::new(&store, &targets, &keys, &lora_cfg(4, 4.0, 1), &dev)?;
    let backend = LoraBackend::new(&store, UNET_PREFIX, &set, DType::F32, &dev)?;
    // Not bit-exact: patched weights track gradients, so attention takes ldm_models::ops' differentiable softmax
    // and layer norm instead of candle's fused kernels (same maths, other rounding).
    let init = run(backend.var_builder())?;
    let r0 = max_ratio(&init, &base, 1e-4, 1e-5)?;
    assert!(r0 <= 1.0, "not the base model at init: {r0}× tolerance");

    // "training": the optimiser updates the Vars in place; the next build sees them
    for (i, l) in set.layers().iter().enumerate() {
        l.up.set(&randn(300 + i as u64, 0.3, l.up.shape())?)?;
    }
    let trained = run(backend.var_builder())?;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("lora.safetensors");
    save_kohya(&path, &set, &HashMap::new(), DType::F32)?;
    let mut merged = sd1_store()?;
    apply_loras(&mut merged, &targets, &[(path, 1.0)])?;
    let inference = run(StrictLoader::new(Arc::new(merged)).var_builder(DType::F32, &dev))?;
    let r = max_ratio(&trained, &inference, 1e-4, 1e-5)?;
    let moved = max_abs(&trained, &base)?;
    eprintln!(
        "init vs base UNet {r0:.2e}×, trained vs merged-at-inference UNet {r:.2e}× tolerance; the LoRA moved \
         the output by up to {moved:.3}"
    );
    assert!(r <= 1.0, "{r}× tolerance");
    assert!(moved > 1e-2, "the LoRA did not change the output");
    Ok(())
}

#[test]
fn bad_settings_are_refused() -> R {
    let store = sd1_store()?;
    let targets = LoraTargets::for_model(&store, Some(&sd1_tiny_unet()), None);
    let keys = LoraSet::default_keys(&store);
    let dev = Device::Cpu;
    assert!(LoraSet::new(&store, &targets, &keys, &lora_cfg(0, 1.0, 0), &dev).is_err());
    assert!(LoraSet::new(&store, &targets, &keys, &lora_cfg(2, f64::NAN, 0), &dev).is_err());
    assert!(LoraSet::new(&store, &targets, &[], &lora_cfg(2, 1.0, 0), &dev).is_err());
    let norm = vec!["model.diffusion_model.input_blocks.1.1.norm.weight".to_string()];
    let e = LoraSet::new(&store, &targets, &norm, &lora_cfg(2, 1.0, 0), &dev)
        .err()
        .ok_or("accepted a norm")?;
    assert!(e.to_string().contains("norm.weight"), "{e}");
    Ok(())
}

/// Through the whole UNet (differentiable softmax/layer norm of `ldm_models::ops`): every up and down gets a
/// gradient, and central finite differences of L = Σ out ⊙ G in one up and one down element agree with it
/// (f32, h = 1e-2: |fd − g| ≤ max(1e-2·|fd + g|, 1e-3)).
#[test]
fn unet_backward_reaches_every_pair_and_matches_finite_differences() -> R {
    let store = sd1_store()?;
    let cfg = sd1_tiny_unet();
    let dev = Device::Cpu;
    let (_, set) = trained_set(&store, 2, 2.0)?;
    let backend = LoraBackend::new(&store, UNET_PREFIX, &set, DType::F32, &dev)?;
    let x = randn(1, 1.0, (2, 4, 8, 8))?;
    let t = Tensor::new(&[999f32, 17.5], &dev)?;
    let ctx = randn(2, 1.0, (2, 5, 16))?;
    let g = randn(3, 1.0, (2, 4, 8, 8))?;
    let loss = || -> R<Tensor> {
        let unet = Unet::new(backend.var_builder().pp("model.diffusion_model"), &cfg)?;
        Ok((unet.forward(&x, &t, &ctx)? * &g)?.sum_all()?)
    };
    let grads = loss()?.backward()?;
    for l in set.layers() {
        for (what, v) in [("up", &l.up), ("down", &l.down)] {
            let gv = grads
                .get(v.as_tensor())
                .ok_or(format!("{}: no {what} gradient", l.key))?;
            let m = gv.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(m > 0.0, "{}: zero {what} gradient", l.key);
        }
    }
    let h = 1e-2f32;
    let layer = &set.layers()[set.layers().len() / 2];
    for (what, v) in [("up", &layer.up), ("down", &layer.down)] {
        let v0 = v.as_tensor().copy()?;
        let analytic = grads.get(v.as_tensor()).ok_or("no gradient")?;
        let flat = v0.flatten_all()?.to_vec1::<f32>()?;
        let shape = v0.shape().clone();
        let eval = |delta: f32| -> R<f32> {
            let mut p = flat.clone();
            p[1] += delta;
            v.set(&Tensor::from_vec(p, shape.clone(), &dev)?)?;
            Ok(loss()?.to_scalar::<f32>()?)
        };
        let fd = (eval(h)? - eval(-h)?) / (2.0 * h);
        v.set(&v0)?;
        let a = analytic.flatten_all()?.to_vec1::<f32>()?[1];
        eprintln!(
            "{} {what}[1]: finite difference {fd:.5}, backward {a:.5}",
            layer.key
        );
        assert!(
            (fd - a).abs() <= (1e-2 * (fd + a).abs()).max(1e-3),
            "{what}: fd {fd} vs backward {a}"
        );
    }
    Ok(())
}
