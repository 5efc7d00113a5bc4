//! ldm-models
pub mod tokenizer;
