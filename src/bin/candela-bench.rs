//! `candela bench` without the server: the small binary that travels to a lent GPU machine
//! (tools/bench/gpu/).
use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = candela::cli::BenchOnly::parse();
    candela::cli::init_logging();
    match candela::cli::run_bench_only(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
