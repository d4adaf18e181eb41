//! Instances: a core module's or a component's instance in a store of its own, run under its
//! owner's guard.

use std::path::PathBuf;

use samepage_dedup::Owner;
use wasmtime::{Memory, Store, Val};
use wasmtime_wasi::cli::StdoutStream;
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::bindings::sync::Command;
use wasmtime_wasi::p2::pipe::{MemoryOutputPipe, SinkOutputStream};
use wasmtime_wasi::{FsPerms, I32Exit, WasiCtxBuilder};

use crate::RuntimeError;
use crate::error::describe;
use crate::host_state::HostState;
use crate::stdio::{GuestOutput, HostStream, PrefixedOutput};
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
    /// Let the guest read the host's stdin; without, its stdin is empty.
    pub inherit_stdin: bool,
    /// Where the guest's stdout goes.
    pub stdout: GuestOutput,
    /// Where the guest's stderr goes.
    pub stderr: GuestOutput,
}

/// One of a guest's output streams, as the instance keeps it.
pub(crate) enum OutputSink {
    /// Inherited or discarded: nothing to keep.
    Passed,
    Captured(MemoryOutputPipe),
    Prefixed(PrefixedOutput),
}

impl OutputSink {
    /// The stream a guest writes `output` to, on the host's `host` stream where it goes
    /// there, and what the instance keeps of it.
    fn open(output: &GuestOutput, host: HostStream) -> (Box<dyn StdoutStream + Sync>, Self) {
        match output {
            GuestOutput::Capture => {
                let pipe = MemoryOutputPipe::new(CAPTURE_LIMIT);
                (Box::new(pipe.clone()), OutputSink::Captured(pipe))
            }
            GuestOutput::Inherit => {
                let stream: Box<dyn StdoutStream + Sync> = match host {
                    HostStream::Stdout => Box::new(std::io::stdout()),
                    HostStream::Stderr => Box::new(std::io::stderr()),
                };
                (stream, OutputSink::Passed)
            }
            GuestOutput::Prefixed { prefix, to } => {
                let stream = PrefixedOutput::new(prefix, *to);
                (Box::new(stream.clone()), OutputSink::Prefixed(stream))
            }
            GuestOutput::Discard => (Box::new(SinkOutputStream), OutputSink::Passed),
        }
    }

    fn captured(&self) -> Option<Vec<u8>> {
        match self {
            OutputSink::Captured(pipe) => Some(pipe.contents().to_vec()),
            _ => None,
        }
    }

    fn finish_line(&self) {
        if let OutputSink::Prefixed(stream) = self {
            stream.finish_line();
        }
    }
}

/// A WASI context and what the instance keeps of its output streams.
pub(crate) struct WasiContext {
    pub(crate) wasi: WasiP1Ctx,
    pub(crate) stdout: OutputSink,
    pub(crate) stderr: OutputSink,
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
        if self.inherit_stdin {
            builder.inherit_stdin();
        }
        let (stream, stdout) = OutputSink::open(&self.stdout, HostStream::Stdout);
        builder.stdout(stream);
        let (stream, stderr) = OutputSink::open(&self.stderr, HostStream::Stderr);
        builder.stderr(stream);
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
    /// It used all the fuel its store was given ([`crate::Limits::fuel`]).
    OutOfFuel { fuel: u64 },
    /// It was still running when its time ran out ([`crate::Limits::timeout`]).
    TimedOut { after: std::time::Duration },
}

impl std::fmt::Display for RunOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RunOutcome::Exited(code) => write!(f, "exited with status {code}"),
            RunOutcome::Trapped(message) => write!(f, "trapped: {message}"),
            RunOutcome::OutOfFuel { fuel } => {
                write!(f, "ran out of fuel: it used all {fuel} units it was given")
            }
            RunOutcome::TimedOut { after } => {
                write!(f, "timed out: still running after {after:?}")
            }
        }
    }
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
    /// What the instance keeps of the guest's stdout.
    stdout: OutputSink,
    /// What the instance keeps of the guest's stderr.
    stderr: OutputSink,
}

impl Instance {
    pub(crate) fn new(
        mut store: Store<HostState>,
        handle: InstanceHandle,
        stdout: OutputSink,
        stderr: OutputSink,
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
        self.stdout.finish_line();
        self.stderr.finish_line();
        Ok(match ended {
            Ok(code) => RunOutcome::Exited(code),
            Err(error) => self.outcome_of(&error),
        })
    }

    /// How a call that failed with `error` ended the guest.
    fn outcome_of(&self, error: &wasmtime::Error) -> RunOutcome {
        if let Some(exit) = error.downcast_ref::<I32Exit>() {
            return RunOutcome::Exited(exit.0);
        }
        let limits = &self.store.data().limits;
        match (error.downcast_ref::<wasmtime::Trap>(), limits) {
            (
                Some(wasmtime::Trap::OutOfFuel),
                &crate::Limits {
                    fuel: Some(fuel), ..
                },
            ) => RunOutcome::OutOfFuel { fuel },
            (
                Some(wasmtime::Trap::Interrupt),
                &crate::Limits {
                    timeout: Some(after),
                    ..
                },
            ) => RunOutcome::TimedOut { after },
            _ => RunOutcome::Trapped(describe(error)),
        }
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
        let called = func.call(&mut self.store, args, &mut results);
        self.stdout.finish_line();
        self.stderr.finish_line();
        called.map_err(|source| match self.outcome_of(&source) {
            RunOutcome::Trapped(_) => RuntimeError::Call {
                name: name.to_owned(),
                source,
            },
            outcome => RuntimeError::Ended {
                name: name.to_owned(),
                outcome,
            },
        })?;
        Ok(results)
    }

    /// Calls a core module's exported function `name` with arguments written as text, as
    /// `wasmtime run --invoke` takes them: each parsed as its parameter's type (`i32`, `i64`,
    /// `f32`, `f64`, in decimal; integers also as `0x` hexadecimal).
    pub fn invoke(&mut self, name: &str, args: &[String]) -> Result<Vec<Val>, RuntimeError> {
        let func = match &self.handle {
            InstanceHandle::Core(instance) => instance.get_func(&mut self.store, name),
            InstanceHandle::Component(_) => return Err(RuntimeError::InvokeComponent),
        }
        .ok_or_else(|| RuntimeError::MissingExport(name.to_owned()))?;
        let params: Vec<wasmtime::ValType> = func.ty(&self.store).params().collect();
        if params.len() != args.len() {
            return Err(RuntimeError::InvokeArguments {
                name: name.to_owned(),
                reason: format!("it takes {} arguments, {} given", params.len(), args.len()),
            });
        }
        let values = params
            .iter()
            .zip(args)
            .map(|(ty, text)| {
                parse_value(ty, text).ok_or_else(|| RuntimeError::InvokeArguments {
                    name: name.to_owned(),
                    reason: format!("{text:?} is not a value of type {ty}"),
                })
            })
            .collect::<Result<Vec<Val>, RuntimeError>>()?;
        self.call(name, &values)
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

    /// What the guest wrote to stdout so far, `None` unless it is captured.
    pub fn stdout(&self) -> Option<Vec<u8>> {
        self.stdout.captured()
    }

    /// What the guest wrote to stderr so far, `None` unless it is captured.
    pub fn stderr(&self) -> Option<Vec<u8>> {
        self.stderr.captured()
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

/// A number as a value of type `ty`; `None` for reference types or text that does not parse.
fn parse_value(ty: &wasmtime::ValType, text: &str) -> Option<Val> {
    fn integer<T: TryFrom<i128>>(text: &str) -> Option<T> {
        let (negative, digits) = match text.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, text),
        };
        let magnitude = match digits.strip_prefix("0x") {
            Some(hex) => i128::from_str_radix(hex, 16).ok()?,
            None => digits.parse::<i128>().ok()?,
        };
        T::try_from(if negative { -magnitude } else { magnitude }).ok()
    }
    Some(match ty {
        // Either signed or unsigned, as wasm integers are both.
        wasmtime::ValType::I32 => {
            Val::I32(integer::<i32>(text).or_else(|| integer::<u32>(text).map(|u| u as i32))?)
        }
        wasmtime::ValType::I64 => {
            Val::I64(integer::<i64>(text).or_else(|| integer::<u64>(text).map(|u| u as i64))?)
        }
        wasmtime::ValType::F32 => Val::F32(text.parse::<f32>().ok()?.to_bits()),
        wasmtime::ValType::F64 => Val::F64(text.parse::<f64>().ok()?.to_bits()),
        _ => return None,
    })
}

impl std::fmt::Debug for Instance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Instance")
            .field("owner", &self.owner().id())
            .finish_non_exhaustive()
    }
}
