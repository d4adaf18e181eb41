//! Instances: a wasm instance in a store of its own, run under its owner's guard.

use std::path::PathBuf;

use samepage_dedup::{Engine, Owner};
use wasmtime::{Memory, Store, Val};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{FsPerms, I32Exit, WasiCtxBuilder};

use crate::RuntimeError;
use crate::error::describe;

/// Most bytes kept of a captured stdout or stderr; a guest that writes more traps.
const CAPTURE_LIMIT: usize = 16 << 20;

/// The WASI world an instance sees.
#[derive(Clone, Debug, Default)]
pub struct WasiOptions {
    /// Command-line arguments; by convention the first is the program's name.
    pub args: Vec<String>,
    /// Environment variables, as (name, value).
    pub env: Vec<(String, String)>,
    /// Host directories the guest may use, read and write, each as (host path, guest path).
    pub preopens: Vec<(PathBuf, String)>,
    /// Let the guest write to the host's stdout instead of capturing it.
    pub inherit_stdout: bool,
    /// Let the guest write to the host's stderr instead of capturing it.
    pub inherit_stderr: bool,
}

/// A WASI context and the pipes capturing its output.
pub(crate) struct WasiContext {
    pub(crate) wasi: WasiP1Ctx,
    pub(crate) stdout: Option<MemoryOutputPipe>,
    pub(crate) stderr: Option<MemoryOutputPipe>,
}

impl WasiOptions {
    pub(crate) fn build(&self) -> Result<WasiContext, RuntimeError> {
        let mut builder = WasiCtxBuilder::new();
        builder.args(&self.args).envs(&self.env);
        for (host, guest) in &self.preopens {
            builder
                .preopened_dir(host, guest, FsPerms::ReadWrite)
                .map_err(|source| RuntimeError::Preopen {
                    host: host.clone(),
                    guest: guest.clone(),
                    source,
                })?;
        }
        let stdout = if self.inherit_stdout {
            builder.inherit_stdout();
            None
        } else {
            let pipe = MemoryOutputPipe::new(CAPTURE_LIMIT);
            builder.stdout(pipe.clone());
            Some(pipe)
        };
        let stderr = if self.inherit_stderr {
            builder.inherit_stderr();
            None
        } else {
            let pipe = MemoryOutputPipe::new(CAPTURE_LIMIT);
            builder.stderr(pipe.clone());
            Some(pipe)
        };
        Ok(WasiContext {
            wasi: builder.build_p1(),
            stdout,
            stderr,
        })
    }
}

/// How a command's `_start` ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RunOutcome {
    /// It returned (code 0) or called `proc_exit`.
    Exited(i32),
    /// It trapped, or a host call it made failed; the message says where and why. The
    /// instance and its memory are still there to inspect.
    Trapped(String),
}

/// An instantiated module and everything it owns.
///
/// The owner's guard is held only while a call runs or the host touches memory: between
/// calls the instance is quiescent and the merge engine may remap its pages.
pub struct Instance {
    /// Owns the instance's memories, tables, globals and WASI context; dropping it drops the
    /// memories, which unregisters them from the merge engine.
    store: Store<WasiP1Ctx>,
    /// The instance inside `store`.
    handle: wasmtime::Instance,
    /// The exported memory named "memory", looked up once.
    memory: Option<Memory>,
    /// Owner of the instance's memories, whose guard every call holds.
    owner: Owner,
    /// The engine merging the memories, told when the instance parks; `None` unmerged.
    dedup: Option<Engine>,
    /// Captured stdout, `None` when inherited.
    stdout: Option<MemoryOutputPipe>,
    /// Captured stderr, `None` when inherited.
    stderr: Option<MemoryOutputPipe>,
}

impl Instance {
    pub(crate) fn new(
        mut store: Store<WasiP1Ctx>,
        handle: wasmtime::Instance,
        owner: Owner,
        dedup: Option<Engine>,
        stdout: Option<MemoryOutputPipe>,
        stderr: Option<MemoryOutputPipe>,
    ) -> Self {
        let memory = handle.get_memory(&mut store, "memory");
        Self {
            store,
            handle,
            memory,
            owner,
            dedup,
            stdout,
            stderr,
        }
    }

    /// Runs `f` with the owner's guard held; when it returns the instance is quiescent
    /// again, and the engine hears that it parked (scan on park).
    fn running<R>(&mut self, f: impl FnOnce(&mut Self) -> R) -> R {
        let guard = self.owner.enter();
        let result = f(self);
        drop(guard);
        if let Some(engine) = &self.dedup {
            engine.parked(&self.owner);
        }
        result
    }

    /// Runs a WASI command's `_start`. The guest's exits and traps are outcomes, not errors:
    /// an error means `_start` is missing or has the wrong type.
    pub fn run_start(&mut self) -> Result<RunOutcome, RuntimeError> {
        if !self.has_export("_start") {
            return Err(RuntimeError::MissingExport("_start".to_owned()));
        }
        let start = self
            .handle
            .get_typed_func::<(), ()>(&mut self.store, "_start")
            .map_err(|source| RuntimeError::ExportType {
                name: "_start".to_owned(),
                source,
            })?;
        Ok(
            match self.running(|instance| start.call(&mut instance.store, ())) {
                Ok(()) => RunOutcome::Exited(0),
                Err(error) => match error.downcast_ref::<I32Exit>() {
                    Some(exit) => RunOutcome::Exited(exit.0),
                    None => RunOutcome::Trapped(describe(&error)),
                },
            },
        )
    }

    /// Calls the exported function `name`, as a reactor's host does.
    pub fn call(&mut self, name: &str, args: &[Val]) -> Result<Vec<Val>, RuntimeError> {
        let func = self
            .handle
            .get_func(&mut self.store, name)
            .ok_or_else(|| RuntimeError::MissingExport(name.to_owned()))?;
        // Placeholders of any type: wasmtime checks the count and overwrites each one.
        let mut results = vec![Val::I32(0); func.ty(&self.store).results().len()];
        self.running(|instance| func.call(&mut instance.store, args, &mut results))
            .map_err(|source| match source.downcast_ref::<I32Exit>() {
                Some(exit) => RuntimeError::Exited {
                    name: name.to_owned(),
                    code: exit.0,
                },
                None => RuntimeError::Call {
                    name: name.to_owned(),
                    source,
                },
            })?;
        Ok(results)
    }

    /// Runs `f` over the exported memory, with the owner's guard held so that the merge
    /// engine leaves the memory alone meanwhile.
    pub fn with_memory<R>(&mut self, f: impl FnOnce(&mut [u8]) -> R) -> Result<R, RuntimeError> {
        let memory = self.exported_memory()?;
        let _guard = self.owner.enter();
        Ok(f(memory.data_mut(&mut self.store)))
    }

    /// Size of the exported memory, in bytes.
    pub fn memory_size(&self) -> Result<usize, RuntimeError> {
        Ok(self.exported_memory()?.data_size(&self.store))
    }

    /// The owner of the instance's memories.
    pub fn owner(&self) -> &Owner {
        &self.owner
    }

    /// What the guest wrote to stdout so far, `None` if stdout is inherited.
    pub fn stdout(&self) -> Option<Vec<u8>> {
        self.stdout.as_ref().map(|pipe| pipe.contents().to_vec())
    }

    /// What the guest wrote to stderr so far, `None` if stderr is inherited.
    pub fn stderr(&self) -> Option<Vec<u8>> {
        self.stderr.as_ref().map(|pipe| pipe.contents().to_vec())
    }

    pub fn has_export(&mut self, name: &str) -> bool {
        self.handle.get_export(&mut self.store, name).is_some()
    }

    fn exported_memory(&self) -> Result<Memory, RuntimeError> {
        self.memory
            .ok_or_else(|| RuntimeError::MissingExport("memory".to_owned()))
    }
}

impl std::fmt::Debug for Instance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Instance")
            .field("owner", &self.owner.id())
            .finish_non_exhaustive()
    }
}
