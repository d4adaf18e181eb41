//! The `samepage:dedup` guest API (`wit/dedup.wit`): a guest advises which ranges of its
//! linear memory may merge, which must never be read (secrets), and which are ready to merge
//! now, and reads its own figures.
//!
//! One implementation, [`GuestApi`], serves two ABIs:
//!
//! - **components**, through `wasmtime::component::bindgen!` from the WIT:
//!   [`add_to_component_linker`];
//! - **core modules**, as core imports under the module name `samepage:dedup/advice@0.1.0`
//!   with the canonical ABI's flat signatures, exactly as `wit-bindgen c` declares them for a
//!   core module ([`add_to_linker`]), so that one C guest works as a core module and, after
//!   `wasm-tools component new`, as a component.
//!
//! Both run inside the guest's call, so the store owner's guard is held (its call hook holds
//! it): advice and merge-now act before the call returns, and other instances' pages are
//! matched only through the engine's usual try-lock rule. A refused call is an error value;
//! a return pointer outside the caller's memory is the canonical ABI's trap.
//!
//! Which memory a guest's offsets refer to: a core module's memory 0 (its exported `memory`);
//! a component's first memory created at instantiation (the main module's, in components made
//! by `wasm-tools component new`).

mod core;

use samepage_dedup::{Advice, PAGE_SIZE, RegionId};
use samepage_runtime::{HasStoreOwner, RuntimeError, StoreOwner};

pub use crate::core::{IMPORT_MODULE, add_to_linker};

wasmtime::component::bindgen!({
    path: "../wit",
    world: "guest",
});

// `samepage` here is the module `bindgen!` made for the WIT package `samepage:dedup`, not a crate.
use self::samepage::dedup::advice::{self, AdviceKind, Error, InstanceStats, MergeReport};

/// The guest API for one call: the caller's owner and the memory its offsets refer to.
pub struct GuestApi<'a> {
    owner: &'a StoreOwner,
    /// The caller's memory; `None` when it has none registered with a merge engine.
    region: Option<RegionId>,
}

impl<'a> GuestApi<'a> {
    /// The API for a caller whose offsets refer to `region`.
    pub fn new(owner: &'a StoreOwner, region: Option<RegionId>) -> Self {
        Self { owner, region }
    }

    /// The pages of the byte range, checked as the WIT says: `offset` aligned, `length`
    /// rounded up to a page, within the memory's current size.
    fn range(&self, offset: u64, length: u64) -> Result<(RegionId, std::ops::Range<usize>), Error> {
        let (engine, region) = match (self.owner.dedup(), self.region) {
            (Some(engine), Some(region)) => (engine, region),
            _ => return Err(Error::Disabled),
        };
        if !offset.is_multiple_of(PAGE_SIZE as u64) {
            return Err(Error::Unaligned);
        }
        let end = length
            .checked_next_multiple_of(PAGE_SIZE as u64)
            .and_then(|length| offset.checked_add(length))
            .ok_or(Error::OutOfBounds)?;
        let len = engine.region_len(region).ok_or(Error::Disabled)? as u64;
        if end > len {
            return Err(Error::OutOfBounds);
        }
        Ok((region, offset as usize..end as usize))
    }

    pub fn advise(&self, offset: u64, length: u64, kind: AdviceKind) -> Result<(), Error> {
        let (region, range) = self.range(offset, length)?;
        if range.is_empty() {
            return Ok(());
        }
        let advice = match kind {
            AdviceKind::Mergeable => Advice::Mergeable,
            AdviceKind::Unmergeable => Advice::Unmergeable,
        };
        self.with_engine(|engine, guard| engine.advise(guard, region, range, advice))
    }

    pub fn merge_now(&self, offset: u64, length: u64) -> Result<MergeReport, Error> {
        let (region, range) = self.range(offset, length)?;
        if range.is_empty() {
            return Ok(MergeReport {
                pages_merged: 0,
                zero_pages: 0,
            });
        }
        let report = self.with_engine(|engine, guard| engine.merge_now(guard, region, range))?;
        Ok(MergeReport {
            pages_merged: report.pages_merged,
            zero_pages: report.zero_pages,
        })
    }

    pub fn stats(&self) -> InstanceStats {
        let stats = self.owner.stats();
        InstanceStats {
            pages_merged: stats.pages_merged,
            zero_pages: stats.zero_pages,
            profit_bytes: stats.profit_bytes,
        }
    }

    /// Runs `f` with the engine and the guard the caller holds.
    fn with_engine<R>(
        &self,
        f: impl FnOnce(
            &samepage_dedup::Engine,
            &samepage_dedup::OwnerGuard,
        ) -> Result<R, samepage_dedup::Error>,
    ) -> Result<R, Error> {
        let engine = self.owner.dedup().ok_or(Error::Disabled)?;
        let result = self
            .owner
            .with_guard(|guard| f(engine, guard))
            // A guest call always holds the guard; outside one there is nobody to answer.
            .ok_or(Error::Disabled)?;
        result.map_err(|error| match error {
            samepage_dedup::Error::TooManyAdvisedRanges { .. } => Error::Limit,
            samepage_dedup::Error::OutOfRange { .. } => Error::OutOfBounds,
            // The region went away, or the system refused a remap: nothing the guest can
            // fix, and nothing merged.
            _ => Error::Disabled,
        })
    }
}

impl advice::Host for GuestApi<'_> {
    fn advise(&mut self, offset: u64, length: u64, kind: AdviceKind) -> Result<(), Error> {
        GuestApi::advise(self, offset, length, kind)
    }

    fn merge_now(&mut self, offset: u64, length: u64) -> Result<MergeReport, Error> {
        GuestApi::merge_now(self, offset, length)
    }

    fn stats(&mut self) -> InstanceStats {
        GuestApi::stats(self)
    }
}

/// [`wasmtime::component::HasData`] for the guest API.
struct Api;

impl wasmtime::component::HasData for Api {
    type Data<'a> = GuestApi<'a>;
}

fn component_api<T: HasStoreOwner>(data: &mut T) -> GuestApi<'_> {
    let owner = data.store_owner();
    GuestApi::new(owner, owner.first_region().map(|region| region.id))
}

/// Adds the guest API to a component linker, for stores whose data holds a [`StoreOwner`].
pub fn add_to_component_linker<T: HasStoreOwner + 'static>(
    linker: &mut wasmtime::component::Linker<T>,
) -> Result<(), RuntimeError> {
    advice::add_to_linker::<T, Api>(linker, component_api::<T>).map_err(RuntimeError::Wasmtime)
}
