use std::process::ExitCode;

fn main() -> ExitCode {
    match std::env::args().nth(1).as_deref() {
        None => tardis_common::app::main(
            enricher::COMPONENT,
            enricher::Config::from_env,
            enricher::run,
        ),
        // Creates the streams, the consumer and the budget bucket, then exits (a deployment's
        // bootstrap step, so that the autoscaler never looks at a consumer that does not exist).
        Some("provision") => tardis_common::app::main(
            enricher::COMPONENT,
            enricher::Config::from_env,
            enricher::provision,
        ),
        Some(other) => {
            eprintln!(
                "enricher: unknown command {other:?}; usage: enricher [provision] (no argument: run)"
            );
            ExitCode::from(64)
        }
    }
}
