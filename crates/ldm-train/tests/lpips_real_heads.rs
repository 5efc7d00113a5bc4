//! The LPIPS heads as the `lpips` PyPI package ships them (fixtures/lpips/vgg-v0.1.pth: lpips 0.1.4's
//! `weights/v0.1/vgg.pth`, a legacy — non-zip — PyTorch pickle, BSD-2-Clause, see fixtures/lpips/LICENSE) read by
//! ldm-rs's restricted unpickler, with a VGG16 of torchvision's real layer widths (random weights: the real ones
//! cannot be fetched here): LPIPS loads, is 0 for identical images, positive and symmetric for different ones.
use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use ldm_train::losses::Lpips;

type R<T = ()> = Result<T, Box<dyn std::error::Error>>;

fn heads_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/lpips/vgg-v0.1.pth")
}

/// torchvision's `vgg16().features` conv layers: (index, in, out).
const VGG16_CONVS: [(usize, usize, usize); 13] = [
    (0, 3, 64),
    (2, 64, 64),
    (5, 64, 128),
    (7, 128, 128),
    (10, 128, 256),
    (12, 256, 256),
    (14, 256, 256),
    (17, 256, 512),
    (19, 512, 512),
    (21, 512, 512),
    (24, 512, 512),
    (26, 512, 512),
    (28, 512, 512),
];

#[test]
fn the_lpips_packages_own_heads_load_and_measure_distances() -> R {
    let dev = Device::Cpu;
    let ckpt = ldm_core::ckpt::read_ckpt(&heads_path())?;
    let heads: HashMap<String, Tensor> = ckpt.tensors.into_iter().collect();
    assert_eq!(heads.len(), 5);
    for (k, c) in [64, 128, 256, 512, 512].iter().enumerate() {
        let w = &heads[&format!("lin{k}.model.1.weight")];
        assert_eq!(w.dims(), [1, *c, 1, 1]);
        // The released heads are non-negative (trained with a clamp) and not all zero.
        let v = w.flatten_all()?.to_vec1::<f32>()?;
        assert!(v.iter().all(|&x| x >= 0.0) && v.iter().any(|&x| x > 0.0));
    }
    let mut vgg = HashMap::new();
    for (i, cin, cout) in VGG16_CONVS {
        let std = (2.0 / (9 * cin) as f64).sqrt();
        vgg.insert(
            format!("features.{i}.weight"),
            Tensor::randn(0f32, std as f32, (cout, cin, 3, 3), &dev)?,
        );
        vgg.insert(
            format!("features.{i}.bias"),
            Tensor::zeros(cout, DType::F32, &dev)?,
        );
    }
    let lpips = Lpips::from_tensors(&vgg, "random vgg16", &heads, "vgg-v0.1.pth", &dev)?;
    let x = Tensor::rand(-1f32, 1., (2, 3, 32, 32), &dev)?;
    let y = Tensor::rand(-1f32, 1., (2, 3, 32, 32), &dev)?;
    let same = lpips.forward(&x, &x)?.flatten_all()?.to_vec1::<f32>()?;
    let xy = lpips.forward(&x, &y)?.flatten_all()?.to_vec1::<f32>()?;
    let yx = lpips.forward(&y, &x)?.flatten_all()?.to_vec1::<f32>()?;
    assert!(same.iter().all(|v| v.abs() < 1e-6), "{same:?}");
    assert!(xy.iter().all(|&v| v > 1e-4), "{xy:?}");
    for (a, b) in xy.iter().zip(&yx) {
        assert!((a - b).abs() <= 1e-5 * a.abs().max(1.0), "{a} vs {b}");
    }
    Ok(())
}
