//! `TorchRng` against outputs of torch 2.15.0 on the CPU, recorded by tools/fixtures/make_rng.py into
//! fixtures/rng/. Tolerance: none — every float32 must have the same bits.

use std::path::{Path, PathBuf};

use ldm_core::npy::read_npy_f32;
use ldm_core::rng::{NoiseRng, NormalKernel, TorchRng};
use serde_json::Value;

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/rng")
}

struct Tally {
    draws: usize,
    values: usize,
    mismatched_values: usize,
    mismatched_bits: u64,
    failures: Vec<String>,
}

/// Replays every case of one kernel flavour and compares each draw with torch's output.
fn replay(flavour: &str, kernel: NormalKernel) -> Tally {
    let dir = fixture_dir();
    let text = std::fs::read_to_string(dir.join("cases.json")).expect("fixtures/rng/cases.json");
    let manifest: Value = serde_json::from_str(&text).expect("cases.json is JSON");
    let fl = &manifest["flavours"][flavour];
    let file = fl["values"].as_str().expect("values file name");
    let values = read_npy_f32(dir.join(file)).expect("values .npy").data;
    let cases = fl["cases"].as_array().expect("cases");
    assert!(!cases.is_empty());
    let mut t = Tally {
        draws: 0,
        values: 0,
        mismatched_values: 0,
        mismatched_bits: 0,
        failures: vec![],
    };
    for case in cases {
        let name = case["name"].as_str().expect("name");
        let mut rng: Option<TorchRng> = None;
        for op in case["ops"].as_array().expect("ops") {
            let kind = op["op"].as_str().expect("op");
            if kind == "seed" {
                let seed = op["seed"].as_u64().expect("u64 seed");
                match rng.as_mut() {
                    Some(r) => r.manual_seed(seed),
                    None => rng = Some(TorchRng::with_kernel(seed, kernel)),
                }
                continue;
            }
            let r = rng.as_mut().expect("a case seeds before drawing");
            let shape: Vec<usize> = op["shape"]
                .as_array()
                .expect("shape")
                .iter()
                .map(|d| d.as_u64().expect("dim") as usize)
                .collect();
            let n: usize = shape.iter().product();
            let offset = op["offset"].as_u64().expect("offset") as usize;
            let expected = &values[offset..offset + n];
            let got = match kind {
                "randn" => r.randn(n),
                "rand" => r.rand(n),
                other => panic!("unknown op {other}"),
            };
            t.draws += 1;
            t.values += n;
            let mut bad = 0;
            for (g, e) in got.iter().zip(expected) {
                let diff = (g.to_bits() ^ e.to_bits()).count_ones();
                if diff != 0 {
                    bad += 1;
                    t.mismatched_bits += u64::from(diff);
                }
            }
            if bad != 0 {
                t.mismatched_values += bad;
                t.failures.push(format!(
                    "{name}: {kind}{shape:?} has {bad}/{n} differing values"
                ));
            }
        }
    }
    eprintln!(
        "{flavour}: {} draws, {} values compared, {} values / {} bits differ",
        t.draws, t.values, t.mismatched_values, t.mismatched_bits
    );
    t
}

#[test]
fn avx2_kernel_matches_torch_bit_for_bit() {
    let t = replay("avx2", NormalKernel::Avx2);
    assert!(
        t.draws >= 80 && t.values > 50_000,
        "fixture unexpectedly small: {} draws",
        t.draws
    );
    assert_eq!(t.mismatched_bits, 0, "{:#?}", t.failures);
}

#[test]
fn default_kernel_matches_torch_bit_for_bit() {
    let t = replay("default", NormalKernel::Default);
    assert!(
        t.draws >= 80,
        "fixture unexpectedly small: {} draws",
        t.draws
    );
    assert_eq!(t.mismatched_bits, 0, "{:#?}", t.failures);
}

#[test]
fn new_reproduces_the_avx2_kernel_and_noise_rng_matches_randn_into() {
    let mut a = TorchRng::new(42);
    assert_eq!(a.kernel(), NormalKernel::Avx2);
    let via_trait = a.randn(1000);
    let mut b = TorchRng::with_kernel(42, NormalKernel::Avx2);
    let mut buf = vec![0f32; 1000];
    b.randn_into(&mut buf);
    assert_eq!(via_trait, buf);
    assert!(TorchRng::new(1).randn(0).is_empty());
}
