//! The guest API as core imports, for core modules: the canonical ABI's lowering of each WIT
//! function, as `wit-bindgen c` declares it under the module name
//! `samepage:dedup/advice@0.1.0`:
//!
//! ```text
//! advise(offset: i64, length: i64, kind: i32, ret: i32)   ret: result<_, error>     2 bytes
//! merge-now(offset: i64, length: i64, ret: i32)           ret: result<merge-report, error> 24 bytes
//! stats(ret: i32)                                         ret: stats                24 bytes
//! ```
//!
//! A result is written at `ret` in the caller's memory 0: `result` as a discriminant byte
//! (0 ok, 1 error) and its payload at the payload's alignment (the error enum as a byte, a
//! record of 64-bit fields at offset 8), records field by field, little-endian. An enum
//! argument out of range, or a `ret` that is misaligned or outside the memory, traps, as the
//! canonical ABI says; every other failure is an `error` value.

use samepage_runtime::{HasStoreOwner, RuntimeError};
use wasmtime::{Caller, Extern, Linker};

use crate::GuestApi;
use crate::samepage::dedup::advice::{AdviceKind, Error, InstanceStats, MergeReport};

/// The module name the imports live under.
pub const IMPORT_MODULE: &str = "samepage:dedup/advice@0.1.0";

/// The API for a core caller: offsets refer to its memory 0, exported as `memory`.
fn api<'a, T: HasStoreOwner>(
    caller: &'a mut Caller<'_, T>,
) -> (GuestApi<'a>, Option<wasmtime::Memory>) {
    let memory = match caller.get_export("memory") {
        Some(Extern::Memory(memory)) => Some(memory),
        _ => None,
    };
    let base = memory.map(|memory| memory.data_ptr(&*caller) as usize);
    let owner = caller.data().store_owner();
    let region = base.and_then(|base| owner.region_at(base));
    (GuestApi::new(owner, region), memory)
}

fn error_code(error: Error) -> u8 {
    match error {
        Error::OutOfBounds => 0,
        Error::Unaligned => 1,
        Error::Disabled => 2,
        Error::Limit => 3,
    }
}

/// Writes `bytes` at `ret` in the caller's memory, which must hold them at `align`.
fn write_return<T>(
    caller: &mut Caller<'_, T>,
    memory: Option<wasmtime::Memory>,
    ret: i32,
    align: usize,
    bytes: &[u8],
) -> wasmtime::Result<()> {
    let memory = memory.ok_or_else(|| wasmtime::Error::msg("the caller exports no memory"))?;
    let at = ret as u32 as usize;
    if !at.is_multiple_of(align) {
        wasmtime::bail!("return pointer {at:#x} is not aligned to {align}");
    }
    memory
        .write(caller, at, bytes)
        .map_err(|_| wasmtime::Error::msg(format!("return pointer {at:#x} is outside memory")))
}

/// A `result<_, error>` at `ret`.
fn unit_result(result: Result<(), Error>) -> [u8; 2] {
    match result {
        Ok(()) => [0, 0],
        Err(error) => [1, error_code(error)],
    }
}

/// A `result<merge-report, error>` at `ret`.
fn report_result(result: Result<MergeReport, Error>) -> [u8; 24] {
    let mut bytes = [0; 24];
    match result {
        Ok(report) => {
            bytes[8..16].copy_from_slice(&report.pages_merged.to_le_bytes());
            bytes[16..24].copy_from_slice(&report.zero_pages.to_le_bytes());
        }
        Err(error) => {
            bytes[0] = 1;
            bytes[8] = error_code(error);
        }
    }
    bytes
}

fn stats_record(stats: InstanceStats) -> [u8; 24] {
    let mut bytes = [0; 24];
    bytes[0..8].copy_from_slice(&stats.pages_merged.to_le_bytes());
    bytes[8..16].copy_from_slice(&stats.zero_pages.to_le_bytes());
    bytes[16..24].copy_from_slice(&stats.profit_bytes.to_le_bytes());
    bytes
}

/// Adds the guest API's core imports to `linker`, for stores whose data holds a
/// [`samepage_runtime::StoreOwner`].
pub fn add_to_linker<T: HasStoreOwner + 'static>(
    linker: &mut Linker<T>,
) -> Result<(), RuntimeError> {
    add_imports(linker).map_err(RuntimeError::Wasmtime)
}

fn add_imports<T: HasStoreOwner + 'static>(linker: &mut Linker<T>) -> wasmtime::Result<()> {
    linker.func_wrap(
        IMPORT_MODULE,
        "advise",
        |mut caller: Caller<'_, T>, offset: i64, length: i64, kind: i32, ret: i32| {
            let kind = match kind {
                0 => AdviceKind::Mergeable,
                1 => AdviceKind::Unmergeable,
                _ => wasmtime::bail!("advice-kind {kind} is out of range"),
            };
            let (api, memory) = api(&mut caller);
            let result = api.advise(offset as u64, length as u64, kind);
            write_return(&mut caller, memory, ret, 1, &unit_result(result))
        },
    )?;
    linker.func_wrap(
        IMPORT_MODULE,
        "merge-now",
        |mut caller: Caller<'_, T>, offset: i64, length: i64, ret: i32| {
            let (api, memory) = api(&mut caller);
            let result = api.merge_now(offset as u64, length as u64);
            write_return(&mut caller, memory, ret, 8, &report_result(result))
        },
    )?;
    linker.func_wrap(
        IMPORT_MODULE,
        "stats",
        |mut caller: Caller<'_, T>, ret: i32| {
            let (api, memory) = api(&mut caller);
            let stats = api.stats();
            write_return(&mut caller, memory, ret, 8, &stats_record(stats))
        },
    )?;
    Ok(())
}
