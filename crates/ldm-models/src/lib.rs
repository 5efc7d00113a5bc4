//! ldm-models
