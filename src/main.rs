use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = candela::cli::Cli::parse();
    candela::cli::init_logging();
    match candela::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
