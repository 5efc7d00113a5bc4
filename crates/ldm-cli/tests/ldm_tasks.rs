//! `ldm sample`, `ldm layout2img`, `ldm semantic2img` and `ldm upscale` end to end on the tiny CompVis LDM
//! fixtures: they write images with A1111-style parameters (the numbers are proven against the references in
//! ldm-pipeline's ldm_family_parity.rs), the same seed gives the same file, and every bad input gets one
//! `error:` line naming the problem, exit code 2 and no output file.
use std::path::PathBuf;
use std::process::{Command, Output};

type R<T = ()> = Result<T, Box<dyn std::error::Error>>;

fn fixture(p: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures")
        .join(p)
        .display()
        .to_string()
}

fn ldm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ldm"))
        .args(args)
        .output()
        .expect("the ldm binary runs")
}

fn assert_usage_error(out: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "expected one line, got: {err}");
    assert!(
        lines[0].starts_with("error: ") && lines[0].contains(needle),
        "`{needle}` not in: {err}"
    );
}

#[test]
fn sample_class_conditional_is_reproducible_and_records_its_parameters() -> R {
    let dir = tempfile::tempdir()?;
    let model = fixture("ldm-cin-tiny/model.safetensors");
    let run = |name: &str| -> R<Vec<u8>> {
        let out = dir.path().join(name);
        let o = ldm(&[
            "sample",
            "--model",
            &model,
            "--class",
            "7",
            "--steps",
            "4",
            "--cfg-scale",
            "3",
            "--seed",
            "5",
            "--width",
            "32",
            "--height",
            "32",
            "-o",
            out.to_str().ok_or("path")?,
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        Ok(std::fs::read(out)?)
    };
    let a = run("a.png")?;
    let b = run("b.png")?;
    assert_eq!(a, b, "same seed, same file");
    let text = String::from_utf8_lossy(&a);
    assert!(
        text.contains("Steps: 4, Sampler: DDIM, CFG scale: 3.0, Seed: 5, Size: 32x32"),
        "parameters"
    );
    assert!(text.contains("Class: 7"));
    Ok(())
}

#[test]
fn layout_and_semantic_subcommands_write_images() -> R {
    let dir = tempfile::tempdir()?;
    let boxes = dir.path().join("boxes.json");
    std::fs::write(
        &boxes,
        r#"[{"class": 3, "box": [0.1, 0.2, 0.5, 0.9]}, {"class": 7, "box": [0.5, 0, 1, 0.6]}]"#,
    )?;
    let out = dir.path().join("layout.png");
    let o = ldm(&[
        "layout2img",
        "--model",
        &fixture("ldm-layout-tiny/model.safetensors"),
        "--boxes",
        boxes.to_str().ok_or("path")?,
        "--steps",
        "3",
        "--cfg-scale",
        "2",
        "--width",
        "32",
        "--height",
        "32",
        "-o",
        out.to_str().ok_or("path")?,
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.is_file());
    let out = dir.path().join("sem.png");
    let o = ldm(&[
        "semantic2img",
        "--model",
        &fixture("ldm-semantic-tiny/model.safetensors"),
        "--map",
        &fixture("ldm-semantic-tiny/map0.png"),
        "--steps",
        "3",
        "-o",
        out.to_str().ok_or("path")?,
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let img = ldm_core::image::RgbImage::load(&out)?;
    assert_eq!((img.width, img.height), (32, 32), "the map's size");
    Ok(())
}

#[test]
fn bad_inputs_are_usage_errors_without_output() -> R {
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("x.png");
    let o = out.to_str().ok_or("path")?;
    let cin = fixture("ldm-cin-tiny/model.safetensors");
    let layout = fixture("ldm-layout-tiny/model.safetensors");
    let semantic = fixture("ldm-semantic-tiny/model.safetensors");
    // A class index out of range.
    assert_usage_error(
        &ldm(&[
            "sample", "--model", &cin, "--class", "1001", "--steps", "2", "-o", o,
        ]),
        "1001",
    );
    // Guidance on a model without an unconditional input.
    assert_usage_error(
        &ldm(&[
            "semantic2img",
            "--model",
            &semantic,
            "--map",
            &fixture("ldm-semantic-tiny/map0.png"),
            "--cfg-scale",
            "3",
            "-o",
            o,
        ]),
        "guidance",
    );
    // Boxes outside [0, 1], and a file that is not JSON.
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, r#"[{"class": 1, "box": [0.1, 0.2, 1.5, 0.9]}]"#)?;
    assert_usage_error(
        &ldm(&[
            "layout2img",
            "--model",
            &layout,
            "--boxes",
            bad.to_str().ok_or("p")?,
            "-o",
            o,
        ]),
        "outside [0, 1]",
    );
    std::fs::write(&bad, "not json")?;
    assert_usage_error(
        &ldm(&[
            "layout2img",
            "--model",
            &layout,
            "--boxes",
            bad.to_str().ok_or("p")?,
            "-o",
            o,
        ]),
        "boxes",
    );
    // A map that is not an image; a map of another size than asked.
    let not_png = dir.path().join("map.png");
    std::fs::write(&not_png, "plain text")?;
    assert_usage_error(
        &ldm(&[
            "semantic2img",
            "--model",
            &semantic,
            "--map",
            not_png.to_str().ok_or("p")?,
            "-o",
            o,
        ]),
        "map",
    );
    assert_usage_error(
        &ldm(&[
            "semantic2img",
            "--model",
            &semantic,
            "--map",
            &fixture("ldm-semantic-tiny/map0.png"),
            "--width",
            "64",
            "-o",
            o,
        ]),
        "map",
    );
    // The wrong task for the model.
    assert_usage_error(
        &ldm(&["sample", "--model", &layout, "-o", o, "--steps", "2"]),
        "layout",
    );
    assert!(!out.exists(), "no output file after errors");
    Ok(())
}

#[test]
fn upscale_makes_an_image_f_times_larger() -> R {
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("up.png");
    let o = ldm(&[
        "upscale",
        "--model",
        &fixture("ldm-sr-tiny/diffusers"),
        "--image",
        &fixture("img2img/init.png"),
        "--steps",
        "2",
        "--seed",
        "1",
        "-o",
        out.to_str().ok_or("path")?,
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let input =
        ldm_core::image::RgbImage::load(std::path::Path::new(&fixture("img2img/init.png")))?;
    let img = ldm_core::image::RgbImage::load(&out)?;
    assert_eq!((img.width, img.height), (4 * input.width, 4 * input.height));
    // LDM-SR has no unconditional input: guidance is refused; a text file is not an image.
    let o2 = dir.path().join("x.png");
    assert_usage_error(
        &ldm(&[
            "upscale",
            "--model",
            &fixture("ldm-sr-tiny/diffusers"),
            "--image",
            &fixture("img2img/init.png"),
            "--cfg-scale",
            "4",
            "-o",
            o2.to_str().ok_or("path")?,
        ]),
        "guidance",
    );
    assert_usage_error(
        &ldm(&[
            "upscale",
            "--model",
            &fixture("ldm-sr-tiny/diffusers"),
            "--image",
            &fixture("ldm-cin-tiny/model.yaml"),
            "-o",
            o2.to_str().ok_or("path")?,
        ]),
        "image",
    );
    assert!(!o2.exists());
    Ok(())
}

#[test]
fn tiled_decode_flag_gives_the_same_image() -> R {
    let dir = tempfile::tempdir()?;
    let model = fixture("sd1-tiny/model.safetensors");
    let run = |name: &str, extra: &[&str]| -> R<ldm_core::image::RgbImage> {
        let out = dir.path().join(name);
        let mut args = vec![
            "txt2img",
            "--model",
            &model,
            "--width",
            "64",
            "--height",
            "64",
            "--steps",
            "3",
            "--seed",
            "2",
            "-o",
            out.to_str().ok_or("path")?,
            "a red apple",
        ];
        args.extend_from_slice(extra);
        let o = ldm(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        Ok(ldm_core::image::RgbImage::load(&out)?)
    };
    let whole = run("whole.png", &[])?;
    let tiled = run("tiled.png", &["--tile-vae", "32"])?;
    let worst = whole
        .data
        .iter()
        .zip(&tiled.data)
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap_or(0);
    assert!(worst <= 1, "tiled decode differs by {worst}/255");
    let o = dir.path().join("x.png");
    assert_usage_error(
        &ldm(&[
            "txt2img",
            "--model",
            &model,
            "--tile-vae",
            "15",
            "-o",
            o.to_str().ok_or("p")?,
            "x",
        ]),
        "tile_vae",
    );
    Ok(())
}
