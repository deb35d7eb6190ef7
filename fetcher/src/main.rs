use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = fetcher::config::Cli::parse();
    if let Some(fetcher::config::CliCommand::Cursor(c)) = &cli.command {
        let name = match c {
            fetcher::config::CursorCommand::Show { .. } => "cursor show",
            fetcher::config::CursorCommand::Set { .. } => "cursor set",
            fetcher::config::CursorCommand::Reset { .. } => "cursor reset",
        };
        return tardis_common::cli::main(
            fetcher::COMPONENT,
            name,
            |env| fetcher::Config::from_cli(env, cli.command),
            fetcher::admin::cursor,
        );
    }
    tardis_common::app::main(
        fetcher::COMPONENT,
        |env| fetcher::Config::from_cli(env, cli.command),
        fetcher::run,
    )
}
