//! `ldm train-autoencoder` then `ldm train` then `ldm sample` on a tiny model and tiny data (the recipes in
//! recipes/tiny/): each trainer runs a few steps, writes its log, checkpoints, grids, loss curve and the exported
//! model; the exported LDM (original single-file layout + YAML) samples through the inference command; a run
//! stopped part-way and resumed ends with the same weights as a straight run; a run killed with SIGKILL leaves
//! only loadable checkpoints and resumes; bad recipes get one clear error line.
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{ldm, ok, write_squares, R};

fn recipes() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../recipes/tiny")
}

/// 16² RGB images in two class folders: reddish and bluish squares on noise.
fn write_data(dir: &Path) -> R {
    let items: Vec<(String, String, usize)> = [("blue", 2), ("red", 0)]
        .iter()
        .flat_map(|&(class, channel)| {
            (0..8).map(move |i| (format!("{class}/{i}"), format!("a {class} square"), channel))
        })
        .collect();
    write_squares(dir, &items, 12345)
}

fn write(path: &Path, text: &str) -> R<String> {
    std::fs::write(path, text)?;
    Ok(path.display().to_string())
}

fn ae_recipe(dir: &Path, data: &Path) -> R<String> {
    write(
        &dir.join("ae.toml"),
        &format!(
            r#"model = "{yaml}"
[data]
folder = "{data}"
size = 16
holdout = 0.125
[train]
steps = 4
batch_size = 4
lr = 1e-4
betas = [0.5, 0.9]
weight_decay = 0.0
checkpoint_every = 2
sample_every = 2
log_every = 1
[loss]
disc_start = 2
disc_channels = 8
disc_layers = 2
"#,
            yaml = recipes().join("ae-kl-f2.yaml").display(),
            data = data.display()
        ),
    )
}

fn ldm_recipe(dir: &Path, data: &Path, ae: &Path, steps: u64) -> R<String> {
    recipe_for(dir, "ldm-class.yaml", data, ae, steps)
}

fn recipe_for(dir: &Path, yaml: &str, data: &Path, ae: &Path, steps: u64) -> R<String> {
    write(
        &dir.join(format!("{yaml}.toml")),
        &format!(
            r#"model = "{yaml}"
first_stage = "{ae}"
[data]
folder = "{data}"
labels = "subfolders"
size = 16
[train]
steps = {steps}
batch_size = 4
lr = 1e-4
warmup_steps = 2
ema_decay = 0.99
cond_drop = 0.25
clip_grad_norm = 1.0
checkpoint_every = 2
log_every = 1
seed = 7
[sample]
steps = 4
count = 4
cfg_scale = 2.0
prompts = ["a red square", "a blue square"]
"#,
            yaml = recipes().join(yaml).display(),
            ae = ae.display(),
            data = data.display()
        ),
    )
}

/// The test data and a 4-step autoencoder run on it (its `model.safetensors` is the first stage of the LDMs).
fn trained_autoencoder(dir: &Path) -> R<(PathBuf, PathBuf)> {
    let data = dir.join("data");
    write_data(&data)?;
    let ae_run = dir.join("ae");
    let ae_toml = ae_recipe(dir, &data)?;
    ok(&ldm(&[
        "train-autoencoder",
        "--config",
        &ae_toml,
        "--out",
        &ae_run.display().to_string(),
    ]));
    Ok((data, ae_run))
}

fn train_lines(run: &Path) -> R<usize> {
    Ok(std::fs::read_to_string(run.join("train.jsonl"))?
        .lines()
        .filter(|l| l.contains("\"kind\":\"train\""))
        .count())
}

/// The trained weights (`model.*`) of a run's last checkpoint.
fn checkpoint_weights(run: &Path) -> R<Vec<(String, Vec<u8>)>> {
    let bytes = std::fs::read(run.join("checkpoints/last.safetensors"))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)?;
    let mut out: Vec<(String, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .filter(|(k, _)| k.starts_with("model."))
        .map(|(k, v)| (k, v.data().to_vec()))
        .collect();
    out.sort();
    Ok(out)
}

#[test]
fn autoencoder_then_ldm_then_sampling_from_the_exported_model() -> R {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    write_data(&data)?;
    let ae_run = dir.path().join("ae-run");
    let ae_toml = ae_recipe(dir.path(), &data)?;
    let out = ldm(&[
        "train-autoencoder",
        "--config",
        &ae_toml,
        "--out",
        &ae_run.display().to_string(),
    ]);
    ok(&out);
    for f in [
        "model.safetensors",
        "model.yaml",
        "loss.png",
        "reconstructions.png",
        "samples/recon-000002.png",
    ] {
        assert!(ae_run.join(f).is_file(), "{f} missing");
    }
    assert_eq!(train_lines(&ae_run)?, 4);
    let log = std::fs::read_to_string(ae_run.join("train.jsonl"))?;
    assert!(log.contains("\"psnr\""), "evaluations are logged: {log}");
    assert!(
        log.contains("\"disc_loss\""),
        "the discriminator trains from disc_start"
    );

    let ldm_run = dir.path().join("ldm-run");
    let ldm_toml = ldm_recipe(dir.path(), &data, &ae_run.join("model.safetensors"), 4)?;
    let out = ldm(&[
        "train",
        "--config",
        &ldm_toml,
        "--out",
        &ldm_run.display().to_string(),
    ]);
    ok(&out);
    for f in [
        "model.safetensors",
        "model.yaml",
        "loss.png",
        "samples.png",
        "checkpoints/last.safetensors",
    ] {
        assert!(ldm_run.join(f).is_file(), "{f} missing");
    }
    assert_eq!(train_lines(&ldm_run)?, 4);

    // The exported model is an ordinary LDM checkpoint for the inference commands; its YAML's image_size sets
    // the default output size (8 latents · f 2 = 16 px).
    let img = dir.path().join("s.png");
    let model = ldm_run.join("model.safetensors").display().to_string();
    let args = [
        "sample",
        "--model",
        &model,
        "--class",
        "1",
        "--steps",
        "3",
        "--seed",
        "3",
        "--cfg-scale",
        "2",
    ];
    let out = ldm(&[&args[..], &["-o", &img.display().to_string()]].concat());
    ok(&out);
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&img)?));
    let info = decoder.read_info()?.info().clone();
    assert_eq!((info.width, info.height), (16, 16));

    // A finished run refuses to start over in the same folder.
    let out = ldm(&[
        "train",
        "--config",
        &ldm_toml,
        "--out",
        &ldm_run.display().to_string(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--resume"));
    Ok(())
}

#[test]
fn a_stopped_and_resumed_run_ends_with_the_weights_of_a_straight_run() -> R {
    let dir = tempfile::tempdir()?;
    // A first stage trained for a step is enough: only the LDM run is compared.
    let (data, ae_run) = trained_autoencoder(dir.path())?;
    let toml = ldm_recipe(dir.path(), &data, &ae_run.join("model.safetensors"), 6)?;
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
        "3",
    ]));
    assert!(
        !parts.join("model.safetensors").exists(),
        "a partial run exports nothing"
    );
    ok(&ldm(&["train", "--config", &toml, "--out", &p, "--resume"]));
    let (a, b) = (checkpoint_weights(&straight)?, checkpoint_weights(&parts)?);
    assert!(!a.is_empty());
    assert_eq!(a.len(), b.len());
    for ((ka, va), (kb, vb)) in a.iter().zip(&b) {
        assert_eq!(ka, kb);
        assert!(
            va == vb,
            "{ka} differs between the straight and the resumed run"
        );
    }
    assert_eq!(
        std::fs::read(straight.join("model.safetensors"))?,
        std::fs::read(parts.join("model.safetensors"))?,
        "the exported models are identical"
    );
    Ok(())
}

#[test]
fn bad_recipes_get_one_clear_error() -> R {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    write_data(&data)?;
    let toml = ldm_recipe(
        dir.path(),
        &data,
        &dir.path().join("missing-ae.safetensors"),
        2,
    )?;
    let out = ldm(&[
        "train",
        "--config",
        &toml,
        "--out",
        &dir.path().join("r").display().to_string(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("missing-ae.safetensors"), "{err}");

    let bad = write(
        &dir.path().join("bad.toml"),
        &std::fs::read_to_string(&toml)?.replace("cond_drop = 0.25", "cond_drop = 2"),
    )?;
    let out = ldm(&["train", "--config", &bad]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("cond_drop"), "{err}");

    // An empty data folder.
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty)?;
    let toml = ae_recipe(dir.path(), &empty)?;
    let out = ldm(&[
        "train-autoencoder",
        "--config",
        &toml,
        "--out",
        &dir.path().join("e").display().to_string(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0));
    assert!(err.contains("empty") || err.contains("no images"), "{err}");
    Ok(())
}

/// Waits until the run has written a step checkpoint (or the process ended).
fn wait_for_checkpoint(run: &Path, child: &mut std::process::Child) -> R<bool> {
    let start = std::time::Instant::now();
    while start.elapsed() < std::time::Duration::from_secs(300) {
        if child.try_wait()?.is_some() {
            return Ok(false);
        }
        let found = std::fs::read_dir(run.join("checkpoints"))
            .map(|d| {
                d.flatten().any(|e| {
                    let n = e.file_name().to_string_lossy().into_owned();
                    n.starts_with("step-") && n.ends_with(".safetensors")
                })
            })
            .unwrap_or(false);
        if found {
            return Ok(true);
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    Ok(false)
}

#[test]
fn sigkill_leaves_loadable_checkpoints_and_ctrl_c_saves_and_stops() -> R {
    let dir = tempfile::tempdir()?;
    let (data, ae_run) = trained_autoencoder(dir.path())?;
    let toml = ldm_recipe(
        dir.path(),
        &data,
        &ae_run.join("model.safetensors"),
        100_000,
    )?;

    // SIGKILL in the middle of training (and of checkpoint writes: one every 2 steps).
    let run = dir.path().join("killed");
    let mut child = Command::new(env!("CARGO_BIN_EXE_ldm"))
        .args([
            "train",
            "--config",
            &toml,
            "--out",
            &run.display().to_string(),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    assert!(
        wait_for_checkpoint(&run, &mut child)?,
        "no checkpoint appeared"
    );
    std::thread::sleep(std::time::Duration::from_millis(300));
    child.kill()?; // SIGKILL
    child.wait()?;
    let mut steps = Vec::new();
    for e in std::fs::read_dir(run.join("checkpoints"))? {
        let p = e?.path();
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if name.ends_with(".safetensors") {
            let ck = ldm_train::checkpoint::TrainCheckpoint::load(&p, &candle_core::Device::Cpu)
                .map_err(|e| format!("{name} does not load after SIGKILL: {e}"))?;
            steps.push(ck.step);
        }
    }
    let last = *steps.iter().max().ok_or("no checkpoint files")?;
    // Resuming loses at most the steps since the last checkpoint.
    let stop = (last + 2).to_string();
    let out = ldm(&[
        "train",
        "--config",
        &toml,
        "--out",
        &run.display().to_string(),
        "--resume",
        "--stop-at",
        &stop,
    ]);
    ok(&out);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("at step {last}")),
        "resumed from the last checkpoint: {err}"
    );

    // Ctrl-C (SIGINT): the step finishes, a checkpoint is written, exit code 0.
    let run = dir.path().join("interrupted");
    let mut child = Command::new(env!("CARGO_BIN_EXE_ldm"))
        .args([
            "train",
            "--config",
            &toml,
            "--out",
            &run.display().to_string(),
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    assert!(
        wait_for_checkpoint(&run, &mut child)?,
        "no checkpoint appeared"
    );
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()?;
    assert!(status.success());
    let out = child.wait_with_output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("stopped at step"), "{err}");
    let ck = ldm_train::checkpoint::TrainCheckpoint::load(
        &run.join("checkpoints/last.safetensors"),
        &candle_core::Device::Cpu,
    )?;
    let logged = std::fs::read_to_string(run.join("train.jsonl"))?;
    let last_train = logged
        .lines()
        .filter(|l| l.contains("\"kind\":\"train\""))
        .filter_map(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()?
                .get("step")?
                .as_u64()
        })
        .max();
    assert_eq!(
        last_train,
        Some(ck.step),
        "the checkpoint holds the last completed step"
    );
    assert!(logged.contains("interrupted"));
    Ok(())
}

#[test]
fn a_text_to_image_model_trains_its_own_text_encoder_and_samples_from_prompts() -> R {
    let dir = tempfile::tempdir()?;
    let (data, ae_run) = trained_autoencoder(dir.path())?;
    let toml = recipe_for(
        dir.path(),
        "ldm-text.yaml",
        &data,
        &ae_run.join("model.safetensors"),
        3,
    )?;
    let run = dir.path().join("text");
    let r = run.display().to_string();
    ok(&ldm(&[
        "train",
        "--config",
        &toml,
        "--out",
        &r,
        "--stop-at",
        "1",
    ]));
    let text_weights = |run: &Path| -> R<Vec<(String, Vec<u8>)>> {
        Ok(checkpoint_weights(run)?
            .into_iter()
            .filter(|(k, _)| k.starts_with("model.cond_stage_model.transformer."))
            .collect())
    };
    let after_one = text_weights(&run)?;
    ok(&ldm(&["train", "--config", &toml, "--out", &r, "--resume"]));
    assert!(run.join("samples.png").is_file());
    // The text encoder is trained jointly: its weights move between steps 1 and 3.
    let after_three = text_weights(&run)?;
    assert!(!after_one.is_empty() && after_one.len() == after_three.len());
    assert!(after_one.iter().zip(&after_three).any(|(a, b)| a.1 != b.1));
    let model = run.join("model.safetensors").display().to_string();
    let img = dir.path().join("t.png").display().to_string();
    let args = [
        "txt2img",
        "--model",
        &model,
        "a red square",
        "--steps",
        "3",
        "--cfg-scale",
        "2",
        "--seed",
        "1",
    ];
    ok(&ldm(&[
        &args[..],
        &[
            "--width",
            "16",
            "--height",
            "16",
            "--sampler",
            "ddim",
            "-o",
            &img,
        ],
    ]
    .concat()));
    let first = std::fs::read(&img)?;
    ok(&ldm(&[
        &args[..],
        &[
            "--width",
            "16",
            "--height",
            "16",
            "--sampler",
            "ddim",
            "-o",
            &img,
        ],
    ]
    .concat()));
    assert_eq!(first, std::fs::read(&img)?, "same seed, same image");
    Ok(())
}

/// An uncompressed IDX file (big-endian magic and sizes, then the bytes).
fn idx(magic: u32, dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut out = magic.to_be_bytes().to_vec();
    for d in dims {
        out.extend(d.to_be_bytes());
    }
    out.extend(data);
    out
}

#[test]
fn grey_mnist_style_data_trains_an_rgb_autoencoder() -> R {
    // Eight 16² grey images in MNIST's IDX format for the 3-channel tiny autoencoder: grey is repeated over
    // RGB, as `ldm train` does for its first stage.
    let dir = tempfile::tempdir()?;
    let d = dir.path().join("mnist");
    std::fs::create_dir_all(&d)?;
    let pixels: Vec<u8> = (0..8 * 16 * 16).map(|i| (i * 13 % 251) as u8).collect();
    std::fs::write(
        d.join("train-images-idx3-ubyte"),
        idx(0x0803, &[8, 16, 16], &pixels),
    )?;
    std::fs::write(
        d.join("train-labels-idx1-ubyte"),
        idx(0x0801, &[8], &[0, 1, 2, 3, 4, 5, 6, 7]),
    )?;
    let recipe = |layers: usize| {
        format!(
            "model = \"{}\"\n[data]\nmnist = \"{}\"\nsize = 16\nholdout = 0.25\n[train]\nsteps = 2\nbatch_size = 2\nlr = 1e-4\n[loss]\ndisc_start = 100\ndisc_layers = {layers}\n",
            recipes().join("ae-kl-f2.yaml").display(),
            d.display()
        )
    };
    // The default 3-layer PatchGAN does not fit 16² images: a clear error before training.
    let toml = write(&dir.path().join("ae3.toml"), &recipe(3))?;
    let out = ldm(&[
        "train-autoencoder",
        "--config",
        &toml,
        "--out",
        &dir.path().join("r3").display().to_string(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("disc_layers") && err.contains("24 px"),
        "{err}"
    );
    let toml = write(&dir.path().join("ae.toml"), &recipe(2))?;
    let run = dir.path().join("run");
    let out = ldm(&[
        "train-autoencoder",
        "--config",
        &toml,
        "--out",
        &run.display().to_string(),
    ]);
    ok(&out);
    assert!(run.join("model.safetensors").is_file());
    assert!(String::from_utf8_lossy(&out.stderr).contains("held-out PSNR"));
    Ok(())
}
