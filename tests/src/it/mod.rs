//! Integration tests: real nats-server, real Postgres, real worker binaries.

mod binaries;
mod cluster;
mod config;
mod cost;
mod delivery;
mod enricher;
mod fetch_edges;
mod fetcher;
mod fleet;
mod manifests;
mod nats;
mod operations;
mod pipeline;
mod postgres;
mod support;
mod writer;
mod writer_copy;
