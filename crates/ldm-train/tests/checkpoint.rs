//! Training checkpoints: bit-exact round trip, atomic writes, clear errors for damaged files, rotation, and a run
//! resumed from a checkpoint that ends bit-identical to the same run done in one go.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use ldm_core::rng::{NoiseRng, TorchRng};
use ldm_train::checkpoint::{
    restore_params, snapshot, temp_path, write_atomic, CheckpointDir, TrainCheckpoint,
};
use ldm_train::ema::Ema;
use ldm_train::grad::{clip_grad_norm, GradAccumulator};
use ldm_train::lr::LrSchedule;
use ldm_train::optim::{AdamW, AdamWConfig};
use ldm_train::TrainError;

const DEV: Device = Device::Cpu;

fn bits(t: &Tensor) -> (DType, Vec<usize>, Vec<u8>) {
    let t = t.flatten_all().expect("flatten");
    let bytes = match t.dtype() {
        DType::F32 => t
            .to_vec1::<f32>()
            .expect("f32")
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::F16 => t
            .to_vec1::<half::f16>()
            .expect("f16")
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::BF16 => t
            .to_vec1::<half::bf16>()
            .expect("bf16")
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        other => panic!("unexpected dtype {other:?}"),
    };
    (t.dtype(), t.dims().to_vec(), bytes)
}

fn assert_same_tensors(what: &str, a: &[(String, Tensor)], b: &[(String, Tensor)]) {
    assert_eq!(a.len(), b.len(), "{what}: count");
    for ((na, ta), (nb, tb)) in a.iter().zip(b) {
        assert_eq!(na, nb, "{what}: names");
        assert_eq!(bits(ta), bits(tb), "{what}: `{na}` differs");
    }
}

fn assert_same_map(what: &str, a: &BTreeMap<String, Tensor>, b: &BTreeMap<String, Tensor>) {
    let a: Vec<_> = a.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    let b: Vec<_> = b.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    assert_same_tensors(what, &a, &b);
}

/// The toy model: linear regression y ≈ x·w + b on 7×4 inputs drawn from the generator each micro-batch.
struct Toy {
    params: Vec<(String, Var)>,
    opt: AdamW,
    ema: Ema,
    rng: TorchRng,
}

const BASE_LR: f64 = 0.05;
const SCHEDULE: LrSchedule = LrSchedule::Cosine {
    warmup_steps: 3,
    total_steps: 20,
    min_lr_ratio: 0.1,
};
const W_TRUE: [f32; 4] = [0.5, -1.5, 2.0, 0.25];

fn adamw_config() -> AdamWConfig {
    AdamWConfig {
        lr: BASE_LR,
        beta1: 0.8,
        beta2: 0.99,
        eps: 1e-7,
        weight_decay: 0.1,
    }
}

impl Toy {
    /// A fresh model; `init` chooses the starting weights (a resumed run overwrites them from the checkpoint).
    fn new(init: f32, seed: u64) -> Self {
        let params = vec![
            (
                "linear.weight".to_string(),
                Var::from_slice(&[init; 4], (4, 1), &DEV).expect("w"),
            ),
            (
                "linear.bias".to_string(),
                Var::from_slice(&[-init], 1, &DEV).expect("b"),
            ),
        ];
        let opt = AdamW::new(params.clone(), adamw_config()).expect("optimizer");
        let ema = Ema::new(&params, 0.95, true).expect("ema");
        Self {
            params,
            opt,
            ema,
            rng: TorchRng::new(seed),
        }
    }

    /// One optimiser step: two micro-batches accumulated, clipping, AdamW with the scheduled rate, EMA.
    fn step(&mut self, step: u64) {
        let vars: Vec<Var> = self.params.iter().map(|(_, v)| v.clone()).collect();
        let w_true = Tensor::from_slice(&W_TRUE, (4, 1), &DEV).expect("w_true");
        let mut acc = GradAccumulator::new(vars.clone());
        for _ in 0..2 {
            let x = Tensor::from_vec(self.rng.randn(28), (7, 4), &DEV).expect("x"); // [7, 4]
            let noise = Tensor::from_vec(self.rng.randn(7), (7, 1), &DEV).expect("noise"); // odd: caches a normal
            let y = (x.matmul(&w_true).expect("xw") + (noise * 0.1).expect("n")).expect("y");
            let pred = x
                .matmul(vars[0].as_tensor())
                .and_then(|p| p.broadcast_add(vars[1].as_tensor()))
                .expect("pred");
            let loss = (pred - y)
                .and_then(|d| d.sqr())
                .and_then(|d| d.mean_all())
                .and_then(|l| l * 0.5) // mean over the two micro-batches
                .expect("loss");
            acc.add(&loss.backward().expect("backward"))
                .expect("accumulate");
        }
        let mut grads = acc.take();
        clip_grad_norm(&mut grads, &vars, 1.0).expect("clip");
        self.opt
            .step(&grads, SCHEDULE.lr_at(step, BASE_LR))
            .expect("adamw");
        self.ema.update().expect("ema");
    }

    fn checkpoint(&self, step: u64) -> TrainCheckpoint {
        TrainCheckpoint {
            model_kind: "toy-linear".into(),
            step,
            config: r#"{"lr": 0.05, "note": "opaque to the checkpoint"}"#.into(),
            rng: BTreeMap::from([("noise".to_string(), self.rng.state())]),
            model: snapshot(&self.params).expect("snapshot"),
            ema: Some(self.ema.state()),
            optimizers: BTreeMap::from([("optim".to_string(), self.opt.state())]),
        }
    }

    fn resume(ckpt: &TrainCheckpoint) -> Self {
        let mut toy = Toy::new(123.0, 999); // deliberately different weights and seed
        restore_params(&toy.params, &ckpt.model).expect("weights");
        toy.opt
            .load_state(&ckpt.optimizers["optim"])
            .expect("optimizer state");
        toy.ema
            .load_state(ckpt.ema.as_ref().expect("ema"))
            .expect("ema state");
        toy.rng = TorchRng::from_state(&ckpt.rng["noise"]).expect("rng");
        toy
    }
}

#[test]
fn resumed_run_equals_straight_run_bit_for_bit() {
    const N: u64 = 6;
    let mut straight = Toy::new(0.0, 7);
    for s in 0..2 * N {
        straight.step(s);
    }

    let dir = tempfile::tempdir().expect("tempdir");
    let ckpts = CheckpointDir::new(dir.path(), 2).expect("dir");
    let mut first = Toy::new(0.0, 7);
    for s in 0..N {
        first.step(s);
    }
    ckpts.save(&first.checkpoint(N)).expect("save");
    drop(first);

    let path = ckpts.latest().expect("list").expect("a checkpoint");
    let ckpt = TrainCheckpoint::load(&path, &DEV).expect("load");
    assert_eq!(ckpt.step, N);
    let mut resumed = Toy::resume(&ckpt);
    for s in ckpt.step..2 * N {
        resumed.step(s);
    }

    assert_same_tensors(
        "weights",
        &snapshot(&straight.params).expect("a"),
        &snapshot(&resumed.params).expect("b"),
    );
    assert_same_tensors("ema", &straight.ema.shadow(), &resumed.ema.shadow());
    let (a, b) = (straight.opt.state(), resumed.opt.state());
    assert_eq!(a.steps, b.steps);
    assert_same_map("exp_avg", &a.exp_avg, &b.exp_avg);
    assert_same_map("exp_avg_sq", &a.exp_avg_sq, &b.exp_avg_sq);
    assert_eq!(straight.rng.state(), resumed.rng.state());
    // The model did learn something, so the comparison is not between two untouched models.
    let w = straight.params[0]
        .1
        .as_tensor()
        .flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .expect("w");
    assert!(w.iter().any(|v| v.abs() > 0.1), "{w:?}");
}

#[test]
fn round_trip_is_bit_exact_for_every_part() {
    let mut toy = Toy::new(0.3, 11);
    for s in 0..4 {
        toy.step(s);
    }
    let mut ckpt = toy.checkpoint(4);
    // Other dtypes and a second generator and optimiser slot.
    ckpt.model.push((
        "half.weight".into(),
        Tensor::new(&[1.5f32, -2.25, 1e-3], &DEV)
            .and_then(|t| t.to_dtype(DType::F16))
            .expect("f16"),
    ));
    ckpt.model.push((
        "bf.weight".into(),
        Tensor::new(&[[0.1f32, 7.0], [-3.0, 1e-5]], &DEV)
            .and_then(|t| t.to_dtype(DType::BF16))
            .expect("bf16"),
    ));
    let mut data_rng = TorchRng::new(5);
    let _ = data_rng.randn(3);
    ckpt.rng.insert("data".into(), data_rng.state());
    ckpt.optimizers.insert("optim_disc".into(), toy.opt.state());

    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ckpt.safetensors");
    ckpt.save(&path).expect("save");
    let back = TrainCheckpoint::load(&path, &DEV).expect("load");

    assert_eq!(back.step, 4);
    assert_eq!(back.model_kind, "toy-linear");
    assert_eq!(back.config, ckpt.config);
    assert_eq!(back.rng, ckpt.rng);
    assert_same_tensors("model", &ckpt.model, &back.model);
    let (ema_a, ema_b) = (ckpt.ema.as_ref().expect("a"), back.ema.as_ref().expect("b"));
    assert_eq!(
        (ema_a.decay, ema_a.num_updates),
        (ema_b.decay, ema_b.num_updates)
    );
    assert_eq!(ema_b.num_updates, Some(4));
    assert_same_tensors("ema", &ema_a.shadow, &ema_b.shadow);
    assert_eq!(
        back.optimizers.keys().collect::<Vec<_>>(),
        ["optim", "optim_disc"]
    );
    for (slot, a) in &ckpt.optimizers {
        let b = &back.optimizers[slot];
        assert_eq!(a.config, b.config);
        assert_eq!(a.steps, b.steps);
        assert_same_map("exp_avg", &a.exp_avg, &b.exp_avg);
        assert_same_map("exp_avg_sq", &a.exp_avg_sq, &b.exp_avg_sq);
    }
    // The file is a plain safetensors file with the documented key layout.
    let file = ldm_core::weights::SafetensorsFile::open(&path).expect("safetensors");
    let mut names: Vec<&str> = file.names().collect();
    names.sort_unstable();
    assert!(names.contains(&"model.linear.weight"));
    assert!(names.contains(&"ema.linear.bias"));
    assert!(names.contains(&"optim.exp_avg.linear.weight"));
    assert!(names.contains(&"optim_disc.exp_avg_sq.linear.bias"));
    assert_eq!(file.metadata()["format"], ldm_train::checkpoint::FORMAT);
    assert_eq!(file.metadata()["step"], "4");
}

fn small_checkpoint(step: u64) -> TrainCheckpoint {
    let toy = Toy::new(0.5, 3);
    toy.checkpoint(step)
}

fn load_err(path: &Path) -> String {
    match TrainCheckpoint::load(path, &DEV) {
        Ok(_) => panic!("{} loaded", path.display()),
        Err(e) => {
            assert!(matches!(e, TrainError::Checkpoint { .. }), "{e:?}");
            e.to_string()
        }
    }
}

#[test]
fn stale_temp_files_are_overwritten_and_never_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("last.safetensors");
    // A leftover of this very pid (overwritten) and one of a killed process (ignored, then cleaned up).
    std::fs::write(temp_path(&path), b"garbage from an interrupted write").expect("stale own");
    let foreign = dir.path().join("last.safetensors.tmp-4000000");
    std::fs::write(&foreign, b"more garbage").expect("stale foreign");
    small_checkpoint(10).save(&path).expect("save");
    assert!(!temp_path(&path).exists(), "the temporary file was renamed");
    assert_eq!(TrainCheckpoint::load(&path, &DEV).expect("load").step, 10);
    let ckpts = CheckpointDir::new(dir.path(), 0).expect("dir");
    assert_eq!(ckpts.remove_stale_temp_files().expect("clean"), 1);
    assert!(!foreign.exists());
    assert!(path.exists());
}

#[test]
fn failed_write_leaves_the_previous_checkpoint_intact() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("last.safetensors");
    small_checkpoint(1).save(&path).expect("save");
    let before = std::fs::read(&path).expect("read");
    // A write that dies half-way (as a full disk would make it).
    let err = write_atomic(&path, |w| {
        use std::io::Write;
        w.write_all(&before[..before.len() / 2]).expect("partial");
        Err(TrainError::invalid("test", "simulated failure"))
    })
    .expect_err("fails");
    assert!(err.to_string().contains("simulated failure"));
    assert_eq!(std::fs::read(&path).expect("read"), before);
    assert!(!temp_path(&path).exists());
    assert_eq!(TrainCheckpoint::load(&path, &DEV).expect("load").step, 1);
}

#[test]
fn damaged_or_foreign_files_give_clear_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ckpt.safetensors");
    small_checkpoint(3).save(&path).expect("save");
    let bytes = std::fs::read(&path).expect("read");

    let truncated = dir.path().join("truncated.safetensors");
    std::fs::write(&truncated, &bytes[..bytes.len() - 7]).expect("write");
    let e = load_err(&truncated);
    assert!(
        e.contains("truncated") && e.contains("truncated.safetensors"),
        "{e}"
    );

    let garbage = dir.path().join("garbage.safetensors");
    std::fs::write(&garbage, b"this is not a checkpoint at all").expect("write");
    let e = load_err(&garbage);
    assert!(e.contains("not a safetensors file"), "{e}");

    // A valid safetensors file that is not ours (a model file without our metadata).
    let model = dir.path().join("model.safetensors");
    candle_core::safetensors::save(
        &std::collections::HashMap::from([("w", Tensor::new(&[1f32], &DEV).expect("t"))]),
        &model,
    )
    .expect("save model");
    let e = load_err(&model);
    assert!(e.contains("not an ldm-rs training checkpoint"), "{e}");

    // Our file with one tensor dropped from the header.
    let missing = dir.path().join("missing.safetensors");
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    let mut header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..8 + n]).expect("header");
    header.remove("model.linear.bias").expect("present");
    let mut h = serde_json::to_vec(&header).expect("json");
    h.resize(h.len() + (8 - h.len() % 8) % 8, b' ');
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(&missing, out).expect("write");
    let e = load_err(&missing);
    assert!(
        e.contains("missing") && e.contains("model.linear.bias"),
        "{e}"
    );
}

#[test]
fn checkpoint_dir_keeps_the_last_n_and_points_last_at_the_newest() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ckpts = CheckpointDir::new(dir.path().join("run"), 2).expect("dir");
    assert_eq!(ckpts.latest().expect("list"), None);
    for step in [100, 200, 300, 400] {
        let p = ckpts.save(&small_checkpoint(step)).expect("save");
        assert_eq!(p, ckpts.step_path(step));
    }
    let steps: Vec<u64> = ckpts
        .step_files()
        .expect("list")
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    assert_eq!(steps, [300, 400]);
    assert!(ckpts.step_path(400).ends_with("step-000400.safetensors"));
    let latest = ckpts.latest().expect("list").expect("some");
    assert_eq!(latest, ckpts.last_path());
    assert_eq!(
        TrainCheckpoint::load(&latest, &DEV).expect("load").step,
        400
    );
    assert_eq!(
        std::fs::read(&latest).expect("last"),
        std::fs::read(ckpts.step_path(400)).expect("step file")
    );
}

/// Not a test on its own: with `LDM_TEST_KILL_DIR` set (by the SIGKILL test below, which runs this test binary
/// as a child process) it saves 4 MB checkpoints into that directory until it is killed.
#[test]
fn helper_process_writes_checkpoints_until_killed() {
    let Ok(dir) = std::env::var("LDM_TEST_KILL_DIR") else {
        return;
    };
    let mut ckpt = small_checkpoint(0);
    let big: Vec<f32> = (0..1 << 20).map(|i| (i as f32).sin()).collect();
    ckpt.model.push((
        "big.weight".into(),
        Tensor::from_vec(big, (1024, 1024), &DEV).expect("big"),
    ));
    let ckpts = CheckpointDir::new(dir, 2).expect("dir");
    for step in 1.. {
        ckpt.step = step;
        ckpts.save(&ckpt).expect("save");
    }
}

#[cfg(unix)]
#[test]
fn sigkill_during_writes_never_leaves_a_corrupt_checkpoint() {
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};
    let exe = std::env::current_exe().expect("test binary");
    let mut killed_mid_write = 0;
    for round in 0..6u64 {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut child = Command::new(&exe)
            .args([
                "helper_process_writes_checkpoints_until_killed",
                "--exact",
                "--test-threads=1",
            ])
            .env("LDM_TEST_KILL_DIR", dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn writer");
        let ckpts = CheckpointDir::new(dir.path(), 2).expect("dir");
        let start = Instant::now();
        while ckpts.latest().expect("list").is_none() {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "writer wrote nothing"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_millis(2 + 5 * round));
        child.kill().expect("SIGKILL");
        child.wait().expect("reap");

        let mut files = 0;
        for entry in std::fs::read_dir(dir.path()).expect("read dir") {
            let path = entry.expect("entry").path();
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            if name.contains(".tmp-") {
                killed_mid_write += 1;
                continue;
            }
            // Every file under a final name is a complete checkpoint.
            let ckpt = TrainCheckpoint::load(&path, &DEV)
                .unwrap_or_else(|e| panic!("round {round}: {name} is damaged: {e}"));
            assert!(ckpt.step >= 1);
            files += 1;
        }
        // (`last.safetensors` may not exist yet if the kill came right after the first step file.)
        assert!(files >= 1, "round {round}: no checkpoint survived");
        let last = TrainCheckpoint::load(&ckpts.latest().expect("list").expect("some"), &DEV)
            .expect("last loads");
        let newest = ckpts
            .step_files()
            .expect("list")
            .pop()
            .expect("step file")
            .0;
        // `last` is replaced right after its step file: it is the newest step or the one before.
        assert!(
            last.step == newest || last.step + 1 == newest,
            "{} vs {newest}",
            last.step
        );
        ckpts.remove_stale_temp_files().expect("clean");
    }
    eprintln!("temporary files left by SIGKILL in {killed_mid_write} of 6 rounds (all ignored)");
}
