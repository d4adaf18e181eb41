//! Instances: a core module's or a component's instance in a store of its own, run under its
//! owner's guard.

use std::path::PathBuf;

use samepage_dedup::Owner;
use wasmtime::{Memory, Store, Val};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::bindings::sync::Command;
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{FsPerms, I32Exit, WasiCtxBuilder};

use crate::RuntimeError;
use crate::error::describe;
use crate::host::HostState;
use crate::store::StoreOwner;

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

/// What a store holds an instance of.
pub(crate) enum InstanceHandle {
    Core(wasmtime::Instance),
    Component(wasmtime::component::Instance),
}

/// An instantiated program and everything it owns.
///
/// The owner's guard is held only while a call runs or the host touches memory (the
/// [`StoreOwner`]'s call hook and [`StoreOwner::access`] see to it): between calls the
/// instance is quiescent and the merge engine may remap its pages.
pub struct Instance {
    /// Owns the instance's memories, tables, globals and WASI context; dropping it drops the
    /// memories, which unregisters them from the merge engine.
    store: Store<HostState>,
    /// The instance inside `store`.
    handle: InstanceHandle,
    /// A core module's exported memory named "memory", looked up once.
    memory: Option<Memory>,
    /// Captured stdout, `None` when inherited.
    stdout: Option<MemoryOutputPipe>,
    /// Captured stderr, `None` when inherited.
    stderr: Option<MemoryOutputPipe>,
}

impl Instance {
    pub(crate) fn new(
        mut store: Store<HostState>,
        handle: InstanceHandle,
        stdout: Option<MemoryOutputPipe>,
        stderr: Option<MemoryOutputPipe>,
    ) -> Self {
        let memory = match &handle {
            InstanceHandle::Core(instance) => instance.get_memory(&mut store, "memory"),
            InstanceHandle::Component(_) => None,
        };
        Self {
            store,
            handle,
            memory,
            stdout,
            stderr,
        }
    }

    /// Runs a command: a core module's `_start`, or a component's `wasi:cli/run`. The
    /// guest's exits and traps are outcomes, not errors: an error means the program is not a
    /// command (no `_start` of the right type, no `wasi:cli/run`).
    pub fn run_start(&mut self) -> Result<RunOutcome, RuntimeError> {
        let ended = match &self.handle {
            InstanceHandle::Core(instance) => {
                if instance.get_export(&mut self.store, "_start").is_none() {
                    return Err(RuntimeError::MissingExport("_start".to_owned()));
                }
                let start = instance
                    .get_typed_func::<(), ()>(&mut self.store, "_start")
                    .map_err(|source| RuntimeError::ExportType {
                        name: "_start".to_owned(),
                        source,
                    })?;
                start.call(&mut self.store, ()).map(|()| 0)
            }
            InstanceHandle::Component(instance) => {
                let command = Command::new(&mut self.store, instance).map_err(|source| {
                    RuntimeError::ExportType {
                        name: "wasi:cli/run".to_owned(),
                        source,
                    }
                })?;
                command
                    .wasi_cli_run()
                    .call_run(&mut self.store)
                    .map(|status| i32::from(status.is_err()))
            }
        };
        Ok(match ended {
            Ok(code) => RunOutcome::Exited(code),
            Err(error) => match error.downcast_ref::<I32Exit>() {
                Some(exit) => RunOutcome::Exited(exit.0),
                None => RunOutcome::Trapped(describe(&error)),
            },
        })
    }

    /// Calls a core module's exported function `name`, as a reactor's host does.
    pub fn call(&mut self, name: &str, args: &[Val]) -> Result<Vec<Val>, RuntimeError> {
        let func = match &self.handle {
            InstanceHandle::Core(instance) => instance.get_func(&mut self.store, name),
            InstanceHandle::Component(_) => None,
        }
        .ok_or_else(|| RuntimeError::MissingExport(name.to_owned()))?;
        // Placeholders of any type: wasmtime checks the count and overwrites each one.
        let mut results = vec![Val::I32(0); func.ty(&self.store).results().len()];
        func.call(&mut self.store, args, &mut results)
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
        let owner = self.store.data().owner.clone();
        Ok(owner.access(|| f(memory.data_mut(&mut self.store))))
    }

    /// Size of the exported memory, in bytes.
    pub fn memory_size(&self) -> Result<usize, RuntimeError> {
        Ok(self.exported_memory()?.data_size(&self.store))
    }

    /// The owner of the instance's memories.
    pub fn owner(&self) -> &Owner {
        self.store.data().owner.owner()
    }

    /// The store's owner: its regions, figures and guard.
    pub fn store_owner(&self) -> &StoreOwner {
        &self.store.data().owner
    }

    /// What the guest wrote to stdout so far, `None` if stdout is inherited.
    pub fn stdout(&self) -> Option<Vec<u8>> {
        self.stdout.as_ref().map(|pipe| pipe.contents().to_vec())
    }

    /// What the guest wrote to stderr so far, `None` if stderr is inherited.
    pub fn stderr(&self) -> Option<Vec<u8>> {
        self.stderr.as_ref().map(|pipe| pipe.contents().to_vec())
    }

    /// Whether a core module exports `name`; a component exports no core items.
    pub fn has_export(&mut self, name: &str) -> bool {
        match &self.handle {
            InstanceHandle::Core(instance) => instance.get_export(&mut self.store, name).is_some(),
            InstanceHandle::Component(_) => false,
        }
    }

    /// Whether the instance is a component.
    pub fn is_component(&self) -> bool {
        matches!(self.handle, InstanceHandle::Component(_))
    }

    fn exported_memory(&self) -> Result<Memory, RuntimeError> {
        self.memory
            .ok_or_else(|| RuntimeError::MissingExport("memory".to_owned()))
    }
}

impl std::fmt::Debug for Instance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Instance")
            .field("owner", &self.owner().id())
            .finish_non_exhaustive()
    }
}
