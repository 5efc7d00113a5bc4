//! The run log: one JSON object per line (`train.jsonl` in the run folder), appended and flushed as training
//! goes, so a run that is killed keeps its history and a resumed run continues the same file.
//!
//! Each line is `{"step": N, "kind": "train" | "eval" | "event", "elapsed_s": T, <name>: <number>, ...}`.
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Result, TrainError};
use crate::plot::Series;

pub struct JsonlLog {
    path: PathBuf,
    file: std::fs::File,
}

impl JsonlLog {
    /// Opens `path` for appending (creating it).
    pub fn append(path: &Path) -> Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| TrainError::io(path, e))?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes one record. Non-finite numbers are written as `null` (JSON has no NaN).
    pub fn write(
        &mut self,
        kind: &str,
        step: u64,
        elapsed_s: f64,
        values: &[(&str, f64)],
    ) -> Result<()> {
        let mut obj = serde_json::Map::new();
        obj.insert("step".into(), step.into());
        obj.insert("kind".into(), kind.into());
        obj.insert("elapsed_s".into(), json_number(elapsed_s));
        for (k, v) in values {
            obj.insert((*k).to_string(), json_number(*v));
        }
        let line = serde_json::Value::Object(obj).to_string();
        writeln!(self.file, "{line}")
            .and_then(|_| self.file.flush())
            .map_err(|e| TrainError::io(&self.path, e))
    }

    /// Writes an event with a message (start, resume, checkpoint, interrupt).
    pub fn event(&mut self, step: u64, elapsed_s: f64, message: &str) -> Result<()> {
        let line = serde_json::json!({
            "step": step, "kind": "event", "elapsed_s": json_number(elapsed_s), "message": message,
        });
        writeln!(self.file, "{line}")
            .and_then(|_| self.file.flush())
            .map_err(|e| TrainError::io(&self.path, e))
    }
}

fn json_number(v: f64) -> serde_json::Value {
    serde_json::Number::from_f64(v).map_or(serde_json::Value::Null, serde_json::Value::Number)
}

/// Reads the numeric fields of the records of `kind` in `path` into one series per field, ordered by step. A
/// resumed run may repeat steps after its last checkpoint: a later record for a step replaces the earlier one.
/// Unparsable lines (a line cut by a kill) are skipped.
pub fn read_series(path: &Path, kind: &str) -> Result<Vec<Series>> {
    let text = std::fs::read_to_string(path).map_err(|e| TrainError::io(path, e))?;
    let mut by_name: BTreeMap<String, BTreeMap<u64, f64>> = BTreeMap::new();
    for line in text.lines() {
        let Ok(serde_json::Value::Object(obj)) = serde_json::from_str::<serde_json::Value>(line)
        else {
            continue;
        };
        if obj.get("kind").and_then(|k| k.as_str()) != Some(kind) {
            continue;
        }
        let Some(step) = obj.get("step").and_then(|s| s.as_u64()) else {
            continue;
        };
        for (k, v) in &obj {
            if k == "step" || k == "elapsed_s" {
                continue;
            }
            if let Some(v) = v.as_f64() {
                by_name.entry(k.clone()).or_default().insert(step, v);
            }
        }
    }
    Ok(by_name
        .into_iter()
        .map(|(name, pts)| Series {
            name,
            points: pts.into_iter().collect(),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_a_resumed_step_replaces_the_old_one() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| TrainError::io("tempdir", e))?;
        let p = dir.path().join("train.jsonl");
        let mut log = JsonlLog::append(&p)?;
        log.write("train", 1, 0.1, &[("loss", 1.0)])?;
        log.write("train", 2, 0.2, &[("loss", 0.5), ("lr", 1e-4)])?;
        log.event(2, 0.2, "checkpoint")?;
        log.write("train", 3, 0.3, &[("loss", f64::NAN)])?;
        drop(log);
        // A kill mid-line, then a resume from step 2.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&p)
            .and_then(|mut f| f.write_all(b"{\"step\": 4, \"ki"))
            .map_err(|e| TrainError::io(&p, e))?;
        let mut log = JsonlLog::append(&p)?;
        writeln!(log.file).map_err(|e| TrainError::io(&p, e))?;
        log.write("train", 3, 0.4, &[("loss", 0.25)])?;
        let series = read_series(&p, "train")?;
        let loss = series
            .iter()
            .find(|s| s.name == "loss")
            .expect("loss series");
        assert_eq!(loss.points, vec![(1, 1.0), (2, 0.5), (3, 0.25)]);
        let lr = series.iter().find(|s| s.name == "lr").expect("lr series");
        assert_eq!(lr.points, vec![(2, 1e-4)]);
        Ok(())
    }
}
