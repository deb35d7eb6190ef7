use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = writer::config::Cli::parse();
    let command = cli.command.unwrap_or_default();
    if command.is_admin() {
        let name = command.name();
        return tardis_common::cli::main(
            writer::COMPONENT,
            name,
            |env| writer::Config::from_env_with(env, command),
            writer::admin::run,
        );
    }
    tardis_common::app::main(
        writer::COMPONENT,
        |env| writer::Config::from_env_with(env, command),
        writer::run,
    )
}
