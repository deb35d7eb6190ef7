//! Metrics every component exports, and the registry they live in.
//!
//! Each component builds one [`prometheus::Registry`] (no global registry), registers
//! [`register_common`] plus its own metrics, and hands it to the ops server.

use prometheus::{IntGaugeVec, Opts, Registry};

/// Registers `tardis_build_info{component,version}` (always 1) and the process collector
/// (`process_resident_memory_bytes`, CPU, open fds).
pub fn register_common(registry: &Registry, component: &str) -> prometheus::Result<()> {
    let info = IntGaugeVec::new(
        Opts::new(
            "tardis_build_info",
            "Build information of the running component (always 1)",
        ),
        &["component", "version"],
    )?;
    info.with_label_values(&[component, env!("CARGO_PKG_VERSION")])
        .set(1);
    registry.register(Box::new(info))?;
    registry.register(Box::new(
        prometheus::process_collector::ProcessCollector::for_self(),
    ))?;
    Ok(())
}

/// Registers `collector` in `registry` and returns it (for building metric structs).
pub fn register<C: prometheus::core::Collector + Clone + 'static>(
    registry: &Registry,
    collector: C,
) -> prometheus::Result<C> {
    registry.register(Box::new(collector.clone()))?;
    Ok(collector)
}
