//! Errors of the runtime: one variant per failure, each naming what failed.

use std::io;
use std::path::PathBuf;

use wasmtime::WasmBacktrace;

use crate::memory::MemoryError;

/// Why the runtime could not do what the embedder asked. A guest that traps or exits while
/// running `_start` is not an error: see [`crate::RunOutcome`].
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("merging needs memfd-backed memories: use MemoryBacking::Memfd or turn dedup off")]
    DedupNeedsMemfd,
    #[error("cannot start the merge engine: {0}")]
    Dedup(#[from] samepage_dedup::Error),
    #[error("cannot set up wasmtime: {}", describe(.0))]
    Wasmtime(#[source] wasmtime::Error),
    #[error("cannot set up wasmtime's compilation cache: {}", describe(.0))]
    Cache(#[source] wasmtime::Error),
    #[error("cannot start the thread that times instances out: {0}")]
    EpochThread(#[source] io::Error),
    #[error("module {} not found", path.display())]
    ModuleNotFound { path: PathBuf },
    #[error("cannot read module {}: {source}", path.display())]
    ReadModule { path: PathBuf, source: io::Error },
    #[error("{} is not a valid WebAssembly module: {}", path.display(), describe(source))]
    InvalidModule {
        path: PathBuf,
        source: wasmtime::Error,
    },
    #[error("the bytes are not a valid WebAssembly module: {}", describe(.0))]
    InvalidModuleBytes(#[source] wasmtime::Error),
    #[error("cannot preopen {} as {guest}: {}", host.display(), describe(source))]
    Preopen {
        host: PathBuf,
        guest: String,
        source: wasmtime::Error,
    },
    #[error("cannot create a linear memory: {0}")]
    MemoryCreation(#[source] MemoryError),
    #[error("cannot instantiate the module: {}", describe(.0))]
    Instantiate(#[source] wasmtime::Error),
    #[error(
        "only {created} of the instance's {expected} linear memories were created by samepage's \
         memory creator, so the others cannot be merged: build the wasmtime engine from the \
         Config that Samepage::configure set up, and do not replace its memory creator or turn \
         on the pooling allocator"
    )]
    ForeignMemories { created: usize, expected: usize },
    #[error(
        "the module's data segments were lifted into images, which only a merging host maps: \
         compile it with wasmtime::Module::new for a host that does not merge"
    )]
    ImagesWithoutMerging,
    #[error("the instance has no export named {0:?}")]
    MissingExport(String),
    #[error(
        "export {name:?} does not have the expected type: {}",
        describe(source)
    )]
    ExportType {
        name: String,
        source: wasmtime::Error,
    },
    #[error("call to {name:?} failed: {}", describe(source))]
    Call {
        name: String,
        source: wasmtime::Error,
    },
    #[error("call to {name:?} {outcome}")]
    Ended {
        name: String,
        outcome: crate::RunOutcome,
    },
    #[error("cannot invoke {name:?}: {reason}")]
    InvokeArguments { name: String, reason: String },
    #[error("invoking a component's function by name is not supported; run its wasi:cli/run")]
    InvokeComponent,
}

/// A wasmtime error for people: its cause first, then the wasm backtrace if wasmtime captured
/// one (wasmtime puts the backtrace first, burying the cause), else the whole chain.
pub(crate) fn describe(error: &wasmtime::Error) -> String {
    match error.downcast_ref::<WasmBacktrace>() {
        Some(backtrace) => format!("{}\n{backtrace}", error.root_cause()),
        None => format!("{error:#}"),
    }
}
