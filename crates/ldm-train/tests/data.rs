//! The training data layer: image folders, captions and labels, transforms, IDX files, the seeded and
//! resumable loader, the latent cache, and every error case. Test data is written into temporary folders.
//!
//! Values: bytes map to `b/127.5 − 1`, so 0 → −1 and 255 → +1 exactly; lossless formats are compared
//! exactly (|x − y| ≤ 1e-6), JPEG and resampled pixels with a stated tolerance.
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use ldm_core::rng::TorchRng;
use ldm_train::data::{
    find_idx_pair, load_idx_dataset, open_image_folder, read_idx_images, read_idx_labels, Batch,
    ColorMode, Crop, DataReport, Dataset, FolderOptions, IdxOptions, IdxSplit, ImageDataset,
    ImageTransform, LabelSource, LatentCache, Loader, LoaderConfig, LoaderPosition,
    FASHION_MNIST_CLASSES,
};
use ldm_train::TrainError;

type Res = Result<(), Box<dyn std::error::Error>>;

// ---------------------------------------------------------------------------------------------- helpers

fn rgb(path: &Path, w: u32, h: u32, f: impl Fn(u32, u32) -> [u8; 3]) {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).expect("create dir");
    }
    image::RgbImage::from_fn(w, h, |x, y| image::Rgb(f(x, y)))
        .save(path)
        .expect("write image");
}

fn solid(path: &Path, w: u32, h: u32, c: [u8; 3]) {
    rgb(path, w, h, |_, _| c);
}

fn gray(path: &Path, w: u32, h: u32, f: impl Fn(u32, u32) -> u8) {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).expect("create dir");
    }
    image::GrayImage::from_fn(w, h, |x, y| image::Luma([f(x, y)]))
        .save(path)
        .expect("write image");
}

fn write(path: &Path, bytes: &[u8]) {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).expect("create dir");
    }
    std::fs::write(path, bytes).expect("write file");
}

fn open(root: &Path, opts: &FolderOptions) -> (ImageDataset, DataReport) {
    match open_image_folder(root, opts) {
        Ok(r) => r,
        Err(e) => panic!("open_image_folder({}): {e}", root.display()),
    }
}

fn open_err(root: &Path, opts: &FolderOptions) -> String {
    match open_image_folder(root, opts) {
        Ok(_) => panic!("expected an error for {}", root.display()),
        Err(e) => e.to_string(),
    }
}

/// `[C, H, W]` values of example `i`, drawn with `TorchRng::new(seed)`.
fn draw(ds: &impl Dataset, i: usize, seed: u64) -> Vec<Vec<Vec<f32>>> {
    ds.get(i, &mut TorchRng::new(seed))
        .expect("get")
        .image
        .to_vec3::<f32>()
        .expect("to_vec3")
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all()
        .expect("flatten")
        .to_vec1::<f32>()
        .expect("to_vec1")
}

fn close(a: f32, b: f32, tol: f32) -> bool {
    (a - b).abs() <= tol
}

// ---------------------------------------------------------------------------------- folders and pixels

#[test]
fn folder_images_come_out_at_training_size_in_unit_range() -> Res {
    let dir = tempfile::tempdir()?;
    let r = dir.path();
    solid(&r.join("a_white.png"), 40, 30, [255, 255, 255]);
    solid(&r.join("b_black.jpg"), 64, 64, [0, 0, 0]);
    rgb(&r.join("c_ramp.webp"), 20, 50, |x, y| {
        [(x * 12) as u8, (y * 5) as u8, 77]
    });
    gray(&r.join("d_gray.PNG"), 16, 16, |x, _| (x * 16) as u8);
    let (ds, report) = open(r, &FolderOptions::new(ImageTransform::new(16)));
    assert_eq!(report.loaded, 4);
    assert!(report.skipped.is_empty());
    assert_eq!(ds.len(), 4);
    assert_eq!(
        ds.channels(),
        3,
        "a gray image among color ones is expanded to RGB"
    );
    assert_eq!(ds.sample_shape(), (3, 16, 16));
    for i in 0..4 {
        let s = ds.get(i, &mut TorchRng::new(0))?;
        assert_eq!(s.image.dims(), [3, 16, 16]);
        assert_eq!(s.image.dtype(), DType::F32);
        assert!(values(&s.image).iter().all(|v| (-1.0..=1.0).contains(v)));
    }
    // Sorted order: white PNG (exact), black JPEG (lossy but flat), the ramp, the gray image.
    assert!(values(&ds.get(0, &mut TorchRng::new(0))?.image)
        .iter()
        .all(|&v| v == 1.0));
    assert!(values(&ds.get(1, &mut TorchRng::new(0))?.image)
        .iter()
        .all(|&v| close(v, -1.0, 0.02)));
    // The gray image (16×16, no resize): its three channels are equal and equal x·16/127.5 − 1.
    let g = draw(&ds, 3, 0);
    for y in 0..16 {
        for x in 0..16 {
            let want = (x * 16) as f32 / 127.5 - 1.0;
            for ch in &g {
                assert!(
                    close(ch[y][x], want, 1e-6),
                    "gray ({x},{y}): {} vs {want}",
                    ch[y][x]
                );
            }
        }
    }
    Ok(())
}

#[test]
fn captions_and_subfolder_labels_stay_with_their_images() -> Res {
    let dir = tempfile::tempdir()?;
    let r = dir.path();
    solid(&r.join("cat/a.png"), 8, 8, [255, 0, 0]);
    write(&r.join("cat/a.txt"), b"  a red cat \n");
    solid(&r.join("dog/b.JPG"), 8, 8, [0, 255, 0]);
    solid(&r.join("dog/deep/er/c.Png"), 8, 8, [0, 0, 255]);
    write(&r.join("dog/deep/er/c.txt"), "a blue dog ✓".as_bytes());
    write(&r.join("dog/notes.md"), b"not an image");
    write(&r.join(".hidden/x.png"), b"ignored: hidden folder");
    let opts = FolderOptions {
        labels: LabelSource::SubFolders,
        ..FolderOptions::new(ImageTransform::exact(8))
    };
    let (ds, _) = open(r, &opts);
    assert_eq!(
        ds.class_names(),
        Some(&["cat".to_string(), "dog".to_string()][..])
    );
    assert_eq!(ds.num_classes(), Some(2));
    let want = [
        (Some("a red cat"), 0, 0usize),
        (None, 1, 1),
        (Some("a blue dog ✓"), 1, 2),
    ];
    for (i, (caption, label, channel)) in want.into_iter().enumerate() {
        let s = ds.get(i, &mut TorchRng::new(0))?;
        assert_eq!(s.caption.as_deref(), caption, "example {i}");
        assert_eq!(s.label, Some(label), "example {i}");
        // The colored channel is the bright one: the pixels stayed with their caption and label.
        let img = s.image.to_vec3::<f32>()?;
        for (ch, plane) in img.iter().enumerate() {
            let v = plane[4][4];
            assert!(
                close(v, if ch == channel { 1.0 } else { -1.0 }, 0.03),
                "example {i} ch {ch}: {v}"
            );
        }
    }
    Ok(())
}

#[test]
fn rgba_is_composited_on_white() -> Res {
    let dir = tempfile::tempdir()?;
    let r = dir.path();
    // Left column transparent, middle opaque red, right half-transparent black.
    image::RgbaImage::from_fn(3, 3, |x, _| match x {
        0 => image::Rgba([10, 200, 30, 0]),
        1 => image::Rgba([255, 0, 0, 255]),
        _ => image::Rgba([0, 0, 0, 128]),
    })
    .save(r.join("emoji.png"))?;
    let (ds, _) = open(r, &FolderOptions::new(ImageTransform::exact(3)));
    assert_eq!(ds.channels(), 3);
    let img = draw(&ds, 0, 0);
    // (0·128 + 255·127)/255 = 127 → 127/127.5 − 1.
    let half = 127.0 / 127.5 - 1.0;
    for (ch, plane) in img.iter().enumerate() {
        assert_eq!(plane[1][0], 1.0, "transparent → white");
        assert_eq!(plane[1][1], if ch == 0 { 1.0 } else { -1.0 }, "opaque red");
        assert!(
            close(plane[1][2], half, 1e-6),
            "half black over white: {}",
            plane[1][2]
        );
    }
    Ok(())
}

#[test]
fn grayscale_is_kept_one_channel_or_expanded_on_request() -> Res {
    let dir = tempfile::tempdir()?;
    let r = dir.path();
    gray(&r.join("a.png"), 4, 4, |x, y| (x * 60 + y) as u8);
    image::GrayAlphaImage::from_fn(4, 4, |_, _| image::LumaA([0, 0])).save(r.join("b.png"))?;
    let (ds, _) = open(r, &FolderOptions::new(ImageTransform::exact(4)));
    assert_eq!(ds.channels(), 1);
    assert_eq!(ds.sample_shape(), (1, 4, 4));
    assert!(
        values(&ds.get(1, &mut TorchRng::new(0))?.image)
            .iter()
            .all(|&v| v == 1.0),
        "LA over white"
    );
    let opts = FolderOptions {
        color: ColorMode::Rgb,
        ..FolderOptions::new(ImageTransform::exact(4))
    };
    let (rgb_ds, _) = open(r, &opts);
    assert_eq!(rgb_ds.channels(), 3);
    let one = draw(&ds, 0, 0);
    let three = draw(&rgb_ds, 0, 0);
    for plane in &three {
        assert_eq!(plane, &one[0]);
    }
    // And color → gray on request.
    solid(&r.join("c.png"), 4, 4, [255, 255, 255]);
    let opts = FolderOptions {
        color: ColorMode::Gray,
        ..FolderOptions::new(ImageTransform::exact(4))
    };
    let (g, _) = open(r, &opts);
    assert_eq!(g.sample_shape(), (1, 4, 4));
    assert!(values(&g.get(2, &mut TorchRng::new(0))?.image)
        .iter()
        .all(|&v| close(v, 1.0, 1e-6)));
    Ok(())
}

#[test]
fn label_file_with_names_or_integers() -> Res {
    let dir = tempfile::tempdir()?;
    let r = dir.path().join("imgs");
    solid(&r.join("x.png"), 4, 4, [0; 3]);
    solid(&r.join("sub/y, with comma.png"), 4, 4, [0; 3]);
    solid(&r.join("z.png"), 4, 4, [0; 3]);
    let csv = dir.path().join("labels.csv");
    write(
        &csv,
        b"filename,label\n# a comment\n\nz.png,zebra\n\"sub/y, with comma.png\",\"ant\"\n./x.png, yak \n",
    );
    let opts = FolderOptions {
        labels: LabelSource::File(csv),
        ..FolderOptions::new(ImageTransform::exact(4))
    };
    let (ds, _) = open(&r, &opts);
    let names = ["ant", "yak", "zebra"].map(String::from);
    assert_eq!(ds.class_names(), Some(&names[..]));
    // Sorted paths: sub/y…, x, z.
    let labels: Vec<_> = ds.examples().iter().map(|e| e.label).collect();
    assert_eq!(labels, [Some(0), Some(1), Some(2)]);

    let tsv = dir.path().join("labels.tsv");
    write(&tsv, b"x.png\t7\nz.png\t0\nsub/y, with comma.png\t3\n");
    let opts = FolderOptions {
        labels: LabelSource::File(tsv),
        ..FolderOptions::new(ImageTransform::exact(4))
    };
    let (ds, _) = open(&r, &opts);
    assert_eq!(ds.class_names(), None);
    assert_eq!(ds.num_classes(), Some(8));
    let labels: Vec<_> = ds.examples().iter().map(|e| e.label).collect();
    assert_eq!(labels, [Some(3), Some(7), Some(0)]);
    Ok(())
}

// ------------------------------------------------------------------------------------------ transforms

#[test]
fn resize_shorter_side_then_center_crop() -> Res {
    let dir = tempfile::tempdir()?;
    let r = dir.path();
    // 64×32: four vertical bands of 16 columns, black/white/black/white.
    gray(&r.join("bands.png"), 64, 32, |x, _| {
        if (x / 16) % 2 == 1 {
            255
        } else {
            0
        }
    });
    let (ds, _) = open(r, &FolderOptions::new(ImageTransform::new(8)));
    // Shorter side 32 → 8: 16×8, then the center 8 columns (4..12) = bands 1 and 2: white then black.
    assert_eq!(ds.examples()[0].image.width, 16);
    assert_eq!(ds.examples()[0].image.height, 8);
    let img = draw(&ds, 0, 0);
    for row in &img[0] {
        // Away from the band edge (and the bicubic overshoot, clamped) the bands are flat.
        for (x, &v) in row.iter().enumerate() {
            match x {
                1 | 2 => assert!(close(v, 1.0, 0.02), "x={x}: {v}"),
                5 | 6 => assert!(close(v, -1.0, 0.02), "x={x}: {v}"),
                _ => assert!((-1.0..=1.0).contains(&v)),
            }
        }
    }
    Ok(())
}

#[test]
fn random_crop_moves_and_flip_mirrors() -> Res {
    let dir = tempfile::tempdir()?;
    let r = dir.path();
    // Exact 8×8 with a unique value per pixel: any flip or crop is visible.
    gray(&r.join("a.png"), 8, 8, |x, y| (y * 8 + x) as u8 * 3);
    let plain = ImageTransform::exact(8);
    let (ds, _) = open(r, &FolderOptions::new(plain.clone().with_flip(true)));
    let original = draw(&open(r, &FolderOptions::new(plain)).0, 0, 0);
    let mirrored: Vec<Vec<Vec<f32>>> = original
        .iter()
        .map(|p| {
            p.iter()
                .map(|row| row.iter().rev().copied().collect())
                .collect()
        })
        .collect();
    let (mut flipped, mut kept) = (0, 0);
    for seed in 0..64 {
        let img = draw(&ds, 0, seed);
        if img == original {
            kept += 1;
        } else if img == mirrored {
            flipped += 1;
        } else {
            panic!("seed {seed}: neither the image nor its mirror");
        }
        assert_eq!(img, draw(&ds, 0, seed), "same generator, same draw");
    }
    assert!(
        flipped >= 16 && kept >= 16,
        "p = 1/2: {flipped} flipped, {kept} kept of 64"
    );

    // Random crop of a 12×8 image (shorter side already 8: no resize) to 8×8: a window at dx in 0..=4.
    let crop_only = ImageTransform::new(8).with_crop(Crop::Random);
    let dir3 = tempfile::tempdir()?;
    gray(&dir3.path().join("wide.png"), 12, 8, |x, y| {
        (y * 12 + x) as u8 * 2
    });
    let (wide, _) = open(dir3.path(), &FolderOptions::new(crop_only.clone()));
    assert_eq!(
        (
            wide.examples()[0].image.width,
            wide.examples()[0].image.height
        ),
        (12, 8)
    );
    let mut offsets = std::collections::BTreeSet::new();
    for seed in 0..64 {
        let img = draw(&wide, 0, seed);
        // The first value tells the offset: (0·12 + dx)·2/127.5 − 1.
        let dx = ((img[0][0][0] + 1.0) * 127.5 / 2.0).round() as usize;
        assert!(dx <= 4);
        for (y, row) in img[0].iter().enumerate() {
            for (x, &v) in row.iter().enumerate() {
                let want = ((y * 12 + x + dx) * 2) as f32 / 127.5 - 1.0;
                assert!(close(v, want, 1e-6));
            }
        }
        offsets.insert(dx);
    }
    assert_eq!(offsets.len(), 5, "all offsets 0..=4 occur: {offsets:?}");
    // Center crop of the same image: offset round(4/2) = 2.
    let (center, _) = open(dir3.path(), &FolderOptions::new(ImageTransform::new(8)));
    assert!(close(draw(&center, 0, 0)[0][0][0], 4.0 / 127.5 - 1.0, 1e-6));
    Ok(())
}

// ---------------------------------------------------------------------------------------------- loader

fn numbered_folder(n: usize) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for i in 0..n {
        // Pixel (0, 0) encodes the index; the rest is a ramp so flips show.
        gray(&dir.path().join(format!("{i:03}.png")), 6, 6, |x, y| {
            if (x, y) == (0, 0) {
                (i * 10) as u8
            } else {
                (x * 40) as u8
            }
        });
        write(
            &dir.path().join(format!("{i:03}.txt")),
            format!("image {i}").as_bytes(),
        );
    }
    dir
}

fn batches(loader: &mut Loader, ds: &impl Dataset, n: usize) -> Vec<Batch> {
    (0..n)
        .map(|_| loader.next_batch(ds, &Device::Cpu).expect("next_batch"))
        .collect()
}

#[test]
fn loader_batches_shuffle_per_epoch_and_repeat_for_a_seed() -> Res {
    let dir = numbered_folder(10);
    let (ds, _) = open(
        dir.path(),
        &FolderOptions::new(ImageTransform::exact(6).with_flip(true)),
    );
    let cfg = LoaderConfig {
        batch_size: 4,
        shuffle: true,
        drop_last: true,
        seed: 1234,
    };
    let mut a = Loader::new(cfg.clone(), ds.len())?;
    assert_eq!(a.batches_per_epoch(), 2);
    let got = batches(&mut a, &ds, 6);
    for b in &got {
        assert_eq!(b.images.dims(), [4, 1, 6, 6]);
        assert!(values(&b.images).iter().all(|v| (-1.0..=1.0).contains(v)));
        // Captions and labels stay with their example.
        for (k, &i) in b.indices.iter().enumerate() {
            assert_eq!(
                b.captions[k].as_deref(),
                Some(format!("image {i}").as_str())
            );
        }
    }
    // Epochs 0, 0, 1, 1, 2, 2; each epoch's 8 indices are distinct and follow the epoch order.
    assert_eq!(
        got.iter().map(|b| b.epoch).collect::<Vec<_>>(),
        [0, 0, 1, 1, 2, 2]
    );
    for e in 0..3u64 {
        let order = a.epoch_order(e);
        let seen: Vec<usize> = got[2 * e as usize..2 * e as usize + 2]
            .iter()
            .flat_map(|b| b.indices.clone())
            .collect();
        assert_eq!(seen, order[..8]);
        let mut sorted = order.clone();
        sorted.sort();
        assert_eq!(sorted, (0..10).collect::<Vec<_>>());
    }
    assert_ne!(a.epoch_order(0), a.epoch_order(1), "reshuffled every epoch");
    assert_eq!(
        a.epoch_order(0),
        ldm_train::data::randperm(10, &mut TorchRng::new(1234))
    );

    // Same seed → identical batches, pixels included; another seed → another order.
    let mut b = Loader::new(cfg.clone(), ds.len())?;
    for (x, y) in got.iter().zip(batches(&mut b, &ds, 6)) {
        assert_eq!(x.indices, y.indices);
        assert_eq!(values(&x.images), values(&y.images));
    }
    let c = Loader::new(
        LoaderConfig {
            seed: 99,
            ..cfg.clone()
        },
        ds.len(),
    )?;
    assert_ne!(c.epoch_order(0), a.epoch_order(0));

    // Without drop_last the last batch of an epoch is short; without shuffle the order is 0..n.
    let mut d = Loader::new(
        LoaderConfig {
            drop_last: false,
            shuffle: false,
            ..cfg
        },
        ds.len(),
    )?;
    let got = batches(&mut d, &ds, 4);
    let sizes: Vec<usize> = got.iter().map(|b| b.indices.len()).collect();
    assert_eq!(sizes, [4, 4, 2, 4]);
    assert_eq!(got[2].indices, [8, 9]);
    assert_eq!(got[3].indices, [0, 1, 2, 3]);
    assert_eq!(got[3].epoch, 1);
    // Each example's pixel (0,0) — (0,5) if flipped — is its index: the batch holds the right images.
    let imgs = got[0].images.to_vec3::<f32>().ok();
    assert!(imgs.is_none(), "a batch is 4-D");
    let v = got[0]
        .images
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    for (k, &i) in got[0].indices.iter().enumerate() {
        let want = (i * 10) as f32 / 127.5 - 1.0;
        assert!(close(v[k * 36], want, 1e-6) || close(v[k * 36 + 5], want, 1e-6));
    }
    Ok(())
}

#[test]
fn resumed_loader_sees_the_same_batches() -> Res {
    let dir = numbered_folder(7);
    let t = ImageTransform::new(4)
        .with_crop(Crop::Random)
        .with_flip(true);
    let (ds, _) = open(dir.path(), &FolderOptions::new(t));
    let cfg = LoaderConfig {
        batch_size: 3,
        shuffle: true,
        drop_last: false,
        seed: 5,
    };
    let mut straight = Loader::new(cfg.clone(), ds.len())?;
    let all = batches(&mut straight, &ds, 9);

    let mut first = Loader::new(cfg.clone(), ds.len())?;
    let _ = batches(&mut first, &ds, 4); // 3 + 3 + 1 (epoch 0) + 3 (epoch 1)
    let saved = serde_json::to_string(&first.position())?;
    let pos: LoaderPosition = serde_json::from_str(&saved)?;
    assert_eq!(
        pos,
        LoaderPosition {
            epoch: 1,
            index: 3,
            seed: 5,
            dataset_len: 7
        }
    );
    let mut resumed = Loader::resume(cfg.clone(), pos)?;
    let rest = batches(&mut resumed, &ds, 5);
    for (x, y) in all[4..].iter().zip(&rest) {
        assert_eq!((x.epoch, &x.indices), (y.epoch, &y.indices));
        assert_eq!(values(&x.images), values(&y.images), "same crops and flips");
        assert_eq!(x.captions, y.captions);
    }
    // Random transforms vary between epochs for the same example.
    assert_ne!(values(&all[0].images), values(&all[3].images));

    // A position from another seed or another data set is refused.
    let e = Loader::resume(
        LoaderConfig {
            seed: 6,
            ..cfg.clone()
        },
        pos,
    )
    .err();
    assert!(
        matches!(e, Some(TrainError::Invalid { field: "seed", .. })),
        "{e:?}"
    );
    let mut other = Loader::resume(
        cfg,
        LoaderPosition {
            dataset_len: 8,
            ..pos
        },
    )?;
    let e = other
        .next_batch(&ds, &Device::Cpu)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains("8 examples") && e.contains("has 7"), "{e}");
    Ok(())
}

#[test]
fn loader_settings_are_checked() {
    let cfg = LoaderConfig {
        batch_size: 0,
        shuffle: true,
        drop_last: false,
        seed: 0,
    };
    assert!(Loader::new(cfg.clone(), 5).is_err());
    let cfg = LoaderConfig {
        batch_size: 6,
        drop_last: true,
        ..cfg
    };
    let e = Loader::new(cfg.clone(), 5)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains("only 5 examples"), "{e}");
    assert!(Loader::new(
        LoaderConfig {
            drop_last: false,
            ..cfg
        },
        5
    )
    .is_ok());
}

// ------------------------------------------------------------------------------------------ error cases

#[test]
fn empty_folder_is_an_error_naming_it() -> Res {
    let dir = tempfile::tempdir()?;
    let e = open_err(dir.path(), &FolderOptions::new(ImageTransform::new(8)));
    assert!(
        e.contains(&dir.path().display().to_string()) && e.contains("empty"),
        "{e}"
    );
    write(&dir.path().join("readme.txt"), b"hi");
    write(&dir.path().join("sub/data.csv"), b"x");
    let e = open_err(dir.path(), &FolderOptions::new(ImageTransform::new(8)));
    assert!(
        e.contains("no images") && e.contains("2 other files"),
        "{e}"
    );
    let e = open_err(
        &dir.path().join("missing"),
        &FolderOptions::new(ImageTransform::new(8)),
    );
    assert!(e.contains("missing"), "{e}");
    Ok(())
}

#[test]
fn unreadable_images_are_skipped_and_counted_or_fatal_if_all() -> Res {
    let dir = tempfile::tempdir()?;
    let r = dir.path();
    solid(&r.join("good.png"), 8, 8, [9, 9, 9]);
    write(&r.join("broken.png"), b"\x89PNG\r\n\x1a\nnot really");
    write(&r.join("text.jpg"), b"hello");
    let (ds, report) = open(r, &FolderOptions::new(ImageTransform::new(8)));
    assert_eq!(ds.len(), 1);
    assert_eq!(report.loaded, 1);
    let skipped: Vec<PathBuf> = report.skipped.iter().map(|(p, _)| p.clone()).collect();
    assert_eq!(skipped, [r.join("broken.png"), r.join("text.jpg")]);
    assert!(
        report.to_string().contains("1 images loaded, 2 skipped"),
        "{report}"
    );

    std::fs::remove_file(r.join("good.png"))?;
    let e = open_err(r, &FolderOptions::new(ImageTransform::new(8)));
    assert!(
        e.contains("none of the 2 images could be read") && e.contains("broken.png"),
        "{e}"
    );
    Ok(())
}

#[test]
fn mixed_sizes_without_resize_name_two_files() -> Res {
    let dir = tempfile::tempdir()?;
    let r = dir.path();
    solid(&r.join("a.png"), 8, 8, [0; 3]);
    solid(&r.join("b.png"), 8, 8, [0; 3]);
    solid(&r.join("c.png"), 10, 6, [0; 3]);
    let e = open_err(r, &FolderOptions::new(ImageTransform::exact(8)));
    assert!(
        e.contains("a.png is 8×8") && e.contains("c.png is 10×6") && e.contains("resizing is off"),
        "{e}"
    );
    // One size, but not the training size.
    std::fs::remove_file(r.join("c.png"))?;
    let e = open_err(r, &FolderOptions::new(ImageTransform::exact(16)));
    assert!(
        e.contains("a.png") && e.contains("8×8") && e.contains("16×16"),
        "{e}"
    );
    // With resizing on, mixed sizes are fine.
    solid(&r.join("c.png"), 10, 6, [0; 3]);
    assert_eq!(
        open(r, &FolderOptions::new(ImageTransform::new(8))).0.len(),
        3
    );
    Ok(())
}

#[test]
fn label_file_errors_give_the_line() -> Res {
    let dir = tempfile::tempdir()?;
    let r = dir.path().join("imgs");
    solid(&r.join("a.png"), 4, 4, [0; 3]);
    solid(&r.join("b.png"), 4, 4, [0; 3]);
    let csv = dir.path().join("l.csv");
    let with = |text: &str| -> String {
        write(&csv, text.as_bytes());
        let opts = FolderOptions {
            labels: LabelSource::File(csv.clone()),
            ..FolderOptions::new(ImageTransform::exact(4))
        };
        open_err(&r, &opts)
    };
    let e = with("filename,label\na.png,1\nc.png,2\n");
    assert!(
        e.contains("l.csv") && e.contains("line 3") && e.contains("`c.png` is not an image"),
        "{e}"
    );
    let e = with("a.png,1\nb.png,-3\n");
    assert!(e.contains("line 2") && e.contains("bad label `-3`"), "{e}");
    let e = with("a.png,1\n\nb.png,\n");
    assert!(e.contains("line 3") && e.contains("empty label"), "{e}");
    let e = with("a.png,1\nb.png,cat\n");
    assert!(e.contains("line 2") && e.contains("one kind"), "{e}");
    let e = with("a.png 1\n");
    assert!(
        e.contains("line 1") && e.contains("expected `filename,label`"),
        "{e}"
    );
    let e = with("a.png,1\na.png,2\n");
    assert!(e.contains("line 2") && e.contains("first on line 1"), "{e}");
    let e = with("a.png,1\n");
    assert!(
        e.contains("1 images") && e.contains("no label") && e.contains("b.png"),
        "{e}"
    );
    Ok(())
}

#[test]
fn subfolder_labels_need_every_image_in_a_class_folder() -> Res {
    let dir = tempfile::tempdir()?;
    solid(&dir.path().join("cls/a.png"), 4, 4, [0; 3]);
    solid(&dir.path().join("loose.png"), 4, 4, [0; 3]);
    let opts = FolderOptions {
        labels: LabelSource::SubFolders,
        ..FolderOptions::new(ImageTransform::exact(4))
    };
    let e = open_err(dir.path(), &opts);
    assert!(e.contains("loose.png") && e.contains("class folder"), "{e}");
    Ok(())
}

// ------------------------------------------------------------------------------------------------- IDX

fn idx(magic: u32, dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut out = magic.to_be_bytes().to_vec();
    for d in dims {
        out.extend(d.to_be_bytes());
    }
    out.extend(data);
    out
}

fn gz(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(bytes).expect("gzip");
    enc.finish().expect("gzip")
}

#[test]
fn idx_files_read_plain_and_gzipped_with_padding() -> Res {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    // Three 4×4 images: image i has value 10·i + the pixel number.
    let pixels: Vec<u8> = (0..3u8)
        .flat_map(|i| (0..16u8).map(move |p| 10 * i + p))
        .collect();
    write(
        &d.join("train-images-idx3-ubyte.gz"),
        &gz(&idx(0x803, &[3, 4, 4], &pixels)),
    );
    write(
        &d.join("train-labels-idx1-ubyte"),
        &idx(0x801, &[3], &[2, 0, 1]),
    );
    let (images, labels) = find_idx_pair(d, IdxSplit::Train)?;
    let raw = read_idx_images(&images)?;
    assert_eq!((raw.count, raw.rows, raw.cols), (3, 4, 4));
    assert_eq!(raw.pixels, pixels);
    assert_eq!(read_idx_labels(&labels)?, [2, 0, 1]);
    assert!(find_idx_pair(d, IdxSplit::Test).is_err());

    let ds = load_idx_dataset(
        &images,
        Some(&labels),
        &IdxOptions {
            transform: ImageTransform::exact(4),
            ..IdxOptions::native()
        },
    )?;
    assert_eq!(ds.sample_shape(), (1, 4, 4));
    assert_eq!(ds.num_classes(), Some(3));
    let img = draw(&ds, 2, 0);
    assert!(close(img[0][1][2], (20 + 6) as f32 / 127.5 - 1.0, 1e-6));

    // Padding by 2 → 8×8 with a black border, content in the middle.
    let opts = IdxOptions {
        transform: ImageTransform::exact(8),
        pad: 2,
        class_names: None,
    }
    .with_class_names(&["a", "b", "c"]);
    let ds = load_idx_dataset(&images, Some(&labels), &opts)?;
    assert_eq!(ds.sample_shape(), (1, 8, 8));
    let s = ds.get(1, &mut TorchRng::new(0))?;
    assert_eq!(s.label, Some(0));
    let img = s.image.to_vec3::<f32>()?;
    assert_eq!(img[0][0], [-1.0; 8]);
    assert_eq!(img[0][1][3], -1.0);
    assert!(close(img[0][2][2], 10.0 / 127.5 - 1.0, 1e-6));
    assert!(close(img[0][5][5], 25.0 / 127.5 - 1.0, 1e-6));
    assert_eq!(ds.class_names().map(<[String]>::len), Some(3));
    // Resized to 8 instead.
    let ds = load_idx_dataset(
        &images,
        None,
        &IdxOptions {
            transform: ImageTransform::new(8),
            ..IdxOptions::native()
        },
    )?;
    assert_eq!(ds.sample_shape(), (1, 8, 8));
    assert_eq!(ds.get(0, &mut TorchRng::new(0))?.label, None);
    Ok(())
}

#[test]
fn bad_idx_files_are_errors() -> Res {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let full = idx(0x803, &[2, 3, 3], &[7; 18]);
    let check = |name: &str, bytes: &[u8], want: &[&str]| {
        let p = d.join(name);
        write(&p, bytes);
        let e = read_idx_images(&p)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            want.iter().all(|w| e.contains(w)) && e.contains(name),
            "{name}: {e}"
        );
    };
    check(
        "truncated",
        &full[..full.len() - 1],
        &["truncated", "17 data bytes", "needs 18"],
    );
    check("header_only", &full[..10], &["truncated header"]);
    check("tiny", &full[..2], &["too short"]);
    check(
        "labels_as_images",
        &idx(0x801, &[3], &[0, 1, 2]),
        &["magic number 0x00000801", "0x00000803"],
    );
    check("long", &[&full[..], &[0]].concat(), &["1 bytes past"]);
    let z = gz(&full);
    check("truncated.gz", &z[..z.len() - 12], &["gzip"]);
    // Counts of images and labels must agree.
    write(&d.join("i"), &full);
    write(&d.join("l"), &idx(0x801, &[3], &[0, 1, 2]));
    let e = load_idx_dataset(
        &d.join("i"),
        Some(&d.join("l")),
        &IdxOptions {
            transform: ImageTransform::exact(3),
            ..IdxOptions::native()
        },
    )
    .err()
    .map(|e| e.to_string())
    .unwrap_or_default();
    assert!(e.contains("3 labels for the 2 images"), "{e}");
    let l = d.join("short_labels");
    write(&l, &idx(0x801, &[3], &[0, 1]));
    assert!(read_idx_labels(&l)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default()
        .contains("truncated"));
    Ok(())
}

/// Fashion-MNIST from Debian's `dataset-fashion-mnist` (`apt-get install dataset-fashion-mnist`). Skipped,
/// with a note, where the package is not installed.
#[test]
fn fashion_mnist_from_debian_package() -> Res {
    let dir = Path::new("/usr/share/datasets/fashion-mnist");
    if !dir.join("train-images-idx3-ubyte.gz").is_file() {
        eprintln!(
            "note: {} not found (apt-get install dataset-fashion-mnist); test skipped",
            dir.display()
        );
        return Ok(());
    }
    let (images, labels) = find_idx_pair(dir, IdxSplit::Test)?;
    let ds = load_idx_dataset(
        &images,
        Some(&labels),
        &IdxOptions::padded_32().with_class_names(&FASHION_MNIST_CLASSES),
    )?;
    assert_eq!(ds.len(), 10_000);
    assert_eq!(ds.sample_shape(), (1, 32, 32));
    let first: Vec<_> = ds.examples()[..5].iter().map(|e| e.label).collect();
    assert_eq!(first, [Some(9), Some(2), Some(1), Some(1), Some(6)]);
    let (images, labels) = find_idx_pair(dir, IdxSplit::Train)?;
    let raw = read_idx_images(&images)?;
    let labels = read_idx_labels(&labels)?;
    assert_eq!((raw.count, raw.rows, raw.cols), (60_000, 28, 28));
    let mut counts = [0usize; 10];
    for &l in &labels {
        counts[l as usize] += 1;
    }
    assert_eq!(counts, [6000; 10]);
    assert_eq!(labels[..10], [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]);
    // First training image: pixel sum 76247 (numpy on the same file).
    assert_eq!(
        raw.pixels[..784].iter().map(|&b| b as u64).sum::<u64>(),
        76_247
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------- latent cache

#[test]
fn latent_cache_round_trips_and_feeds_the_loader() -> Res {
    let dir = numbered_folder(5);
    let opts = FolderOptions {
        labels: LabelSource::None,
        ..FolderOptions::new(ImageTransform::exact(6).with_flip(true))
    };
    let (ds, _) = open(dir.path(), &opts);
    // A stand-in encoder: 2×2 average pooling, then ×0.5 (a "scale factor").
    let mut cache = LatentCache::encode(&ds, 2, &Device::Cpu, |x| Ok((x.avg_pool2d(2)? * 0.5)?))?;
    assert_eq!(cache.latents().dims(), [5, 1, 3, 3]);
    assert_eq!(cache.captions()[3].as_deref(), Some("image 3"));
    // Encoded without the flip: example i's latent (0,0) averages pixels (0,0) = i·10, (1,0) = (1,1) = 40
    // and (0,1) = 0.
    let lat = cache
        .latents()
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    for i in 0..5 {
        let b = |v: usize| v as f32 / 127.5 - 1.0;
        let want = (b(i * 10) + 2.0 * b(40) + b(0)) / 4.0 * 0.5;
        assert!(
            close(lat[i * 9], want, 1e-6),
            "example {i}: {} vs {want}",
            lat[i * 9]
        );
    }
    cache.info.insert("scale_factor".into(), "0.5".into());
    cache.class_names = Some(vec!["x".into()]);
    let path = dir.path().join("cache.safetensors");
    cache.save(&path)?;
    let back = LatentCache::load(&path)?;
    assert_eq!(values(back.latents()), values(cache.latents()));
    assert_eq!(back.captions(), cache.captions());
    assert_eq!(back.labels(), [None; 5]);
    assert_eq!(
        back.info.get("scale_factor").map(String::as_str),
        Some("0.5")
    );
    assert_eq!(back.class_names, Some(vec!["x".to_string()]));

    // Labels, f16 storage.
    let lat16 = Tensor::arange(0f32, 2.0 * 4.0 * 2.0 * 2.0, &Device::Cpu)?
        .reshape((2, 4, 2, 2))?
        .to_dtype(DType::F16)?;
    let c16 = LatentCache::new(lat16, vec![Some(3), None], vec![None, Some("b".into())])?;
    let p16 = dir.path().join("c16.safetensors");
    c16.save(&p16)?;
    let back = LatentCache::load(&p16)?;
    assert_eq!(back.latents().dtype(), DType::F16);
    assert_eq!(back.labels(), [Some(3), None]);
    assert_eq!(back.captions(), [None, Some("b".to_string())]);
    let mut loader = Loader::new(
        LoaderConfig {
            batch_size: 2,
            shuffle: false,
            drop_last: true,
            seed: 0,
        },
        back.len(),
    )?;
    let b = loader.next_batch(&back, &Device::Cpu)?;
    assert_eq!(b.images.dims(), [2, 4, 2, 2]);
    assert_eq!(b.images.dtype(), DType::F32);
    assert_eq!(
        values(&b.images),
        (0..32).map(|v| v as f32).collect::<Vec<_>>()
    );
    assert_eq!(b.labels_u32(), None);

    // Not a cache / counts that disagree.
    let other = dir.path().join("other.safetensors");
    write(&other, b"garbage");
    assert!(LatentCache::load(&other)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default()
        .contains("not a safetensors"));
    assert!(LatentCache::new(
        Tensor::zeros((2, 1, 1, 1), DType::F32, &Device::Cpu)?,
        vec![None],
        vec![None, None]
    )
    .is_err());
    Ok(())
}

// ------------------------------------------------------------------------------ examples built in code

#[test]
fn float_examples_are_resized_in_their_range() -> Res {
    use ldm_train::data::{Example, HwcImage, Pixels};
    let ex = |v: f32, h: usize, w: usize, name: &str| -> Result<Example, TrainError> {
        Ok(Example {
            image: HwcImage::new(h, w, 3, Pixels::F32(vec![v; h * w * 3]))?,
            caption: Some(name.into()),
            label: Some(1),
            source: PathBuf::from(name),
        })
    };
    // Constant images stay constant through the bicubic resize (weights sum to 1), −1 included.
    let ds = ImageDataset::new(
        vec![
            ex(0.3, 8, 8, "a")?,
            ex(-1.0, 6, 10, "b")?,
            ex(0.75, 4, 4, "c")?,
        ],
        ImageTransform::new(4),
    )?;
    assert_eq!(
        (ds.examples()[1].image.height, ds.examples()[1].image.width),
        (4, 6)
    );
    for (i, want) in [0.3f32, -1.0, 0.75].into_iter().enumerate() {
        let v = values(&ds.get(i, &mut TorchRng::new(0))?.image);
        assert_eq!(v.len(), 48);
        assert!(
            v.iter().all(|&x| close(x, want, 1e-5)),
            "example {i}: {v:?}"
        );
    }
    assert_eq!(ds.num_classes(), Some(2));
    let e = ds
        .get(3, &mut TorchRng::new(0))
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains("example 3 of a data set of 3"), "{e}");
    // Inconsistent buffers and mixed channel counts are refused.
    assert!(HwcImage::new(2, 2, 3, Pixels::U8(vec![0; 11])).is_err());
    assert!(HwcImage::new(2, 2, 4, Pixels::U8(vec![0; 16])).is_err());
    let gray = Example {
        image: HwcImage::new(4, 4, 1, Pixels::U8(vec![0; 16]))?,
        caption: None,
        label: None,
        source: PathBuf::from("g"),
    };
    let e = ImageDataset::new(vec![ex(0.0, 4, 4, "a")?, gray], ImageTransform::new(4))
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains("1 channel(s), but a has 3"), "{e}");
    assert!(ImageDataset::new(vec![], ImageTransform::new(4)).is_err());
    Ok(())
}
