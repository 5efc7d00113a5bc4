//! The `ldm` binary end to end on the tiny fixture models: outputs, reproducibility, and one test per bad input
//! (each a one-line `error:` message naming the problem, a non-zero exit, no panic, nothing clobbered).
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

type R<T = ()> = Result<T, Box<dyn std::error::Error>>;

fn fixture(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures")
        .join(p)
}

fn ldm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ldm"))
        .args(args)
        .output()
        .expect("the ldm binary runs")
}

fn sd1() -> String {
    fixture("sd1-tiny/model.safetensors").display().to_string()
}

/// A small, fast txt2img invocation writing to `out`, with extra flags.
fn txt2img(model: &str, out: &Path, extra: &[&str]) -> Output {
    let out = out.display().to_string();
    let mut args = vec!["txt2img", "--model", model, "--output", &out];
    for (flag, default) in [("--width", "32"), ("--height", "32"), ("--steps", "3")] {
        if !extra.contains(&flag) {
            args.extend_from_slice(&[flag, default]);
        }
    }
    args.extend_from_slice(extra);
    args.push("a red apple");
    ldm(&args)
}

/// Asserts a failed run: exit code `code`, one `error:` line on stderr containing `needle`, no panic.
fn assert_fails(out: &Output, code: i32, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "stderr: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "expected one line, got: {err}");
    assert!(
        lines[0].starts_with("error: ") && lines[0].contains(needle),
        "`{needle}` not in: {err}"
    );
}

fn png_parameters(path: &Path) -> R<String> {
    let dec = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path)?));
    let reader = dec.read_info()?;
    let t = reader
        .info()
        .uncompressed_latin1_text
        .iter()
        .find(|t| t.keyword == "parameters")
        .ok_or("no parameters chunk")?;
    Ok(t.text.clone())
}

fn png_pixels(path: &Path) -> R<Vec<u8>> {
    let dec = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path)?));
    let mut reader = dec.read_info()?;
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf)?;
    buf.truncate(info.buffer_size());
    Ok(buf)
}

#[test]
fn same_seed_same_image_with_a1111_parameters() -> R {
    let dir = tempfile::tempdir()?;
    let (a, b, c) = (
        dir.path().join("a.png"),
        dir.path().join("b.png"),
        dir.path().join("c.png"),
    );
    for (p, seed) in [(&a, "7"), (&b, "7"), (&c, "8")] {
        let out = txt2img(
            &sd1(),
            p,
            &[
                "--seed",
                seed,
                "--negative-prompt",
                "blurry",
                "--cfg-scale",
                "5",
            ],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // Not a terminal: no progress bar; the written path on stdout.
        assert!(
            out.stderr.is_empty(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            p.display().to_string()
        );
    }
    let (pa, pb, pc) = (png_pixels(&a)?, png_pixels(&b)?, png_pixels(&c)?);
    assert_eq!(pa.len(), 32 * 32 * 3);
    assert_eq!(pa, pb, "same seed, different images");
    assert_ne!(pa, pc, "different seeds, same image");
    let min = pa.iter().min().copied().unwrap_or(0);
    let max = pa.iter().max().copied().unwrap_or(0);
    assert!(max > min, "constant image");
    assert_eq!(
        png_parameters(&a)?,
        "a red apple\nNegative prompt: blurry\nSteps: 3, Sampler: Euler a, CFG scale: 5.0, Seed: 7, Size: 32x32, Model: model"
    );
    Ok(())
}

/// `--noise` reproduces diffusers' image for the fixture's `euler-fixed` case through the whole CLI.
#[test]
fn noise_file_reproduces_the_diffusers_image() -> R {
    let refs = candle_core::safetensors::load(
        fixture("sd1-tiny/ref.safetensors"),
        &candle_core::Device::Cpu,
    )?;
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("sd1-tiny/cases.json"))?)?;
    let case = cases["txt2img"]
        .as_array()
        .ok_or("cases")?
        .iter()
        .find(|c| c["name"] == "euler-fixed")
        .ok_or("case")?;
    let dir = tempfile::tempdir()?;
    let noise = &refs["txt2img.euler-fixed.noise"];
    let npy = dir.path().join("noise.npy");
    ldm_core::npy::write_npy_f32(&npy, noise.dims(), &noise.flatten_all()?.to_vec1::<f32>()?)?;
    let out_png = dir.path().join("out.png");
    let steps = case["steps"].to_string();
    let cfg = case["guidance_scale"].to_string();
    let prompt = case["prompt"].as_str().ok_or("prompt")?;
    let out = ldm(&[
        "txt2img",
        "--model",
        &sd1(),
        "--width",
        "32",
        "--height",
        "32",
        "--sampler",
        "euler",
        "--steps",
        &steps,
        "--cfg-scale",
        &cfg,
        "--noise",
        &npy.display().to_string(),
        "--output",
        &out_png.display().to_string(),
        "--prompt",
        prompt,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let want: Vec<f32> = refs["txt2img.euler-fixed.image"]
        .get(0)?
        .permute((1, 2, 0))?
        .flatten_all()?
        .to_vec1()?;
    let got = png_pixels(&out_png)?;
    let worst = got
        .iter()
        .zip(&want)
        .map(|(&g, &w)| (g as f32 - w * 255.0).abs())
        .fold(0.0, f32::max);
    assert!(worst <= 2.0, "image differs from diffusers by {worst}/255");
    Ok(())
}

#[test]
fn batch_writes_numbered_files() -> R {
    let dir = tempfile::tempdir()?;
    let out = txt2img(
        &sd1(),
        &dir.path().join("img.png"),
        &["--batch", "2", "--seed", "1", "--sampler", "ddim"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (a, b) = (dir.path().join("img-0.png"), dir.path().join("img-1.png"));
    assert_ne!(png_pixels(&a)?, png_pixels(&b)?);
    assert!(png_parameters(&b)?.ends_with("Batch size: 2, Batch pos: 1"));
    Ok(())
}

#[test]
fn info_describes_each_form() {
    for (path, want) in [
        ("sd1-tiny/model.safetensors", "SD 1.x, eps-prediction"),
        ("sd1-tiny/model.ckpt", "SD 1.x, eps-prediction"),
        ("sd1-tiny/diffusers", "SD 1.x, eps-prediction"),
        ("sd2v-tiny/model.safetensors", "SD 2.x, v-prediction"),
        ("sd1-inpaint-tiny/model.safetensors", "SD 1.x inpainting"),
    ] {
        let out = ldm(&["info", &fixture(path).display().to_string()]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains(want),
            "{path}: {text}"
        );
        assert!(text.contains("parameters"), "{text}");
    }
}

#[test]
fn missing_file_is_named() -> R {
    let dir = tempfile::tempdir()?;
    let out = txt2img(
        "/nonexistent/model.safetensors",
        &dir.path().join("o.png"),
        &[],
    );
    assert_fails(&out, 1, "/nonexistent/model.safetensors");
    Ok(())
}

#[test]
fn a_file_that_is_not_a_checkpoint_is_named() -> R {
    let dir = tempfile::tempdir()?;
    let notes = dir.path().join("notes.safetensors");
    std::fs::write(&notes, "just some text, certainly not weights")?;
    let out = txt2img(&notes.display().to_string(), &dir.path().join("o.png"), &[]);
    assert_fails(&out, 1, "not a checkpoint");
    Ok(())
}

#[test]
fn truncated_safetensors_is_named() -> R {
    let dir = tempfile::tempdir()?;
    let bytes = std::fs::read(fixture("sd1-tiny/model.safetensors"))?;
    let cut = dir.path().join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() / 2])?;
    let out = txt2img(&cut.display().to_string(), &dir.path().join("o.png"), &[]);
    assert_fails(&out, 1, "truncated safetensors");
    Ok(())
}

#[test]
fn pickle_with_a_forbidden_global_is_refused_without_running_it() -> R {
    let dir = tempfile::tempdir()?;
    for evil in ["pickle/evil_os_system.ckpt", "pickle/evil_popen.ckpt"] {
        let out = txt2img(
            &fixture(evil).display().to_string(),
            &dir.path().join("o.png"),
            &[],
        );
        assert_fails(&out, 1, "forbidden global");
    }
    Ok(())
}

#[test]
fn unsupported_family_is_named() -> R {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("sdxl.safetensors");
    let t = candle_core::Tensor::zeros((2, 2), candle_core::DType::F32, &candle_core::Device::Cpu)?;
    candle_core::safetensors::save(
        &[(
            "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight"
                .to_string(),
            t,
        )]
        .into_iter()
        .collect(),
        &path,
    )?;
    let out = txt2img(&path.display().to_string(), &dir.path().join("o.png"), &[]);
    assert_fails(&out, 1, "SDXL");
    Ok(())
}

#[test]
fn bad_requests_are_usage_errors_and_keep_existing_output() -> R {
    let dir = tempfile::tempdir()?;
    let out_png = dir.path().join("keep.png");
    std::fs::write(&out_png, b"earlier work")?;
    let cases: [(&[&str], &str); 5] = [
        (&["--width", "30"], "width: 30 is not a multiple of 4"),
        (&["--steps", "0"], "steps: must be at least 1"),
        (&["--sampler", "magic"], "unknown sampler `magic`"),
        (
            &["--sampler", "euler-a", "--karras"],
            "has no Karras schedule",
        ),
        (&["--batch", "0"], "batch"),
    ];
    for (extra, needle) in cases {
        let out = txt2img(&sd1(), &out_png, extra);
        assert_fails(&out, 2, needle);
        assert_eq!(std::fs::read(&out_png)?, b"earlier work");
    }
    let out = txt2img(
        &fixture("sd1-inpaint-tiny/model.safetensors")
            .display()
            .to_string(),
        &out_png,
        &[],
    );
    assert_fails(&out, 2, "inpainting model");
    assert_eq!(std::fs::read(&out_png)?, b"earlier work");
    Ok(())
}

/// Presets fix the prediction type where a file cannot tell it. `ldm info` reads only headers, so a file with
/// just the text tower's shape-bearing tensors (64 wide, as real OpenCLIP heads are) is enough.
#[test]
fn config_presets_override_detection() -> R {
    use candle_core::{DType, Device, Tensor};
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("sd2-like.safetensors");
    let p = "cond_stage_model.model.";
    let z = |s: &[usize]| Tensor::zeros(s, DType::F16, &Device::Cpu);
    let tensors: std::collections::HashMap<String, Tensor> = [
        (format!("{p}token_embedding.weight"), z(&[8, 64])?),
        (format!("{p}positional_embedding"), z(&[77, 64])?),
        (format!("{p}transformer.resblocks.0.ln_1.weight"), z(&[64])?),
        (
            format!("{p}transformer.resblocks.0.mlp.c_fc.weight"),
            z(&[256, 64])?,
        ),
        (format!("{p}transformer.resblocks.1.ln_1.weight"), z(&[64])?),
        (
            format!("{p}transformer.resblocks.1.mlp.c_fc.weight"),
            z(&[256, 64])?,
        ),
        (
            "model.diffusion_model.input_blocks.0.0.weight".to_string(),
            z(&[320, 4, 3, 3])?,
        ),
    ]
    .into_iter()
    .collect();
    candle_core::safetensors::save(&tensors, &path)?;
    let file = path.display().to_string();
    for (preset, want) in [
        (None, "SD 2.x, v-prediction"),
        (Some("v2-inference"), "SD 2.x, eps-prediction"),
        (Some("v2-inference-v"), "SD 2.x, v-prediction"),
    ] {
        let mut args = vec!["info", file.as_str()];
        if let Some(p) = preset {
            args.extend_from_slice(&["--config", p]);
        }
        let out = ldm(&args);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains(want),
            "{preset:?}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // A preset of the wrong family is refused, naming both.
    let out = ldm(&["info", &file, "--config", "v1-inference"]);
    assert_fails(
        &out,
        1,
        "the config describes SD 1.x but the weights are SD 2.x",
    );
    Ok(())
}
