//! The merge state: per-page records, the unstable index and the merge algorithm. Everything
//! here runs under the engine's state lock, with the gate of the region being changed held.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::sync::Arc;

use xxhash_rust::xxh3::xxh3_64;

use crate::layout::{MAX_GAP, mapping_delta, runs_of, trim_window};
use crate::pagemap::{PageBacking, Pagemap};
use crate::quiesce::{Owner, OwnerGuard, OwnerId, Quiescent};
use crate::region::{Region, RegionId};
use crate::stable::{ContentKey, Slot, StableStore};
use crate::{Error, Knobs, OwnerStats, PAGE_SIZE, Stats, remap};

/// Runs shorter than this are not merged while the map-count budget is tight (more than
/// three quarters used): an isolated page costs two mappings and saves one page.
const TIGHT_MIN_RUN: usize = 16;

/// Pages of a partner region's page map read at a time while extending a run.
const BACKING_CHUNK: usize = 64;

/// Mappings kept free below `vm.max_map_count` for the rest of the process (wasmtime's code
/// and reservations, thread stacks, new instances) between two readings of the real count.
const MAP_COUNT_MARGIN: u64 = 2048;

/// What the engine remembers of one page of a region.
#[derive(Clone, Copy, Debug, Default)]
struct PageRecord {
    /// xxh3 of the content at the last visit (valid when `SEEN`).
    checksum: u64,
    /// The stable slot this page maps, plus one; zero when the page maps its own memfd.
    stable: u32,
    /// `SEEN`, `VOLATILE`, `ZERO`, `COPY`.
    flags: u8,
    /// Consecutive visits in which the page was unchanged but matched nothing (smart scan).
    misses: u8,
}

const SEEN: u8 = 1;
const VOLATILE: u8 = 2;
const ZERO: u8 = 4;
/// The page lies in a merged window but holds a private copy of its own bytes.
const COPY: u8 = 8;

impl PageRecord {
    fn slot(&self) -> Option<Slot> {
        self.stable.checked_sub(1)
    }
    /// Whether the page maps a stable page it shares.
    fn shares(&self) -> bool {
        self.stable != 0 && !self.has(COPY)
    }
    fn has(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }
}

/// A registered region and the engine's records of its pages.
struct RegionPages {
    region: Arc<Region>,
    /// One record per page up to the region's length at the last visit.
    pages: Vec<PageRecord>,
    /// Mappings the engine's merges split this region's mapping into, beyond the first.
    vmas: u64,
    /// The owner's gate entries (see [`Owner`]) at which a whole visit of the region found
    /// nothing left to do: every page merged, a hole, or a copy. While the owner has not
    /// entered since, the scanner skips the region.
    quiet_at: Option<u64>,
    /// The visit in progress: the owner's entries when it began, and whether it has found
    /// nothing to do so far.
    visit: (u64, bool),
}

/// A page in the unstable index: unchanged for one pass, matched nothing yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct PageRef {
    region: RegionId,
    page: usize,
}

/// How a visit treats a page that has not been seen unchanged for a pass.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Visit {
    /// KSM's rule: merge only pages whose checksum did not change since the last visit, and
    /// (with smart scan) skip pages that keep failing to merge.
    Scan,
    /// A visit because the owner parked: the same rule, but no page is skipped, since the
    /// owner may just have changed any of them.
    Park,
    /// The owner says the range is ready: merge at once.
    Now,
}

/// Where the scanner resumes.
#[derive(Default)]
struct Cursor {
    region: Option<RegionId>,
    page: usize,
}

/// Counters kept by the state (the rest of [`crate::Stats`] is derived).
#[derive(Default)]
struct Counters {
    pages_scanned: u64,
    full_scans: u64,
    pages_skipped_map_budget: u64,
    regions_busy_skips: u64,
    pages_volatile: u64,
    zero_pages: u64,
    /// Page visits smart scan skipped (KSM `pages_skipped`).
    pages_skipped: u64,
    regions_idle_skips: u64,
    /// Hole punches that failed (memory left allocated, no data affected).
    punch_failures: u64,
    /// Pages visited in the pass in progress, and whether the last whole pass visited none
    /// (every region idle): then the scanner may sleep longer.
    pages_visited_this_pass: u64,
    last_pass_idle: bool,
    merges_this_pass: u64,
    merges_last_pass: u64,
}

pub(crate) struct MergeState {
    regions: BTreeMap<RegionId, RegionPages>,
    cursor: Cursor,
    stable: StableStore,
    /// This pass's unchanged pages that matched nothing, by content key. Rebuilt every pass;
    /// entries may be stale (the page changed or merged since) and are checked before use.
    unstable: HashMap<ContentKey, PageRef>,
    pagemap: Pagemap,
    /// Backing of the pages of the range being visited, from page `backing_from` on.
    backing: Vec<PageBacking>,
    backing_from: usize,
    counters: Counters,
    /// Mappings the engine holds: the stable view plus every region's `vmas`.
    vmas: u64,
    /// `vm.max_map_count`, read at start.
    max_map_count: u64,
    /// Mappings in the whole process at the last reading of `/proc/self/maps`, our `vmas`
    /// at that time, and the pass it was read in (read at most once a pass, and only when
    /// a merge needs it: the file is long when the process holds many mappings).
    process_maps: (u64, u64, u64),
    pub(crate) knobs: Knobs,
}

/// Pages that would fill every mapping count we may spend: see [`MergeState::budget_allows`].
fn map_budget(knobs: &Knobs, max_map_count: u64) -> u64 {
    max_map_count * u64::from(knobs.map_budget_percent) / 100
}

fn zero_page_hash() -> u64 {
    static HASH: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *HASH.get_or_init(|| xxh3_64(&[0; PAGE_SIZE]))
}

impl MergeState {
    pub(crate) fn new(stable: StableStore, pagemap: Pagemap, knobs: Knobs) -> Self {
        let max_map_count = std::fs::read_to_string("/proc/sys/vm/max_map_count")
            .ok()
            .and_then(|text| text.trim().parse().ok())
            .unwrap_or(65_530);
        Self {
            regions: BTreeMap::new(),
            cursor: Cursor::default(),
            stable,
            unstable: HashMap::new(),
            pagemap,
            backing: Vec::new(),
            backing_from: 0,
            counters: Counters::default(),
            vmas: 1,
            max_map_count,
            process_maps: (0, 0, u64::MAX),
            knobs,
        }
    }

    pub(crate) fn add_region(&mut self, region: Arc<Region>) {
        self.regions.insert(
            region.id,
            RegionPages {
                region,
                pages: Vec::new(),
                vmas: 0,
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
        let mut result = Ok(());
        for page in &record.pages {
            if let Some(slot) = page.slot()
                && let Err(source) = self.leave_slot(slot, page.has(COPY))
            {
                result = Err(Error::Remap { region: id, source });
            }
            self.forget_flags(page.flags);
        }
        if self.cursor.region == Some(id) {
            self.cursor.page = 0;
        }
        result
    }

    /// Merges every region of the guard's owner at once (see [`crate::Engine::merge_owner_now`]);
    /// returns how many of their pages map stable pages afterwards.
    pub(crate) fn merge_owner_now(&mut self, guard: &OwnerGuard) -> Result<u64, Error> {
        let ids = self.regions_of(guard.owner());
        self.visit_whole(guard, &ids, Visit::Now)?;
        Ok(ids
            .iter()
            .map(|&id| self.merged_pages(id, 0..usize::MAX))
            .sum())
    }

    fn regions_of(&self, owner: OwnerId) -> Vec<RegionId> {
        self.regions
            .iter()
            .filter(|(_, r)| r.region.owner.id() == owner)
            .map(|(&id, _)| id)
            .collect()
    }

    /// Visits regions `ids`, all of the guard's owner, from end to end.
    fn visit_whole(
        &mut self,
        guard: &OwnerGuard,
        ids: &[RegionId],
        visit: Visit,
    ) -> Result<(), Error> {
        for &id in ids {
            let pages = self.regions[&id].region.len() / PAGE_SIZE;
            self.scan_range(guard.quiescent(), id, 0..pages, visit)?;
        }
        Ok(())
    }

    /// Visits every region of `owner` (its park visit). `false` when the owner is running
    /// again, or has no regions: then there is nothing to look at now.
    pub(crate) fn scan_owner(&mut self, owner: &Owner) -> Result<bool, Error> {
        let ids = self.regions_of(owner.id());
        if ids.is_empty() {
            return Ok(false);
        }
        let Some(guard) = owner.try_enter() else {
            self.counters.regions_busy_skips += 1;
            return Ok(false);
        };
        self.visit_whole(&guard, &ids, Visit::Park)?;
        Ok(true)
    }

    /// What merging saves one owner (as Linux's `/proc/PID/ksm_stat`).
    pub(crate) fn owner_stats(&self, owner: OwnerId) -> OwnerStats {
        let mut stats = OwnerStats::default();
        let mut metadata = 0;
        for record in self
            .regions
            .values()
            .filter(|r| r.region.owner.id() == owner)
        {
            stats.pages_merged += record.pages.iter().filter(|p| p.shares()).count() as u64;
            stats.zero_pages += record.pages.iter().filter(|p| p.has(ZERO)).count() as u64;
            metadata += (record.pages.capacity() * size_of::<PageRecord>()) as i64;
        }
        stats.profit_bytes =
            ((stats.pages_merged + stats.zero_pages) * PAGE_SIZE as u64) as i64 - metadata;
        stats
    }

    /// Takes new settings; a new sharing limit only while nothing is shared.
    pub(crate) fn set_knobs(&mut self, knobs: Knobs) -> Result<(), Error> {
        self.stable.set_max_sharing(knobs.max_page_sharing)?;
        self.knobs = knobs;
        Ok(())
    }

    /// Whether the last whole pass found every region idle (see `RegionPages::quiet_at`).
    pub(crate) fn last_pass_idle(&self) -> bool {
        self.counters.last_pass_idle
    }

    /// Pages of `range` in region `id` that map a stable page.
    pub(crate) fn merged_pages(&self, id: RegionId, range: Range<usize>) -> u64 {
        self.regions.get(&id).map_or(0, |record| {
            let end = range.end.min(record.pages.len());
            let start = range.start.min(end);
            record.pages[start..end]
                .iter()
                .filter(|p| p.shares())
                .count() as u64
        })
    }

    pub(crate) fn stats(&self) -> Stats {
        let page_records: usize = self.regions.values().map(|r| r.pages.capacity()).sum();
        let metadata_bytes = (page_records * size_of::<PageRecord>()
            + self.stable.metadata_bytes()
            + self.unstable.capacity() * size_of::<(ContentKey, PageRef)>())
            as u64;
        let saved = self.stable.pages_sharing() + self.counters.zero_pages;
        Stats {
            general_profit_bytes: (saved * PAGE_SIZE as u64) as i64 - metadata_bytes as i64,
            pages_shared: self.stable.pages_shared(),
            pages_sharing: self.stable.pages_sharing(),
            pages_unshared: self.unstable.len() as u64,
            pages_volatile: self.counters.pages_volatile,
            pages_scanned: self.counters.pages_scanned,
            full_scans: self.counters.full_scans,
            vmas: self.vmas,
            pages_skipped_map_budget: self.counters.pages_skipped_map_budget,
            regions_busy_skips: self.counters.regions_busy_skips,
            metadata_bytes,
            regions: self.regions.len() as u64,
            merges_last_pass: self.counters.merges_last_pass,
            zero_pages: self.counters.zero_pages,
            pages_skipped: self.counters.pages_skipped,
            regions_idle_skips: self.counters.regions_idle_skips,
            punch_failures: self.counters.punch_failures,
            stable_node_chains: self.stable.chain_counts().0,
            stable_node_dups: self.stable.chain_counts().1,
            map_budget: map_budget(&self.knobs, self.max_map_count),
            scanner_cpu_ns: 0,
            errors: 0,
        }
    }

    /// One scanner batch: visits up to `pages_to_scan` pages from the cursor on, region by
    /// region, skipping regions whose owner is busy, and stops early at the end of a pass.
    /// Returns whether a full pass ended.
    pub(crate) fn scan_batch(&mut self) -> Result<bool, Error> {
        let mut budget = self.knobs.pages_to_scan;
        let mut pass_ended = false;
        while budget > 0 && !pass_ended {
            let Some(id) = self.cursor_region() else {
                return Ok(true);
            };
            let region = self.regions[&id].region.clone();
            let pages = region.len() / PAGE_SIZE;
            let start = self.cursor.page;
            let Some(guard) = region.owner.try_enter() else {
                self.counters.regions_busy_skips += 1;
                budget = budget.saturating_sub(pages.saturating_sub(start).max(1));
                pass_ended |= self.advance_region(id);
                continue;
            };
            let entries = region.owner.entries();
            let record = self.regions.get_mut(&id).expect("cursor region");
            if start == 0 {
                if record.quiet_at == Some(entries) {
                    // The owner has not run since a visit found nothing to do here.
                    self.counters.regions_idle_skips += 1;
                    budget -= 1;
                    pass_ended |= self.advance_region(id);
                    continue;
                }
                record.visit = (entries, true);
            }
            let end = pages.min(start + budget);
            let result = self.scan_range(guard.quiescent(), id, start..end, Visit::Scan);
            drop(guard);
            budget -= (end - start).max(1);
            if end >= pages {
                let record = self.regions.get_mut(&id).expect("cursor region");
                let (entries, quiet) = record.visit;
                record.quiet_at = quiet.then_some(entries);
                pass_ended |= self.advance_region(id);
            } else {
                self.cursor.page = end;
            }
            result?;
        }
        Ok(pass_ended)
    }

    /// The region the cursor is in, or the first one after it; `None` when none is left,
    /// which ends the pass.
    fn cursor_region(&mut self) -> Option<RegionId> {
        let from = self.cursor.region.unwrap_or(RegionId(0));
        let Some((&id, _)) = self.regions.range(from..).next() else {
            self.end_pass();
            return None;
        };
        if self.cursor.region != Some(id) {
            self.cursor = Cursor {
                region: Some(id),
                page: 0,
            };
        }
        Some(id)
    }

    /// Moves the cursor past region `id`; ends the pass when it was the last.
    fn advance_region(&mut self, id: RegionId) -> bool {
        let next = self
            .regions
            .range(RegionId(id.0 + 1)..)
            .next()
            .map(|(&id, _)| id);
        self.cursor = Cursor {
            region: next,
            page: 0,
        };
        if next.is_none() {
            self.end_pass();
            return true;
        }
        false
    }

    fn end_pass(&mut self) {
        self.counters.full_scans += 1;
        self.counters.merges_last_pass = std::mem::take(&mut self.counters.merges_this_pass);
        self.counters.last_pass_idle =
            std::mem::take(&mut self.counters.pages_visited_this_pass) == 0;
        // Keep room for as many entries as this pass had, no more: once everything merged,
        // the index of a host that converged should cost next to nothing.
        let used = self.unstable.len();
        self.unstable.clear();
        self.unstable.shrink_to(used);
        self.cursor = Cursor::default();
    }

    /// Mappings in the process now, estimated from the last reading of `/proc/self/maps` and
    /// the engine's own changes since; re-read once a pass.
    fn process_maps_now(&mut self) -> u64 {
        if self.process_maps.2 != self.counters.full_scans {
            let count = std::fs::read("/proc/self/maps")
                .map(|text| text.iter().filter(|&&b| b == b'\n').count() as u64)
                .unwrap_or(0);
            self.process_maps = (count, self.vmas, self.counters.full_scans);
        }
        let (count, ours, _) = self.process_maps;
        (count + self.vmas).saturating_sub(ours)
    }

    /// Visits pages `range` of region `id`, whose gate `q` proves held: notices sharers that
    /// left, then merges what can be merged.
    pub(crate) fn scan_range(
        &mut self,
        q: Quiescent<'_>,
        id: RegionId,
        range: Range<usize>,
        visit: Visit,
    ) -> Result<(), Error> {
        let record = self.regions.get_mut(&id).ok_or(Error::UnknownRegion(id))?;
        let region = record.region.clone();
        let pages = region.len() / PAGE_SIZE;
        if record.pages.len() < pages {
            // Grown: a merged last page now has the new memfd range after it, a boundary
            // between two mappings.
            let boundary = record.pages.last().is_some_and(|last| last.stable != 0);
            record.pages.resize(pages, PageRecord::default());
            if boundary {
                record.vmas += 1;
                self.vmas += 1;
            }
        }
        let range = range.start.min(pages)..range.end.min(pages);
        if range.is_empty() {
            return Ok(());
        }
        self.counters.pages_scanned += range.len() as u64;
        self.counters.pages_visited_this_pass += range.len() as u64;
        let remap_error = |source| Error::Remap { region: id, source };
        self.read_backing(&region, range.clone())
            .map_err(remap_error)?;
        self.release_written(q, id, range.clone())
            .map_err(remap_error)?;

        let mut page = range.start;
        while page < range.end {
            page += self.visit_page(q, id, &region, page, range.end, visit)?;
        }
        Ok(())
    }

    fn read_backing(&mut self, region: &Region, range: Range<usize>) -> std::io::Result<()> {
        self.backing.clear();
        self.backing_from = range.start;
        let backing = self
            .pagemap
            .read(region.page_addr(range.start), range.len())?;
        self.backing.extend(backing);
        Ok(())
    }

    /// Merged pages that their owner wrote since (now private copies) leave their stable page:
    /// each run of them is given back to the region's own memfd.
    fn release_written(
        &mut self,
        q: Quiescent<'_>,
        id: RegionId,
        range: Range<usize>,
    ) -> std::io::Result<()> {
        let mut page = range.start;
        while page < range.end {
            let written = |state: &Self, p: usize| {
                state.regions[&id].pages[p].shares()
                    && state.backing[p - range.start] == PageBacking::Private
            };
            if !written(self, page) {
                page += 1;
                continue;
            }
            let start = page;
            while page < range.end && written(self, page) {
                page += 1;
            }
            self.restore(q, id, start..page)?;
        }
        Ok(())
    }

    /// Gives pages `range` (all merged) back to the region's own memfd and leaves their
    /// stable pages.
    fn restore(
        &mut self,
        q: Quiescent<'_>,
        id: RegionId,
        range: Range<usize>,
    ) -> std::io::Result<()> {
        let record = self.regions.get_mut(&id).expect("caller checked");
        remap::restore_own(q, &record.region, range.start, range.len())?;
        // Pages of its own again: the region needs visits, whoever ran.
        record.quiet_at = None;
        record.visit.1 = false;
        let delta = region_delta(&record.pages, range.clone(), |_| 0);
        record.vmas = record.vmas.saturating_add_signed(delta);
        self.vmas = self.vmas.saturating_add_signed(delta);
        for page in range {
            let record = &mut self.regions.get_mut(&id).expect("caller checked").pages[page];
            let slot = record.slot().expect("restore of an unmerged page");
            let copy = record.has(COPY);
            record.stable = 0;
            record.flags &= !COPY;
            self.leave_slot(slot, copy)?;
        }
        Ok(())
    }

    /// A page stops mapping `slot`, as a sharer or as a private copy.
    fn leave_slot(&mut self, slot: Slot, copy: bool) -> std::io::Result<()> {
        if copy {
            self.stable.drop_copy(slot);
            Ok(())
        } else {
            self.stable.drop_sharer(slot)
        }
    }

    /// Gives every merged page of region `id` back to it: afterwards the region is one
    /// mapping of its own memfd again.
    pub(crate) fn unmerge_region(&mut self, q: Quiescent<'_>, id: RegionId) -> Result<(), Error> {
        let record = self.regions.get(&id).ok_or(Error::UnknownRegion(id))?;
        let merged: Vec<Range<usize>> = runs_of(&record.pages, |p| p.stable != 0).collect();
        for range in merged {
            self.restore(q, id, range)
                .map_err(|source| Error::Remap { region: id, source })?;
        }
        Ok(())
    }

    /// Unmerges every region whose owner is quiescent; returns how many were busy.
    pub(crate) fn unmerge_all(&mut self) -> Result<usize, Error> {
        let mut busy = 0;
        let ids: Vec<RegionId> = self.regions.keys().copied().collect();
        for id in ids {
            let region = self.regions[&id].region.clone();
            if !self.regions[&id].pages.iter().any(|p| p.stable != 0) {
                continue;
            }
            match region.owner.try_enter() {
                Some(guard) => self.unmerge_region(guard.quiescent(), id)?,
                None => {
                    self.counters.regions_busy_skips += 1;
                    busy += 1;
                }
            }
        }
        Ok(busy)
    }

    /// Visits one page; returns how many pages it consumed (a merged run counts whole).
    fn visit_page(
        &mut self,
        q: Quiescent<'_>,
        id: RegionId,
        region: &Arc<Region>,
        page: usize,
        end: usize,
        visit: Visit,
    ) -> Result<usize, Error> {
        let record = self.regions[&id].pages[page];
        let backing = self.backing_of(page);
        if record.stable != 0 {
            return Ok(1);
        }
        if backing == PageBacking::Untouched {
            // A hole (never written, or punched as zeros): reading it would allocate a page.
            return Ok(1);
        }
        // A page of the region's own with bytes in it: there may be work here next time.
        self.regions.get_mut(&id).expect("visited region").visit.1 = false;
        if visit == Visit::Scan
            && self.knobs.smart_scan
            && !self
                .counters
                .full_scans
                .is_multiple_of(smart_scan_period(record.misses))
        {
            self.counters.pages_skipped += 1;
            return Ok(1);
        }
        if record.has(ZERO) {
            self.set_flags(id, page, record.flags & !ZERO);
        }
        let domain = region.owner.domain();
        // SAFETY: the gate is held (`q`) and `page` is below the length read under it.
        let content = unsafe { region.page(page) };

        // A page that matches the stable page its last checksum names is unchanged and
        // mergeable at once: the comparison proves both, without hashing.
        if record.has(SEEN)
            && let Some(slot) = self.stable.lookup((domain, record.checksum), content)
        {
            return self.merge_onto_stable(q, id, page, end, slot, visit);
        }

        let checksum = xxh3_64(content);
        let unchanged = record.has(SEEN) && record.checksum == checksum;
        // A first visit proves nothing either way; only a changed checksum is volatile.
        let changed = record.has(SEEN) && !unchanged;
        self.record_visit(id, page, checksum, !changed || visit == Visit::Now);
        if !unchanged && visit != Visit::Now {
            return Ok(1);
        }
        if self.knobs.use_zero_pages && checksum == zero_page_hash() && content == [0; PAGE_SIZE] {
            remap::punch_own(q, region, page, 1)
                .map_err(|source| Error::Remap { region: id, source })?;
            let flags = self.regions[&id].pages[page].flags;
            self.set_flags(id, page, flags | ZERO);
            return Ok(1);
        }
        let key = (domain, checksum);
        if let Some(slot) = self.stable.lookup(key, content) {
            return self.merge_onto_stable(q, id, page, end, slot, visit);
        }
        if let Some(&partner) = self.unstable.get(&key)
            && partner != (PageRef { region: id, page })
            && let Some(merged) = self.merge_pair(q, id, page, end, partner, key, visit)?
        {
            return Ok(merged);
        }
        self.unstable.insert(key, PageRef { region: id, page });
        self.note_miss(id, page);
        Ok(1)
    }

    fn note_miss(&mut self, id: RegionId, page: usize) {
        let record = &mut self.regions.get_mut(&id).expect("visited region").pages[page];
        record.misses = record.misses.saturating_add(1);
    }

    fn backing_of(&self, page: usize) -> PageBacking {
        self.backing[page - self.backing_from]
    }

    /// Stores a visit's checksum and whether the page counts as volatile; a change (or a
    /// merge) ends a smart-scan streak.
    fn record_visit(&mut self, id: RegionId, page: usize, checksum: u64, settled: bool) {
        let record = &mut self.regions.get_mut(&id).expect("visited region").pages[page];
        if record.checksum != checksum || !settled {
            record.misses = 0;
        }
        record.checksum = checksum;
        let flags = (record.flags | SEEN) & !VOLATILE | if settled { 0 } else { VOLATILE };
        self.set_flags(id, page, flags);
    }

    /// Sets a page's flags, keeping the counters derived from them in step.
    fn set_flags(&mut self, id: RegionId, page: usize, flags: u8) {
        let record = &mut self.regions.get_mut(&id).expect("visited region").pages[page];
        let was = record.flags;
        record.flags = flags;
        self.forget_flags(was);
        for (flag, counter) in [
            (VOLATILE, &mut self.counters.pages_volatile),
            (ZERO, &mut self.counters.zero_pages),
        ] {
            if flags & flag != 0 {
                *counter += 1;
            }
        }
    }

    /// Takes a page's flags out of the counters derived from them.
    fn forget_flags(&mut self, flags: u8) {
        for (flag, counter) in [
            (VOLATILE, &mut self.counters.pages_volatile),
            (ZERO, &mut self.counters.zero_pages),
        ] {
            if flags & flag != 0 {
                *counter -= 1;
            }
        }
    }

    /// Whether a merge adding `delta` mappings for a run of `run` pages fits the budget.
    fn budget_allows(&mut self, delta: i64, run: usize) -> bool {
        if delta <= 0 {
            return true;
        }
        let budget = map_budget(&self.knobs, self.max_map_count);
        let used = self.vmas + delta as u64;
        let process_after = self.process_maps_now() + delta as u64;
        let allowed = used <= budget
            && process_after + MAP_COUNT_MARGIN <= self.max_map_count
            && (used * 4 <= budget * 3 || run >= TIGHT_MIN_RUN);
        if !allowed {
            self.counters.pages_skipped_map_budget += run as u64;
        }
        allowed
    }

    /// Merges the window starting at `page` onto the stable slots starting at `slot`: it
    /// extends while the next region page equals the next stable page, and bridges up to
    /// [`MAX_GAP`] pages in a row that differ, which keep private copies (see [`trim_window`]).
    fn merge_onto_stable(
        &mut self,
        q: Quiescent<'_>,
        id: RegionId,
        page: usize,
        end: usize,
        slot: Slot,
        visit: Visit,
    ) -> Result<usize, Error> {
        let region = self.regions[&id].region.clone();
        let domain = region.owner.domain();
        let mut shares = vec![true];
        let mut gap = 0;
        while page + shares.len() < end {
            let next = page + shares.len();
            let next_slot = slot + shares.len() as Slot;
            let record = self.regions[&id].pages[next];
            let Some(node) = self.stable.node(next_slot) else {
                break;
            };
            if record.stable != 0
                || self.backing_of(next) != PageBacking::File
                || node.key.0 != domain
            {
                break;
            }
            let share = self.stable.has_room_at(next_slot)
                && (visit == Visit::Now || (record.has(SEEN) && record.checksum == node.key.1))
                // SAFETY: gate held (`q`), `next` below the length read under it.
                && unsafe { region.page(next) } == self.stable.page(next_slot);
            gap = if share { 0 } else { gap + 1 };
            if gap > MAX_GAP {
                break;
            }
            shares.push(share);
        }
        trim_window(&mut shares);
        self.map_window(q, id, page, &shares, slot)?;
        Ok(shares.len())
    }

    /// Walks every record and stable node and checks that they agree: each stable page's
    /// sharer count is the number of region pages that map it, and none is above `limit`.
    pub(crate) fn audit(&self) -> Audit {
        // Per slot: (sharers, private copies) found in the page records.
        let mut mapped: HashMap<Slot, (u32, u32)> = HashMap::new();
        for record in self.regions.values() {
            for page in &record.pages {
                if let Some(slot) = page.slot() {
                    let counts = mapped.entry(slot).or_default();
                    if page.has(COPY) {
                        counts.1 += 1;
                    } else {
                        counts.0 += 1;
                    }
                }
            }
        }
        let (chains, dups, index_sound) = self.stable.walk_index();
        let mut audit = Audit {
            stable_node_chains: chains,
            stable_node_dups: dups,
            index_sound,
            ..Audit::default()
        };
        for (slot, node) in self.stable.nodes() {
            audit.stable_pages += u64::from(node.content);
            audit.max_sharers = audit.max_sharers.max(node.sharers);
            if mapped.remove(&slot) != Some((node.sharers, node.copies))
                || node.content != (node.sharers > 0)
            {
                audit.mismatched_slots.push(slot);
            }
        }
        audit.mismatched_slots.extend(mapped.keys());
        audit
    }

    /// Merges the run at `page` of region `id` with the equal run at `partner` into new
    /// stable pages. `None` when the partner is gone, changed, busy or not equal.
    #[allow(clippy::too_many_arguments)]
    fn merge_pair(
        &mut self,
        q: Quiescent<'_>,
        id: RegionId,
        page: usize,
        end: usize,
        partner: PageRef,
        key: ContentKey,
        visit: Visit,
    ) -> Result<Option<usize>, Error> {
        let Some(other) = self.regions.get(&partner.region) else {
            return Ok(None);
        };
        let other_region = other.region.clone();
        let other_pages = other_region.len() / PAGE_SIZE;
        let still_there = |r: &PageRecord| r.stable == 0 && r.has(SEEN) && r.checksum == key.1;
        if partner.page >= other_pages
            || partner.page >= other.pages.len()
            || !still_there(&other.pages[partner.page])
        {
            return Ok(None);
        }
        let other_guard: Option<OwnerGuard>;
        let other_q = if other_region.owner.id() == q.owner() {
            q
        } else {
            match other_region.owner.try_enter() {
                Some(guard) => {
                    other_guard = Some(guard);
                    other_guard.as_ref().expect("just set").quiescent()
                }
                None => {
                    self.counters.regions_busy_skips += 1;
                    return Ok(None);
                }
            }
        };
        let region = self.regions[&id].region.clone();
        // SAFETY: both gates are held (`q`, `other_q`), both pages below the lengths read
        // under them.
        let (content, other_content) =
            unsafe { (region.page(page), other_region.page(partner.page)) };
        if content != other_content {
            return Ok(None);
        }

        // Extend the run while both next pages are unmerged, resident, unchanged since the
        // partner's last visit and equal. Runs within one region must not overlap.
        let mut limit = (end - page).min(other_pages - partner.page);
        if partner.region == id {
            limit = limit.min(page.abs_diff(partner.page));
        }
        // The partner's backing, read a chunk at a time as the run grows: most runs are short.
        let mut other_backing: Vec<PageBacking> = Vec::new();
        let mut keys = vec![Some(key)];
        let mut gap = 0;
        while keys.len() < limit {
            let n = keys.len();
            if n >= other_backing.len() {
                let from = other_backing.len();
                let chunk = (limit - from).min(BACKING_CHUNK);
                let more = self
                    .pagemap
                    .read(other_region.page_addr(partner.page + from), chunk)
                    .map_err(|source| Error::Remap {
                        region: partner.region,
                        source,
                    })?;
                other_backing.extend(more);
            }
            let mine = self.regions[&id].pages[page + n];
            let theirs = self.regions[&partner.region]
                .pages
                .get(partner.page + n)
                .copied()
                .unwrap_or_default();
            if mine.stable != 0
                || theirs.stable != 0
                || self.backing_of(page + n) != PageBacking::File
                || other_backing[n] != PageBacking::File
            {
                break;
            }
            let settled = theirs.has(SEEN)
                && (visit == Visit::Now || (mine.has(SEEN) && mine.checksum == theirs.checksum));
            // SAFETY: as above.
            let next = unsafe { region.page(page + n) };
            let checksum = if settled { xxh3_64(next) } else { 0 };
            let next_key = (key.0, checksum);
            if settled
                && checksum == theirs.checksum
                && (self.stable.has_room(next_key)
                    || (self.knobs.use_zero_pages && checksum == zero_page_hash()))
            {
                // Already stable with room, or zeros: the page's own visit deals with it.
                break;
            }
            let share = settled
                && checksum == theirs.checksum
                // SAFETY: as above.
                && next == unsafe { other_region.page(partner.page + n) };
            gap = if share { 0 } else { gap + 1 };
            if gap > MAX_GAP {
                break;
            }
            keys.push(share.then_some(next_key));
        }
        let mut shares: Vec<bool> = keys.iter().map(Option::is_some).collect();
        trim_window(&mut shares);
        keys.truncate(shares.len());
        let run = keys.len();

        // The run's slots are not chosen yet; any fresh contiguous numbers stand for them.
        let fresh = |n: usize| u32::MAX - (run - n) as u32;
        let delta = region_delta(&self.regions[&id].pages, page..page + run, fresh)
            + region_delta(
                &self.regions[&partner.region].pages,
                partner.page..partner.page + run,
                fresh,
            );
        if !self.budget_allows(delta, run) {
            return Ok(Some(run));
        }
        // SAFETY: as above.
        let bytes = unsafe { region.pages(page..page + run) };
        let slot = match self.stable.publish(bytes, &keys) {
            Ok(Some(slot)) => slot,
            Ok(None) => return Ok(None),
            Err(source) => return Err(Error::Remap { region: id, source }),
        };
        for (n, key) in keys.iter().enumerate() {
            let entry = PageRef {
                region: partner.region,
                page: partner.page + n,
            };
            if let Some(key) = key
                && self.unstable.get(key) == Some(&entry)
            {
                self.unstable.remove(key);
            }
        }
        let partner_mapped = self.map_window(other_q, partner.region, partner.page, &shares, slot);
        if !matches!(partner_mapped, Ok(true)) {
            // Nobody maps the new pages: take them back before reporting.
            let unpublished = self.stable.unpublish(slot, run as Slot);
            partner_mapped?;
            unpublished.map_err(|source| Error::Remap { region: id, source })?;
            return Ok(Some(run));
        }
        self.map_window(q, id, page, &shares, slot)?;
        Ok(Some(run))
    }

    /// Maps the window of region `id` from `page` onto the stable slots from `slot` with one
    /// mapping, if the map-count budget allows; returns whether it did. Where `shares` is
    /// true the page shares the stable page; where it is false the page gets a private copy
    /// of its own bytes. Then the region's own copies are freed and the sharing recorded.
    fn map_window(
        &mut self,
        q: Quiescent<'_>,
        id: RegionId,
        page: usize,
        shares: &[bool],
        slot: Slot,
    ) -> Result<bool, Error> {
        let len = shares.len();
        let record = &self.regions[&id];
        let delta = region_delta(&record.pages, page..page + len, |n| slot + 1 + n as Slot);
        let region = record.region.clone();
        if !self.budget_allows(delta, len) {
            return Ok(false);
        }
        let remap_error = |source| Error::Remap { region: id, source };
        remap::map_stable(q, &region, page, len, self.stable.fd(), u64::from(slot))
            .map_err(remap_error)?;
        let filled = runs_of(shares, |&share| !share).try_for_each(|copies| {
            remap::fill_private_from_own(q, &region, page + copies.start, copies.len())
        });
        if let Err(source) = filled {
            // The region's memfd still holds every byte: map it back, and nothing happened.
            remap::map_own(q, &region, page, len).map_err(remap_error)?;
            return Err(remap_error(source));
        }
        // From here on the merge stands; a failed punch only leaves memory unfreed.
        if shares.contains(&false) && self.stable.punch_empty(slot, len as Slot).is_err() {
            self.counters.punch_failures += 1;
        }
        let record = self.regions.get_mut(&id).expect("visited region");
        record.vmas = record.vmas.saturating_add_signed(delta);
        self.vmas = self.vmas.saturating_add_signed(delta);
        for (n, &share) in shares.iter().enumerate() {
            let page_slot = slot + n as Slot;
            self.regions.get_mut(&id).expect("visited region").pages[page + n].stable =
                page_slot + 1;
            // A zero page read back in since it was punched, merged now, is no longer one.
            let flags = self.regions[&id].pages[page + n].flags;
            self.set_flags(id, page + n, flags & !ZERO);
            if share {
                self.stable.add_sharer(page_slot);
                let checksum = self.stable.node(page_slot).expect("just shared").key.1;
                self.record_visit(id, page + n, checksum, true);
                self.regions.get_mut(&id).expect("visited region").pages[page + n].misses = 0;
            } else {
                self.stable.add_copy(page_slot);
                let flags = self.regions[&id].pages[page + n].flags;
                self.set_flags(id, page + n, flags | COPY);
            }
        }
        self.counters.merges_this_pass += 1;
        if remap::punch_own(q, &region, page, len).is_err() {
            self.counters.punch_failures += 1;
        }
        Ok(true)
    }
}

/// The result of walking the engine's records ([`crate::Engine::audit`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Audit {
    /// Stable pages in use.
    pub stable_pages: u64,
    /// The most sharers any stable page has.
    pub max_sharers: u32,
    /// Stable slots whose sharer count disagrees with the region pages that map them.
    pub mismatched_slots: Vec<u32>,
    /// Chains and dups found by walking the stable index.
    pub stable_node_chains: u64,
    pub stable_node_dups: u64,
    /// Whether every page the index names is in use, within the sharing limit, and holds the
    /// same bytes as the rest of its chain.
    pub index_sound: bool,
}

/// Smart scan: a page that stays unchanged and matches nothing visit after visit is looked
/// at only every second pass, then every fourth, up to every 32nd, until it changes or
/// merges. The passes are aligned (pass numbers divisible by the period) rather than counted
/// per page, so that two such pages that became equal still meet in one pass: pages of any
/// period are all visited on every 32nd pass.
fn smart_scan_period(misses: u8) -> u64 {
    if misses < 2 {
        1
    } else {
        1 << (misses - 1).min(5)
    }
}

/// [`mapping_delta`] over a region's page records.
fn region_delta(pages: &[PageRecord], range: Range<usize>, kind: impl Fn(usize) -> u32) -> i64 {
    mapping_delta(|p| pages[p].stable, pages.len(), range, kind)
}
