#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use mde_actiond::cli::{self, Cli, Command};
use mde_actiond::logging;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Commands that print results keep stderr quiet unless something is wrong.
    let default_filter = match cli.command {
        Command::Run => "info",
        Command::Demo(_) => "error",
        _ => "warn",
    };
    logging::init(cli.log_format, default_filter);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cli::run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(e.exit_code())
        }
    }
}
