//! ldm-sampling
