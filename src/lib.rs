//! candela: an OpenAI-compatible image generation server with a built-in candle engine.
//!
//! `api` (HTTP, never touches candle) → `jobs` (engine handle and worker) → `engine` (candle);
//! `auth`, `db` and `storage` serve the API.

pub mod api;
pub mod auth;
pub mod cli;
pub mod db;
pub mod engine;
pub mod jobs;
pub mod large_pages;
pub mod server;
pub mod storage;

#[global_allocator]
static ALLOCATOR: large_pages::LargePages = large_pages::LargePages;
