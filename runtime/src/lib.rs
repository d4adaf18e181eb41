//! samepage-runtime: wasmtime embeddings whose linear memories the samepage merge engine can
//! share.
//!
//! Two ways in:
//!
//! - **Under your own wasmtime set-up** ([`Samepage`], [`StoreOwner`]): one call configures a
//!   `wasmtime::Config` for memfd memories and returns the handle owning the merge engine;
//!   each store gets a [`StoreOwner`], which instantiates modules and components through your
//!   own `Linker<T>` and drives the quiescence contract with a call hook. Any `T`, any host
//!   functions. See `embed.rs` for what it configures and what it refuses.
//! - **A ready host** ([`Host`]): compiles programs and instantiates them, each in a store of
//!   its own with WASI (preview 1 for core modules, preview 2 for components), built on the
//!   same two pieces; its store data ([`HostState`]) holds the WASI context and the owner.
//!
//! With memfd backing every linear memory is a memfd mapped into an address-space reservation
//! (`src/memory.rs` explains how) and registered with a [`samepage_dedup::Engine`], whose
//! scanner merges identical pages across instances into shared copy-on-write pages.
//!
//! # The owner's guard
//!
//! Each store has a [`samepage_dedup::Owner`]. Its guard is held whenever the store's memory
//! can change: during instantiation (data segments, the start function), during every call
//! into wasm (host functions it calls included), and while the host reads or writes the
//! memory ([`StoreOwner::access`], [`Instance::with_memory`]). Between calls an instance is
//! quiescent, and only then does the scanner remap its pages. An embedder never handles the
//! guard itself (`src/store.rs` says how).
//!
//! ```no_run
//! use samepage_runtime::{Host, HostConfig, RunOutcome, WasiOptions};
//!
//! # fn main() -> Result<(), samepage_runtime::RuntimeError> {
//! let host = Host::new(HostConfig::default())?;
//! let program = host.load("examples/guests/fill.wat".as_ref())?;
//! let mut instance = host.instantiate(&program, &WasiOptions::default())?;
//! assert_eq!(instance.run_start()?, RunOutcome::Exited(0));
//! # Ok(())
//! # }
//! ```

pub mod cleanup;
mod embed;
mod error;
mod host;
mod host_state;
mod image;
mod instance;
mod limits;
pub mod measure;
mod memory;
mod program;
mod slots;
mod stdio;
mod store;

pub use embed::{Lifetime, Samepage, SamepageConfig};
pub use error::RuntimeError;
pub use host::{CompilationCache, Host, HostConfig, MemoryBacking};
pub use host_state::HostState;
pub use image::{
    Component, ImageError, Module, ModuleAt, ModuleImages, SegmentsKept, UnknownOrder, Unlifted,
};
pub use instance::{Instance, RunOutcome, WasiOptions};
pub use limits::{EPOCH_TICK, EpochTicker, Limits};
pub use memory::{MemoryError, MemoryRegion};
pub use program::{Program, is_component};
pub use slots::IDLE_SLOTS;
pub use stdio::{GuestOutput, HostStream};
pub use store::{ComponentPre, ComponentRef, HasStoreOwner, ModulePre, ModuleRef, StoreOwner};
pub use wasmtime::Val;
