//! Step 5 of a page's journey: a sharer that wrote leaves, and merged pages go back to their
//! region.
//!
//! After the kernel's copy-on-write (step 4) the written page is a private anonymous page in
//! the region's `MAP_PRIVATE` mapping of the stable memfd; the page map shows it as
//! `Private`. The visit that sees this ([`MergeState::release_written`], called by every
//! visit before it looks for merges) copies what the owner sees into the region's own memfd,
//! maps the memfd there again ([`crate::remap::restore_own`]), and drops the page's sharing;
//! the stable page goes when its last sharer does, and its slot once no mapping covers it.
//! Until that visit the page is simply private memory of the owner's: nobody else sees it,
//! and it costs what any written page costs.
//!
//! Unmerging (`run = 2`, or a region that must not be shared) gives back every merged page
//! of a region the same way, private copies and shared pages alike, so that the region ends
//! as one mapping of its own memfd. So does [`MergeState::unbridge`], for one bridged page
//! whose bytes came to match a page elsewhere, just before that merge.

use std::ops::Range;
use std::sync::Arc;

use crate::Error;
use crate::pagemap::PageBacking;
use crate::protect::WINDOW_PAGES;
use crate::quiesce::Quiescent;
use crate::region::{Region, RegionId};
use crate::remap;
use crate::stable::Slot;

use super::MergeState;
use super::records::COPY;

impl MergeState {
    /// Merged pages that their owner wrote since (now private copies) leave their stable page:
    /// each run of them is given back to the region's own memfd.
    pub(super) fn release_written(
        &mut self,
        q: Quiescent<'_>,
        id: RegionId,
        range: Range<usize>,
    ) -> Result<(), Error> {
        let mut page = range.start;
        while page < range.end {
            let written = |state: &Self, p: usize| {
                state.records.record(id, p).shares() && state.backing.of(p) == PageBacking::Private
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
    pub(super) fn restore(
        &mut self,
        q: Quiescent<'_>,
        id: RegionId,
        range: Range<usize>,
    ) -> Result<(), Error> {
        let record = self.records.region_mut(id);
        remap::restore_own(q, &record.region, range.start, range.len())?;
        // Pages of its own again: the region needs visits, whoever ran.
        record.quiet_at = None;
        record.visit.1 = false;
        let delta = record.mapping_delta(range.clone(), 0);
        let remapped = range.clone();
        self.add_mappings(id, delta);
        // Sharers leaving make room in their stable pages, and mappings in the budget.
        self.counters.host_awake = true;
        for page in range {
            let record = self.records.record_mut(id, page);
            let slot = record.slot().expect("restore of an unmerged page");
            let copy = record.has(COPY);
            record.unmap_stable();
            self.leave_slot(slot, copy)?;
        }
        self.reconcile_edges(id, remapped);
        Ok(())
    }

    /// Gives bridged page `page` of region `id` (a private copy in a merged window) back to
    /// the region's memfd, so that it can merge elsewhere: its bytes matched another page's.
    /// Splitting the window costs mappings; `false`, and the page left bridged, when they do
    /// not fit the budget (counted in `pages_skipped_map_budget`).
    pub(super) fn unbridge(
        &mut self,
        q: Quiescent<'_>,
        id: RegionId,
        page: usize,
    ) -> Result<bool, Error> {
        let delta = self.records.region(id).mapping_delta(page..page + 1, 0);
        if !self.budget_allows(delta, 1) {
            return Ok(false);
        }
        self.restore(q, id, page..page + 1)?;
        // `restore_own` mapped the memfd with its page-table entries filled.
        self.backing.update(id, page, PageBacking::File);
        Ok(true)
    }

    /// A page stops mapping `slot`, as a sharer or as a private copy.
    pub(super) fn leave_slot(&mut self, slot: Slot, copy: bool) -> Result<(), Error> {
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
        let record = self
            .records
            .regions
            .get(&id)
            .ok_or(Error::UnknownRegion(id))?;
        let merged = record.pages.runs(0..usize::MAX, |p| p.stable() != 0);
        for range in merged {
            self.restore(q, id, range)?;
        }
        Ok(())
    }

    /// Unmerges every region whose owner is quiescent, or runs with its gate lent (in
    /// write-protect windows, as the scanner merges it); returns how many were busy.
    pub(crate) fn unmerge_all(&mut self) -> Result<usize, Error> {
        let mut busy = 0;
        let ids: Vec<RegionId> = self.records.regions.keys().copied().collect();
        for id in ids {
            let record = self.records.region(id);
            if !record.pages.all().any(|(_, p)| p.stable() != 0) {
                continue;
            }
            let region = record.region.clone();
            if let Some(guard) = region.owner.try_enter() {
                self.unmerge_region(guard.quiescent(), id)?;
                continue;
            }
            // Any wait after a lend, as an unmerge is asked for at once.
            let running = match self.merges_running() {
                true => region.owner.try_running(std::time::Duration::ZERO),
                false => None,
            };
            match running {
                Some(running) => self.unmerge_running(running.quiescent(), &region)?,
                None => {
                    self.counters.regions_busy_skips += 1;
                    busy += 1;
                }
            }
        }
        Ok(busy)
    }

    /// Gives every merged page of `region`, whose owner runs (`q` is its running token), back
    /// to it, a window of at most `WINDOW_PAGES` at a time: each run is copied out while its
    /// pages are write-protected, then the memfd is mapped over it (`crate::protect`).
    fn unmerge_running(&mut self, q: Quiescent<'_>, region: &Arc<Region>) -> Result<(), Error> {
        let id = region.id;
        let merged = self
            .records
            .region(id)
            .pages
            .runs(0..usize::MAX, |p| p.stable() != 0);
        for run in merged {
            for start in run.clone().step_by(WINDOW_PAGES) {
                let pages = start..run.end.min(start + WINDOW_PAGES);
                let window = self.open_window(q, region, pages.clone())?;
                self.restore(window.quiescent(), id, pages)?;
                if region.protection_lost() {
                    return Err(Error::Protect {
                        region: id,
                        source: crate::ProtectError::Lost,
                    });
                }
            }
        }
        Ok(())
    }
}
