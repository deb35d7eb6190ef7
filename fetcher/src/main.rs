use std::process::ExitCode;

fn main() -> ExitCode {
    tardis_common::app::main(fetcher::COMPONENT, fetcher::Config::from_env, fetcher::run)
}
