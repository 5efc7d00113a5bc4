//! A folder of images (searched recursively) as a data set, with optional captions and class labels.
//!
//! * Images: `.png`, `.jpg`, `.jpeg`, `.webp` in any letter case; the format is taken from the file's
//!   content. Names starting with `.` (hidden files and folders) are ignored; symbolic links to files are
//!   followed, to folders not. Files are read in sorted path order.
//! * Alpha is composited over white (`c·a + 255·(1 − a)`), as emoji and clip-art need.
//! * Captions: `photo.png` gets the trimmed text of `photo.txt` beside it, if that exists.
//! * Labels: the first-level sub-folder (`root/cat/x.png` → class "cat"; classes are the sorted folder
//!   names) or a label file of `filename,label` lines (comma or tab; filenames relative to the root; an
//!   optional header line `filename,label`; `#` comments). Labels are all integers (used as they are) or all
//!   names (sorted → class indices).
//! * A file that cannot be decoded is skipped and listed in the [`DataReport`]; if none can, that is an error.
use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

use image::{DynamicImage, ImageReader};
use serde::{Deserialize, Serialize};

use super::{Example, HwcImage, ImageDataset, ImageTransform, Pixels, Resize};
use crate::error::{Result, TrainError};

/// File extensions read as images (compared case-insensitively).
pub const IMAGE_EXTENSIONS: [&str; 4] = ["png", "jpg", "jpeg", "webp"];

/// Where class labels come from.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum LabelSource {
    #[default]
    None,
    /// The first-level sub-folder of each image; every image must be in one.
    SubFolders,
    /// A `filename,label` (or tab-separated) file; every image must be listed.
    File(PathBuf),
}

/// How many channels the images get.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ColorMode {
    /// 1 channel if every image is grayscale, else 3 (gray images expanded).
    #[default]
    Auto,
    /// Always 3 channels.
    Rgb,
    /// Always 1 channel (color images converted with the Rec. 709 luma weights of the `image` crate).
    Gray,
}

/// How [`open_image_folder`] reads a folder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FolderOptions {
    pub transform: ImageTransform,
    pub labels: LabelSource,
    pub color: ColorMode,
    /// Read `<stem>.txt` captions.
    pub captions: bool,
}

impl FolderOptions {
    /// Captions on, no labels, automatic color, the given transform.
    pub fn new(transform: ImageTransform) -> Self {
        Self {
            transform,
            labels: LabelSource::None,
            color: ColorMode::Auto,
            captions: true,
        }
    }
}

/// What a reader loaded and what it had to skip, with the reason for each skipped file.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DataReport {
    pub loaded: usize,
    pub skipped: Vec<(PathBuf, String)>,
}

impl fmt::Display for DataReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} images loaded", self.loaded)?;
        if let Some((path, reason)) = self.skipped.first() {
            write!(
                f,
                ", {} skipped (first: {}: {reason})",
                self.skipped.len(),
                path.display()
            )?;
        }
        Ok(())
    }
}

/// Reads every image under `root` (see the module documentation).
///
/// Errors: a missing or empty folder, a folder without images, no readable image, images outside a class
/// folder (with [`LabelSource::SubFolders`]), label-file problems (with the line number), and the size
/// checks of [`ImageDataset::new`].
pub fn open_image_folder(root: &Path, opts: &FolderOptions) -> Result<(ImageDataset, DataReport)> {
    opts.transform.validate()?;
    let meta = std::fs::metadata(root).map_err(|e| TrainError::io(root, e))?;
    if !meta.is_dir() {
        return Err(data_err(root, "not a folder"));
    }
    let mut scan = Scan::default();
    scan.walk(root)?;
    if scan.images.is_empty() {
        let reason = if scan.other_files == 0 {
            "the folder is empty".to_string()
        } else {
            format!(
                "no images (.png, .jpg, .jpeg, .webp) in the folder ({} other files)",
                scan.other_files
            )
        };
        return Err(data_err(root, reason));
    }
    scan.images.sort();
    let rel: Vec<String> = scan.images.iter().map(|p| relative(root, p)).collect();

    let (labels, class_names) = match &opts.labels {
        LabelSource::None => (vec![None; rel.len()], None),
        LabelSource::SubFolders => subfolder_labels(root, &rel)?,
        LabelSource::File(file) => label_file(file, root, &rel)?,
    };

    let mut report = DataReport::default();
    let mut examples = Vec::with_capacity(scan.images.len());
    for (path, label) in scan.images.iter().zip(labels) {
        let loaded = decode(path, opts.color).and_then(|image| {
            let caption = if opts.captions {
                read_caption(path)?
            } else {
                None
            };
            Ok((image, caption))
        });
        match loaded {
            Ok((image, caption)) => {
                // Resize now, to hold only the prepared image; with resizing off, sizes are checked (all
                // together, naming two files that differ) by `ImageDataset::new`.
                let image = match opts.transform.resize {
                    Resize::Off => image,
                    Resize::ShorterSide(_) => opts.transform.prepare(&image, path)?,
                };
                examples.push(Example {
                    image,
                    caption,
                    label,
                    source: path.clone(),
                });
            }
            Err(reason) => report.skipped.push((path.clone(), reason)),
        }
    }
    report.loaded = examples.len();
    if examples.is_empty() {
        let (first, reason) = report
            .skipped
            .first()
            .map(|(p, r)| (p.display().to_string(), r.as_str()))
            .unwrap_or_default();
        return Err(data_err(
            root,
            format!(
                "none of the {} images could be read (first: {first}: {reason})",
                report.skipped.len()
            ),
        ));
    }
    if opts.color == ColorMode::Auto && examples.iter().any(|e| e.image.channels == 3) {
        for e in &mut examples {
            expand_gray(&mut e.image);
        }
    }
    let mut dataset = ImageDataset::new(examples, opts.transform.clone())?;
    if let Some(names) = class_names {
        dataset = dataset.with_class_names(names)?;
    }
    Ok((dataset, report))
}

fn data_err(path: &Path, reason: impl Into<String>) -> TrainError {
    TrainError::Data {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

#[derive(Default)]
struct Scan {
    images: Vec<PathBuf>,
    other_files: usize,
}

impl Scan {
    fn walk(&mut self, dir: &Path) -> Result<()> {
        let entries = std::fs::read_dir(dir).map_err(|e| TrainError::io(dir, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| TrainError::io(dir, e))?;
            let path = entry.path();
            if entry.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            let kind = entry.file_type().map_err(|e| TrainError::io(&path, e))?;
            if kind.is_dir() {
                self.walk(&path)?;
            } else if kind.is_file() || (kind.is_symlink() && path.is_file()) {
                if is_image_name(&path) {
                    self.images.push(path);
                } else {
                    self.other_files += 1;
                }
            }
        }
        Ok(())
    }
}

fn is_image_name(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|x| x.eq_ignore_ascii_case(e)))
}

/// `path` relative to `root`, with `/` separators.
fn relative(root: &Path, path: &Path) -> String {
    let rel = path.strip_prefix(root).unwrap_or(path);
    rel.components()
        .map(|c| c.as_os_str().to_string_lossy())
        .collect::<Vec<_>>()
        .join("/")
}

/// Decodes one file into 1 or 3 channels (per `color`), alpha composited over white.
fn decode(path: &Path, color: ColorMode) -> std::result::Result<HwcImage, String> {
    let img = ImageReader::open(path)
        .map_err(|e| format!("cannot open: {e}"))?
        .with_guessed_format()
        .map_err(|e| format!("cannot read: {e}"))?
        .decode()
        .map_err(|e| format!("not a readable image: {e}"))?;
    let (w, h) = (img.width() as usize, img.height() as usize);
    let gray_source = !img.color().has_color();
    let channels = match color {
        ColorMode::Rgb => 3,
        ColorMode::Gray => 1,
        ColorMode::Auto if gray_source => 1,
        ColorMode::Auto => 3,
    };
    let data = if channels == 1 && gray_source {
        if img.color().has_alpha() {
            over_white(img.to_luma_alpha8().into_raw(), 1)
        } else {
            img.to_luma8().into_raw()
        }
    } else {
        let rgb = if img.color().has_alpha() {
            over_white(img.to_rgba8().into_raw(), 3)
        } else {
            img.to_rgb8().into_raw()
        };
        if channels == 1 {
            let buf = image::RgbImage::from_raw(w as u32, h as u32, rgb)
                .ok_or_else(|| "inconsistent decoded size".to_string())?;
            DynamicImage::ImageRgb8(buf).to_luma8().into_raw()
        } else {
            rgb
        }
    };
    HwcImage::new(h, w, channels, Pixels::U8(data)).map_err(|e| e.to_string())
}

/// Drops the alpha channel of `channels + 1`-byte pixels, compositing over white: `c·a + 255·(1 − a)`.
fn over_white(data: Vec<u8>, channels: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() / (channels + 1) * channels);
    for px in data.chunks_exact(channels + 1) {
        let a = px[channels] as u32;
        for &c in &px[..channels] {
            out.push(((c as u32 * a + 255 * (255 - a) + 127) / 255) as u8);
        }
    }
    out
}

fn expand_gray(image: &mut HwcImage) {
    if image.channels != 1 {
        return;
    }
    image.pixels = match &image.pixels {
        Pixels::U8(v) => Pixels::U8(v.iter().flat_map(|&g| [g, g, g]).collect()),
        Pixels::F32(v) => Pixels::F32(v.iter().flat_map(|&g| [g, g, g]).collect()),
    };
    image.channels = 3;
}

/// The trimmed text of `<stem>.txt` beside the image, if it exists.
fn read_caption(image: &Path) -> std::result::Result<Option<String>, String> {
    let txt = image.with_extension("txt");
    match std::fs::read(&txt) {
        Ok(bytes) => String::from_utf8(bytes)
            .map(|s| Some(s.trim().to_string()))
            .map_err(|_| format!("caption {} is not UTF-8 text", txt.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("cannot read caption {}: {e}", txt.display())),
    }
}

type Labels = (Vec<Option<usize>>, Option<Vec<String>>);

fn subfolder_labels(root: &Path, rel: &[String]) -> Result<Labels> {
    let mut classes = Vec::with_capacity(rel.len());
    for r in rel {
        match r.split_once('/') {
            Some((class, _)) => classes.push(class.to_string()),
            None => {
                return Err(data_err(
                    &root.join(r),
                    "image directly in the data folder, but labels come from sub-folders: \
                     put every image in a class folder",
                ))
            }
        }
    }
    let names: Vec<String> = classes
        .iter()
        .cloned()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let labels = classes
        .iter()
        .map(|c| names.binary_search(c).ok())
        .collect();
    Ok((labels, Some(names)))
}

enum RawLabel {
    Index(usize),
    Name(String),
}

/// Reads a `filename,label` file; `rel` are the images found under `root` (relative, `/`-separated).
fn label_file(file: &Path, root: &Path, rel: &[String]) -> Result<Labels> {
    let text = std::fs::read_to_string(file).map_err(|e| TrainError::io(file, e))?;
    let index: HashMap<&str, usize> = rel
        .iter()
        .enumerate()
        .map(|(i, r)| (r.as_str(), i))
        .collect();
    let at = |line: usize, reason: String| data_err(file, format!("line {line}: {reason}"));
    let mut raw: Vec<Option<(RawLabel, usize)>> = (0..rel.len()).map(|_| None).collect();
    let mut kind: Option<(bool, usize)> = None; // (labels are names, first line of that kind)
    let mut first_content = true;
    for (n, line) in text.lines().enumerate() {
        let n = n + 1;
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let sep = if line.contains('\t') { '\t' } else { ',' };
        let (name, label) = line
            .rsplit_once(sep)
            .ok_or_else(|| at(n, format!("expected `filename,label`, found `{line}`")))?;
        let (name, label) = (unquote(name), unquote(label));
        let header = first_content
            && ["filename", "file", "path", "image", "name"]
                .contains(&name.to_lowercase().as_str())
            && ["label", "labels", "class", "class_name", "y"]
                .contains(&label.to_lowercase().as_str());
        first_content = false;
        if header {
            continue;
        }
        let key = name.trim_start_matches("./").replace('\\', "/");
        let Some(&i) = index.get(key.as_str()) else {
            return Err(at(
                n,
                format!("`{name}` is not an image in {}", root.display()),
            ));
        };
        if let Some((_, prev)) = &raw[i] {
            return Err(at(
                n,
                format!("`{name}` is listed again (first on line {prev})"),
            ));
        }
        let value = parse_label(label).map_err(|r| at(n, r))?;
        let is_name = matches!(value, RawLabel::Name(_));
        match kind {
            None => kind = Some((is_name, n)),
            Some((k, first)) if k != is_name => {
                let (this, that) = if is_name {
                    ("a name", "integers")
                } else {
                    ("an integer", "names")
                };
                return Err(at(
                    n,
                    format!("label `{label}` is {this}, but the labels from line {first} on are {that}; use one kind"),
                ));
            }
            Some(_) => {}
        }
        raw[i] = Some((value, n));
    }
    let missing: Vec<&String> = rel
        .iter()
        .zip(&raw)
        .filter(|(_, l)| l.is_none())
        .map(|(r, _)| r)
        .collect();
    if let Some(first) = missing.first() {
        return Err(data_err(
            file,
            format!(
                "{} images under {} have no label here (first: {first})",
                missing.len(),
                root.display()
            ),
        ));
    }
    let names: Vec<String> = raw
        .iter()
        .filter_map(|l| match l {
            Some((RawLabel::Name(s), _)) => Some(s.clone()),
            _ => None,
        })
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let labels = raw
        .iter()
        .map(|l| match l {
            Some((RawLabel::Index(i), _)) => Some(*i),
            Some((RawLabel::Name(s), _)) => names.binary_search(s).ok(),
            None => None,
        })
        .collect();
    Ok((labels, (!names.is_empty()).then_some(names)))
}

fn unquote(s: &str) -> &str {
    let s = s.trim();
    s.strip_prefix('"')
        .and_then(|t| t.strip_suffix('"'))
        .unwrap_or(s)
        .trim()
}

/// A label is a non-negative integer or a name that does not look like a number.
fn parse_label(s: &str) -> std::result::Result<RawLabel, String> {
    if s.is_empty() {
        return Err("empty label".into());
    }
    if let Ok(i) = s.parse::<usize>() {
        return Ok(RawLabel::Index(i));
    }
    let numeric = s.starts_with(|c: char| c.is_ascii_digit() || c == '-' || c == '+' || c == '.');
    if numeric {
        return Err(format!(
            "bad label `{s}`: labels are non-negative integers or class names"
        ));
    }
    Ok(RawLabel::Name(s.to_string()))
}
