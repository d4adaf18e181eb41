//! What the guest API's tests share: a host with the API linked for core modules and
//! components.

use samepage_dedup::{EngineConfig, Knobs};
use samepage_runtime::{Host, HostConfig};

/// A host (merging when `dedup`, the scanner stepped by the test) with the guest API.
pub fn host(dedup: bool) -> Host {
    let mut host = Host::new(HostConfig {
        dedup,
        engine_config: EngineConfig::manual(Knobs::default()),
        ..HostConfig::default()
    })
    .expect("host");
    let (core, component) = host.linkers();
    samepage_host_api::add_to_linker(core).expect("core imports");
    samepage_host_api::add_to_component_linker(component).expect("component imports");
    host
}
