//! Network definitions. Each reads its sizes from the component's `config.json`.

pub mod attention;
pub mod blocks;
pub mod clip;
pub mod cpu_activation;
pub mod cpu_attention;
pub mod cpu_conv;
pub mod cpu_norm;
pub mod cpu_winograd;
pub mod dit;
pub mod flux;
pub mod mmdit;
pub mod t5;
pub mod unet;
pub mod vae;
