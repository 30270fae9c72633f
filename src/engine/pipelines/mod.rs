//! Text-to-image pipelines, one per model family.

pub mod sd;
