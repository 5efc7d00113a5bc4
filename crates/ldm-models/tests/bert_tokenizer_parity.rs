//! BERT WordPiece tokenizer parity with transformers on ~70 hard prompts (unicode, accents, CJK, emoji,
//! punctuation, controls, numbers, special-token text, > 77 tokens). References: `tools/fixtures/make_bert_tokenizer.py`
//! → `fixtures/ldmbert-tiny/tokens_{fast,slow}_v{4,5}.json` (transformers 4.57.3 / tokenizers 0.22.2 and
//! transformers 5.25.0 / tokenizers 0.23.x). Ids are compared exactly.
use std::path::PathBuf;

use ldm_models::tokenizer::{BertFlavor, BertTokenizer};
use serde_json::Value;

fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/ldmbert-tiny")
        .join(rel)
}

fn ids(v: &Value) -> Vec<Vec<u32>> {
    v.as_array()
        .expect("list of id lists")
        .iter()
        .map(|row| {
            row.as_array()
                .expect("id list")
                .iter()
                .map(|i| u32::try_from(i.as_u64().expect("id")).expect("u32 id"))
                .collect()
        })
        .collect()
}

fn check(file: &str, tok: &BertTokenizer) {
    let path = fixture(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let doc: Value = serde_json::from_str(&text).expect("fixture json");
    let prompts: Vec<&str> = doc["prompts"]
        .as_array()
        .expect("prompts")
        .iter()
        .map(|p| p.as_str().expect("prompt"))
        .collect();
    assert!(prompts.len() >= 50);
    let (padded, raw, len8) = (ids(&doc["ids"]), ids(&doc["raw"]), ids(&doc["len8"]));
    let mut failures = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        let got77 = tok.encode_for_model(p);
        let got_raw = tok.encode(p);
        let got8 = tok.encode_padded(p, 8).expect("8 >= 2");
        for (what, got, want) in [
            ("77", &got77, &padded[i]),
            ("raw", &got_raw, &raw[i]),
            ("len8", &got8, &len8[i]),
        ] {
            if got != want {
                failures.push(format!(
                    "{file} #{i} {what} {p:?}:\n  got  {got:?}\n  want {want:?}"
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn fast_matches_transformers_5_bert_tokenizer() {
    check("tokens_fast_v5.json", &BertTokenizer::builtin());
}

#[test]
fn fast_matches_transformers_4_bert_tokenizer_fast() {
    check("tokens_fast_v4.json", &BertTokenizer::builtin());
}

#[test]
fn slow_v4_matches_transformers_4_bert_tokenizer() {
    check(
        "tokens_slow_v4.json",
        &BertTokenizer::builtin().with_flavor(BertFlavor::SlowV4),
    );
}

#[test]
fn slow_v5_matches_transformers_5_bert_tokenizer_legacy() {
    check(
        "tokens_slow_v5.json",
        &BertTokenizer::builtin().with_flavor(BertFlavor::SlowV5),
    );
}

#[test]
fn diffusers_tokenizer_folder_matches_builtin() {
    let dir = fixture("diffusers/tokenizer");
    let tok = BertTokenizer::from_dir(&dir).expect("tokenizer folder");
    assert_eq!(tok.vocab_size(), 30522);
    assert_eq!(tok.pad_id(), 0);
    check("tokens_fast_v5.json", &tok);
    let fallback = BertTokenizer::from_dir_or_builtin(&fixture("no-such-dir")).expect("builtin");
    assert_eq!(fallback.vocab_size(), 30522);
}
