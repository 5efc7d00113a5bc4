//! Reading a HuggingFace tokenizer folder (diffusers' `tokenizer/`): `vocab.json` + `merges.txt` (the classic
//! layout, also what transformers 4.x saves) or `tokenizer.json` (what transformers 5.x saves), plus
//! `tokenizer_config.json`, `special_tokens_map.json` and `added_tokens.json` when present.
//!
//! Precedence as in transformers: a special token in `special_tokens_map.json` overrides the one in
//! `tokenizer_config.json`; added tokens come from `tokenizer.json`'s `added_tokens`, the config's
//! `added_tokens_decoder` and `added_tokens.json`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::added::AddedToken;
use super::{Result, TokenizerError};

/// How a special-token role (bos, eos, unk, pad) was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoleSpec {
    /// A plain string: keeps the flags of an added token with the same content, else `normalized = false`.
    Plain(String),
    /// An `AddedToken` object with its own flags (`normalized` defaults to false for special tokens).
    Full {
        content: String,
        normalized: bool,
        lstrip: bool,
        rstrip: bool,
    },
}

impl RoleSpec {
    pub fn content(&self) -> &str {
        match self {
            RoleSpec::Plain(c) | RoleSpec::Full { content: c, .. } => c,
        }
    }
}

/// Everything read from a tokenizer folder.
#[derive(Debug)]
pub struct DirContents {
    pub encoder: HashMap<String, u32>,
    pub merges: Vec<(String, String)>,
    /// Added tokens declared by the files (before the special-token roles are applied).
    pub added: Vec<AddedToken>,
    /// bos, eos, unk, pad (None: not given, the CLIP default applies).
    pub roles: [Option<RoleSpec>; 4],
    pub model_max_length: Option<usize>,
}

fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| TokenizerError::Io {
        path: path.to_owned(),
        source,
    })
}

fn read_json(path: &Path) -> Result<Value> {
    let text = read_text(path)?;
    serde_json::from_str(&text).map_err(|source| TokenizerError::Json {
        path: path.to_owned(),
        source,
    })
}

fn format_err(path: &Path, what: impl Into<String>) -> TokenizerError {
    TokenizerError::Format {
        path: path.to_owned(),
        what: what.into(),
    }
}

fn flag(obj: &serde_json::Map<String, Value>, key: &str) -> bool {
    obj.get(key).and_then(Value::as_bool).unwrap_or(false)
}

fn role_spec(value: &Value, path: &Path, key: &str) -> Result<Option<RoleSpec>> {
    match value {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(RoleSpec::Plain(s.clone()))),
        Value::Object(obj) => {
            let content = obj
                .get("content")
                .and_then(Value::as_str)
                .ok_or_else(|| format_err(path, format!("`{key}` has no string `content`")))?;
            Ok(Some(RoleSpec::Full {
                content: content.to_owned(),
                normalized: flag(obj, "normalized"),
                lstrip: flag(obj, "lstrip"),
                rstrip: flag(obj, "rstrip"),
            }))
        }
        _ => Err(format_err(
            path,
            format!("`{key}` is neither a string nor an AddedToken object"),
        )),
    }
}

const ROLE_KEYS: [&str; 4] = ["bos_token", "eos_token", "unk_token", "pad_token"];

fn added_from_object(
    obj: &serde_json::Map<String, Value>,
    id: u32,
    path: &Path,
) -> Result<AddedToken> {
    let content = obj
        .get("content")
        .and_then(Value::as_str)
        .ok_or_else(|| format_err(path, format!("added token {id} has no string `content`")))?;
    Ok(AddedToken {
        content: content.to_owned(),
        id,
        normalized: flag(obj, "normalized"),
        lstrip: flag(obj, "lstrip"),
        rstrip: flag(obj, "rstrip"),
    })
}

fn to_id(v: &Value, path: &Path, what: &str) -> Result<u32> {
    v.as_u64()
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| format_err(path, format!("{what}: id {v} is not a u32")))
}

fn parse_vocab(v: &Value, path: &Path) -> Result<HashMap<String, u32>> {
    let obj = v
        .as_object()
        .ok_or_else(|| format_err(path, "vocabulary is not a JSON object"))?;
    obj.iter()
        .map(|(k, id)| Ok((k.clone(), to_id(id, path, &format!("token `{k}`"))?)))
        .collect()
}

fn parse_merge_line(line: &str, path: &Path, number: usize) -> Result<(String, String)> {
    let mut parts = line.split(' ');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(a), Some(b), None) if !a.is_empty() && !b.is_empty() => {
            Ok((a.to_owned(), b.to_owned()))
        }
        _ => Err(format_err(
            path,
            format!("merge {number} `{line}` is not two space-separated symbols"),
        )),
    }
}

/// merges.txt: an optional `#version` header line, then one `a b` pair per line.
fn parse_merges_txt(text: &str, path: &Path) -> Result<Vec<(String, String)>> {
    let mut lines: Vec<&str> = text.trim_end_matches(['\n', '\r']).split('\n').collect();
    if lines.first().is_some_and(|l| l.starts_with("#version")) {
        lines.remove(0);
    }
    lines
        .iter()
        .map(|l| l.trim_end_matches('\r'))
        .filter(|l| !l.is_empty())
        .enumerate()
        .map(|(i, l)| parse_merge_line(l, path, i))
        .collect()
}

fn parse_merges_json(v: &Value, path: &Path) -> Result<Vec<(String, String)>> {
    let arr = v
        .as_array()
        .ok_or_else(|| format_err(path, "`model.merges` is not an array"))?;
    arr.iter()
        .enumerate()
        .map(|(i, m)| match m {
            Value::String(s) => parse_merge_line(s, path, i),
            Value::Array(pair) => match pair.as_slice() {
                [Value::String(a), Value::String(b)] => Ok((a.clone(), b.clone())),
                _ => Err(format_err(
                    path,
                    format!("merge {i} is not a pair of strings"),
                )),
            },
            _ => Err(format_err(
                path,
                format!("merge {i} is neither a string nor a pair"),
            )),
        })
        .collect()
}

/// Reads a tokenizer folder. `vocab.json` + `merges.txt` are preferred over `tokenizer.json`.
pub fn read_dir(dir: &Path) -> Result<DirContents> {
    let file = |name: &str| -> PathBuf { dir.join(name) };
    let mut added: Vec<AddedToken> = Vec::new();
    let mut roles: [Option<RoleSpec>; 4] = Default::default();
    let (vocab_path, merges_path, tok_json) = (
        file("vocab.json"),
        file("merges.txt"),
        file("tokenizer.json"),
    );

    let (encoder, merges) = if vocab_path.is_file() && merges_path.is_file() {
        let encoder = parse_vocab(&read_json(&vocab_path)?, &vocab_path)?;
        let merges = parse_merges_txt(&read_text(&merges_path)?, &merges_path)?;
        (encoder, merges)
    } else if tok_json.is_file() {
        let root = read_json(&tok_json)?;
        let model = root
            .get("model")
            .ok_or_else(|| format_err(&tok_json, "no `model`"))?;
        match model.get("type").and_then(Value::as_str) {
            Some("BPE") | None => {}
            Some(other) => {
                return Err(format_err(
                    &tok_json,
                    format!("model type `{other}`, expected BPE"),
                ))
            }
        }
        let vocab = model
            .get("vocab")
            .ok_or_else(|| format_err(&tok_json, "no `model.vocab`"))?;
        let merges = model
            .get("merges")
            .ok_or_else(|| format_err(&tok_json, "no `model.merges`"))?;
        if let Some(unk) = model.get("unk_token") {
            roles[2] = role_spec(unk, &tok_json, "model.unk_token")?;
        }
        if let Some(list) = root.get("added_tokens").and_then(Value::as_array) {
            for entry in list {
                let obj = entry
                    .as_object()
                    .ok_or_else(|| format_err(&tok_json, "added token is not an object"))?;
                let id = to_id(
                    obj.get("id").unwrap_or(&Value::Null),
                    &tok_json,
                    "added token",
                )?;
                added.push(added_from_object(obj, id, &tok_json)?);
            }
        }
        (
            parse_vocab(vocab, &tok_json)?,
            parse_merges_json(merges, &tok_json)?,
        )
    } else {
        return Err(TokenizerError::NoFiles {
            dir: dir.to_owned(),
        });
    };

    let mut model_max_length = None;
    let config_path = file("tokenizer_config.json");
    if config_path.is_file() {
        let config = read_json(&config_path)?;
        if let Some(decoder) = config
            .get("added_tokens_decoder")
            .and_then(Value::as_object)
        {
            for (id, entry) in decoder {
                let id: u32 = id.parse().map_err(|_| {
                    format_err(
                        &config_path,
                        format!("added_tokens_decoder key `{id}` is not an id"),
                    )
                })?;
                let obj = entry
                    .as_object()
                    .ok_or_else(|| format_err(&config_path, "added token is not an object"))?;
                added.push(added_from_object(obj, id, &config_path)?);
            }
        }
        for (slot, key) in roles.iter_mut().zip(ROLE_KEYS) {
            if let Some(v) = config.get(key) {
                if let Some(spec) = role_spec(v, &config_path, key)? {
                    *slot = Some(spec);
                }
            }
        }
        if let Some(v) = config.get("model_max_length") {
            let n = v
                .as_f64()
                .ok_or_else(|| format_err(&config_path, "`model_max_length` is not a number"))?;
            // transformers writes 1e30 for "no limit"; that is treated as absent (CLIP's 77 applies).
            if n < 1e9 {
                if n < 2.0 || n.fract() != 0.0 {
                    return Err(format_err(
                        &config_path,
                        format!("`model_max_length` {n} is not an integer >= 2"),
                    ));
                }
                model_max_length = Some(n as usize);
            }
        }
    }
    let map_path = file("special_tokens_map.json");
    if map_path.is_file() {
        let map = read_json(&map_path)?;
        for (slot, key) in roles.iter_mut().zip(ROLE_KEYS) {
            if let Some(v) = map.get(key) {
                if let Some(spec) = role_spec(v, &map_path, key)? {
                    *slot = Some(spec);
                }
            }
        }
    }
    let extra_path = file("added_tokens.json");
    if extra_path.is_file() {
        let extra = read_json(&extra_path)?;
        let obj = extra
            .as_object()
            .ok_or_else(|| format_err(&extra_path, "not a JSON object"))?;
        for (content, id) in obj {
            let id = to_id(id, &extra_path, content)?;
            if !added.iter().any(|t| t.content == *content) {
                // transformers' default for a non-special added token: normalized.
                added.push(AddedToken {
                    content: content.clone(),
                    id,
                    normalized: true,
                    lstrip: false,
                    rstrip: false,
                });
            }
        }
    }
    Ok(DirContents {
        encoder,
        merges,
        added,
        roles,
        model_max_length,
    })
}
