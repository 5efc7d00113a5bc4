//! `ldm train` on models conditioned by concatenation (recipes/tiny): LDM-SR, a noise-augmented upscaler in
//! the SD x4 layout, Stable Diffusion-style inpainting with the paper's text transformer, and the paper's own
//! inpainting model on a VQ first stage. Each trains a few steps on a tiny first stage, writes its grid
//! (input, output, original per row) and exports a model that the inference command for its task runs.
mod common;

use std::path::{Path, PathBuf};

use common::{ldm, ok, write_squares, R};

fn recipes() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../recipes/tiny")
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

fn write_data(dir: &Path) -> R {
    let items: Vec<(String, String, usize)> = [("blue", 2), ("red", 0)]
        .iter()
        .flat_map(|&(class, channel)| {
            (0..4).map(move |i| (format!("{class}-{i}"), format!("a {class} square"), channel))
        })
        .collect();
    write_squares(dir, &items, 777)
}

/// A 4-step autoencoder run from `yaml` (KL or VQ); returns its exported model.
fn autoencoder(dir: &Path, data: &Path, yaml: &str) -> R<PathBuf> {
    let toml = dir.join(format!("{yaml}.toml"));
    std::fs::write(
        &toml,
        format!(
            r#"model = "{yaml}"
[data]
folder = "{data}"
size = 16
holdout = 0.125
[train]
steps = 4
batch_size = 4
lr = 1e-4
checkpoint_every = 4
[loss]
disc_start = 100
disc_channels = 8
disc_layers = 2
"#,
            yaml = s(&recipes().join(yaml)),
            data = s(data)
        ),
    )?;
    let run = dir.join(format!("ae-{yaml}"));
    ok(&ldm(&[
        "train-autoencoder",
        "--config",
        &s(&toml),
        "--out",
        &s(&run),
    ]));
    Ok(run.join("model.safetensors"))
}

/// Trains `yaml` for 3 steps on `first_stage`; returns the run folder.
fn train(dir: &Path, data: &Path, yaml: &str, first_stage: &Path, extra: &str) -> R<PathBuf> {
    let toml = dir.join(format!("{yaml}.toml"));
    std::fs::write(
        &toml,
        format!(
            r#"model = "{yaml}"
first_stage = "{fs}"
[data]
folder = "{data}"
size = 16
[train]
steps = 3
batch_size = 4
lr = 1e-4
cond_drop = 0.1
checkpoint_every = 3
log_every = 1
seed = 5
[sample]
steps = 3
count = 2
cfg_scale = 2.0
prompts = ["a red square"]
{extra}
"#,
            yaml = s(&recipes().join(yaml)),
            fs = s(first_stage),
            data = s(data)
        ),
    )?;
    let run = dir.join(format!("run-{yaml}"));
    let out = ldm(&["train", "--config", &s(&toml), "--out", &s(&run)]);
    ok(&out);
    let log = std::fs::read_to_string(run.join("train.jsonl"))?;
    let losses: Vec<f64> = log
        .lines()
        .filter(|l| l.contains("\"kind\":\"train\""))
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            v.get("loss")?.as_f64()
        })
        .collect();
    assert_eq!(losses.len(), 3, "{log}");
    assert!(
        losses.iter().all(|l| l.is_finite() && *l > 0.0),
        "{losses:?}"
    );
    for f in ["model.safetensors", "model.yaml", "samples.png", "loss.png"] {
        assert!(run.join(f).is_file(), "{yaml}: {f} missing");
    }
    // The grid: one row (input, output, original) per example, 16² tiles with 2-pixel borders.
    assert_eq!(
        png_size(&run.join("samples.png"))?,
        (3 * 18 + 2, 2 * 18 + 2)
    );
    Ok(run)
}

fn png_size(path: &Path) -> R<(u32, u32)> {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path)?));
    let info = decoder.read_info()?.info().clone();
    Ok((info.width, info.height))
}

fn png_pixels(path: &Path) -> R<Vec<u8>> {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path)?));
    let mut reader = decoder.read_info()?;
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf)?;
    buf.truncate(info.buffer_size());
    Ok(buf)
}

fn write_png(path: &Path, side: u32, px: &[u8]) -> R {
    let mut enc = png::Encoder::new(std::fs::File::create(path)?, side, side);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    enc.write_header()?.write_image_data(px)?;
    Ok(())
}

/// An 8² low-res image and a 16² image with a mask of its left half.
fn inputs(dir: &Path) -> R<(PathBuf, PathBuf, PathBuf)> {
    let lr = dir.join("lr.png");
    let px: Vec<u8> = (0..8 * 8 * 3).map(|i| (i * 7 % 256) as u8).collect();
    write_png(&lr, 8, &px)?;
    let image = dir.join("image.png");
    let px: Vec<u8> = (0..16 * 16 * 3).map(|i| (i * 5 % 256) as u8).collect();
    write_png(&image, 16, &px)?;
    let mask = dir.join("mask.png");
    let px: Vec<u8> = (0..16 * 16)
        .flat_map(|i| [if i % 16 < 8 { 255u8 } else { 0 }; 3])
        .collect();
    write_png(&mask, 16, &px)?;
    Ok((lr, image, mask))
}

/// Runs an inference command twice with one seed: a 16² image, the same both times.
fn runs_deterministically(dir: &Path, args: &[&str]) -> R {
    let (a, b) = (dir.join("a.png"), dir.join("b.png"));
    for out in [&a, &b] {
        ok(&ldm(&[
            args,
            &["--steps", "3", "--seed", "9", "-o", &s(out)],
        ]
        .concat()));
    }
    assert_eq!(png_size(&a)?, (16, 16));
    let (pa, pb) = (png_pixels(&a)?, png_pixels(&b)?);
    assert_eq!(pa, pb, "same seed, same image");
    assert!(pa.iter().any(|&p| p != pa[0]), "the image is not constant");
    Ok(())
}

#[test]
fn super_resolution_models_train_and_upscale() -> R {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    write_data(&data)?;
    let ae = autoencoder(dir.path(), &data, "ae-kl-f2.yaml")?;
    let (lr, _, _) = inputs(dir.path())?;

    // LDM-SR: the bicubically degraded image concatenated to z_t.
    let run = train(dir.path(), &data, "ldm-sr.yaml", &ae, "")?;
    let model = s(&run.join("model.safetensors"));
    runs_deterministically(
        dir.path(),
        &["upscale", "--model", &model, "--image", &s(&lr)],
    )?;

    // The SD x4 layout: noise augmentation, the level as class label, text by the paper's transformer.
    let run = train(dir.path(), &data, "ldm-x4.yaml", &ae, "")?;
    let model = s(&run.join("model.safetensors"));
    runs_deterministically(
        dir.path(),
        &[
            "upscale",
            "--model",
            &model,
            "--image",
            &s(&lr),
            "a red square",
        ],
    )?;
    Ok(())
}

#[test]
fn inpainting_models_train_and_inpaint() -> R {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    write_data(&data)?;
    let (_, image, mask) = inputs(dir.path())?;
    let masks = "[masks]\nfull = 0.25\nboxes = [1, 2]\nmin_side = 0.25\nmax_side = 0.75";

    // Stable Diffusion's layout on a KL first stage, with text.
    let kl = autoencoder(dir.path(), &data, "ae-kl-f2.yaml")?;
    let run = train(dir.path(), &data, "ldm-inpaint-sd.yaml", &kl, masks)?;
    let model = s(&run.join("model.safetensors"));
    let args = [
        "inpaint",
        "--model",
        &model,
        "--image",
        &s(&image),
        "--mask",
        &s(&mask),
    ];
    runs_deterministically(
        dir.path(),
        &[&args[..], &["--prompt", "a red square"]].concat(),
    )?;

    // The paper's model (`__is_first_stage__`, l1 loss) on a VQ first stage.
    let vq = autoencoder(dir.path(), &data, "ae-vq-f2.yaml")?;
    let run = train(dir.path(), &data, "ldm-inpaint.yaml", &vq, masks)?;
    let model = s(&run.join("model.safetensors"));
    let args = [
        "inpaint",
        "--model",
        &model,
        "--image",
        &s(&image),
        "--mask",
        &s(&mask),
        "--sampler",
        "ddim",
    ];
    runs_deterministically(dir.path(), &args)?;
    Ok(())
}

#[test]
fn concatenation_models_with_a_mismatched_unet_or_first_stage_are_refused() -> R {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    write_data(&data)?;
    // The paper's inpainting YAML with the KL first stage of ldm-sr.yaml: a posterior cannot be concatenated.
    let vq_yaml = std::fs::read_to_string(recipes().join("ldm-inpaint.yaml"))?;
    let sr_yaml = std::fs::read_to_string(recipes().join("ldm-sr.yaml"))?;
    let kl_first_stage = &sr_yaml[sr_yaml.find("    first_stage_config:").ok_or("kl")?
        ..sr_yaml.find("    cond_stage_config:").ok_or("kl")?];
    let start = vq_yaml.find("    first_stage_config:").ok_or("vq")?;
    let end = vq_yaml.find("    cond_stage_config:").ok_or("vq")?;
    let bad_fs = format!("{}{}{}", &vq_yaml[..start], kl_first_stage, &vq_yaml[end..]);
    // LDM-SR with a UNet that does not take the low-res channels.
    let bad_unet = sr_yaml.replace("in_channels: 5", "in_channels: 2");
    for (name, yaml, needle) in [
        ("bad-fs.yaml", bad_fs, "VQ"),
        ("bad-unet.yaml", bad_unet, "in_channels"),
    ] {
        let path = dir.path().join(name);
        std::fs::write(&path, yaml)?;
        let toml = dir.path().join(format!("{name}.toml"));
        std::fs::write(
            &toml,
            format!(
                "model = \"{}\"\n[data]\nfolder = \"{}\"\nsize = 16\n[train]\nsteps = 1\nbatch_size = 2\nlr = 1e-4\n",
                s(&path),
                s(&data)
            ),
        )?;
        let out = ldm(&[
            "train",
            "--config",
            &s(&toml),
            "--out",
            &s(&dir.path().join(format!("out-{name}"))),
        ]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{name}: {err}");
        assert!(err.contains(needle), "{name}: {err}");
    }
    Ok(())
}
