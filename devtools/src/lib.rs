//! Development tools that play the outside world in tests, benchmarks and `docker compose`:
//!
//! * [`demo_source`]: the legacy source API for the two legacy sources, with records that keep
//!   appearing and fault switches;
//! * [`mock_llm`]: an OpenAI-compatible chat-completions server speaking the wire protocol.
#![forbid(unsafe_code)]

pub mod demo_source;
pub mod mock_llm;

/// A token cancelled on SIGTERM or Ctrl-C, for the tools' `main`.
pub fn shutdown_on_signal() -> std::io::Result<tokio_util::sync::CancellationToken> {
    let token = tokio_util::sync::CancellationToken::new();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let stop = token.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        stop.cancel();
    });
    Ok(token)
}
