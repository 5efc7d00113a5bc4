//! Added (special) tokens: text equal to one of them is cut out before any clean-up and maps straight to its id.
//! transformers does this for every special token it knows — `<|startoftext|>`, `<|endoftext|>` and also the pad
//! token, so with SD2's pad token `!` every `!` of a prompt becomes id 0 on its own.

use super::text::is_py_space;

/// One added token, with the flags of transformers' `AddedToken` that change tokenization.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddedToken {
    pub content: String,
    pub id: u32,
    /// Matched after normalization (fast tokenizer only; the slow one always matches the raw text).
    pub normalized: bool,
    /// Eat whitespace on the left / right of the match.
    pub lstrip: bool,
    pub rstrip: bool,
}

/// A piece of text after cutting out added tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece<'a> {
    Text(&'a str),
    Added(u32),
}

/// Cuts `text` at the leftmost-longest occurrences of `tokens` (as transformers' `Trie.split` and tokenizers'
/// `AddedVocabulary` do), applying `lstrip`/`rstrip` to the neighbouring text. Empty text pieces are dropped.
pub fn split<'a>(text: &'a str, tokens: &[&AddedToken]) -> Vec<Piece<'a>> {
    let mut out = Vec::new();
    if tokens.is_empty() {
        if !text.is_empty() {
            out.push(Piece::Text(text));
        }
        return out;
    }
    let mut start = 0; // start of the pending text piece
    let mut pos = 0;
    let mut strip_next_left = false;
    while pos < text.len() {
        let rest = &text[pos..];
        let hit = tokens
            .iter()
            .filter(|t| !t.content.is_empty() && rest.starts_with(t.content.as_str()))
            .max_by_key(|t| t.content.len());
        match hit {
            Some(tok) => {
                let mut before = &text[start..pos];
                if strip_next_left {
                    before = before.trim_start_matches(is_py_space);
                }
                if tok.lstrip {
                    before = before.trim_end_matches(is_py_space);
                }
                if !before.is_empty() {
                    out.push(Piece::Text(before));
                }
                out.push(Piece::Added(tok.id));
                pos += tok.content.len();
                start = pos;
                strip_next_left = tok.rstrip;
            }
            None => {
                pos += rest.chars().next().map_or(1, char::len_utf8);
            }
        }
    }
    let mut tail = &text[start..];
    if strip_next_left {
        tail = tail.trim_start_matches(is_py_space);
    }
    if !tail.is_empty() {
        out.push(Piece::Text(tail));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tok(content: &str, id: u32) -> AddedToken {
        AddedToken {
            content: content.into(),
            id,
            normalized: false,
            lstrip: false,
            rstrip: false,
        }
    }

    #[test]
    fn cuts_leftmost_longest() {
        let a = tok("<|endoftext|>", 7);
        let b = tok("!", 0);
        let c = tok("!!", 9);
        let p = split("x!!!<|endoftext|>y", &[&a, &b, &c]);
        assert_eq!(
            p,
            [
                Piece::Text("x"),
                Piece::Added(9),
                Piece::Added(0),
                Piece::Added(7),
                Piece::Text("y")
            ]
        );
        assert_eq!(split("", &[&a]), []);
    }

    #[test]
    fn strips_neighbours() {
        let mut a = tok("<x>", 1);
        a.lstrip = true;
        a.rstrip = true;
        assert_eq!(
            split("a  <x>  b", &[&a]),
            [Piece::Text("a"), Piece::Added(1), Piece::Text("b")]
        );
    }
}
