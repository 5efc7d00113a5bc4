//! ldm-kernels: CPU kernels for the operations where candle is slow on the CPU, as candle custom ops with
//! backward passes, each falling back to candle's own operation on other devices and dtypes; and `nn`-style
//! modules that use them.
pub mod conv;
pub mod nn;
pub mod norm;

pub use conv::{conv2d, ConvParams};
pub use nn::{Conv2d, GroupNorm};
pub use norm::{group_norm, silu};
