//! The host: one wasmtime engine, its WASI linkers (preview 1 for core modules, preview 2 for
//! components) and, when merging, the merge engine that all of its instances' memories are
//! registered with.

use std::io;
use std::path::{Path, PathBuf};

use samepage_dedup::{DomainId, EngineConfig, Owner};
use wasmtime::component;
use wasmtime::{Linker, Store};
use wasmtime_wasi::p1;

use crate::RuntimeError;
use crate::embed::{Lifetime, Samepage, SamepageConfig};
use crate::host_state::HostState;
use crate::instance::{Instance, InstanceHandle, WasiOptions};
use crate::limits::{EpochTicker, Limits};
use crate::program::{self, Program};
use crate::store::StoreOwner;

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
    /// Fuel, time and memory each instance may use.
    pub limits: Limits,
    /// wasmtime's cache of compiled modules.
    pub compilation_cache: CompilationCache,
}

impl Default for HostConfig {
    fn default() -> Self {
        Self {
            memory: MemoryBacking::Memfd,
            dedup: true,
            engine_config: EngineConfig::default(),
            domain: 0,
            merge_on_instantiate: true,
            limits: Limits::default(),
            compilation_cache: CompilationCache::Off,
        }
    }
}

/// Whether compiled modules are kept on disk between runs, with the meanings of
/// `wasmtime run`'s `-C cache` and `-C cache-config`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum CompilationCache {
    /// Compile every time.
    #[default]
    Off,
    /// wasmtime's cache with its default configuration (its `config.toml` in the user's
    /// configuration directory if there is one, else the cache in the user's cache
    /// directory).
    Default,
    /// wasmtime's cache configured by this TOML file.
    Config(PathBuf),
}

impl CompilationCache {
    /// Sets `config`'s cache to this one.
    pub fn configure(&self, config: &mut wasmtime::Config) -> Result<(), RuntimeError> {
        let cache = match self {
            CompilationCache::Off => return Ok(()),
            CompilationCache::Default => wasmtime::Cache::from_file(None),
            CompilationCache::Config(path) => wasmtime::Cache::from_file(Some(path)),
        };
        config.cache(Some(cache.map_err(RuntimeError::Cache)?));
        Ok(())
    }
}

/// Compiles programs and instantiates them, each instance in a store of its own. A
/// convenience built on [`Samepage`] and [`StoreOwner`], which embedders with a wasmtime
/// set-up of their own use directly.
pub struct Host {
    /// Compiles programs; with memfd backing, creates every linear memory through
    /// samepage's memory creator.
    engine: wasmtime::Engine,
    /// WASI preview 1, for core modules.
    linker: Linker<HostState>,
    /// WASI preview 2, for components.
    component_linker: component::Linker<HostState>,
    /// samepage under the engine, when memories are memfd-backed.
    samepage: Option<Samepage>,
    /// Domain given to every instance's owner.
    domain: DomainId,
    /// What every instance may use.
    limits: Limits,
    /// Advances the epoch for timeouts; `None` without one.
    _ticker: Option<EpochTicker>,
}

impl Host {
    /// Starts the merge engine (with `dedup`) and sets wasmtime up for the chosen backing.
    pub fn new(config: HostConfig) -> Result<Self, RuntimeError> {
        if config.dedup && config.memory != MemoryBacking::Memfd {
            return Err(RuntimeError::DedupNeedsMemfd);
        }
        let mut wasm_config = wasmtime::Config::new();
        let samepage = match config.memory {
            MemoryBacking::Memfd => Some(Samepage::configure(
                &mut wasm_config,
                SamepageConfig {
                    dedup: config.dedup,
                    engine_config: config.engine_config,
                    merge_on_instantiate: config.merge_on_instantiate,
                    // The engine's `merge_running` knob decides.
                    merge_while_running: true,
                },
            )?),
            MemoryBacking::WasmtimeDefault => None,
        };
        config.limits.configure(&mut wasm_config);
        config.compilation_cache.configure(&mut wasm_config)?;
        let engine = wasmtime::Engine::new(&wasm_config).map_err(RuntimeError::Wasmtime)?;
        let ticker = match config.limits.timeout {
            Some(_) => Some(EpochTicker::start(&engine).map_err(RuntimeError::EpochThread)?),
            None => None,
        };
        let mut linker = Linker::new(&engine);
        p1::add_to_linker_sync(&mut linker, |state: &mut HostState| &mut state.wasi)
            .map_err(RuntimeError::Wasmtime)?;
        let mut component_linker = component::Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut component_linker)
            .map_err(RuntimeError::Wasmtime)?;
        Ok(Self {
            engine,
            linker,
            component_linker,
            samepage,
            domain: config.domain,
            limits: config.limits,
            _ticker: ticker,
        })
    }

    /// The merge engine, when merging is on: for its statistics and knobs.
    pub fn dedup(&self) -> Option<&samepage_dedup::Engine> {
        self.samepage.as_ref().and_then(Samepage::dedup)
    }

    /// The linkers instances are made with, for adding host functions (such as the guest
    /// API's) before instantiating.
    pub fn linkers(&mut self) -> (&mut Linker<HostState>, &mut component::Linker<HostState>) {
        (&mut self.linker, &mut self.component_linker)
    }

    /// Compiles the program at `path`, in the binary (`.wasm`) or text (`.wat`) format.
    pub fn load(&self, path: &Path) -> Result<Program, RuntimeError> {
        let bytes = std::fs::read(path).map_err(|source| match source.kind() {
            io::ErrorKind::NotFound => RuntimeError::ModuleNotFound {
                path: path.to_owned(),
            },
            _ => RuntimeError::ReadModule {
                path: path.to_owned(),
                source,
            },
        })?;
        self.compile(&bytes)
            .map_err(|source| RuntimeError::InvalidModule {
                path: path.to_owned(),
                source,
            })
    }

    /// Compiles a program from its binary or text format.
    pub fn load_bytes(&self, bytes: &[u8]) -> Result<Program, RuntimeError> {
        self.compile(bytes)
            .map_err(RuntimeError::InvalidModuleBytes)
    }

    /// Compiles `bytes` ([`Samepage::compile`], or as plain wasmtime programs without
    /// memfd backing).
    fn compile(&self, bytes: &[u8]) -> wasmtime::Result<Program> {
        match &self.samepage {
            Some(samepage) => samepage.compile(&self.engine, bytes),
            None => program::compile(&self.engine, bytes, false),
        }
    }

    /// Instantiates `program` in a new store with a new owner. A core module's `_initialize`
    /// export runs if it has one (a WASI reactor). The instance is quiescent when this
    /// returns.
    pub fn instantiate(
        &self,
        program: &Program,
        wasi: &WasiOptions,
    ) -> Result<Instance, RuntimeError> {
        self.instantiate_in(program, wasi, self.domain)
    }

    /// [`Host::instantiate`] for tenant `domain` instead of the host's: its pages merge only
    /// with other instances of the same domain.
    pub fn instantiate_in(
        &self,
        program: &Program,
        wasi: &WasiOptions,
        domain: DomainId,
    ) -> Result<Instance, RuntimeError> {
        let context = wasi.build()?;
        let owner = match &self.samepage {
            Some(samepage) => samepage.owner(domain),
            // wasmtime's own memories: the owner only counts calls, nobody merges.
            None => StoreOwner::new(Owner::new(domain), None, false, Lifetime::Kept),
        };
        let mut store = Store::new(
            &self.engine,
            HostState::new(context.wasi, owner.clone(), self.limits),
        );
        store.limiter(HostState::limiter);
        self.limits
            .apply(&mut store)
            .map_err(RuntimeError::Wasmtime)?;
        let handle = match program {
            Program::Module(module) => {
                InstanceHandle::Core(owner.instantiate(&mut store, &self.linker, module)?)
            }
            Program::Component(component) => {
                let instance =
                    owner.instantiate_component(&mut store, &self.component_linker, component)?;
                InstanceHandle::Component(instance)
            }
        };
        let mut instance = Instance::new(store, handle, context.stdout, context.stderr);
        if instance.has_export("_initialize") {
            instance.call("_initialize", &[])?;
        }
        Ok(instance)
    }
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host")
            .field("merging", &self.dedup().is_some())
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
        // 2^36 wasm pages: 4 PiB, more than the address space.
        let module = host
            .load_bytes(b"(module (memory i64 0x1000000000))")
            .expect("module");
        let error = host
            .instantiate(&module, &WasiOptions::default())
            .expect_err("too large");
        assert!(
            matches!(
                error,
                RuntimeError::MemoryCreation(MemoryError::Mapping(MappingError::Reserve {
                    bytes,
                    ..
                })) if bytes > 0x10_0000_0000_0000
            ),
            "{error}"
        );
        assert!(current_owner().is_none());
    }

    #[test]
    fn a_64_bit_memory_above_4_gib_is_created_written_and_grown() {
        let host = host();
        // 70,000 wasm pages (4.3 GiB) at the start, growable to 80,000.
        let module = host
            .load_bytes(
                br#"(module (memory (export "memory") i64 70000 80000)
                    (func (export "poke") (param i64) (result i64)
                        (i64.store (local.get 0) (i64.const 7))
                        (i64.load (local.get 0)))
                    (func (export "grow") (param i64) (result i64)
                        (memory.grow (local.get 0))))"#,
            )
            .expect("module");
        let mut instance = host
            .instantiate(&module, &WasiOptions::default())
            .expect("a 64-bit memory past 4 GiB");
        let past_4_gib = (69_999u64 << 16) as i64;
        let poked = instance
            .call("poke", &[wasmtime::Val::I64(past_4_gib)])
            .expect("poke");
        assert_eq!(poked[0].i64(), Some(7));
        let grown = instance
            .call("grow", &[wasmtime::Val::I64(10_000)])
            .expect("grow");
        assert_eq!(grown[0].i64(), Some(70_000), "grown to its maximum");
        let beyond = instance
            .call("grow", &[wasmtime::Val::I64(1)])
            .expect("grow");
        assert_eq!(beyond[0].i64(), Some(-1), "past its maximum");
    }
}
