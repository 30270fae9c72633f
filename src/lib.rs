//! candela: an OpenAI-compatible image generation server with a built-in candle engine.

pub mod cli;
pub mod engine;
