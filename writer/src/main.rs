use std::process::ExitCode;

fn main() -> ExitCode {
    tardis_common::app::main(writer::COMPONENT, writer::Config::from_env, writer::run)
}
