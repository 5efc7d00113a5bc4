//! Helpers shared by the training tests: running the binary, and tiny captioned image data.
#![allow(dead_code)]
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub type R<T = ()> = Result<T, Box<dyn std::error::Error>>;

pub fn fixture(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures")
        .join(p)
}

pub fn ldm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ldm"))
        .args(args)
        .output()
        .expect("the ldm binary runs")
}

pub fn ok(out: &Output) {
    assert!(
        out.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One 16² RGB image per `(path, caption, channel)`: a square bright in `channel` on noise (from `seed`),
/// written as `<path>.png` with its caption as `<path>.txt`.
pub fn write_squares(dir: &Path, items: &[(String, String, usize)], seed: u32) -> R {
    let mut state = seed;
    let mut next = || {
        state = state.wrapping_mul(1_103_515_245).wrapping_add(12345);
        (state >> 16) as u8
    };
    for (i, (path, caption, channel)) in items.iter().enumerate() {
        let mut px = vec![0u8; 16 * 16 * 3];
        for y in 0..16 {
            for x in 0..16 {
                let inside = (4..12).contains(&x) && (4..12).contains(&y);
                for c in 0..3 {
                    let base = if inside && c == *channel { 220 } else { 40 };
                    px[(y * 16 + x) * 3 + c] = base / 2 + next() / 4 + (i % 8) as u8 * 2;
                }
            }
        }
        let file = dir.join(format!("{path}.png"));
        if let Some(d) = file.parent() {
            std::fs::create_dir_all(d)?;
        }
        let mut enc = png::Encoder::new(std::fs::File::create(&file)?, 16, 16);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        enc.write_header()?.write_image_data(&px)?;
        std::fs::write(dir.join(format!("{path}.txt")), caption)?;
    }
    Ok(())
}
