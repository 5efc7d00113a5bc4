//! `ldm txt2img --lora FILE[:WEIGHT]` on the tiny SD1 model against diffusers with the same LoRA fused at 0.7
//! (fixtures/lora from tools/fixtures/make_lora.py). Bar: the 8-bit PNG within 2/255 of diffusers' image.
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::Device;

type R<T = ()> = Result<T, Box<dyn std::error::Error>>;

fn fixture(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures")
        .join(p)
}

fn png_pixels(path: &Path) -> R<Vec<u8>> {
    let dec = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path)?));
    let mut reader = dec.read_info()?;
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf)?;
    buf.truncate(info.buffer_size());
    Ok(buf)
}

fn run(lora: &str, out: &Path) -> R<std::process::Output> {
    let model = fixture("sd1-tiny/model.safetensors");
    let case: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("lora/case.json"))?)?;
    let prompt = case["txt2img"]["prompt"].as_str().ok_or("no prompt")?;
    Ok(Command::new(env!("CARGO_BIN_EXE_ldm"))
        .args(["txt2img", "--model"])
        .arg(&model)
        .args(["--lora", lora, "--output"])
        .arg(out)
        .args(["--width", "32", "--height", "32", "--steps", "5"])
        .args(["--sampler", "euler", "--cfg-scale", "5", "--seed", "42"])
        .arg(prompt)
        .output()?)
}

#[test]
fn txt2img_with_lora_weight_matches_diffusers_fuse_lora() -> R {
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("fox.png");
    let lora = format!("{}:0.7", fixture("lora/sd1.safetensors").display());
    let o = run(&lora, &out)?;
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("LoRA: 44 modules merged into 44 weights"),
        "{err}"
    );
    let got = png_pixels(&out)?;
    let refs = candle_core::safetensors::load(fixture("lora/ref.safetensors"), &Device::Cpu)?;
    // [1, 3, 32, 32] in [0, 1] -> HWC bytes
    let want = refs["sd1.txt2img.image"]
        .squeeze(0)?
        .permute((1, 2, 0))?
        .flatten_all()?
        .to_vec1::<f32>()?;
    assert_eq!(got.len(), want.len());
    let worst = got
        .iter()
        .zip(&want)
        .map(|(g, w)| (*g as f32 - w * 255.0).abs())
        .fold(0.0, f32::max);
    eprintln!("PNG vs diffusers: max {worst:.3}/255");
    assert!(worst <= 2.0, "{worst}/255");
    Ok(())
}

#[test]
fn a_bad_lora_is_one_error_line() -> R {
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("x.png");
    // a checkpoint is not a LoRA
    let o = run(
        &fixture("sd1-tiny/model.safetensors").display().to_string(),
        &out,
    )?;
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("error: ") && err.contains("not a kohya LoRA file"),
        "{err}"
    );
    assert!(!out.exists());
    Ok(())
}

/// img2img and inpaint take `--lora` too: weight 0 is the plain model bit for bit, weight 0.7 changes the image.
#[test]
fn img2img_and_inpaint_take_lora() -> R {
    let dir = tempfile::tempdir()?;
    let model = fixture("sd1-tiny/model.safetensors").display().to_string();
    let init = fixture("img2img/init.png").display().to_string();
    let mask = fixture("img2img/mask.png").display().to_string();
    let lora = fixture("lora/sd1.safetensors").display().to_string();
    for task in ["img2img", "inpaint"] {
        let mut images = Vec::new();
        for (i, extra) in [
            vec![],
            vec![format!("{lora}:0")],
            vec![format!("{lora}:0.7")],
        ]
        .into_iter()
        .enumerate()
        {
            let out = dir.path().join(format!("{task}-{i}.png"));
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_ldm"));
            cmd.args([task, "--model", &model, "--steps", "2", "--seed", "1"]);
            match task {
                "img2img" => cmd.args(["--init-image", &init]),
                _ => cmd.args(["--image", &init, "--mask", &mask]),
            };
            for l in &extra {
                cmd.args(["--lora", l]);
            }
            let o = cmd.arg("--output").arg(&out).arg("a cat").output()?;
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            images.push(png_pixels(&out)?);
        }
        assert_eq!(images[0], images[1], "{task}: weight 0 changed the image");
        assert_ne!(
            images[0], images[2],
            "{task}: weight 0.7 left the image unchanged"
        );
    }
    Ok(())
}
