//! Safetensors reading and strict loading on small files made here.
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use ldm_core::weights::{SafetensorsFile, StrictLoader, WeightStore};
use ldm_core::Error;

type R = Result<(), Box<dyn std::error::Error>>;

fn write_file(dir: &std::path::Path) -> Result<std::path::PathBuf, Box<dyn std::error::Error>> {
    let path = dir.join("w.safetensors");
    let a = Tensor::arange(0f32, 6.0, &Device::Cpu)?
        .reshape((2, 3))?
        .to_dtype(DType::F16)?;
    let b = Tensor::ones((4,), DType::BF16, &Device::Cpu)?;
    let c = Tensor::arange(0f32, 4.0, &Device::Cpu)?.reshape((2, 2))?;
    candle_core::safetensors::save(
        &[
            ("net.a".to_string(), a),
            ("net.b".to_string(), b),
            ("extra.c".to_string(), c),
        ]
        .into_iter()
        .collect(),
        &path,
    )?;
    Ok(path)
}

#[test]
fn reads_stored_dtypes_and_converts_on_load() -> R {
    let dir = tempfile::tempdir()?;
    let file = Arc::new(SafetensorsFile::open(&write_file(dir.path())?)?);
    assert_eq!(file.dtype("net.a"), Some(DType::F16));
    assert_eq!(file.dtype("net.b"), Some(DType::BF16));
    let mut store = WeightStore::new("w.safetensors");
    store.add_file(&file, "");
    let a = store.load("net.a", DType::F32, &Device::Cpu)?;
    assert_eq!(
        a.to_vec2::<f32>()?,
        vec![vec![0.0, 1.0, 2.0], vec![3.0, 4.0, 5.0]]
    );
    // A declared reshape (same element count) is what models see.
    store.add_from_file("conv.c", &file, "extra.c", Some(vec![2, 2, 1, 1]));
    assert_eq!(store.shape("conv.c"), Some(&[2usize, 2, 1, 1][..]));
    assert_eq!(
        store.load("conv.c", DType::F32, &Device::Cpu)?.dims(),
        &[2, 2, 1, 1]
    );
    Ok(())
}

#[test]
fn truncated_and_foreign_files_are_named() -> R {
    let dir = tempfile::tempdir()?;
    let path = write_file(dir.path())?;
    let bytes = std::fs::read(&path)?;
    let cut = dir.path().join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() - 5])?;
    let err = SafetensorsFile::open(&cut)
        .err()
        .ok_or("truncated file accepted")?;
    assert!(matches!(err, Error::TruncatedSafetensors { .. }), "{err}");
    assert!(err.to_string().contains("cut.safetensors"), "{err}");
    let text = dir.path().join("notes.safetensors");
    std::fs::write(&text, "hello, this is not a checkpoint")?;
    let err = SafetensorsFile::open(&text).err().ok_or("text accepted")?;
    assert!(matches!(err, Error::NotSafetensors { .. }), "{err}");
    let err = SafetensorsFile::open(&dir.path().join("absent.safetensors"))
        .err()
        .ok_or("missing file")?;
    assert!(matches!(err, Error::Io { .. }), "{err}");
    Ok(())
}

#[test]
fn strict_loader_reports_every_problem_at_once() -> R {
    let dir = tempfile::tempdir()?;
    let file = Arc::new(SafetensorsFile::open(&write_file(dir.path())?)?);
    let mut store = WeightStore::new("w.safetensors");
    store.add_file(&file, "");
    let loader = StrictLoader::new(Arc::new(store));
    let vb = loader.var_builder(DType::F32, &Device::Cpu);
    let net = vb.pp("net");
    assert_eq!(net.get((2, 3), "a")?.dims(), &[2, 3]);
    // Wrong shape and missing tensors come back as zeros so that building continues...
    assert_eq!(net.get(5, "b")?.sum_all()?.to_scalar::<f32>()?, 0.0);
    assert_eq!(net.get((7, 7), "absent")?.dims(), &[7, 7]);
    // ...and are all reported together, with `extra.c` unused.
    let report = loader
        .finish(&|_| false)
        .err()
        .ok_or("problems not reported")?;
    assert_eq!(report.missing, vec![("net.absent".to_string(), vec![7, 7])]);
    assert_eq!(
        report.mismatched,
        vec![("net.b".to_string(), vec![5], vec![4])]
    );
    assert_eq!(report.unused, vec!["extra.c".to_string()]);
    let msg = report.to_string();
    assert!(
        msg.contains("1 missing") && msg.contains("wrong shape") && msg.contains("`extra.c`"),
        "{msg}"
    );
    // An allow-list lets known extras stay unused.
    let report = loader
        .finish(&|k| k.starts_with("extra."))
        .err()
        .ok_or("missing not reported")?;
    assert!(report.unused.is_empty());
    Ok(())
}

#[test]
fn keep_stored_dtype_hands_out_half_precision_matrices_only() -> R {
    let dir = tempfile::tempdir()?;
    let file = Arc::new(SafetensorsFile::open(&write_file(dir.path())?)?);
    let mut store = WeightStore::new("w.safetensors");
    store.add_file(&file, "");
    let store = Arc::new(store);
    let dev = Device::Cpu;
    let get = |keep: bool| -> Result<(Tensor, Tensor, Tensor), Box<dyn std::error::Error>> {
        let vb = StrictLoader::new(store.clone())
            .keep_stored_dtype(keep)
            .var_builder(DType::F32, &dev);
        Ok((
            vb.get((2, 3), "net.a")?,
            vb.get(4, "net.b")?,
            vb.get((2, 2), "extra.c")?,
        ))
    };
    let (a, b, c) = get(true)?;
    // The f16 matrix stays f16; the bf16 vector (rank 1) and the f32 matrix come as asked.
    assert_eq!(
        (a.dtype(), b.dtype(), c.dtype()),
        (DType::F16, DType::F32, DType::F32)
    );
    let (a32, b32, c32) = get(false)?;
    assert_eq!(a32.dtype(), DType::F32);
    // Widening later gives exactly what widening at load gives.
    assert_eq!(
        a.to_dtype(DType::F32)?.to_vec2::<f32>()?,
        a32.to_vec2::<f32>()?
    );
    assert_eq!(b.to_vec1::<f32>()?, b32.to_vec1::<f32>()?);
    assert_eq!(c.to_vec2::<f32>()?, c32.to_vec2::<f32>()?);
    // Asking for f16 itself is unaffected, and so is a second read of the same tensor (its pages were dropped
    // from the process after the first copy and come back from the page cache).
    let again = store.load("net.a", DType::F32, &dev)?;
    assert_eq!(again.to_vec2::<f32>()?, a32.to_vec2::<f32>()?);
    Ok(())
}
