//! `tardis-probe [URL]`: exit 0 when `GET URL` answers 2xx within 3 s, 1 otherwise. Without a
//! URL, probes `/ready` on the port of `OPS_ADDR`. The images' HEALTHCHECK (they have no shell).

use std::process::ExitCode;
use std::time::Duration;

use tardis_common::config::ProcessEnv;
use tardis_common::probe::Target;

fn main() -> ExitCode {
    let target = match std::env::args().nth(1) {
        Some(url) => Target::from_url(&url),
        None => Target::from_env(&ProcessEnv),
    };
    let result = target.and_then(|t| t.check(Duration::from_secs(3)).map(|status| (t, status)));
    match result {
        Ok((_, status)) if (200..300).contains(&status) => ExitCode::SUCCESS,
        Ok((t, status)) => {
            eprintln!(
                "tardis-probe: {}:{}{} answered {status}",
                t.host, t.port, t.path
            );
            ExitCode::FAILURE
        }
        Err(error) => {
            eprintln!("tardis-probe: {error}");
            ExitCode::FAILURE
        }
    }
}
