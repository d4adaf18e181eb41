//! Errors of the runtime: one variant per failure, each naming what failed.

use std::io;
use std::path::PathBuf;

use crate::memory::MemoryError;

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("merging needs memfd-backed memories: use MemoryBacking::Memfd or turn dedup off")]
    DedupNeedsMemfd,
    #[error("cannot start the merge engine: {0}")]
    Dedup(#[from] samepage_dedup::Error),
    #[error("cannot set up wasmtime: {0}")]
    Wasmtime(#[source] wasmtime::Error),
    #[error("module {} not found", path.display())]
    ModuleNotFound { path: PathBuf },
    #[error("cannot read module {}: {source}", path.display())]
    ReadModule { path: PathBuf, source: io::Error },
    #[error("{} is not a valid WebAssembly module: {source}", path.display())]
    InvalidModule {
        path: PathBuf,
        source: wasmtime::Error,
    },
    #[error("the bytes are not a valid WebAssembly module: {0}")]
    InvalidModuleBytes(#[source] wasmtime::Error),
    #[error("cannot preopen {} as {guest}: {source}", host.display())]
    Preopen {
        host: PathBuf,
        guest: String,
        source: wasmtime::Error,
    },
    #[error("cannot create a linear memory: {0}")]
    MemoryCreation(#[source] MemoryError),
    #[error("cannot instantiate the module: {0}")]
    Instantiate(#[source] wasmtime::Error),
    #[error("the instance has no export named {0:?}")]
    MissingExport(String),
    #[error("export {name:?} does not have the expected type: {source}")]
    ExportType {
        name: String,
        source: wasmtime::Error,
    },
    #[error("call to {name:?} failed: {source}")]
    Call {
        name: String,
        source: wasmtime::Error,
    },
    #[error("call to {name:?} ended the instance with proc_exit({code})")]
    Exited { name: String, code: i32 },
}
