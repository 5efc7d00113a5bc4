//! Text clean-up and word splitting before BPE, in the two forms transformers has.
//!
//! *Slow* (transformers ≤ 4.x `CLIPTokenizer` without `ftfy`, i.e. its `BasicTokenizer(strip_accents=False,
//! do_split_on_punc=False)` fallback): drop NUL, U+FFFD and every `\p{C}` char except `\t \n \r`; turn those three
//! and `\p{Zs}` into spaces; put spaces around CJK ideographs; NFC; split on whitespace; lower-case each piece
//! (Python `str.lower`, so a word-final `Σ` becomes `ς`); join with single spaces. Words are then found with
//! CLIP's pattern (`'s 't 're 've 'm 'll 'd` case-insensitively, letter runs, single digits, runs of other
//! non-space chars).
//!
//! *Fast* (transformers 4.x `CLIPTokenizerFast`, transformers 5.x `CLIPTokenizer`, both backed by `tokenizers`):
//! NFC, `\s+` → one space, lower-case char by char (no final-sigma rule); no control-char removal and no CJK
//! splitting. Words: CLIP's pattern (case-sensitive), then GPT-2's byte-level pattern inside each match (which
//! only changes anything for the text `<|startoftext|>` / `<|endoftext|>`: it becomes `<|`, `…text`, `|>`).

use std::sync::LazyLock;

use regex::Regex;
use unicode_normalization::UnicodeNormalization;

fn re(pattern: &str) -> Regex {
    Regex::new(pattern).expect("invariant: static tokenizer pattern compiles")
}

/// Python `regex` with IGNORECASE treats U+0345 (combining ypogegrammeni, which case-folds to ι) as a letter;
/// it is the only char whose class changes, so it is listed explicitly instead of making the classes (?i).
static SLOW_WORDS: LazyLock<Regex> = LazyLock::new(|| {
    re(
        r"(?i:<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d)|[\p{L}\x{345}]+|[\p{N}]|[^\s\p{L}\p{N}\x{345}]+",
    )
});
static FAST_WORDS: LazyLock<Regex> = LazyLock::new(|| {
    re(
        r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
    )
});
/// GPT-2's pattern without its whitespace alternatives (the words it is applied to hold no whitespace); every
/// non-space char is covered, so nothing is dropped.
static GPT2_WORDS: LazyLock<Regex> =
    LazyLock::new(|| re(r"'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}+|[^\s\p{L}\p{N}]+|\s+"));
/// BasicTokenizer `_is_control` minus `\t \n \r`, plus NUL and U+FFFD.
static SLOW_DROP: LazyLock<Regex> = LazyLock::new(|| re(r"[\p{C}\x{FFFD}&&[^\t\n\r]]"));
/// BasicTokenizer `_is_whitespace`.
static SLOW_SPACE: LazyLock<Regex> = LazyLock::new(|| re(r"[\t\n\r\p{Zs}]"));
static FAST_SPACES: LazyLock<Regex> = LazyLock::new(|| re(r"\s+"));

/// BasicTokenizer `_is_chinese_char`: the CJK Unified Ideographs blocks (not kana or hangul).
fn is_cjk_ideograph(c: char) -> bool {
    matches!(u32::from(c),
        0x4E00..=0x9FFF | 0x3400..=0x4DBF | 0x20000..=0x2A6DF | 0x2A700..=0x2B73F | 0x2B740..=0x2B81F
        | 0x2B820..=0x2CEAF | 0xF900..=0xFAFF | 0x2F800..=0x2FA1F)
}

/// Python `str.isspace` (used by `str.split()` / `str.strip()`): Unicode White_Space plus U+001C..U+001F.
pub fn is_py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1C}'..='\u{1F}').contains(&c)
}

/// The slow tokenizer's text fix (BasicTokenizer path), returning the words joined by single spaces.
pub fn slow_clean(text: &str) -> String {
    let dropped = SLOW_DROP.replace_all(text, "");
    let spaced = SLOW_SPACE.replace_all(&dropped, " ");
    let mut cjk = String::with_capacity(spaced.len());
    for c in spaced.chars() {
        if is_cjk_ideograph(c) {
            cjk.push(' ');
            cjk.push(c);
            cjk.push(' ');
        } else {
            cjk.push(c);
        }
    }
    let nfc: String = cjk.nfc().collect();
    let words: Vec<String> = nfc
        .split(is_py_space)
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect();
    words.join(" ")
}

/// The fast tokenizer's normalizer: NFC, whitespace runs → one space, per-char lower-casing.
pub fn fast_normalize(text: &str) -> String {
    let nfc: String = text.nfc().collect();
    FAST_SPACES
        .replace_all(&nfc, " ")
        .chars()
        .flat_map(char::to_lowercase)
        .collect()
}

/// Words of cleaned slow-path text.
pub fn slow_words(text: &str) -> impl Iterator<Item = &str> {
    SLOW_WORDS.find_iter(text).map(|m| m.as_str())
}

/// Words of normalized fast-path text.
pub fn fast_words(text: &str) -> Vec<&str> {
    FAST_WORDS
        .find_iter(text)
        .flat_map(|m| GPT2_WORDS.find_iter(m.as_str()).map(|w| w.as_str()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slow_clean_follows_basic_tokenizer() {
        assert_eq!(slow_clean("  Hello\tWORLD\n"), "hello world");
        assert_eq!(slow_clean("a\u{200d}b\u{0}c\u{fffd}"), "abc");
        assert_eq!(slow_clean("你好x"), "你 好 x");
        assert_eq!(slow_clean("ΟΔΟΣ"), "οδος");
        assert_eq!(slow_clean("cafe\u{301}"), "caf\u{e9}");
        assert_eq!(slow_clean("a\u{3000}b\u{2028}c"), "a b c");
    }

    #[test]
    fn fast_normalize_keeps_controls_and_uses_plain_sigma() {
        assert_eq!(fast_normalize("  A\t\nB"), " a b");
        assert_eq!(fast_normalize("ΟΔΟΣ"), "οδοσ");
        assert_eq!(fast_normalize("a\u{200d}b"), "a\u{200d}b");
    }

    #[test]
    fn word_patterns() {
        let w: Vec<&str> = slow_words("don't it'\u{17f} 12 ab!!").collect();
        assert_eq!(w, ["don", "'t", "it", "'\u{17f}", "1", "2", "ab", "!!"]);
        assert_eq!(
            fast_words("it'\u{17f} <|endoftext|>"),
            ["it", "'", "\u{17f}", "<|", "endoftext", "|>"]
        );
    }
}
