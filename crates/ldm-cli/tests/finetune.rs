//! Fine-tuning an existing Stable Diffusion checkpoint (fixtures/sd1-tiny) on a folder of captioned images with
//! `ldm train`: the full UNet (the first stage and the text encoder stay byte for byte what they were), and LoRA
//! adapters on the attention projections saved as a kohya file that `ldm txt2img --lora FILE:WEIGHT` applies.
//! A LoRA run stopped part-way and resumed writes the same file as a straight run, bit for bit.
mod common;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use common::{fixture, ldm, ok, write_squares, R};

/// Four 16² RGB images (sd1-tiny's VAE has f = 2 and its UNet one down-sampling: sizes in multiples of 4), each
/// with a same-stem caption.
fn write_data(dir: &Path) -> R {
    let captions = [
        "a red square",
        "a blue square",
        "a green square",
        "a red circle",
    ];
    let items: Vec<(String, String, usize)> = captions
        .iter()
        .enumerate()
        .map(|(i, c)| (i.to_string(), c.to_string(), i % 3))
        .collect();
    write_squares(dir, &items, 777)
}

/// A fine-tuning recipe for sd1-tiny (`extra` is appended: a `[lora]` section), with or without `init`.
fn recipe(dir: &Path, name: &str, data: &Path, init: bool, extra: &str) -> R<String> {
    let init_line = if init {
        format!(
            "init = \"{}\"\n",
            fixture("sd1-tiny/model.safetensors").display()
        )
    } else {
        String::new()
    };
    let text = format!(
        r#"model = "{yaml}"
{init_line}[data]
folder = "{data}"
size = 16
[train]
steps = 3
batch_size = 2
lr = 1e-3
cond_drop = 0.25
clip_grad_norm = 1.0
ema_decay = 0.5
checkpoint_every = 1
log_every = 1
seed = 11
[sample]
steps = 2
count = 2
prompts = ["a red square"]
{extra}"#,
        yaml = fixture("sd1-tiny/model.yaml").display(),
        data = data.display(),
    );
    let path = dir.join(name);
    std::fs::write(&path, text)?;
    Ok(path.display().to_string())
}

fn png_pixels(path: &Path) -> R<Vec<u8>> {
    let dec = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path)?));
    let mut reader = dec.read_info()?;
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf)?;
    assert_eq!((info.width, info.height), (16, 16));
    buf.truncate(info.buffer_size());
    Ok(buf)
}

/// `ldm txt2img` of sd1-tiny-like `model` at 16², 2 steps, seed 5, with `extra` arguments; the PNG's pixels.
fn txt2img(model: &Path, extra: &[&str], out: &Path) -> R<Vec<u8>> {
    let model = model.display().to_string();
    let o = out.display().to_string();
    let args = [
        "txt2img", "--model", &model, "--steps", "2", "--seed", "5", "--width", "16", "--height",
        "16", "--output", &o,
    ];
    ok(&ldm(&[&args[..], extra, &["a red square"]].concat()));
    png_pixels(out)
}

#[test]
fn full_fine_tune_changes_only_the_unet_and_the_result_samples() -> R {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    write_data(&data)?;
    let toml = recipe(dir.path(), "full.toml", &data, true, "")?;
    let run = dir.path().join("run");
    ok(&ldm(&[
        "train",
        "--config",
        &toml,
        "--out",
        &run.display().to_string(),
    ]));
    for f in [
        "model.safetensors",
        "model.yaml",
        "samples.png",
        "loss.png",
        "checkpoints/last.safetensors",
    ] {
        assert!(run.join(f).is_file(), "{f} missing");
    }
    let init = candle_core::safetensors::load(fixture("sd1-tiny/model.safetensors"), &Device::Cpu)?;
    let tuned = candle_core::safetensors::load(run.join("model.safetensors"), &Device::Cpu)?;
    let (mut same_frozen, mut changed_unet, mut unet) = (0, 0, 0);
    for (k, t) in &tuned {
        let base = init
            .get(k)
            .ok_or_else(|| format!("{k} is not in the init model"))?;
        // The init file is fp16; the export is f32: compare the exact f32 values (upcasting is exact).
        let a = base.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let b = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let identical =
            a.len() == b.len() && a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits());
        if k.starts_with("model.diffusion_model.") {
            unet += 1;
            changed_unet += usize::from(!identical);
        } else {
            assert!(identical, "{k} changed, but only the UNet is fine-tuned");
            same_frozen += 1;
        }
    }
    eprintln!("{changed_unet}/{unet} UNet tensors changed; {same_frozen} first-stage/text tensors identical");
    assert!(same_frozen > 0 && unet > 0);
    assert!(
        changed_unet * 2 > unet,
        "most UNet tensors move after 3 steps"
    );
    for prefix in ["first_stage_model.", "cond_stage_model."] {
        assert!(
            tuned.keys().any(|k| k.starts_with(prefix)),
            "{prefix} is exported"
        );
    }

    let tuned_img = txt2img(
        &run.join("model.safetensors"),
        &[],
        &dir.path().join("t.png"),
    )?;
    let base_img = txt2img(
        &fixture("sd1-tiny/model.safetensors"),
        &[],
        &dir.path().join("b.png"),
    )?;
    assert_ne!(
        tuned_img, base_img,
        "the fine-tuned model samples differently"
    );
    Ok(())
}

#[test]
fn lora_fine_tune_writes_a_kohya_file_that_txt2img_applies() -> R {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    write_data(&data)?;
    let toml = recipe(
        dir.path(),
        "lora.toml",
        &data,
        true,
        "[lora]\nrank = 2\nalpha = 2.0\n",
    )?;
    let run = dir.path().join("run");
    ok(&ldm(&[
        "train",
        "--config",
        &toml,
        "--out",
        &run.display().to_string(),
    ]));
    let lora = run.join("lora.safetensors");
    assert!(lora.is_file(), "lora.safetensors missing");
    assert!(
        !run.join("model.safetensors").exists(),
        "a LoRA run exports the adapters, not a model"
    );
    assert!(run.join("samples.png").is_file());

    // kohya layout: 32 attention projections, down/up/alpha each, f16 by default.
    let bytes = std::fs::read(&lora)?;
    let st = safetensors::SafeTensors::deserialize(&bytes)?;
    let names = st.names();
    assert_eq!(names.len(), 32 * 3);
    assert!(names
        .iter()
        .all(|n| n.starts_with("lora_unet_") && n.contains("_attn")));
    let down = st.tensor(
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight",
    )?;
    assert_eq!(down.dtype(), safetensors::Dtype::F16);
    assert_eq!(down.shape(), &[2, 16]);
    let up = st.tensor(
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight",
    )?;
    assert!(
        up.data().iter().any(|&b| b != 0),
        "lora_up left zero: the adapters did not train"
    );

    let model = fixture("sd1-tiny/model.safetensors");
    let l1 = format!("{}:1.0", lora.display());
    let l0 = format!("{}:0", lora.display());
    let plain = txt2img(&model, &[], &dir.path().join("p.png"))?;
    let with = txt2img(&model, &["--lora", &l1], &dir.path().join("w.png"))?;
    let zero = txt2img(&model, &["--lora", &l0], &dir.path().join("z.png"))?;
    assert_ne!(
        plain, with,
        "the trained LoRA at weight 1 changes the image"
    );
    assert_eq!(plain, zero, "the LoRA at weight 0 is the plain model");
    Ok(())
}

#[test]
fn a_stopped_and_resumed_lora_run_writes_the_file_of_a_straight_run() -> R {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    write_data(&data)?;
    let toml = recipe(
        dir.path(),
        "lora.toml",
        &data,
        true,
        "[lora]\nrank = 2\nsave_dtype = \"f32\"\n",
    )?;
    let straight = dir.path().join("straight");
    ok(&ldm(&[
        "train",
        "--config",
        &toml,
        "--out",
        &straight.display().to_string(),
    ]));
    let parts = dir.path().join("parts");
    let p = parts.display().to_string();
    ok(&ldm(&[
        "train",
        "--config",
        &toml,
        "--out",
        &p,
        "--stop-at",
        "2",
    ]));
    assert!(!parts.join("lora.safetensors").exists());
    ok(&ldm(&["train", "--config", &toml, "--out", &p, "--resume"]));
    let a = std::fs::read(straight.join("lora.safetensors"))?;
    let b = std::fs::read(parts.join("lora.safetensors"))?;
    assert!(!a.is_empty());
    assert!(
        a == b,
        "the resumed run's LoRA differs from the straight run's"
    );
    Ok(())
}

#[test]
fn a_lora_recipe_without_init_is_one_clear_error() -> R {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    write_data(&data)?;
    let toml = recipe(
        dir.path(),
        "noinit.toml",
        &data,
        false,
        "[lora]\nrank = 2\n",
    )?;
    let out = ldm(&[
        "train",
        "--config",
        &toml,
        "--out",
        &dir.path().join("r").display().to_string(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("lora") && err.contains("init"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    Ok(())
}

/// The example recipes in recipes/finetune/ are valid (their paths are placeholders and are not opened here).
#[test]
fn the_example_fine_tuning_recipes_parse() -> R {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../recipes/finetune");
    let full = ldm_train::recipe::LdmRecipe::load(&dir.join("sd15-full.toml"))?;
    assert!(full.init.is_some() && full.lora.is_none());
    let lora = ldm_train::recipe::LdmRecipe::load(&dir.join("sd15-lora.toml"))?;
    let l = lora.lora.ok_or("no [lora] section")?;
    assert_eq!((l.rank, l.alpha), (8, 4.0));
    Ok(())
}
