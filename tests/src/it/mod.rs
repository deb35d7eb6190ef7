//! Integration tests: real nats-server, real Postgres, real worker binaries.

mod binaries;
mod config;
mod fetcher;
mod nats;
mod postgres;
mod support;
