//! `--device` and `--dtype`, shared by every command that runs a model.
use clap::Args;
use ldm_pipeline::compute::{parse_dtype, Compute, DeviceSpec};

#[derive(Args, Clone, Debug)]
pub struct ComputeArgs {
    /// cpu, cuda, cuda:N, or auto (CUDA when this build has it and a GPU answers). CUDA needs a build with
    /// `--features cuda` (tools/build-cuda.sh).
    #[arg(long, default_value = "cpu", value_name = "DEVICE")]
    pub device: String,
    /// Compute dtype of the networks: f32, f16 or bf16. Default: f32 on the CPU, f16 on CUDA. The sampler
    /// keeps f32 latents either way.
    #[arg(long, value_name = "DTYPE")]
    pub dtype: Option<String>,
}

impl ComputeArgs {
    /// Opens the device (failing at once, before any slow loading, when it cannot be used).
    pub fn resolve(&self) -> anyhow::Result<Compute> {
        let device: DeviceSpec = self.device.parse()?;
        let dtype = self.dtype.as_deref().map(parse_dtype).transpose()?;
        Ok(Compute::resolve(device, dtype)?)
    }
}
