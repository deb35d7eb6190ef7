use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = writer::config::Cli::parse();
    let command = cli.command.unwrap_or_default();
    tardis_common::app::main(
        writer::COMPONENT,
        |env| writer::Config::from_env_with(env, command),
        writer::run,
    )
}
