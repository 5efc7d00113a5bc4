//! CLIP's byte-level BPE tokenizer (Radford et al. 2021, "Learning Transferable Visual Models From Natural
//! Language Supervision"), giving the same ids as HuggingFace transformers when called the way diffusers'
//! Stable Diffusion pipelines call it:
//! `tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True)`
//! → `[<|startoftext|>, ids[..max_len-2], <|endoftext|>, pad, pad, …]`, exactly `max_len` long.
//!
//! | here | transformers |
//! |---|---|
//! | [`Flavor::Slow`] (default) | 4.x `CLIPTokenizer` (pure Python) without `ftfy` installed |
//! | [`Flavor::Fast`] | 5.x `CLIPTokenizer`; 4.x `CLIPTokenizerFast` except for special-token flags (below) |
//! | [`Pad::EndOfText`] | SD1 (`pad_token` `<|endoftext|>`, id 49407) |
//! | [`Pad::sd2`] | SD2 / OpenCLIP (`pad_token` `!`, id 0) |
//!
//! The two flavors differ only on unusual text (see `text.rs`): the slow one drops control and format chars
//! (NUL, U+FFFD, zero-width joiners, BOM, soft hyphen, private-use and unassigned code points), splits CJK
//! ideographs into one word each, and lower-cases a word-final `Σ` to `ς`; the fast one keeps them, and with
//! transformers 5 it only recognises `<|ENDOFTEXT|>`-style upper-case special-token text when the folder's
//! config marks the token `normalized` (4.x fast always does). Prompt text equal to a special token — including
//! the pad token, so every `!` under SD2 — becomes that token's id in both, as in transformers.
//! With `ftfy` installed the slow tokenizer would instead use `ftfy.fix_text` (HTML unescaping, quote
//! uncurling, mojibake repair); that path is not reproduced.
//!
//! Vocabulary: built in (OpenAI's `bpe_simple_vocab_16e6.txt`, 49408 tokens), or read from a diffusers
//! `tokenizer/` folder with [`ClipTokenizer::from_dir`].

mod added;
mod bpe;
mod files;
mod text;
pub mod wordpiece;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

pub use added::AddedToken;
use added::Piece;
pub use bpe::{builtin_vocab, BpeModel, CLIP_MERGES, END_OF_WORD};
use files::RoleSpec;
pub use wordpiece::{BertFlavor, BertOptions, BertSpecials, BertTokenizer, BERT_MAX_LEN};

/// CLIP's context length.
pub const CLIP_MAX_LEN: usize = 77;
pub const START_OF_TEXT: &str = "<|startoftext|>";
pub const END_OF_TEXT: &str = "<|endoftext|>";
/// Pad token of SD2's (OpenCLIP's) tokenizer config; id 0 in CLIP's vocabulary.
pub const SD2_PAD: &str = "!";
/// Words cached before the cache is emptied.
const CACHE_LIMIT: usize = 1 << 16;

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("parsing {path}: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path}: {what}")]
    Format { path: PathBuf, what: String },
    #[error("no tokenizer files in {dir}: expected vocab.json + merges.txt, or tokenizer.json")]
    NoFiles { dir: PathBuf },
    #[error("{role} token `{token}` is neither in the vocabulary nor an added token")]
    UnknownToken { role: &'static str, token: String },
    #[error("max_len {max_len} leaves no room for the start and end tokens (need at least 2)")]
    MaxLenTooSmall { max_len: usize },
}

pub type Result<T> = std::result::Result<T, TokenizerError>;

/// Which transformers implementation to reproduce (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Flavor {
    #[default]
    Slow,
    Fast,
}

/// The pad token: SD1 pads with `<|endoftext|>`, SD2 with `!` (id 0).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pad {
    EndOfText,
    Token(String),
}

impl Pad {
    /// SD2's pad token `!`.
    pub fn sd2() -> Self {
        Pad::Token(SD2_PAD.to_owned())
    }

    fn content(&self) -> &str {
        match self {
            Pad::EndOfText => END_OF_TEXT,
            Pad::Token(t) => t,
        }
    }
}

const ROLE_NAMES: [&str; 4] = ["bos", "eos", "unk", "pad"];

/// CLIP BPE tokenizer. Cheap to clone (the vocabulary is shared); the per-word cache is not.
pub struct ClipTokenizer {
    bpe: Arc<BpeModel>,
    flavor: Flavor,
    /// Added tokens declared by the files, before the special-token roles are applied.
    declared: Vec<AddedToken>,
    /// bos, eos, unk, pad.
    roles: [RoleSpec; 4],
    /// Added tokens in effect: `declared` plus the four roles.
    added: Vec<AddedToken>,
    ids: [u32; 4],
    model_max_length: usize,
    cache: Mutex<HashMap<String, Vec<u32>>>,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("vocab_size", &self.bpe.len())
            .field("flavor", &self.flavor)
            .field("added", &self.added)
            .field("bos_eos_unk_pad", &self.ids)
            .field("model_max_length", &self.model_max_length)
            .finish()
    }
}

impl Clone for ClipTokenizer {
    fn clone(&self) -> Self {
        Self {
            bpe: self.bpe.clone(),
            flavor: self.flavor,
            declared: self.declared.clone(),
            roles: self.roles.clone(),
            added: self.added.clone(),
            ids: self.ids,
            model_max_length: self.model_max_length,
            cache: Mutex::new(HashMap::new()),
        }
    }
}

impl ClipTokenizer {
    /// The built-in CLIP vocabulary, SD1 padding, `model_max_length` 77, [`Flavor::Slow`].
    pub fn builtin() -> Self {
        let roles = [
            RoleSpec::Plain(START_OF_TEXT.to_owned()),
            RoleSpec::Plain(END_OF_TEXT.to_owned()),
            RoleSpec::Plain(END_OF_TEXT.to_owned()),
            RoleSpec::Plain(END_OF_TEXT.to_owned()),
        ];
        Self::assemble(BpeModel::builtin(), Vec::new(), roles, CLIP_MAX_LEN)
            .expect("invariant: the built-in vocabulary holds CLIP's special tokens")
    }

    /// Loads a transformers tokenizer folder (diffusers' `tokenizer/`): `vocab.json` + `merges.txt` or
    /// `tokenizer.json`, with the special tokens and `model_max_length` of `tokenizer_config.json` /
    /// `special_tokens_map.json`. Roles not given default to CLIP's (`<|startoftext|>`, `<|endoftext|>`), and a
    /// missing or unbounded `model_max_length` to 77.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let contents = files::read_dir(dir)?;
        let defaults = [START_OF_TEXT, END_OF_TEXT, END_OF_TEXT, END_OF_TEXT];
        let mut roles = defaults.map(|d| RoleSpec::Plain(d.to_owned()));
        for (slot, given) in roles.iter_mut().zip(contents.roles) {
            if let Some(spec) = given {
                *slot = spec;
            }
        }
        let bpe = Arc::new(BpeModel::new(contents.encoder, &contents.merges));
        Self::assemble(
            bpe,
            contents.added,
            roles,
            contents.model_max_length.unwrap_or(CLIP_MAX_LEN),
        )
    }

    /// [`from_dir`](Self::from_dir) when `dir` holds tokenizer files, else [`builtin`](Self::builtin).
    pub fn from_dir_or_builtin(dir: &Path) -> Result<Self> {
        let has_files = (dir.join("vocab.json").is_file() && dir.join("merges.txt").is_file())
            || dir.join("tokenizer.json").is_file();
        if has_files {
            Self::from_dir(dir)
        } else {
            Ok(Self::builtin())
        }
    }

    /// Replaces the pad token (a plain-string token, as transformers' `pad_token=` argument).
    pub fn with_padding(self, pad: Pad) -> Result<Self> {
        let mut roles = self.roles;
        roles[3] = RoleSpec::Plain(pad.content().to_owned());
        Self::assemble(self.bpe, self.declared, roles, self.model_max_length)
    }

    pub fn with_flavor(mut self, flavor: Flavor) -> Self {
        self.flavor = flavor;
        self.cache = Mutex::new(HashMap::new());
        self
    }

    /// Applies the special-token roles (in transformers' order bos, eos, unk, pad; a later one wins) to the
    /// declared added tokens. A plain-string role keeps the flags of a declared token with the same content.
    fn assemble(
        bpe: Arc<BpeModel>,
        declared: Vec<AddedToken>,
        roles: [RoleSpec; 4],
        model_max_length: usize,
    ) -> Result<Self> {
        if model_max_length < 2 {
            return Err(TokenizerError::MaxLenTooSmall {
                max_len: model_max_length,
            });
        }
        let mut added = declared.clone();
        let mut ids = [0u32; 4];
        for (i, role) in roles.iter().enumerate() {
            let content = role.content();
            let known = declared.iter().find(|t| t.content == content);
            let id = known
                .map(|t| t.id)
                .or_else(|| bpe.token_to_id(content))
                .ok_or_else(|| TokenizerError::UnknownToken {
                    role: ROLE_NAMES[i],
                    token: content.to_owned(),
                })?;
            ids[i] = id;
            let token = match (role, known) {
                (RoleSpec::Plain(_), Some(t)) => t.clone(),
                (RoleSpec::Plain(c), None) => AddedToken {
                    content: c.clone(),
                    id,
                    normalized: false,
                    lstrip: false,
                    rstrip: false,
                },
                (
                    RoleSpec::Full {
                        content,
                        normalized,
                        lstrip,
                        rstrip,
                    },
                    _,
                ) => AddedToken {
                    content: content.clone(),
                    id,
                    normalized: *normalized,
                    lstrip: *lstrip,
                    rstrip: *rstrip,
                },
            };
            added.retain(|t| t.content != token.content);
            added.push(token);
        }
        Ok(Self {
            bpe,
            flavor: Flavor::default(),
            declared,
            roles,
            added,
            ids,
            model_max_length,
            cache: Mutex::new(HashMap::new()),
        })
    }

    pub fn flavor(&self) -> Flavor {
        self.flavor
    }
    pub fn bos_id(&self) -> u32 {
        self.ids[0]
    }
    pub fn eos_id(&self) -> u32 {
        self.ids[1]
    }
    pub fn unk_id(&self) -> u32 {
        self.ids[2]
    }
    pub fn pad_id(&self) -> u32 {
        self.ids[3]
    }
    /// The folder's `model_max_length` (77 for every SD tokenizer).
    pub fn model_max_length(&self) -> usize {
        self.model_max_length
    }
    pub fn vocab_size(&self) -> usize {
        self.bpe.len()
    }
    pub fn added_tokens(&self) -> &[AddedToken] {
        &self.added
    }
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.added
            .iter()
            .find(|t| t.content == token)
            .map(|t| t.id)
            .or_else(|| self.bpe.token_to_id(token))
    }
    pub fn id_to_token(&self, id: u32) -> Option<&str> {
        self.added
            .iter()
            .find(|t| t.id == id)
            .map(|t| t.content.as_str())
            .or_else(|| self.bpe.id_to_token(id))
    }

    /// Token ids of `text`, without start/end tokens and without truncation.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut ids = Vec::new();
        match self.flavor {
            Flavor::Slow => {
                let all: Vec<&AddedToken> = self.added.iter().collect();
                for piece in added::split(text, &all) {
                    match piece {
                        Piece::Added(id) => ids.push(id),
                        Piece::Text(t) => {
                            let cleaned = text::slow_clean(t);
                            for word in text::slow_words(&cleaned) {
                                self.push_word(word, &mut ids);
                            }
                        }
                    }
                }
            }
            Flavor::Fast => {
                let (normalized, raw): (Vec<&AddedToken>, Vec<&AddedToken>) =
                    self.added.iter().partition(|t| t.normalized);
                for piece in added::split(text, &raw) {
                    match piece {
                        Piece::Added(id) => ids.push(id),
                        Piece::Text(t) => {
                            let norm = text::fast_normalize(t);
                            for sub in added::split(&norm, &normalized) {
                                match sub {
                                    Piece::Added(id) => ids.push(id),
                                    Piece::Text(s) => {
                                        for word in text::fast_words(s) {
                                            self.push_word(word, &mut ids);
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        ids
    }

    /// `[bos, encode(text) truncated to max_len − 2, eos, pad, …]`, exactly `max_len` ids.
    pub fn encode_padded(&self, text: &str, max_len: usize) -> Result<Vec<u32>> {
        if max_len < 2 {
            return Err(TokenizerError::MaxLenTooSmall { max_len });
        }
        let mut ids = Vec::with_capacity(max_len);
        ids.push(self.bos_id());
        let body = self.encode(text);
        ids.extend(body.into_iter().take(max_len - 2));
        ids.push(self.eos_id());
        ids.resize(max_len, self.pad_id());
        Ok(ids)
    }

    /// [`encode_padded`](Self::encode_padded) to `model_max_length`, as diffusers' pipelines call it.
    pub fn encode_for_model(&self, text: &str) -> Vec<u32> {
        let mut ids = Vec::with_capacity(self.model_max_length);
        ids.push(self.bos_id());
        ids.extend(
            self.encode(text)
                .into_iter()
                .take(self.model_max_length - 2),
        );
        ids.push(self.eos_id());
        ids.resize(self.model_max_length, self.pad_id());
        ids
    }

    /// BPE of one word (unencoded text), through the cache.
    fn push_word(&self, word: &str, ids: &mut Vec<u32>) {
        let encoded = self.bpe.byte_encode(word);
        if let Some(hit) = self
            .cache
            .lock()
            .ok()
            .and_then(|c| c.get(&encoded).cloned())
        {
            ids.extend(hit);
            return;
        }
        let tokens = match self.flavor {
            // The slow tokenizer's BPE cache starts out holding these two words as themselves.
            Flavor::Slow if encoded == START_OF_TEXT || encoded == END_OF_TEXT => {
                vec![encoded.clone()]
            }
            Flavor::Slow => self.bpe.merge_word(&encoded, Some(CLIP_MERGES)),
            Flavor::Fast => self.bpe.merge_word(&encoded, None),
        };
        let unk = self.unk_id();
        let word_ids: Vec<u32> = tokens
            .iter()
            .map(|t| self.bpe.token_to_id(t).unwrap_or(unk))
            .collect();
        ids.extend_from_slice(&word_ids);
        if let Ok(mut cache) = self.cache.lock() {
            if cache.len() >= CACHE_LIMIT {
                cache.clear();
            }
            cache.insert(encoded, word_ids);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_pads_to_77_with_start_and_end() {
        let t = ClipTokenizer::builtin();
        let ids = t.encode_for_model("a photo of a cat");
        assert_eq!(ids.len(), 77);
        assert_eq!(&ids[..7], &[49406, 320, 1125, 539, 320, 2368, 49407]);
        assert!(ids[7..].iter().all(|&i| i == 49407));
        let sd2 = t
            .with_padding(Pad::sd2())
            .expect("`!` is in the vocabulary");
        let ids = sd2.encode_for_model("a photo of a cat");
        assert_eq!(ids[6], 49407);
        assert!(ids[7..].iter().all(|&i| i == 0));
    }

    #[test]
    fn truncates_and_rejects_tiny_lengths() {
        let t = ClipTokenizer::builtin();
        let ids = t.encode_padded(&"cat ".repeat(200), 77).expect("77 >= 2");
        assert_eq!(ids.len(), 77);
        assert_eq!((ids[0], ids[75], ids[76]), (49406, 2368, 49407));
        assert_eq!(t.encode_padded("cat", 2).expect("2 >= 2"), [49406, 49407]);
        assert!(matches!(
            t.encode_padded("cat", 1),
            Err(TokenizerError::MaxLenTooSmall { max_len: 1 })
        ));
    }

    #[test]
    fn unknown_pad_token_is_an_error() {
        let err = ClipTokenizer::builtin().with_padding(Pad::Token("<pad>".into()));
        assert!(matches!(
            err,
            Err(TokenizerError::UnknownToken { role: "pad", .. })
        ));
    }
}
