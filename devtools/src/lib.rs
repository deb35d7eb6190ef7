//! Development tools that play the outside world in tests, benchmarks and `docker compose`:
//!
//! * [`demo_source`]: the legacy source API for the two legacy sources, with records that keep
//!   appearing and fault switches;
//! * [`mock_llm`]: an OpenAI-compatible chat-completions server speaking the wire protocol.
#![forbid(unsafe_code)]

pub mod demo_source;
pub mod mock_llm;
