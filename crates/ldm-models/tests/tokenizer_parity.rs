//! Token ids of `ldm_models::tokenizer::ClipTokenizer` against HuggingFace transformers.
//!
//! Fixtures: fixtures/tokenizer/{slow,fast_v4,fast_v5}.json, written by tools/fixtures/make_tokenizer.py
//! (slow + fast_v4: transformers 4.57.3 / tokenizers 0.22.2 without ftfy; fast_v5: transformers 5.25.0 /
//! tokenizers 0.23.3). Ids are integers: every comparison is exact equality.
//! Tokenizer folders are rebuilt in a temp dir from the fixture's small config files plus vocab.json /
//! merges.txt / tokenizer.json made from the built-in vocabulary.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use ldm_models::tokenizer::{builtin_vocab, ClipTokenizer, Flavor, Pad};
use serde_json::{json, Value};

/// The one prompt where transformers 4.x fast and 5.x fast disagree (4.x marks `<|endoftext|>` and
/// `<|startoftext|>` `normalized`, so their upper-case spellings are recognised); `Flavor::Fast` follows 5.x.
const V4_FAST_ONLY: &str = "<|ENDOFTEXT|> and <|StartOfText|>";

fn fixture(name: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/tokenizer")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn ids_of(v: &Value) -> Vec<Vec<u32>> {
    v.as_array()
        .expect("id lists")
        .iter()
        .map(|row| {
            row.as_array()
                .expect("ids")
                .iter()
                .map(|i| i.as_u64().expect("id") as u32)
                .collect()
        })
        .collect()
}

/// Writes a tokenizer folder for fixture dir `name` and returns its path.
fn write_dir(doc: &Value, file: &str, name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("tokenizer-{file}-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let spec = &doc["dirs"][name];
    for (fname, content) in spec["files"].as_object().expect("files") {
        std::fs::write(
            dir.join(fname),
            serde_json::to_string_pretty(content).expect("json"),
        )
        .expect("write");
    }
    let (encoder, merges) = builtin_vocab();
    for big in spec["big_files"].as_array().expect("big_files") {
        match big.as_str().expect("name") {
            "vocab.json" => std::fs::write(
                dir.join("vocab.json"),
                serde_json::to_string(&encoder).expect("json"),
            )
            .expect("write"),
            "merges.txt" => {
                let mut text = String::from("#version: 0.2\n");
                for (a, b) in &merges {
                    text.push_str(&format!("{a} {b}\n"));
                }
                std::fs::write(dir.join("merges.txt"), text).expect("write");
            }
            "tokenizer.json" => {
                let merges: Vec<[&String; 2]> = merges.iter().map(|(a, b)| [a, b]).collect();
                let tj = json!({
                    "version": "1.0",
                    "added_tokens": doc["tokenizer_json_added_tokens"],
                    "model": {"type": "BPE", "unk_token": "<|endoftext|>", "end_of_word_suffix": "</w>",
                              "vocab": encoder, "merges": merges},
                });
                std::fs::write(
                    dir.join("tokenizer.json"),
                    serde_json::to_string(&tj).expect("json"),
                )
                .expect("write");
            }
            other => panic!("unknown big file {other}"),
        }
    }
    dir
}

struct Tally {
    lines: Vec<String>,
    failures: Vec<String>,
}

impl Tally {
    fn compare(
        &mut self,
        label: &str,
        prompts: &[String],
        skip: &[&str],
        want: &[Vec<u32>],
        got: impl Fn(&str) -> Vec<u32>,
    ) {
        let mut matched = 0;
        let mut compared = 0;
        for (p, w) in prompts.iter().zip(want) {
            if skip.contains(&p.as_str()) {
                continue;
            }
            compared += 1;
            let g = got(p);
            if &g == w {
                matched += 1;
            } else {
                self.failures
                    .push(format!("{label}: {p:?}\n   want {w:?}\n    got {g:?}"));
            }
        }
        self.lines
            .push(format!("{label}: {matched}/{compared} prompts identical"));
    }
}

fn check_file(file: &str, flavor: Flavor, skip: &[&str]) {
    let doc = fixture(&format!("{file}.json"));
    let prompts: Vec<String> = doc["prompts"]
        .as_array()
        .expect("prompts")
        .iter()
        .map(|p| p.as_str().expect("str").to_owned())
        .collect();
    assert!(
        prompts.len() >= 40,
        "{file}: only {} prompts",
        prompts.len()
    );
    let mut tally = Tally {
        lines: Vec::new(),
        failures: Vec::new(),
    };
    for setup in doc["setups"].as_array().expect("setups") {
        let name = setup["name"].as_str().expect("name");
        let tok = if let Some(dir_name) = name.strip_prefix("dir:") {
            let dir = write_dir(&doc, file, dir_name);
            let t = ClipTokenizer::from_dir(&dir).unwrap_or_else(|e| panic!("{file} {name}: {e}"));
            std::fs::remove_dir_all(&dir).expect("cleanup");
            t
        } else {
            let pad = match setup["pad_token"].as_str().expect("pad") {
                "<|endoftext|>" => Pad::EndOfText,
                other => Pad::Token(other.to_owned()),
            };
            ClipTokenizer::builtin()
                .with_padding(pad)
                .expect("pad token in vocab")
        }
        .with_flavor(flavor);
        assert_eq!(
            u64::from(tok.pad_id()),
            setup["pad_id"].as_u64().expect("pad_id"),
            "{file} {name}"
        );
        let max_len = setup["max_length"].as_u64().expect("max_length") as usize;
        assert_eq!(tok.model_max_length(), max_len, "{file} {name}");
        let label = format!("{file} {name}");
        tally.compare(&label, &prompts, skip, &ids_of(&setup["ids"]), |p| {
            tok.encode_for_model(p)
        });
        if !setup["raw"].is_null() {
            tally.compare(
                &format!("{label} raw"),
                &prompts,
                skip,
                &ids_of(&setup["raw"]),
                |p| tok.encode(p),
            );
            tally.compare(
                &format!("{label} len8"),
                &prompts,
                skip,
                &ids_of(&setup["len8"]),
                |p| tok.encode_padded(p, 8).expect("8 >= 2"),
            );
        }
    }
    for line in &tally.lines {
        eprintln!("{line}");
    }
    assert!(
        tally.failures.is_empty(),
        "{} mismatches:\n{}",
        tally.failures.len(),
        tally.failures.join("\n")
    );
}

#[test]
fn slow_flavor_matches_transformers_4_clip_tokenizer() {
    check_file("slow", Flavor::Slow, &[]);
}

#[test]
fn fast_flavor_matches_transformers_5_clip_tokenizer() {
    check_file("fast_v5", Flavor::Fast, &[]);
}

#[test]
fn fast_flavor_matches_transformers_4_clip_tokenizer_fast_but_one_prompt() {
    check_file("fast_v4", Flavor::Fast, &[V4_FAST_ONLY]);
}

#[test]
fn every_padded_encoding_has_max_len_ids() {
    let doc = fixture("slow.json");
    let tok = ClipTokenizer::builtin();
    let sd2 = ClipTokenizer::builtin()
        .with_padding(Pad::sd2())
        .expect("`!` in vocab");
    let mut lens: HashMap<usize, usize> = HashMap::new();
    for p in doc["prompts"].as_array().expect("prompts") {
        let p = p.as_str().expect("str");
        for n in [2, 3, 8, 77, 100] {
            for t in [&tok, &sd2] {
                let ids = t.encode_padded(p, n).expect("n >= 2");
                assert_eq!(ids.len(), n);
                assert_eq!(ids[0], 49406);
                *lens.entry(n).or_default() += 1;
            }
        }
    }
    assert_eq!(lens.len(), 5);
}

/// The two flavors must differ exactly where transformers' slow and 5.x fast tokenizers differ (10 of the
/// prompts: control/format chars, CJK, final sigma, `'ſ`, upper-case special-token text), so the fixtures
/// really tell them apart.
#[test]
fn flavors_differ_exactly_where_transformers_implementations_differ() {
    let slow = fixture("slow.json");
    let fast = fixture("fast_v5.json");
    let builtin_ids = |doc: &Value| ids_of(&doc["setups"][0]["ids"]);
    assert_eq!(slow["setups"][0]["name"], "builtin_sd1");
    assert_eq!(fast["setups"][0]["name"], "builtin_sd1");
    let (want_slow, want_fast) = (builtin_ids(&slow), builtin_ids(&fast));
    let tok_slow = ClipTokenizer::builtin();
    let tok_fast = ClipTokenizer::builtin().with_flavor(Flavor::Fast);
    let prompts = slow["prompts"].as_array().expect("prompts");
    let mut reference = Vec::new();
    let mut ours = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        let p = p.as_str().expect("str");
        if want_slow[i] != want_fast[i] {
            reference.push(p);
        }
        if tok_slow.encode_for_model(p) != tok_fast.encode_for_model(p) {
            ours.push(p);
        }
    }
    assert_eq!(reference.len(), 10, "{reference:?}");
    assert_eq!(ours, reference);
}
