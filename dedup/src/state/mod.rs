//! The merge state: what the engine knows of every registered region's pages, and the merge
//! algorithm over it. Everything here runs under the engine's state lock; a region's mappings
//! change only with its owner's gate held ([`crate::quiesce`]), which the `Quiescent` token
//! each remapping method takes proves.
//!
//! One file per step of a page's journey, in the order a page takes them:
//!
//! 1. [`records`]: what the engine keeps for every page that exists, and only for those
//!    (`PageRecord`: checksum, stable slot, flags, in a sparse `PageTable`), and the counters
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
//! [`accounting`] derives the counters, per-owner figures and the audit from the records.
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
mod image;
mod merge;
mod records;
mod release;
mod scan;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use crate::advice::MergeScope;
use crate::pagemap::{PageBacking, Pagemap};
use crate::quiesce::OwnerId;
use crate::region::{Region, RegionId};
use crate::stable::{ContentKey, StableStore};
use crate::{Error, Knobs};

pub use accounting::Audit;
use advice::AdviceMap;
use records::{COPY, PageRecord, PageTable};
pub(crate) use scan::Visit;
use scan::{Cursor, PageRef};

/// A registered region and the engine's records of its pages.
struct RegionPages {
    region: Arc<Region>,
    /// Records of the pages that exist (see [`records`]).
    pages: PageTable,
    /// The region's length in pages at the last visit.
    len: usize,
    /// The owner's advice, by range.
    advice: AdviceMap,
    /// Mappings the engine's merges split this region's mapping into, beyond the first.
    vmas: u64,
    /// Pages where the kernel starts a mapping although the page before maps the slot
    /// before (their mappings' anonymous memory differs: `vma.rs`), so that the records
    /// alone imply one boundary fewer; each is counted in `vmas`.
    kernel_splits: std::collections::BTreeSet<usize>,
    /// The owner's gate entries (see [`crate::Owner`]) at which a whole visit of the region
    /// found nothing left to do: every page shared, a hole, advised never to merge, or (with
    /// smart scan) looked at only on every 32nd pass. While the owner has not entered since,
    /// the scanner skips the region, but on those passes if anything was awake since the
    /// last of them (see [`scan`]).
    quiet_at: Option<u64>,
    /// The visit in progress: the owner's entries when it began, and whether it has found
    /// nothing to do so far.
    visit: (u64, bool),
}

pub(crate) struct MergeState {
    regions: BTreeMap<RegionId, RegionPages>,
    cursor: Cursor,
    stable: StableStore,
    /// This pass's unchanged pages that matched nothing, by content key. Rebuilt every pass;
    /// entries may be stale (the page changed or merged since) and are checked before use.
    unstable: HashMap<ContentKey, PageRef>,
    pagemap: Pagemap,
    /// Backing of the pages of the range being visited, from page `backing_from` on, of
    /// region `backing_region`.
    backing: Vec<PageBacking>,
    backing_from: usize,
    backing_region: Option<RegionId>,
    counters: records::Counters,
    /// Mappings the engine holds: the stable view plus every region's `vmas`.
    vmas: u64,
    /// `vm.max_map_count`, read at start, or the lower limit the engine was given.
    max_map_count: u64,
    /// Mappings in the whole process at the last reading of `/proc/self/maps`, our `vmas`
    /// at that time, and when it was read (at most every `budget::MAPS_READ_INTERVAL`, and
    /// only when a merge needs it: the file is long when the process holds many mappings,
    /// and reading it on every instantiation made instantiation cost grow with the number of
    /// instances).
    process_maps: (u64, u64, Option<std::time::Instant>),
    /// Regions registered since the engine started, and at the last reading of
    /// `/proc/self/maps`: the budget counts a few mappings for each one since.
    registrations: u64,
    registrations_at_reading: u64,
    pub(crate) knobs: Knobs,
    /// Which pages may merge without advice (fixed at start).
    scope: MergeScope,
    /// Whether a merge made on an owner's call leaves freeing the replaced pages to the
    /// scanner thread, so that the call returns sooner (only engines that have one).
    punch_after_calls: bool,
    /// Set while such a call merges.
    in_owner_call: bool,
    /// Ranges of regions' own memfd pages that merges on owners' calls replaced, waiting to
    /// be freed ([`MergeState::free_deferred`]).
    deferred_punches: Vec<(Arc<Region>, std::ops::Range<usize>)>,
    /// Module images, by number ([`image`]).
    images: HashMap<u64, image::ImageRecord>,
    next_image: u64,
}

impl MergeState {
    pub(crate) fn new(
        stable: StableStore,
        pagemap: Pagemap,
        knobs: Knobs,
        scope: MergeScope,
        punch_after_calls: bool,
        max_map_count: Option<u64>,
    ) -> Self {
        let system = std::fs::read_to_string("/proc/sys/vm/max_map_count")
            .ok()
            .and_then(|text| text.trim().parse().ok())
            .unwrap_or(65_530);
        let max_map_count = max_map_count.map_or(system, |limit| limit.min(system));
        Self {
            regions: BTreeMap::new(),
            cursor: Cursor::default(),
            stable,
            unstable: HashMap::new(),
            pagemap,
            backing: Vec::new(),
            backing_from: 0,
            backing_region: None,
            counters: records::Counters::default(),
            vmas: 1,
            max_map_count,
            process_maps: (0, 0, None),
            registrations: 0,
            registrations_at_reading: 0,
            knobs,
            scope,
            punch_after_calls,
            in_owner_call: false,
            deferred_punches: Vec::new(),
            images: HashMap::new(),
            next_image: 0,
        }
    }

    pub(crate) fn add_region(&mut self, region: Arc<Region>) {
        self.registrations += 1;
        self.regions.insert(
            region.id,
            RegionPages {
                region,
                pages: PageTable::default(),
                len: 0,
                advice: AdviceMap::default(),
                vmas: 0,
                kernel_splits: Default::default(),
                quiet_at: None,
                visit: (0, false),
            },
        );
    }

    /// Forgets a region whose owner is about to unmap it: releases its sharing without
    /// touching its mapping.
    pub(crate) fn remove_region(&mut self, id: RegionId) -> Result<(), Error> {
        let Some(record) = self.regions.remove(&id) else {
            return Err(Error::UnknownRegion(id));
        };
        self.vmas = self.vmas.saturating_sub(record.vmas);
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
            self.forget_flags(page.flags());
        }
        result
    }

    /// The records of region `id`, which the caller knows is registered (it was found under
    /// the same lock).
    fn region(&self, id: RegionId) -> &RegionPages {
        self.regions
            .get(&id)
            .expect("a region found under the state lock stays registered")
    }

    fn region_mut(&mut self, id: RegionId) -> &mut RegionPages {
        self.regions
            .get_mut(&id)
            .expect("a region found under the state lock stays registered")
    }

    /// The records of region `id` and the counters their flags feed, borrowed together, for
    /// loops over many pages (one lookup of the region for all of them).
    fn records_and_counters(&mut self, id: RegionId) -> (&mut PageTable, &mut records::Counters) {
        let region = self
            .regions
            .get_mut(&id)
            .expect("a region found under the state lock stays registered");
        (&mut region.pages, &mut self.counters)
    }

    /// The record of page `page` of region `id`.
    fn record(&self, id: RegionId, page: usize) -> PageRecord {
        self.region(id).pages.get(page)
    }

    /// The record of page `page` of region `id`, made if it has none.
    fn record_mut(&mut self, id: RegionId, page: usize) -> &mut PageRecord {
        self.region_mut(id).pages.get_mut(page)
    }

    /// Takes note of region `id`'s current length (it may have grown since the last visit);
    /// returns it in pages.
    pub(crate) fn cover_length(&mut self, id: RegionId) -> Result<usize, Error> {
        let record = self.regions.get_mut(&id).ok_or(Error::UnknownRegion(id))?;
        let pages = record.region.len() / crate::PAGE_SIZE;
        if record.len < pages {
            // Grown: a merged last page now has the new memfd range after it, a boundary
            // between two mappings.
            let boundary = record.len > 0 && record.pages.get(record.len - 1).stable() != 0;
            record.len = pages;
            if boundary {
                record.vmas += 1;
                self.vmas += 1;
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
        Some(self.regions.get(&id)?.region.owner.clone())
    }

    /// The current length of region `id` in bytes.
    pub(crate) fn region_len(&self, id: RegionId) -> Option<usize> {
        Some(self.regions.get(&id)?.region.len())
    }

    fn regions_of(&self, owner: OwnerId) -> Vec<RegionId> {
        self.regions
            .iter()
            .filter(|(_, r)| r.region.owner.id() == owner)
            .map(|(&id, _)| id)
            .collect()
    }

    /// Takes new settings; a new sharing limit only while nothing is shared.
    pub(crate) fn set_knobs(&mut self, knobs: Knobs) -> Result<(), Error> {
        self.stable.set_max_sharing(knobs.max_page_sharing)?;
        if self.knobs.smart_scan && !knobs.smart_scan {
            // Pages smart scan had backed off made their regions idle; without it, they are
            // work on every pass again.
            for region in self.regions.values_mut() {
                region.quiet_at = None;
            }
        }
        self.knobs = knobs;
        // Zero pages, the budget or the run mode may make pages of idle regions mergeable.
        self.counters.host_awake = true;
        Ok(())
    }
}
