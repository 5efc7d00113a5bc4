//! ldm-pipeline
