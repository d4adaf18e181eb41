//! The merge state: what the engine knows of every registered region's pages, and the merge
//! algorithm over it. Everything here runs under the engine's state lock; a region's mappings
//! change only with its owner's gate held ([`crate::quiesce`]), which the `Quiescent` token
//! each remapping method takes proves.
//!
//! One file per step of a page's journey, in the order a page takes them:
//!
//! 1. [`records`]: what the engine keeps for every page that exists, and only for those
//!    (`PageRecord`: checksum, stable slot, flags, in a sparse `PageTable`), and the counts
//!    derived from its flags.
//! 2. [`scan`]: the cursor and full passes; a visit reads the page map, hashes the page,
//!    applies KSM's volatility rule and smart scan, and looks for a match, first in the
//!    stable index, then in this pass's unstable index.
//! 3. [`merge`]: a match grows into a run or a window (`layout.rs` says what a window may
//!    bridge and what it costs in mappings), which is mapped onto stable slots with one
//!    `mmap`; the region's own copies are then punched.
//! 4. The copy-on-write break is the kernel's: a write to a merged page faults and gets a
//!    private anonymous copy. Nothing in samepage runs in the write path.
//! 5. [`release`]: the next visit sees the private copy in the page map and gives the page
//!    back to the region's memfd (sharer-left recovery); a stable page nobody shares any more
//!    is freed. Unmerging a region takes the same path, and so does a bridged page (a
//!    private copy in a window) that is about to merge elsewhere.
//!
//! Beside the journey: [`budget`] decides whether a merge may spend the mappings it costs;
//! [`compact`] maps a region's stretches that merges left in pieces onto layout copies,
//! once mappings run short;
//! [`accounting`] derives the counters, per-owner figures and the audit from the records.
//!
//! [`MergeState`] holds one part per concern, each a type of its own in its step's file with
//! the methods that touch only its data: the records (`Records`, in [`records`]), the stable
//! store (`StableStore`, in `stable/`), the map-count budget (`MapBudget`, in [`budget`]), the
//! counters (`Counters`, in [`accounting`]), and smaller ones: the cursor and the page map
//! of the range being visited (`Cursor`, `Backing`, in [`scan`]), the frees left to the
//! scanner thread (`DeferredPunches`, in [`merge`]) and the module images (`Images`, in
//! [`image`]). What spans them (a visit, a merge, a release) is a `MergeState` method in
//! the file of the step that does it.
//!
//! Invariants kept across all of them:
//! - every page of a region maps its own memfd (`stable == 0`), a stable slot it shares, or
//!   a private copy of its own bytes over a slot (`COPY`); the slot's node counts it;
//! - `vmas` equals the stable view plus, per region, the mapping boundaries its records imply
//!   (`layout::mapping_delta` keeps it in step with every change) and those the kernel keeps
//!   where the records imply none (`kernel_splits`, asked of the kernel after each remap:
//!   `vma.rs`);
//! - the unstable index is only a hint: its entries are re-checked, and bytes are compared,
//!   before anything merges.

mod accounting;
mod advice;
mod budget;
mod compact;
mod image;
mod merge;
mod records;
mod release;
mod scan;

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

use crate::advice::MergeScope;
use crate::pagemap::Pagemap;
use crate::protect::{ProtectError, Protector, RunningMergesOff, WaitFigures, Window};
use crate::quiesce::Quiescent;
use crate::region::{Region, RegionId};
use crate::stable::{ContentKey, StableStore};
use crate::{Error, Knobs};

pub use accounting::Audit;
use accounting::Counters;
use budget::MapBudget;
use compact::LayoutCopies;
use image::Images;
use merge::DeferredPunches;
use records::{COPY, PageTable, Records};
pub(crate) use scan::Visit;
use scan::{Backing, Cursor, PageRef};

/// What the engine knows of every registered region's pages and of the stable pages they
/// share, with what it needs to go on merging: the parts below, one per concern, and the
/// few facts that belong to no single step.
pub(crate) struct MergeState {
    /// Every region's page records and the counts that follow their flags.
    records: Records,
    /// Where the scanner resumes.
    cursor: Cursor,
    /// The stable pages, their sharers and the stable index.
    stable: StableStore,
    /// This pass's unchanged pages that matched nothing, by content key. Rebuilt every pass;
    /// entries may be stale (the page changed or merged since) and are checked before use.
    unstable: HashMap<ContentKey, PageRef>,
    /// `/proc/self/pagemap`, to tell pages of a region's memfd from holes and from private
    /// copies its owner wrote: read for the range being visited, and for a partner's run.
    pagemap: Pagemap,
    /// What the page map says of the range being visited.
    backing: Backing,
    /// What the steps count as they go.
    counters: Counters,
    /// The mappings the engine holds, against the share of `vm.max_map_count` it may.
    budget: MapBudget,
    /// The settings, which every step reads.
    pub(crate) knobs: Knobs,
    /// Which pages may merge without advice (fixed at start).
    scope: MergeScope,
    /// Pages that merges on owners' calls replaced, left for the scanner thread to free.
    deferred: DeferredPunches,
    /// Module images ([`image`]).
    images: Images,
    /// Copies of stretches' layouts that fragmented regions map ([`compact`]).
    layout_copies: LayoutCopies,
    /// The `userfaultfd` that write-protects running owners' pages, or why there is none.
    protector: Result<Arc<Protector>, ProtectError>,
}

impl MergeState {
    pub(crate) fn new(
        stable: StableStore,
        pagemap: Pagemap,
        knobs: Knobs,
        scope: MergeScope,
        punch_after_calls: bool,
        max_map_count: Option<u64>,
        protector: Result<Arc<Protector>, ProtectError>,
    ) -> Self {
        Self {
            records: Records::default(),
            cursor: Cursor::default(),
            stable,
            unstable: HashMap::new(),
            pagemap,
            backing: Backing::default(),
            counters: Counters::default(),
            budget: MapBudget::new(max_map_count),
            knobs,
            scope,
            deferred: DeferredPunches::new(punch_after_calls),
            images: Images::default(),
            layout_copies: LayoutCopies::default(),
            protector,
        }
    }

    /// Why running owners are not merged, if they are not: the knob is off, or the kernel
    /// does not let the engine write-protect their pages.
    pub(crate) fn running_merges(&self) -> Result<&Arc<Protector>, RunningMergesOff> {
        match &self.protector {
            _ if !self.knobs.merge_running => Err(RunningMergesOff::Knob),
            Ok(protector) => Ok(protector),
            Err(error) => Err(RunningMergesOff::Kernel(error.clone())),
        }
    }

    /// `pages_sharing` alone, without the walk over every record that the other counters take.
    pub(crate) fn pages_sharing(&self) -> u64 {
        self.stable.pages_sharing()
    }

    pub(crate) fn merges_running(&self) -> bool {
        self.running_merges().is_ok()
    }

    /// The write-protect windows' figures so far.
    pub(crate) fn wait_figures(&self) -> WaitFigures {
        self.protector
            .as_ref()
            .map(|p| p.waits())
            .unwrap_or_default()
    }

    /// Write-protects pages `pages` of `region` for a merge while its owner runs.
    pub(crate) fn open_window(
        &self,
        q: Quiescent<'_>,
        region: &Arc<Region>,
        pages: Range<usize>,
    ) -> Result<Window, Error> {
        self.protector
            .as_ref()
            .map_err(Clone::clone)
            .and_then(|protector| Window::open(protector, q, region, pages))
            .map_err(|source| Error::Protect {
                region: region.id,
                source,
            })
    }

    pub(crate) fn add_region(&mut self, region: Arc<Region>) {
        self.budget.note_registration();
        self.records.add(region);
    }

    /// Puts `region` (a region already registered under its id, with another owner) in the
    /// records: see [`crate::Engine::reassign_region`].
    pub(crate) fn reassign_region(
        &mut self,
        id: RegionId,
        region: Arc<Region>,
    ) -> Result<(), Error> {
        let record = self
            .records
            .regions
            .get_mut(&id)
            .ok_or(Error::UnknownRegion(id))?;
        record.region = region;
        // The new owner's gate entries say nothing of a visit under the old one, and the old
        // owner's advice is not the new one's word.
        record.quiet_at = None;
        record.visit = (0, false);
        record.advice = Default::default();
        Ok(())
    }

    /// Forgets a region whose owner is about to unmap it: releases its sharing without
    /// touching its mapping.
    pub(crate) fn remove_region(&mut self, id: RegionId) -> Result<(), Error> {
        let Some(record) = self.records.regions.remove(&id) else {
            return Err(Error::UnknownRegion(id));
        };
        self.budget.remove(record.vmas);
        self.counters.host_awake = true;
        let result = self.forget_records(&record.pages);
        if self.cursor.region == Some(id) {
            self.cursor.page = 0;
        }
        result
    }

    /// Takes a region's records out of the stable nodes and counters (the region keeps none).
    fn forget_records(&mut self, records: &PageTable) -> Result<(), Error> {
        let mut result = Ok(());
        for (_, page) in records.all() {
            if let Some(slot) = page.slot()
                && let Err(error) = self.leave_slot(slot, page.has(COPY))
            {
                result = Err(error);
            }
            self.records.forget_flags(page.flags());
        }
        result
    }

    /// Takes note of region `id`'s current length (it may have grown since the last visit);
    /// returns it in pages.
    pub(crate) fn cover_length(&mut self, id: RegionId) -> Result<usize, Error> {
        let record = self
            .records
            .regions
            .get_mut(&id)
            .ok_or(Error::UnknownRegion(id))?;
        let pages = record.region.len() / crate::PAGE_SIZE;
        if record.len < pages {
            // Grown: a merged last page now has the new memfd range after it, a boundary
            // between two mappings.
            let boundary = record.len > 0 && record.pages.get(record.len - 1).stable() != 0;
            record.len = pages;
            if boundary {
                record.vmas += 1;
                self.budget.add(1);
            }
        }
        Ok(pages)
    }

    /// The pages of byte range `range` of region `id`, after checking that `guard` is its
    /// owner's and that the range is page-aligned and inside the region.
    pub(crate) fn checked_pages(
        &self,
        guard: &crate::OwnerGuard,
        id: RegionId,
        range: std::ops::Range<usize>,
    ) -> Result<std::ops::Range<usize>, Error> {
        let region = &self
            .records
            .regions
            .get(&id)
            .ok_or(Error::UnknownRegion(id))?
            .region;
        if guard.owner() != region.owner.id() {
            return Err(Error::WrongOwner(id));
        }
        let len = region.len();
        let page = crate::PAGE_SIZE;
        if range.start > range.end
            || range.end > len
            || !range.start.is_multiple_of(page)
            || !range.end.is_multiple_of(page)
        {
            return Err(Error::OutOfRange {
                region: id,
                range,
                len,
            });
        }
        Ok(range.start / page..range.end / page)
    }

    /// The owner of region `id`.
    pub(crate) fn region_owner(&self, id: RegionId) -> Option<crate::Owner> {
        Some(self.records.regions.get(&id)?.region.owner.clone())
    }

    /// The current length of region `id` in bytes.
    pub(crate) fn region_len(&self, id: RegionId) -> Option<usize> {
        Some(self.records.regions.get(&id)?.region.len())
    }

    /// Takes new settings; a new sharing limit only while nothing is shared.
    pub(crate) fn set_knobs(&mut self, knobs: Knobs) -> Result<(), Error> {
        self.stable.set_max_sharing(knobs.max_page_sharing)?;
        if self.knobs.smart_scan && !knobs.smart_scan {
            // Pages smart scan had backed off made their regions idle; without it, they are
            // work on every pass again.
            for region in self.records.regions.values_mut() {
                region.quiet_at = None;
            }
        }
        self.knobs = knobs;
        // Zero pages, the budget or the run mode may make pages of idle regions mergeable.
        self.counters.host_awake = true;
        Ok(())
    }
}
