//! samepage under an embedder's own wasmtime set-up.
//!
//! ```no_run
//! # fn main() -> wasmtime::Result<()> {
//! use samepage_runtime::{Samepage, SamepageConfig};
//! use wasmtime::{Config, Engine, Linker, Module, Store};
//!
//! let mut config = Config::new();
//! let samepage = Samepage::configure(&mut config, SamepageConfig::default())?;
//! let engine = Engine::new(&config)?;
//! let module = Module::new(&engine, "(module (memory (export \"memory\") 1))")?;
//! let linker = Linker::new(&engine);
//!
//! let owner = samepage.owner(0);
//! let mut store = Store::new(&engine, owner.clone());
//! let instance = owner.instantiate(&mut store, &linker, &module)?;
//! # let _ = instance;
//! # Ok(())
//! # }
//! ```
//!
//! [`Samepage::configure`] makes every linear memory of the wasmtime engine a memfd that the
//! merge engine can remap (`crate::memory` says how), and sets what such memories need:
//!
//! - `memory_may_move(false)`: the merge engine knows a memory by its base address;
//! - `memory_init_cow(false)`: wasmtime's copy-on-write images map over a memory as if it
//!   were wasmtime's own mmap, which would replace the memfd; data segments are copied in
//!   instead (and merged at once, see [`SamepageConfig::merge_on_instantiate`]);
//! - the on-demand instance allocator: the pooling allocator keeps memories of its own and
//!   never asks a custom memory creator. An embedder who turns pooling on afterwards has the
//!   engine refused by wasmtime (pooling wants GC heaps to have the memories' guard size,
//!   see the next item), and one whose engine comes from another `Config` gets
//!   [`crate::RuntimeError::ForeignMemories`] at the first instantiation: never silently
//!   unmerged memory;
//! - a guard size of its own for GC heaps (`gc_heap_guard_size`), by which the memory
//!   creator tells a store's GC heap from the linear memories that module images are for.
//!
//! Shared memories (the threads proposal) are refused at instantiation: other threads would
//! write them without the owner's guard.
//!
//! Each store then gets a [`crate::StoreOwner`] from [`Samepage::owner`], which drives the
//! quiescence contract for it; any `T` and any host functions work.

use std::sync::Arc;

use samepage_dedup::{DomainId, EngineConfig, Owner};

use crate::RuntimeError;
use crate::memory::{GC_HEAP_GUARD_BYTES, MemfdMemoryCreator};
use crate::program::{self, Program};
use crate::slots::SlotPool;
use crate::store::StoreOwner;

/// How samepage is set up under a wasmtime engine.
#[derive(Clone, Debug)]
pub struct SamepageConfig {
    /// Register every memory with a merge engine; without, memories are memfd-backed but
    /// never merged (a baseline to measure against).
    pub dedup: bool,
    /// Settings of the merge engine; unused without `dedup`.
    pub engine_config: EngineConfig,
    /// Merge each new instance's memories right after instantiation, when they hold just
    /// the module's data segments: instances then start out sharing them, as with wasmtime's
    /// copy-on-write instantiation (which memfd memories cannot use).
    pub merge_on_instantiate: bool,
    /// Merge instances while their wasm code runs, not only between calls, where the merge
    /// engine can ([`samepage_dedup::Engine::running_merges`]); each owner may still opt out
    /// ([`StoreOwner::merge_while_running`]).
    pub merge_while_running: bool,
}

impl Default for SamepageConfig {
    fn default() -> Self {
        Self {
            dedup: true,
            engine_config: EngineConfig::default(),
            merge_on_instantiate: true,
            merge_while_running: true,
        }
    }
}

/// samepage's part of a wasmtime engine: the merge engine its memories are registered with.
/// Cloning gives another handle to the same one.
#[derive(Clone)]
pub struct Samepage {
    dedup: Option<samepage_dedup::Engine>,
    merge_on_instantiate: bool,
    /// Whether new owners merge while their wasm code runs.
    merge_while_running: bool,
    /// The memory creator's ready memories (`crate::slots`), when it keeps them.
    slots: Option<Arc<SlotPool>>,
}

impl Samepage {
    /// Configures `config` for memfd memories merged by a new merge engine, and returns the
    /// handle that owns it. Build the wasmtime engine from `config` afterwards.
    pub fn configure(
        config: &mut wasmtime::Config,
        settings: SamepageConfig,
    ) -> Result<Self, RuntimeError> {
        let dedup = if settings.dedup {
            Some(samepage_dedup::Engine::new(settings.engine_config)?)
        } else {
            None
        };
        let creator = MemfdMemoryCreator::new(dedup.clone());
        let slots = creator.slots();
        config
            .with_host_memory(Arc::new(creator))
            .memory_init_cow(false)
            .memory_may_move(false)
            .gc_heap_guard_size(GC_HEAP_GUARD_BYTES as u64)
            .allocation_strategy(wasmtime::InstanceAllocationStrategy::OnDemand);
        Ok(Self {
            dedup,
            merge_on_instantiate: settings.merge_on_instantiate,
            merge_while_running: settings.merge_while_running,
            slots,
        })
    }

    /// Configures `config` as a host without samepage runs wasmtime: its own memories, with
    /// its copy-on-write module images and its pooling allocator with `pooling`'s limits,
    /// nothing merged. The handle compiles as wasmtime does and makes owners that register
    /// nothing: the baseline that merging is measured against.
    pub fn without_merging(
        config: &mut wasmtime::Config,
        pooling: wasmtime::PoolingAllocationConfig,
    ) -> Self {
        config
            .memory_init_cow(true)
            .allocation_strategy(wasmtime::InstanceAllocationStrategy::Pooling(pooling));
        Self {
            dedup: None,
            merge_on_instantiate: false,
            merge_while_running: false,
            slots: None,
        }
    }

    /// Drops the memories kept ready for new instances (`crate::slots`), with their
    /// descriptors, reservations and mappings; how many there were. For a host that goes
    /// quiet, or a check that nothing is left registered once every store is gone.
    pub fn release_idle_slots(&self) -> usize {
        self.slots.as_ref().map_or(0, |slots| slots.release_all())
    }

    /// The merge engine, when merging is on: for its statistics and knobs.
    pub fn dedup(&self) -> Option<&samepage_dedup::Engine> {
        self.dedup.as_ref()
    }

    /// Compiles `bytes` (binary or text, a module or a component) for `engine`, the engine
    /// built from the `Config` this handle configured. With merging, data segments are lifted
    /// into module images, mapped into each instance's memories instead of copied; without,
    /// wasmtime keeps them (a lifted segment needs the merge engine to be mapped).
    pub fn compile(&self, engine: &wasmtime::Engine, bytes: &[u8]) -> wasmtime::Result<Program> {
        program::compile(engine, bytes, self.dedup.is_some())
    }

    /// A new owner for one store, in tenant `domain` (pages merge only within a domain),
    /// whose instances are kept across calls.
    pub fn owner(&self, domain: DomainId) -> StoreOwner {
        self.owner_for(domain, Lifetime::Kept)
    }

    /// [`Samepage::owner`], for a store whose instances live as long as `lifetime` says.
    pub fn owner_for(&self, domain: DomainId, lifetime: Lifetime) -> StoreOwner {
        let merge_on_instantiate =
            self.dedup.is_some() && lifetime == Lifetime::Kept && self.merge_on_instantiate;
        let owner = StoreOwner::new(
            Owner::new(domain),
            self.dedup.clone(),
            merge_on_instantiate,
            lifetime,
        );
        owner.merge_while_running(self.merge_while_running);
        owner
    }
}

/// How long a store's instances live, which decides what merging them is worth.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lifetime {
    /// Called again and again: merged right after instantiation (as
    /// [`SamepageConfig::merge_on_instantiate`] says) and looked at each time a call returns
    /// (the engine's scan on park).
    Kept,
    /// Serves one call and is dropped, as a request's own instance: neither merged after
    /// instantiation nor looked at when its call returns, since merging memory about to be
    /// dropped only costs CPU. (Measured under `samepage serve` with an instance per
    /// request: the scanner took 1.1 ms of CPU per request chasing such instances, mostly
    /// giving their written pages back to their memfds just before they were dropped.) The
    /// scanner's cursor still passes over its memory like any other.
    OneCall,
}

impl std::fmt::Debug for Samepage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Samepage")
            .field("merging", &self.dedup.is_some())
            .finish_non_exhaustive()
    }
}
