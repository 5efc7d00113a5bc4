//! Building blocks of the LDM UNet, named and keyed as in the original `ldm.modules` code.
pub mod attention;
pub mod embed;
pub mod legacy_attention;
pub mod resnet;
pub mod sample;
pub mod transformer;
