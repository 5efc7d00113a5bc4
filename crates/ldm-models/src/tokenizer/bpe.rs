//! Byte-level BPE of CLIP (Radford et al. 2021), as in OpenAI's `simple_tokenizer.py` and transformers'
//! `CLIPTokenizer.bpe`: a word is first written with GPT-2's reversible byte → printable-char table, its last
//! symbol gets the end-of-word marker `</w>`, then the lowest-ranked adjacent pair is merged (every
//! non-overlapping occurrence, left to right) until no pair of the word has a rank.

use std::collections::HashMap;
use std::io::Read;
use std::sync::{Arc, OnceLock};

/// Number of merges CLIP uses out of `bpe_simple_vocab_16e6.txt` (49152 − 256 − 2).
pub const CLIP_MERGES: usize = 49152 - 256 - 2;
/// Marker appended to the last symbol of every word.
pub const END_OF_WORD: &str = "</w>";

/// OpenAI's merge list (MIT licence, see `assets/README.md`), gzip-compressed.
static BPE_SIMPLE_VOCAB_GZ: &[u8] = include_bytes!("../../assets/bpe_simple_vocab_16e6.txt.gz");

/// GPT-2's byte → char table in CLIP's vocabulary order: the printable bytes `!`..`~`, `¡`..`¬`, `®`..`ÿ` map to
/// themselves, the remaining 68 bytes (in increasing order) to U+0100, U+0101, ….
/// Returns the (byte, char) pairs in vocabulary order.
pub fn byte_symbols() -> Vec<(u8, char)> {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut out: Vec<(u8, char)> = (0u8..=255)
        .filter(|&b| printable(b))
        .map(|b| (b, char::from(b)))
        .collect();
    for (code, b) in (256u32..).zip((0u8..=255).filter(|&b| !printable(b))) {
        out.push((
            b,
            char::from_u32(code).expect("invariant: 256..324 are valid chars"),
        ));
    }
    out
}

/// byte value → its printable char.
pub fn byte_table() -> [char; 256] {
    let mut table = ['\0'; 256];
    for (b, c) in byte_symbols() {
        table[usize::from(b)] = c;
    }
    table
}

/// A vocabulary (token → id, id → token) and a merge table.
#[derive(Debug)]
pub struct BpeModel {
    encoder: HashMap<String, u32>,
    decoder: HashMap<u32, String>,
    /// `"first second"` → rank (a later duplicate overrides an earlier one, as in Python's `dict(zip(..))`).
    ranks: HashMap<String, u32>,
    byte_table: [char; 256],
}

impl BpeModel {
    pub fn new(encoder: HashMap<String, u32>, merges: &[(String, String)]) -> Self {
        let decoder = encoder.iter().map(|(k, &v)| (v, k.clone())).collect();
        let mut ranks = HashMap::with_capacity(merges.len());
        for (rank, (a, b)) in merges.iter().enumerate() {
            ranks.insert(format!("{a} {b}"), u32::try_from(rank).unwrap_or(u32::MAX));
        }
        Self {
            encoder,
            decoder,
            ranks,
            byte_table: byte_table(),
        }
    }

    /// The built-in CLIP vocabulary (49408 tokens), decompressed and built once per process.
    pub fn builtin() -> Arc<Self> {
        static MODEL: OnceLock<Arc<BpeModel>> = OnceLock::new();
        MODEL
            .get_or_init(|| {
                let (encoder, merges) = builtin_vocab();
                Arc::new(Self::new(encoder, &merges))
            })
            .clone()
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.encoder.get(token).copied()
    }

    pub fn id_to_token(&self, id: u32) -> Option<&str> {
        self.decoder.get(&id).map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.encoder.len()
    }

    pub fn is_empty(&self) -> bool {
        self.encoder.is_empty()
    }

    pub fn vocab(&self) -> &HashMap<String, u32> {
        &self.encoder
    }

    /// The word written with the byte → char table.
    pub fn byte_encode(&self, word: &str) -> String {
        word.bytes()
            .map(|b| self.byte_table[usize::from(b)])
            .collect()
    }

    /// BPE of one byte-encoded word; returns the symbols (the last one ends in `</w>`). With `rank_limit`,
    /// only the first `rank_limit` merges are used (the slow tokenizer reads at most [`CLIP_MERGES`]).
    pub fn merge_word(&self, word: &str, rank_limit: Option<usize>) -> Vec<String> {
        let limit = rank_limit.map_or(u32::MAX, |n| u32::try_from(n).unwrap_or(u32::MAX));
        let mut symbols: Vec<String> = word.chars().map(String::from).collect();
        match symbols.last_mut() {
            Some(last) => last.push_str(END_OF_WORD),
            None => return symbols,
        }
        let mut key = String::new();
        while symbols.len() > 1 {
            let mut best: Option<(u32, usize)> = None;
            for i in 0..symbols.len() - 1 {
                key.clear();
                key.push_str(&symbols[i]);
                key.push(' ');
                key.push_str(&symbols[i + 1]);
                if let Some(&rank) = self.ranks.get(key.as_str()).filter(|&&r| r < limit) {
                    if best.is_none_or(|(r, _)| rank < r) {
                        best = Some((rank, i));
                    }
                }
            }
            let Some((_, at)) = best else { break };
            let (first, second) = (symbols[at].clone(), symbols[at + 1].clone());
            let mut merged = Vec::with_capacity(symbols.len() - 1);
            let mut i = 0;
            while i < symbols.len() {
                if i + 1 < symbols.len() && symbols[i] == first && symbols[i + 1] == second {
                    merged.push(format!("{first}{second}"));
                    i += 2;
                } else {
                    merged.push(std::mem::take(&mut symbols[i]));
                    i += 1;
                }
            }
            symbols = merged;
        }
        symbols
    }
}

/// CLIP's vocabulary from the embedded merge list: the 256 byte chars, the same with `</w>`, the first
/// [`CLIP_MERGES`] merges joined, `<|startoftext|>`, `<|endoftext|>` (ids 0..49408 in that order).
pub fn builtin_vocab() -> (HashMap<String, u32>, Vec<(String, String)>) {
    let mut text = String::new();
    flate2::read::GzDecoder::new(BPE_SIMPLE_VOCAB_GZ)
        .read_to_string(&mut text)
        .expect("invariant: the embedded merge list is valid gzip'd UTF-8");
    let merges: Vec<(String, String)> = text
        .split('\n')
        .skip(1)
        .take(CLIP_MERGES)
        .map(|line| {
            let mut parts = line.split_whitespace();
            match (parts.next(), parts.next()) {
                (Some(a), Some(b)) => (a.to_owned(), b.to_owned()),
                _ => panic!("invariant: embedded merge line `{line}` has two symbols"),
            }
        })
        .collect();
    let chars: Vec<char> = byte_symbols().into_iter().map(|(_, c)| c).collect();
    let mut tokens: Vec<String> = chars.iter().map(|c| c.to_string()).collect();
    tokens.extend(chars.iter().map(|c| format!("{c}{END_OF_WORD}")));
    tokens.extend(merges.iter().map(|(a, b)| format!("{a}{b}")));
    tokens.push("<|startoftext|>".to_owned());
    tokens.push("<|endoftext|>".to_owned());
    let encoder = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| (t, i as u32))
        .collect();
    (encoder, merges)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_vocab_has_clip_layout() {
        let m = BpeModel::builtin();
        assert_eq!(m.len(), 49408);
        assert_eq!(m.token_to_id("!"), Some(0));
        assert_eq!(m.token_to_id("!</w>"), Some(256));
        assert_eq!(m.token_to_id("<|startoftext|>"), Some(49406));
        assert_eq!(m.token_to_id("<|endoftext|>"), Some(49407));
        // First merges of the list: `i n`, `t h`.
        assert_eq!(m.token_to_id("in"), Some(512));
        assert_eq!(m.token_to_id("th"), Some(513));
    }

    #[test]
    fn byte_table_is_a_bijection_onto_printable_chars() {
        let t = byte_table();
        let mut seen: Vec<char> = t.to_vec();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), 256);
        assert_eq!(t[usize::from(b' ')], '\u{120}'); // `Ġ`
        assert_eq!(t[usize::from(b'a')], 'a');
    }

    #[test]
    fn merges_whole_words() {
        let m = BpeModel::builtin();
        assert_eq!(m.merge_word("hello", None), vec!["hello</w>".to_owned()]);
        assert_eq!(m.merge_word("x", None), vec!["x</w>".to_owned()]);
        assert!(m.merge_word("", None).is_empty());
    }
}
