//! Tardis's test harness and integration tests.
//!
//! [`harness`] is the library every integration test uses: real `nats-server` and Postgres
//! processes, the worker binaries, polling helpers. The tests themselves are modules of this
//! crate compiled only under `cfg(test)`, so they build as one test binary sharing one NATS
//! server and one Postgres server, each test isolated by a name prefix and a fresh database.
#![forbid(unsafe_code)]

pub mod bench;
pub mod harness;

#[cfg(test)]
mod it;
