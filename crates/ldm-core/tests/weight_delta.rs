//! `WeightStore::add_delta`: patches are summed in f32 and added on load, in the requested dtype; a patch must
//! name a stored weight and have the shape models see.
use candle_core::{DType, Device, Tensor};
use ldm_core::weights::WeightStore;

type R<T = ()> = Result<T, Box<dyn std::error::Error>>;

#[test]
fn deltas_add_up_on_load_in_any_dtype() -> R {
    let dev = Device::Cpu;
    let mut store = WeightStore::new("test");
    let w0 = Tensor::new(&[[1f32, 2.0], [3.0, 4.0]], &dev)?.to_dtype(DType::F16)?;
    store.insert("w", w0);
    store.add_delta("w", &Tensor::new(&[[0.5f32, 0.0], [0.0, -1.0]], &dev)?)?;
    store.add_delta(
        "w",
        &Tensor::new(&[[0.25f32, 1.0], [0.0, 0.0]], &dev)?.to_dtype(DType::BF16)?,
    )?;
    let got = store.load("w", DType::F32, &dev)?.to_vec2::<f32>()?;
    assert_eq!(got, [[1.75, 3.0], [3.0, 3.0]]);
    assert_eq!(store.load("w", DType::F16, &dev)?.dtype(), DType::F16);
    assert_eq!(
        store.dtype("w"),
        Some(DType::F16),
        "the stored dtype is reported"
    );
    Ok(())
}

#[test]
fn a_delta_for_a_missing_key_or_of_another_shape_is_refused() -> R {
    let dev = Device::Cpu;
    let mut store = WeightStore::new("test");
    store.insert("w", Tensor::zeros((2, 2), DType::F32, &dev)?);
    let e = store
        .add_delta("v", &Tensor::zeros((2, 2), DType::F32, &dev)?)
        .err()
        .ok_or("accepted a missing key")?;
    assert!(e.to_string().contains('v'), "{e}");
    let e = store
        .add_delta("w", &Tensor::zeros((4,), DType::F32, &dev)?)
        .err()
        .ok_or("accepted a wrong shape")?;
    assert!(e.to_string().contains("[4]"), "{e}");
    let w = store.load("w", DType::F32, &dev)?.to_vec2::<f32>()?;
    assert_eq!(
        w,
        [[0.0, 0.0], [0.0, 0.0]],
        "a refused delta changed nothing"
    );
    Ok(())
}
