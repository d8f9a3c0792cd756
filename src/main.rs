//! The `ringbroker` binary: parse the command line and `server.properties` into a `Config`, set up
//! logging, and run the node until SIGTERM/SIGINT.

use std::process::ExitCode;

use clap::Parser;
use ringbroker::config::{Cli, Config};

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let loaded = match Config::from_cli(&cli) {
        Ok(loaded) => loaded,
        Err(error) => {
            eprintln!("ringbroker: configuration error: {error}");
            return ExitCode::from(2);
        }
    };
    for warning in &loaded.warnings {
        tracing::warn!("config: {warning}");
    }
    match ringbroker::node::run(loaded.config, ringbroker::broker::BrokerFactory::new()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("ringbroker: {error:#}");
            ExitCode::FAILURE
        }
    }
}
