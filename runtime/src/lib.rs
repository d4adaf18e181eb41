//! samepage-runtime: a wasmtime embedding whose linear memories the samepage merge engine can
//! share.
//!
//! A [`Host`] compiles modules and instantiates them, each [`Instance`] in a store of its own
//! with WASI preview 1. With [`MemoryBacking::Memfd`] (the default) every linear memory is a
//! memfd mapped into an address-space reservation (`src/memory.rs` explains how); with
//! `dedup` on, each is registered with a [`samepage_dedup::Engine`], whose scanner merges
//! identical pages across instances into shared copy-on-write pages.
//!
//! # The owner's guard
//!
//! Each instance has a [`samepage_dedup::Owner`]. The runtime holds the owner's guard
//! whenever the instance's memory can change: during instantiation (data segments), during
//! every call into the instance, and while the host reads or writes the memory through
//! [`Instance::with_memory`]. Between calls an instance is quiescent, and only then does the
//! scanner remap its pages. An embedder never handles the guard itself.
//!
//! ```no_run
//! use samepage_runtime::{Host, HostConfig, RunOutcome, WasiOptions};
//!
//! # fn main() -> Result<(), samepage_runtime::RuntimeError> {
//! let host = Host::new(HostConfig::default())?;
//! let module = host.load("examples/guests/fill.wat".as_ref())?;
//! let mut instance = host.instantiate(&module, &WasiOptions::default())?;
//! assert_eq!(instance.run_start()?, RunOutcome::Exited(0));
//! # Ok(())
//! # }
//! ```

mod embed;
mod error;
mod host;
mod instance;
mod memory;
mod store;

pub use embed::{Samepage, SamepageConfig};
pub use error::RuntimeError;
pub use host::{Host, HostConfig, HostState, MemoryBacking, Program};
pub use instance::{Instance, RunOutcome, WasiOptions};
pub use memory::MemoryError;
pub use store::{HasStoreOwner, MemoryRegion, StoreOwner};
pub use wasmtime::{Module, Val};
