//! The host: one wasmtime engine, its WASI linker and, when merging, the merge engine that all
//! of its instances' memories are registered with.

use std::io;
use std::path::Path;
use std::sync::Arc;

use samepage_dedup::{DomainId, EngineConfig, Owner};
use wasmtime::{Linker, Module, Store};
use wasmtime_wasi::p1::{self, WasiP1Ctx};

use crate::RuntimeError;
use crate::instance::{Instance, WasiOptions};
use crate::memory::{MemfdMemoryCreator, OwnerScope};

/// What backs the linear memories of a host's instances.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MemoryBacking {
    /// One memfd per memory, mapped shared; required for merging.
    #[default]
    Memfd,
    /// wasmtime's own anonymous memory with copy-on-write instantiation, as a baseline to
    /// compare against.
    WasmtimeDefault,
}

/// How a [`Host`] is set up.
#[derive(Clone, Debug)]
pub struct HostConfig {
    /// What backs linear memories.
    pub memory: MemoryBacking,
    /// Register every memory with a merge engine, which shares identical pages between them.
    pub dedup: bool,
    /// Settings of the merge engine; unused without `dedup`.
    pub engine_config: EngineConfig,
    /// Tenant domain of every instance of this host: pages merge only within a domain.
    pub domain: DomainId,
    /// Merge each new instance's memory right after instantiation, when it holds just the
    /// module's data segments: instances then start out sharing them, as with wasmtime's
    /// copy-on-write instantiation (which a memfd memory cannot use).
    pub merge_on_instantiate: bool,
}

impl Default for HostConfig {
    fn default() -> Self {
        Self {
            memory: MemoryBacking::Memfd,
            dedup: true,
            engine_config: EngineConfig::default(),
            domain: 0,
            merge_on_instantiate: true,
        }
    }
}

/// Compiles modules and instantiates them, each instance in a store of its own.
pub struct Host {
    /// Compiles modules; with memfd backing, creates every linear memory through
    /// [`MemfdMemoryCreator`].
    engine: wasmtime::Engine,
    /// WASI preview 1, shared by every instantiation.
    linker: Linker<WasiP1Ctx>,
    /// The merge engine, when merging is on; the memory creator holds a handle too.
    dedup: Option<samepage_dedup::Engine>,
    /// Domain given to every instance's owner.
    domain: DomainId,
    merge_on_instantiate: bool,
}

impl Host {
    /// Starts the merge engine (with `dedup`) and sets wasmtime up for the chosen backing.
    pub fn new(config: HostConfig) -> Result<Self, RuntimeError> {
        if config.dedup && config.memory != MemoryBacking::Memfd {
            return Err(RuntimeError::DedupNeedsMemfd);
        }
        let dedup = if config.dedup {
            Some(samepage_dedup::Engine::new(config.engine_config)?)
        } else {
            None
        };
        let mut wasm_config = wasmtime::Config::new();
        if config.memory == MemoryBacking::Memfd {
            wasm_config
                .with_host_memory(Arc::new(MemfdMemoryCreator::new(dedup.clone())))
                // A copy-on-write image would be mapped over the memfd; see `crate::memory`.
                .memory_init_cow(false)
                // The engine knows each memory by its base address.
                .memory_may_move(false);
        }
        let engine = wasmtime::Engine::new(&wasm_config).map_err(RuntimeError::Wasmtime)?;
        let mut linker = Linker::new(&engine);
        p1::add_to_linker_sync(&mut linker, |wasi| wasi).map_err(RuntimeError::Wasmtime)?;
        Ok(Self {
            engine,
            linker,
            dedup,
            domain: config.domain,
            merge_on_instantiate: config.merge_on_instantiate,
        })
    }

    /// The merge engine, when merging is on: for its statistics and knobs.
    pub fn dedup(&self) -> Option<&samepage_dedup::Engine> {
        self.dedup.as_ref()
    }

    /// Compiles the module at `path`, in the binary (`.wasm`) or text (`.wat`) format.
    pub fn load(&self, path: &Path) -> Result<Module, RuntimeError> {
        let bytes = std::fs::read(path).map_err(|source| match source.kind() {
            io::ErrorKind::NotFound => RuntimeError::ModuleNotFound {
                path: path.to_owned(),
            },
            _ => RuntimeError::ReadModule {
                path: path.to_owned(),
                source,
            },
        })?;
        Module::new(&self.engine, bytes).map_err(|source| RuntimeError::InvalidModule {
            path: path.to_owned(),
            source,
        })
    }

    /// Compiles a module from its binary or text format.
    pub fn load_bytes(&self, bytes: &[u8]) -> Result<Module, RuntimeError> {
        Module::new(&self.engine, bytes).map_err(RuntimeError::InvalidModuleBytes)
    }

    /// Instantiates `module` in a new store with a new owner, and calls its `_initialize`
    /// export if it has one (a WASI reactor). The instance is quiescent when this returns.
    pub fn instantiate(
        &self,
        module: &Module,
        wasi: &WasiOptions,
    ) -> Result<Instance, RuntimeError> {
        let context = wasi.build()?;
        let owner = Owner::new(self.domain);
        let mut store = Store::new(&self.engine, context.wasi);
        let handle = {
            // wasmtime writes data segments into the new memories: that is the owner writing.
            let guard = owner.enter();
            let scope = OwnerScope::enter(&owner);
            let handle =
                self.linker
                    .instantiate(&mut store, module)
                    .map_err(|source| match scope.take_failure() {
                        Some(memory) => RuntimeError::MemoryCreation(memory),
                        None => RuntimeError::Instantiate(source),
                    })?;
            if let Some(engine) = self.dedup.as_ref().filter(|_| self.merge_on_instantiate) {
                engine.merge_owner_now(&guard)?;
            }
            handle
        };
        let mut instance = Instance::new(
            store,
            handle,
            owner,
            self.dedup.clone(),
            context.stdout,
            context.stderr,
        );
        if instance.has_export("_initialize") {
            instance.call("_initialize", &[])?;
        }
        Ok(instance)
    }
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host")
            .field("merging", &self.dedup.is_some())
            .field("domain", &self.domain)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use samepage_dedup::{EngineConfig, Knobs};

    use super::*;
    use crate::memory::{MemoryError, current_owner};
    use samepage_dedup::MappingError;

    fn host() -> Host {
        Host::new(HostConfig {
            engine_config: EngineConfig::manual(Knobs::default()),
            ..HostConfig::default()
        })
        .expect("host")
    }

    #[test]
    fn instantiation_leaves_no_owner_behind() {
        let host = host();
        let module = host.load_bytes(b"(module (memory 1))").expect("module");
        host.instantiate(&module, &WasiOptions::default())
            .expect("instance");
        assert!(current_owner().is_none());
    }

    #[test]
    fn failed_memory_creation_is_typed_and_leaves_no_owner_behind() {
        let host = host();
        // 64-bit memories get the same 4 GiB reservation, which 70,000 wasm pages overflow.
        let module = host
            .load_bytes(b"(module (memory i64 70000))")
            .expect("module");
        let error = host
            .instantiate(&module, &WasiOptions::default())
            .expect_err("too large");
        assert!(
            matches!(
                error,
                RuntimeError::MemoryCreation(MemoryError::Mapping(
                    MappingError::BeyondCapacity { .. }
                ))
            ),
            "{error}"
        );
        assert!(current_owner().is_none());
    }
}
