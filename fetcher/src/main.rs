use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = fetcher::config::Cli::parse();
    tardis_common::app::main(
        fetcher::COMPONENT,
        |env| fetcher::Config::from_cli(env, cli.command),
        fetcher::run,
    )
}
