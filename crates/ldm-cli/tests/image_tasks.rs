//! `ldm img2img` and `ldm inpaint` end to end on the tiny fixture models: they reproduce diffusers' images
//! (fixtures/img2img, tools/fixtures/make_img2img.py; images within 2/255) with A1111's parameters text, and
//! every bad input gets a one-line `error:` naming the problem, exit code 2, no panic and no output file.
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

type R<T = ()> = Result<T, Box<dyn std::error::Error>>;

fn fixture(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures")
        .join(p)
}

fn path(p: &str) -> String {
    fixture(p).display().to_string()
}

fn ldm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ldm"))
        .args(args)
        .output()
        .expect("the ldm binary runs")
}

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

fn png(path: &Path) -> R<(Vec<u8>, String)> {
    let dec = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path)?));
    let mut reader = dec.read_info()?;
    let text = reader
        .info()
        .uncompressed_latin1_text
        .iter()
        .find(|t| t.keyword == "parameters")
        .map(|t| t.text.clone())
        .ok_or("no parameters chunk")?;
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf)?;
    buf.truncate(info.buffer_size());
    Ok((buf, text))
}

fn case(suite: &str, name: &str) -> R<serde_json::Value> {
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("img2img/cases.json"))?)?;
    Ok(cases[suite]
        .as_array()
        .ok_or("suite")?
        .iter()
        .find(|c| c["name"] == name)
        .ok_or("case")?
        .clone())
}

/// Runs `args` + the case's generation flags, and compares the first image with diffusers'.
fn reproduces(suite: &str, name: &str, args: &[&str]) -> R<String> {
    let c = case(suite, name)?;
    let dir = tempfile::tempdir()?;
    let out_png = dir.path().join("out.png");
    let s = |k: &str| c[k].to_string();
    let (steps, cfg, strength, seed) = (s("steps"), s("guidance_scale"), s("strength"), s("seed"));
    let sampler = c["sampler"].as_str().ok_or("sampler")?;
    let prompt = c["prompt"].as_str().ok_or("prompt")?;
    let out_s = out_png.display().to_string();
    let mut all: Vec<&str> = args.to_vec();
    all.extend_from_slice(&[
        "--sampler",
        sampler,
        "--steps",
        &steps,
        "--cfg-scale",
        &cfg,
        "--strength",
        &strength,
        "--seed",
        &seed,
        "--output",
        &out_s,
        "--prompt",
        prompt,
    ]);
    let out = ldm(&all);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let refs = candle_core::safetensors::load(
        fixture("img2img/ref.safetensors"),
        &candle_core::Device::Cpu,
    )?;
    let want: Vec<f32> = refs[&format!("{suite}.{name}.image")]
        .get(0)?
        .permute((1, 2, 0))?
        .flatten_all()?
        .to_vec1()?;
    let (got, text) = png(&out_png)?;
    assert_eq!(got.len(), want.len());
    let worst = got
        .iter()
        .zip(&want)
        .map(|(&g, &w)| (g as f32 - w * 255.0).abs())
        .fold(0.0, f32::max);
    assert!(
        worst <= 2.0,
        "{suite}.{name}: image differs from diffusers by {worst}/255"
    );
    Ok(text)
}

#[test]
fn img2img_reproduces_diffusers_with_a1111_parameters() -> R {
    let text = reproduces(
        "img2img",
        "euler-a-0.3",
        &[
            "img2img",
            "--model",
            &path("sd1-tiny/model.safetensors"),
            "--init-image",
            &path("img2img/init.png"),
        ],
    )?;
    assert_eq!(
        text,
        "a painting of a fox in the snow\nSteps: 10, Sampler: Euler a, CFG scale: 5.0, Seed: 2, Size: 32x32, \
         Model: model, Denoising strength: 0.3"
    );
    Ok(())
}

#[test]
fn inpaint_with_a_plain_model_reproduces_diffusers() -> R {
    reproduces(
        "inpaint4",
        "euler-a-0.75",
        &[
            "inpaint",
            "--model",
            &path("sd1-tiny/model.safetensors"),
            "--image",
            &path("img2img/init.png"),
            "--mask",
            &path("img2img/mask.png"),
        ],
    )?;
    Ok(())
}

#[test]
fn outpainting_by_padding_reproduces_diffusers() -> R {
    let text = reproduces(
        "inpaint9",
        "euler-outpaint",
        &[
            "inpaint",
            "--model",
            &path("sd1-inpaint-tiny/model.safetensors"),
            "--image",
            &path("img2img/init-wide.png"),
            "--pad",
            "0,4,0,4",
        ],
    )?;
    assert!(text.contains("Size: 32x32"), "{text}");
    Ok(())
}

/// Each bad input: exit 2, one line naming the problem, and no output written.
#[test]
fn bad_inputs_are_usage_errors() -> R {
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("out.png");
    let out_s = out.display().to_string();
    let odd = dir.path().join("odd.png");
    ldm_core::image::RgbImage {
        width: 30,
        height: 32,
        data: vec![128; 30 * 32 * 3],
    }
    .save_png(&odd, &[])?;
    let odd_s = odd.display().to_string();
    let text_file = path("img2img/cases.json");
    let missing = dir.path().join("missing.png").display().to_string();
    let (sd1, inp) = (
        path("sd1-tiny/model.safetensors"),
        path("sd1-inpaint-tiny/model.safetensors"),
    );
    let (init, mask, wide) = (
        path("img2img/init.png"),
        path("img2img/mask.png"),
        path("img2img/mask-wide.png"),
    );
    let i2i = |extra: &[&str]| {
        let mut a = vec![
            "img2img", "--model", &sd1, "--steps", "2", "--output", &out_s,
        ];
        a.extend_from_slice(extra);
        a.push("a cat");
        ldm(&a)
    };
    let inpaint = |extra: &[&str]| {
        let mut a = vec![
            "inpaint", "--model", &sd1, "--steps", "2", "--output", &out_s,
        ];
        a.extend_from_slice(extra);
        a.push("a cat");
        ldm(&a)
    };
    for s in ["1.5", "-0.1", "NaN", "inf"] {
        let flag = format!("--strength={s}");
        assert_fails(&i2i(&["--init-image", &init, &flag]), 2, "strength");
        assert_fails(
            &inpaint(&["--image", &init, "--mask", &mask, &flag]),
            2,
            "strength",
        );
    }
    assert_fails(&i2i(&["--init-image", &missing]), 2, "No such file");
    assert_fails(
        &i2i(&["--init-image", &text_file]),
        2,
        "not a readable image",
    );
    assert_fails(&i2i(&["--init-image", &odd_s]), 2, "multiples of 4");
    assert_fails(
        &inpaint(&["--image", &init, "--mask", &wide]),
        2,
        "the mask is 32x24, the image 32x32",
    );
    assert_fails(
        &inpaint(&["--image", &init, "--mask", &missing]),
        2,
        "mask: ",
    );
    assert_fails(
        &inpaint(&["--image", &init, "--mask", &text_file]),
        2,
        "not a readable image",
    );
    assert_fails(
        &inpaint(&["--image", &missing, "--mask", &mask]),
        2,
        "image: ",
    );
    assert_fails(&inpaint(&["--image", &init]), 2, "needs a mask");
    assert_fails(&inpaint(&["--image", &init, "--pad", "1,2"]), 2, "pad");
    assert_fails(&inpaint(&["--image", &init, "--pad", "1"]), 2, "34x34");
    let i2i_inpainting_model = ldm(&[
        "img2img",
        "--model",
        &inp,
        "--init-image",
        &init,
        "--output",
        &out_s,
        "x",
    ]);
    assert_fails(&i2i_inpainting_model, 2, "inpainting model");
    assert!(!out.exists(), "an output was written");
    Ok(())
}

#[test]
fn strength_zero_returns_the_encoded_image() -> R {
    // No step is run: the output is the VAE round trip of the init image (close to it, not equal).
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("same.png");
    let run = ldm(&[
        "img2img",
        "--model",
        &path("sd1-tiny/model.safetensors"),
        "--init-image",
        &path("img2img/init.png"),
        "--strength",
        "0",
        "--seed",
        "1",
        "--output",
        &out.display().to_string(),
        "x",
    ]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let (_, text) = png(&out)?;
    assert!(text.ends_with("Denoising strength: 0.0"), "{text}");
    Ok(())
}
