//! The `igny8ctl` binary. See `igny8ctl --help`.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = igny8ctl::cli::Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("igny8ctl: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(igny8ctl::cli::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("igny8ctl: error: {e}");
            ExitCode::FAILURE
        }
    }
}
