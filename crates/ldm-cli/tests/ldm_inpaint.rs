//! `ldm inpaint` with the paper's own inpainting model (fixtures/ldm-inpaint-tiny, references from the original
//! scripts/inpaint.py by tools/fixtures/make_ldm_inpaint.py): no prompt needed, guidance 1 by default, the saved
//! composite within 2/255 of the original's (float) composite; a prompt or a guidance scale is a one-line error.
use std::path::PathBuf;
use std::process::{Command, Output};

use candle_core::Device;

type R<T = ()> = Result<T, Box<dyn std::error::Error>>;

fn fixture(p: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/ldm-inpaint-tiny")
        .join(p)
        .display()
        .to_string()
}

fn ldm(extra: &[&str], out: &str) -> Output {
    let (model, image, mask) = (
        fixture("model.safetensors"),
        fixture("image.png"),
        fixture("mask_rect.png"),
    );
    let mut args = vec![
        "inpaint",
        "--model",
        &model,
        "--image",
        &image,
        "--mask",
        &mask,
        "--steps",
        "4",
        "--sampler",
        "ddim",
        "--seed",
        "11",
        "-o",
        out,
    ];
    args.extend_from_slice(extra);
    Command::new(env!("CARGO_BIN_EXE_ldm"))
        .args(&args)
        .output()
        .expect("the ldm binary runs")
}

#[test]
fn inpaints_without_a_prompt_like_the_original_script() -> R {
    let tmp = tempfile::tempdir()?;
    let out_path = tmp.path().join("out.png");
    let out = ldm(&[], &out_path.display().to_string());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dec = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&out_path)?));
    let mut reader = dec.read_info()?;
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf)?;
    assert_eq!(info.color_type, png::ColorType::Rgb);
    let (w, h) = (info.width as usize, info.height as usize);
    let refs = candle_core::safetensors::load(fixture("ref.safetensors"), &Device::Cpu)?;
    let want: Vec<f32> = refs["rect.image"].flatten_all()?.to_vec1()?; // [1, 3, 32, 32]
    assert_eq!((w, h), (32, 32));
    let mut worst = 0f32;
    for c in 0..3 {
        for y in 0..h {
            for x in 0..w {
                let got = f32::from(buf[(y * w + x) * 3 + c]);
                let r = want[(c * h + y) * w + x] * 255.0;
                worst = worst.max((got - r).abs());
            }
        }
    }
    eprintln!("ldm inpaint PNG vs original composite: max abs {worst:.3}/255");
    assert!(worst <= 2.0, "{worst}/255");
    Ok(())
}

#[test]
fn a_prompt_or_guidance_is_a_one_line_error() -> R {
    let tmp = tempfile::tempdir()?;
    let out_path = tmp.path().join("out.png");
    let o = out_path.display().to_string();
    for (extra, needle) in [
        (vec!["a red barn"], "prompt"),
        (vec!["--cfg-scale", "5"], "cfg_scale"),
    ] {
        let out = ldm(&extra, &o);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && !err.contains("panicked"), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.starts_with("error: ") && err.contains(needle), "{err}");
        assert!(!out_path.exists());
    }
    Ok(())
}
