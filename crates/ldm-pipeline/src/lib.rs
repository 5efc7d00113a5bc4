//! ldm-pipeline: the only crate that joins models and samplers — opening checkpoints in their three forms,
//! building the networks strictly, and the generation tasks.
pub mod compute;
pub mod conditioned;
pub mod error;
pub mod img2img;
pub mod infotext;
pub mod init_image;
pub mod inpaint;
pub mod load;
pub mod load_diffusers;
pub mod lora;
pub mod mask;
pub mod models;
pub mod request;
pub mod source;
pub mod spec;
pub mod txt2img;

pub use compute::{Compute, DeviceSpec};
pub use conditioned::{sample, sample_with_rng, Condition};
pub use error::{PipelineError, Result};
pub use load::{open, ConfigOverride, Opened};
pub use models::SdModels;
pub use request::{GenerateRequest, ImageRequest, ImageTask, ValidImageRequest, ValidRequest};
