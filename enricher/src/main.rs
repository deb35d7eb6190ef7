use std::process::ExitCode;

fn main() -> ExitCode {
    tardis_common::app::main(
        enricher::COMPONENT,
        enricher::Config::from_env,
        enricher::run,
    )
}
