//! Command-line entry points. Settings come from flags with environment fallbacks, read here
//! once and passed down; the engine never reads the environment itself.

pub mod bench;
mod device_kernel_bench;
mod device_parity;
mod generate;
mod kernel_bench;
mod load_bench;
mod random_gguf;
mod serve;
mod token;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::engine::loader::HubOptions;

#[derive(Parser, Debug)]
#[command(
    name = "candela",
    version,
    about = "OpenAI-compatible image generation on your own GPU or CPU"
)]
pub struct Cli {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(clap::Args, Debug, Clone)]
pub struct CommonArgs {
    /// Where candela keeps its database, images, secrets and the demo model.
    #[arg(
        long,
        env = "CANDELA_DATA_DIR",
        default_value = "./data",
        global = true
    )]
    pub data_dir: PathBuf,
    /// Hugging Face home (the hub cache is `$HF_HOME/hub`, shared with the Python tools).
    #[arg(long, env = "HF_HOME", global = true)]
    pub hf_home: Option<PathBuf>,
    /// Never touch the network; use only models already in the hub cache.
    #[arg(long, env = "HF_HUB_OFFLINE", value_parser = parse_flag, default_value = "false", global = true)]
    pub offline: bool,
    /// Token for gated/private repos.
    #[arg(long, env = "HF_TOKEN", global = true, hide_env_values = true)]
    pub hf_token: Option<String>,
    /// CPU threads for inference (default: every core), as torch's `set_num_threads`: leaves
    /// cores to the rest of a shared machine.
    #[arg(long, env = "CANDELA_THREADS", global = true)]
    pub threads: Option<std::num::NonZeroUsize>,
}

/// Sets the CPU thread count for the whole process. Must run before the first parallel
/// operation: rayon's global pool (our kernels) and candle's CPU ops (which size their `gemm`
/// calls by the same variable on every call) both read `RAYON_NUM_THREADS`, so one variable
/// keeps them in step.
fn set_cpu_threads(threads: Option<std::num::NonZeroUsize>) {
    if let Some(threads) = threads {
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    }
}

/// candle's element-wise CPU ops run on their own pool, whose workers spin 25 000 times after
/// each op before they sleep. Ours also runs rayon's pool (matrix products, our kernels), so a
/// spinning candle worker takes a core from the product that follows the op. Parking at once
/// made SDXL's prompt encoding (77-token CLIPs: many small ops between products) 16 % faster on
/// two cores (742–760 against 892–901 ms); the steps, whose ops are large, moved within noise
/// (docs/performance.md, session 17). A value the user sets is kept. Like
/// `set_cpu_threads`, it must run before the first CPU op (candle reads it once).
fn park_idle_candle_workers() {
    const SPIN_LIMIT: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";
    if std::env::var_os(SPIN_LIMIT).is_none() {
        std::env::set_var(SPIN_LIMIT, "0");
    }
}

fn parse_flag(s: &str) -> Result<bool, String> {
    match s.to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" | "" => Ok(false),
        other => Err(format!("expected a boolean, got `{other}`")),
    }
}

impl CommonArgs {
    pub fn hub_options(&self) -> HubOptions {
        HubOptions {
            cache_dir: self.hf_home.as_ref().map(|h| h.join("hub")),
            offline: self.offline,
            token: self.hf_token.clone(),
            progress: true,
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Generate images from a prompt.
    Generate(generate::GenerateArgs),
    /// Time the UNet and a whole generation (random weights, real-size configs) and print a table.
    Bench(bench::BenchArgs),
    /// Run the OpenAI-compatible HTTP server.
    Serve(serve::ServeArgs),
    /// Manage bearer tokens.
    #[command(subcommand)]
    Token(token::TokenCommand),
    /// Print the OpenAPI document (as committed in openapi/openapi.json).
    Openapi,
}

/// `--low-memory` (serve, generate) kept the CPU's 3×3 convolution weights out of Winograd's
/// larger form; since they are always held at their own size it changes nothing. Accepted so
/// that existing command lines and unit files keep working.
fn warn_retired_low_memory(on: bool) {
    if on {
        tracing::warn!(
            "--low-memory / CANDELA_LOW_MEMORY is retired and changes nothing: the CPU's 3×3 \
             convolution weights are always held at their own size"
        );
    }
}

/// `--quantize`: dense when absent.
fn weight_format(
    arg: Option<&str>,
) -> anyhow::Result<crate::engine::models::quantized::WeightFormat> {
    parse_format("--quantize", arg)
}

/// `--quantize-t5`: dense when absent.
fn t5_format(arg: Option<&str>) -> anyhow::Result<crate::engine::models::quantized::WeightFormat> {
    parse_format("--quantize-t5", arg)
}

fn parse_format(
    flag: &str,
    arg: Option<&str>,
) -> anyhow::Result<crate::engine::models::quantized::WeightFormat> {
    arg.map(str::parse)
        .transpose()
        .map_err(|e: String| anyhow::anyhow!("{flag}: {e}"))
        .map(Option::unwrap_or_default)
}

/// `candela-bench`: `candela bench` without the server, so that the binary carried to a GPU
/// machine is not weighed down by the HTTP stack, the database and the Swagger UI's assets.
#[derive(Parser, Debug)]
#[command(
    name = "candela-bench",
    version,
    about = "candela's benchmarks (the `candela bench` flags), without the server"
)]
pub struct BenchOnly {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub bench: bench::BenchArgs,
}

pub fn run_bench_only(cli: BenchOnly) -> anyhow::Result<()> {
    set_cpu_threads(cli.common.threads);
    park_idle_candle_workers();
    bench::run_engine(&cli.common, cli.bench)
}

pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CANDELA_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .try_init();
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    // `serve` falls back to its config file's `threads` when the flag is absent.
    set_cpu_threads(cli.common.threads);
    park_idle_candle_workers();
    match cli.command {
        Command::Generate(args) => generate::run(&cli.common, args),
        Command::Bench(args) => bench::run(&cli.common, args),
        Command::Serve(args) => serve::run(&cli.common, args),
        Command::Token(cmd) => token::run(&cli.common, cmd),
        Command::Openapi => {
            print!("{}", crate::api::openapi_json());
            Ok(())
        }
    }
}
