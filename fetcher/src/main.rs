use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = fetcher::config::Cli::parse();
    let command = cli.command.unwrap_or_default();
    tardis_common::app::main(
        fetcher::COMPONENT,
        |env| fetcher::Config::from_env_with(env, command),
        fetcher::run,
    )
}
