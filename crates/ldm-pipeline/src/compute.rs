//! Where and in which precision the networks run: the CLI's `--device cpu|cuda|cuda:N|auto` and
//! `--dtype f32|f16|bf16`.
//!
//! Only the networks change: [`crate::SdModels::build_on`] builds every weight in the chosen dtype on the chosen
//! device. The sampler's state (latents, σ arithmetic) stays f32, the noise is still drawn by the
//! torch-compatible CPU generator and then moved to the device, and images come back as f32 on the CPU, so a
//! seed gives the same noise on every device. CUDA needs a binary built with the `cuda` feature
//! (`tools/build-cuda.sh`); asking for it otherwise is an error that says so, as is asking for it on a machine
//! without a usable CUDA device.
use std::str::FromStr;

use candle_core::{DType, Device};

use crate::error::{PipelineError, Result};

/// A device as the user names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    #[default]
    Cpu,
    /// CUDA device number N (`cuda` is `cuda:0`).
    Cuda(usize),
    /// CUDA device 0 when this binary has CUDA support and a device answers; the CPU otherwise.
    Auto,
}

impl FromStr for DeviceSpec {
    type Err = PipelineError;

    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" | "gpu" => Ok(DeviceSpec::Cuda(0)),
            "auto" => Ok(DeviceSpec::Auto),
            other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(DeviceSpec::Cuda(n)),
                _ => Err(PipelineError::invalid(
                    "device",
                    format!("`{s}` is not a device: use cpu, cuda, cuda:N or auto"),
                )),
            },
        }
    }
}

/// `f32`, `f16` (also `fp16`, `half`) or `bf16`.
pub fn parse_dtype(s: &str) -> Result<DType> {
    match s.trim().to_ascii_lowercase().as_str() {
        "f32" | "fp32" | "float32" | "float" => Ok(DType::F32),
        "f16" | "fp16" | "float16" | "half" => Ok(DType::F16),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        _ => Err(PipelineError::invalid(
            "dtype",
            format!("`{s}` is not a compute dtype: use f32, f16 or bf16"),
        )),
    }
}

/// Whether this binary was built with candle's CUDA backend (the `cuda` feature).
pub const CUDA_BUILT: bool = cfg!(feature = "cuda");

/// A device and the dtype the networks' weights and activations have on it.
#[derive(Debug, Clone)]
pub struct Compute {
    pub device: Device,
    pub dtype: DType,
}

impl Default for Compute {
    fn default() -> Self {
        Compute::cpu()
    }
}

impl Compute {
    /// f32 on the CPU (what every fixture is checked in).
    pub fn cpu() -> Self {
        Compute {
            device: Device::Cpu,
            dtype: DType::F32,
        }
    }

    /// Opens `device` and picks the dtype: `dtype`, or f32 on the CPU and f16 on CUDA. Fails, naming the
    /// problem, when CUDA is asked of a binary built without it, when no CUDA device answers (no driver, no
    /// GPU, a bad number), or for a dtype other than f32/f16/bf16.
    pub fn resolve(device: DeviceSpec, dtype: Option<DType>) -> Result<Self> {
        let device = match device {
            DeviceSpec::Cpu => Device::Cpu,
            DeviceSpec::Cuda(n) => open_cuda(n)?,
            DeviceSpec::Auto => open_cuda(0).unwrap_or(Device::Cpu),
        };
        let dtype = match dtype {
            Some(d @ (DType::F32 | DType::F16 | DType::BF16)) => d,
            Some(other) => {
                return Err(PipelineError::invalid(
                    "dtype",
                    format!("{other:?} is not a compute dtype: use f32, f16 or bf16"),
                ))
            }
            None if device.is_cuda() => DType::F16,
            None => DType::F32,
        };
        if dtype == DType::BF16 && device.is_cpu() {
            // candle 0.11.1's CPU convolution has no bf16 matmul (`unsupported dtype BF16 for op matmul`).
            return Err(PipelineError::invalid(
                "dtype",
                "bf16 is not supported on the CPU (candle 0.11.1 has no bf16 convolution there): \
                 use f32 or f16 on the CPU, bf16 on CUDA",
            ));
        }
        Ok(Compute { device, dtype })
    }

    /// `cpu f32`, `cuda:0 f16`, … for logs and benchmark tables.
    pub fn describe(&self) -> String {
        let dev = match self.device.location() {
            candle_core::DeviceLocation::Cpu => "cpu".to_string(),
            candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
            candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
        };
        format!("{dev} {}", self.dtype.as_str())
    }
}

fn open_cuda(n: usize) -> Result<Device> {
    if !CUDA_BUILT {
        return Err(PipelineError::invalid(
            "device",
            "this ldm was built without CUDA support: rebuild with `--features cuda` \
             (tools/build-cuda.sh) or use --device cpu",
        ));
    }
    Device::new_cuda(n).map_err(|e| {
        // candle appends a backtrace after the first line; the first line names the driver's error.
        let e = e.to_string();
        let first = e.lines().next().unwrap_or_default();
        PipelineError::Device(format!(
            "CUDA device {n} cannot be opened (no NVIDIA driver or GPU here, or no device {n}): {first}"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_and_dtypes_parse() -> Result<()> {
        assert_eq!("cpu".parse::<DeviceSpec>()?, DeviceSpec::Cpu);
        assert_eq!("CUDA".parse::<DeviceSpec>()?, DeviceSpec::Cuda(0));
        assert_eq!("cuda:3".parse::<DeviceSpec>()?, DeviceSpec::Cuda(3));
        assert_eq!("auto".parse::<DeviceSpec>()?, DeviceSpec::Auto);
        for bad in ["cuda:", "cuda:x", "tpu", ""] {
            let err = bad.parse::<DeviceSpec>().err().map(|e| e.to_string());
            assert!(
                err.as_deref().is_some_and(|e| e.contains("device")),
                "{bad}: {err:?}"
            );
        }
        assert_eq!(parse_dtype("f16")?, DType::F16);
        assert_eq!(parse_dtype("BF16")?, DType::BF16);
        assert_eq!(parse_dtype("fp32")?, DType::F32);
        assert!(parse_dtype("f64").is_err());
        Ok(())
    }

    #[test]
    fn defaults_and_refusals() -> Result<()> {
        let c = Compute::resolve(DeviceSpec::Cpu, None)?;
        assert!(c.device.is_cpu() && c.dtype == DType::F32);
        assert_eq!(c.describe(), "cpu f32");
        let c = Compute::resolve(DeviceSpec::Cpu, Some(DType::F16))?;
        assert_eq!(c.dtype, DType::F16);
        assert!(Compute::resolve(DeviceSpec::Cpu, Some(DType::F64)).is_err());
        let bf16 = Compute::resolve(DeviceSpec::Cpu, Some(DType::BF16))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(bf16.contains("bf16 is not supported on the CPU"), "{bf16}");
        // No GPU in CI: CUDA is refused with a message that says why (built without it, or no device).
        if !CUDA_BUILT || Device::new_cuda(0).is_err() {
            let err = Compute::resolve(DeviceSpec::Cuda(0), None)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(
                err.contains("CUDA"),
                "unexpected error for --device cuda: {err}"
            );
            // auto falls back to the CPU.
            assert!(Compute::resolve(DeviceSpec::Auto, None)?.device.is_cpu());
        }
        Ok(())
    }
}
