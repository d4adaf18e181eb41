//! Step 2 of a page's journey: the scanner's cursor, full passes, and the visit of a page.
//!
//! The cursor walks the regions in id order, `pages_to_scan` pages a batch; a *pass* ends when
//! it passes the last region; only pages that exist count against `pages_to_scan`. Each pass
//! the unstable index starts empty, as in KSM. A visit of a range looks only at the pages that
//! exist: those the region's memfd holds data for (`SEEK_DATA`), and those with records
//! (merged, private copies, punched zeros); a page never touched is not read, hashed or
//! recorded, so a guest that grows to gigabytes and touches a few pages costs a few visits. It
//! first reads the page map of each run of such pages (which also tells [`super::release`]
//! which merged pages were written), then looks at each page:
//!
//! - shared pages and holes (never touched, or punched zeros) are passed over: reading a hole
//!   would allocate a page;
//! - a bridged page (a private copy of its own bytes in a merged window) is visited like a
//!   page of the region's own, on scan passes and merge-now but not on park visits; if it
//!   matches, it is given back to its memfd first ([`super::release`]);
//! - a page whose last checksum names a stable page with the same bytes merges at once: the
//!   comparison proves both that it did not change and that it can merge;
//! - otherwise it is hashed: a changed checksum marks it volatile (KSM's rule), an unchanged
//!   one makes it a candidate: zeros are punched (`use_zero_pages`), a stable match or an
//!   unstable partner merges ([`super::merge`]), and anything else enters the unstable index.
//!
//! Owners are never waited for: a region whose owner is busy is skipped for the batch
//! (`regions_busy_skips`); one whose owner has not run since a visit found nothing left to do
//! is skipped (`regions_idle_skips`). "Nothing left to do" is every page shared or a hole,
//! or, with smart scan, looked at only on every 32nd pass anyway. On those passes, idle
//! regions are visited too, so that their unmerged pages still meet what changed elsewhere:
//! but only if something did since the last of them (`host_awake`: a region that was not
//! idle visited, a merge, pages given back, an image made or dropped, a knob changed, a
//! region gone). A host whose instances are all idle visits nothing and naps.

use std::ops::Range;
use std::sync::Arc;

use xxhash_rust::xxh3::xxh3_64;

use crate::pagemap::{PageBacking, Pagemap};
use crate::protect::{WINDOW_PAGES, Window};
use crate::quiesce::{Owner, OwnerGuard, Quiescent};
use crate::region::{Region, RegionId};
use crate::{Error, Knobs, MergeNowReport, PAGE_SIZE};

use super::MergeState;
use super::records::{COPY, SEEN, ZERO};

/// A page in the unstable index: unchanged for one pass, matched nothing yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct PageRef {
    /// The region it is in (which may have gone since: entries are checked before use).
    pub(super) region: RegionId,
    /// Its page number in the region.
    pub(super) page: usize,
}

/// How a visit treats a page that has not been seen unchanged for a pass.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Visit {
    /// KSM's rule: merge only pages whose checksum did not change since the last visit, and
    /// (with smart scan) skip pages that keep failing to merge.
    Scan,
    /// A visit because the owner parked: the same rule, but smart scan skips no page, since
    /// the owner may just have changed any of them. Bridged pages are left to scan passes
    /// (see [`MergeState::visit_page`]).
    Park,
    /// The owner says the range is ready: merge at once.
    Now,
}

/// What the page map says of the range being visited, read once per run of pages that
/// exist: the visit, both run growers and the release of written pages ask it page by page.
#[derive(Default)]
pub(super) struct Backing {
    /// Backing of the pages from `from` on, of region `region`.
    pages: Vec<PageBacking>,
    /// The first page read.
    from: usize,
    /// The region read; `None` before the first reading.
    region: Option<RegionId>,
}

impl Backing {
    /// Reads the backing of pages `range` of `region` from `pagemap`.
    fn read(
        &mut self,
        pagemap: &mut Pagemap,
        region: &Region,
        range: Range<usize>,
    ) -> Result<(), Error> {
        self.pages.clear();
        self.region = Some(region.id);
        self.from = range.start;
        let backing = pagemap
            .read(region.page_addr(range.start), range.len())
            .map_err(|source| Error::PagemapRead {
                region: region.id,
                source,
            })?;
        self.pages.extend(backing);
        Ok(())
    }

    /// The backing of page `page` of the range being visited.
    pub(super) fn of(&self, page: usize) -> PageBacking {
        self.pages[page - self.from]
    }

    /// Page `page` of region `id` has changed backing to `backing` since the reading: the
    /// page map of the range being visited, if the page is in it, reads so from now on.
    pub(super) fn update(&mut self, id: RegionId, page: usize, backing: PageBacking) {
        let from = self.from;
        if self.region == Some(id) && (from..from + self.pages.len()).contains(&page) {
            self.pages[page - from] = backing;
        }
    }
}

/// Where the scanner resumes.
#[derive(Default)]
pub(super) struct Cursor {
    /// The region the batch resumes in; `None` before the first region of a pass.
    pub(super) region: Option<RegionId>,
    /// The page it resumes at (regions are visited in page order).
    pub(super) page: usize,
}

/// The checksum of a page of zeros.
pub(super) fn zero_page_hash() -> u64 {
    static HASH: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *HASH.get_or_init(|| xxh3_64(&[0; PAGE_SIZE]))
}

/// Smart scan: a page that stays unchanged and unmerged visit after visit (it matches
/// nothing, or its merge does not fit the map budget) is looked at only every second pass,
/// then every fourth, up to every 32nd, until it changes or merges. The passes are aligned
/// (pass numbers divisible by the period) rather than counted per page, so that two such
/// pages that became equal still meet in one pass: pages of any period are all visited on
/// every 32nd pass.
fn smart_scan_period(misses: u8) -> u64 {
    if misses < 2 {
        1
    } else {
        (1 << (misses - 1).min(5)).min(crate::Knobs::SMART_SCAN_LONGEST_SKIP)
    }
}

impl MergeState {
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
            let region = self.records.region(id).region.clone();
            let start = self.cursor.page;
            let guard = region.owner.try_enter();
            // An owner whose guest code runs, with its gate lent (rule 7 of `quiesce`), is
            // visited in write-protect windows.
            let running = match &guard {
                None if self.merges_running() => {
                    region.owner.try_running(self.knobs.merge_running_after)
                }
                _ => None,
            };
            let q = match (&guard, &running) {
                (Some(guard), _) => guard.quiescent(),
                (None, Some(running)) => running.quiescent(),
                (None, None) => {
                    self.counters.regions_busy_skips += 1;
                    budget -= 1;
                    pass_ended |= self.advance_region(id);
                    continue;
                }
            };
            let entries = region.owner.entries();
            let visit_idle = self.counters.visit_idle_regions;
            let record = self.records.region_mut(id);
            if q.running() {
                // Its pages may change until it parks: no visit of it counts as quiet.
                record.visit = (entries, false);
                if start == 0 {
                    self.counters.regions_running_visits += 1;
                    self.counters.host_awake = true;
                }
            } else if start == 0 {
                let idle = record.quiet_at == Some(entries);
                if idle && !visit_idle {
                    // The owner has not run since a visit found nothing to do here; its
                    // mappings may still want compacting, if they crowd the budget now.
                    self.counters.regions_idle_skips += 1;
                    if self.counters.host_awake && record.holds_back {
                        // Something that may make its pages mergeable happened since: the
                        // next pass that visits idle regions looks at them.
                        self.counters
                            .looked_at_again_within(Knobs::SMART_SCAN_LONGEST_SKIP);
                    }
                    let compacted = self.compact_region(q, id);
                    budget -= 1;
                    pass_ended |= self.advance_region(id);
                    compacted?;
                    continue;
                }
                record.visit = (entries, true);
                record.holds_back = false;
                self.counters.host_awake |= !idle;
            }
            let pages = self.cover_length(id)?;
            let mut spans = self.existing_spans(id, start..pages)?;
            // Up to the budget's worth of pages that exist; holes cost nothing.
            let mut left = budget;
            spans.retain_mut(|span| {
                let keep = left > 0;
                span.end = span.end.min(span.start + left);
                left -= span.len().min(left);
                keep
            });
            let end = match spans.last() {
                Some(last) if left == 0 => last.end,
                _ => pages,
            };
            let mut result = self.scan_spans(q, id, &spans, Visit::Scan);
            if end >= pages && result.is_ok() && !q.running() {
                // The whole region visited: what its merges left in pieces is compacted
                // (only while its owner is parked: see `protect`).
                result = self.compact_region(q, id);
            }
            drop((running, guard));
            budget -= (budget - left).max(1);
            if end >= pages {
                let record = self.records.region_mut(id);
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

    /// Whether the last whole pass found every region idle (see `RegionPages::quiet_at`).
    pub(crate) fn last_pass_idle(&self) -> bool {
        self.counters.last_pass_idle
    }

    /// The region the cursor is in, or the first one after it; `None` when none is left,
    /// which ends the pass.
    fn cursor_region(&mut self) -> Option<RegionId> {
        let from = self.cursor.region.unwrap_or(RegionId(0));
        let Some((&id, _)) = self.records.regions.range(from..).next() else {
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
            .records
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
        self.counters.visit_idle_regions = self
            .counters
            .full_scans
            .is_multiple_of(Knobs::SMART_SCAN_LONGEST_SKIP)
            && std::mem::take(&mut self.counters.host_awake);
        if let Err(error) = self
            .prune_image_copies()
            .and(self.forget_unused_layout_copies())
        {
            // Only a punch of a freed page can fail: memory of the stable store stays
            // allocated, and nothing else changes.
            let _ = error;
            self.counters.punch_failures += 1;
        }
        self.counters.merges_last_pass = std::mem::take(&mut self.counters.merges_this_pass);
        self.counters.end_pass_periods();
        self.counters.last_pass_idle =
            std::mem::take(&mut self.counters.pages_visited_this_pass) == 0;
        // Keep room for as many entries as this pass had, no more: once everything merged,
        // the index of a host that converged should cost next to nothing.
        let used = self.unstable.len();
        self.unstable.clear();
        self.unstable.shrink_to(used);
        self.cursor = Cursor::default();
    }

    /// Merges every region of the guard's owner at once (see [`crate::Engine::merge_owner_now`]);
    /// returns how many of their pages map stable pages, or are freed zeros, afterwards.
    pub(crate) fn merge_owner_now(&mut self, guard: &OwnerGuard) -> Result<MergeNowReport, Error> {
        let ids = self.records.regions_of(guard.owner());
        self.owner_call(|state| state.visit_whole(guard, &ids, Visit::Now))?;
        Ok(ids
            .iter()
            .map(|&id| self.merged_pages(id, 0..usize::MAX))
            .fold(MergeNowReport::default(), |sum, report| MergeNowReport {
                pages_merged: sum.pages_merged + report.pages_merged,
                zero_pages: sum.zero_pages + report.zero_pages,
            }))
    }

    /// Visits every region of `owner` (its park visit). `false` when the owner is running
    /// again, or has no regions: then there is nothing to look at now.
    pub(crate) fn scan_owner(&mut self, owner: &Owner) -> Result<bool, Error> {
        let ids = self.records.regions_of(owner.id());
        if ids.is_empty() {
            return Ok(false);
        }
        let Some(guard) = owner.try_enter() else {
            self.counters.regions_busy_skips += 1;
            return Ok(false);
        };
        self.visit_whole(&guard, &ids, Visit::Park)?;
        for id in ids {
            self.compact_region(guard.quiescent(), id)?;
        }
        Ok(true)
    }

    /// Visits regions `ids`, all of the guard's owner, from end to end.
    fn visit_whole(
        &mut self,
        guard: &OwnerGuard,
        ids: &[RegionId],
        visit: Visit,
    ) -> Result<(), Error> {
        for &id in ids {
            let pages = self.records.region(id).region.len() / PAGE_SIZE;
            self.scan_range(guard.quiescent(), id, 0..pages, visit)?;
        }
        Ok(())
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
        let pages = self.cover_length(id)?;
        let spans = self.existing_spans(id, range.start.min(pages)..range.end.min(pages))?;
        self.scan_spans(q, id, &spans, visit)
    }

    /// The pages of `range` that exist, as maximal runs in order: those with data in the
    /// region's memfd, and those with records (merged pages, private copies, zeros punched).
    /// Everything else was never touched, and is not visited.
    fn existing_spans(
        &self,
        id: RegionId,
        range: Range<usize>,
    ) -> Result<Vec<Range<usize>>, Error> {
        let record = self.records.region(id);
        let data = crate::memfds::data_extents(&record.region.memfd, range.clone())
            .map_err(|source| Error::DataExtents { region: id, source })?;
        Ok(union_of_runs(
            data,
            record.pages.runs(range, |r| r.in_use()),
        ))
    }

    /// Visits `spans` (in order, within the length) of region `id`, whose gate `q` proves
    /// held. A running owner's spans are visited a window at a time (`crate::protect`).
    fn scan_spans(
        &mut self,
        q: Quiescent<'_>,
        id: RegionId,
        spans: &[Range<usize>],
        visit: Visit,
    ) -> Result<(), Error> {
        let region = self.records.region(id).region.clone();
        let piece = if q.running() {
            WINDOW_PAGES
        } else {
            usize::MAX
        };
        let pieces = spans.iter().flat_map(|span| {
            (span.start..span.end)
                .step_by(piece)
                .map(move |start| start..span.end.min(start.saturating_add(piece)))
        });
        for range in pieces {
            self.counters.pages_scanned += range.len() as u64;
            self.counters.pages_visited_this_pass += range.len() as u64;
            // Read before the window opens: the kernel shows a write-protected hole as a
            // swapped page. What the owner can change meanwhile only makes the reading
            // cautious (a hole it writes is passed over, a merged page it writes is given
            // back on the next visit).
            self.backing
                .read(&mut self.pagemap, &region, range.clone())?;
            let window = match q.running() {
                true => Some(self.open_window(q, &region, range.clone())?),
                false => None,
            };
            let q = window.as_ref().map_or(q, Window::quiescent);
            self.release_written(q, id, range.clone())?;
            let mut page = range.start;
            while page < range.end {
                let refused = self.counters.pages_skipped_map_budget;
                let visited = self.visit_page(q, id, &region, page, range.end, visit)?;
                if self.counters.pages_skipped_map_budget > refused {
                    // A merge the map budget refused is a miss, as KSM's smart scan counts
                    // any page that stays unmerged: on a full budget these pages back off
                    // like any other, rather than being compared again on every pass.
                    for missed in page..page + visited {
                        self.records.note_miss(id, missed);
                    }
                }
                page += visited;
            }
            let lost = window.is_some() && region.protection_lost();
            drop(window);
            if lost {
                return Err(Error::Protect {
                    region: id,
                    source: crate::ProtectError::Lost,
                });
            }
        }
        Ok(())
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
        let record = self.records.record(id, page);
        let backing = self.backing.of(page);
        // A bridged page (a private copy in a merged window) holds its own bytes and is
        // visited like a page of the region's own: once they match a page elsewhere, it is
        // given back to its memfd and merged (`unbridge`, here or in `merge_pair`).
        let bridged = record.has(COPY);
        if record.shares() || !self.may_merge(id, page) {
            // Shared already, or advised never to be read.
            return Ok(1);
        }
        if backing == PageBacking::Untouched {
            // A hole (never written, or punched as zeros): reading it would allocate a page.
            return Ok(1);
        }
        // A page of the region's own with bytes in it, or a bridged page: there may be work
        // here next time, unless smart scan has come to look at it only on every 32nd pass
        // (when idle regions are visited too, if anything was awake since).
        let period = smart_scan_period(record.misses());
        if self.knobs.smart_scan {
            self.counters.period_seen(period);
        }
        if self.knobs.smart_scan && period == Knobs::SMART_SCAN_LONGEST_SKIP {
            self.records.region_mut(id).holds_back = true;
        } else {
            self.records.region_mut(id).visit.1 = false;
        }
        if bridged && visit == Visit::Park {
            // A bridged page is private memory already, so the page map cannot show whether
            // the owner wrote it: a park would have to hash every bridged page at every
            // request (`samepage serve` parks after each). They are left to scan passes,
            // which look at them at the smart-scan rate; a write there merges that much later.
            return Ok(1);
        }
        if visit == Visit::Scan
            && self.knobs.smart_scan
            && !self.counters.full_scans.is_multiple_of(period)
        {
            self.counters.pages_skipped += 1;
            return Ok(1);
        }
        if record.has(ZERO) {
            self.records.set_flags(id, page, record.flags() & !ZERO);
        }
        let domain = region.owner.domain();
        // SAFETY: the gate is held (`q`) and `page` is below the length read under it.
        let content = unsafe { region.page(page) };

        // A page that matches the stable page its last checksum names is unchanged and
        // mergeable at once: the comparison proves both, without hashing.
        if record.has(SEEN)
            && let Some(slot) = self.stable.lookup((domain, record.checksum()), content)
        {
            if bridged && !self.unbridge(q, id, page)? {
                return Ok(1);
            }
            return self.merge_onto_stable(q, id, page, end, slot, visit);
        }

        let checksum = xxh3_64(content);
        let unchanged = record.has(SEEN) && record.checksum() == checksum;
        // A first visit proves nothing either way; only a changed checksum is volatile.
        let changed = record.has(SEEN) && !unchanged;
        self.records
            .record_visit(id, page, checksum, !changed || visit == Visit::Now);
        if changed {
            // Its smart-scan streak ended: it is looked at next pass, even if it was one of
            // those that let the region count as idle.
            self.records.region_mut(id).visit.1 = false;
        }
        if !unchanged && visit != Visit::Now {
            // New or changed: it may merge once a pass has seen it unchanged, the next.
            self.counters.news();
            return Ok(1);
        }
        if self.knobs.use_zero_pages && checksum == zero_page_hash() && content == [0; PAGE_SIZE] {
            if bridged && !self.unbridge(q, id, page)? {
                return Ok(1);
            }
            crate::memfds::punch_region(q, region, page, 1)
                .map_err(|source| Error::Punch { region: id, source })?;
            let flags = self.records.record(id, page).flags();
            self.records.set_flags(id, page, flags | ZERO);
            return Ok(1);
        }
        let key = (domain, checksum);
        if let Some(slot) = self.stable.lookup(key, content) {
            if bridged && !self.unbridge(q, id, page)? {
                return Ok(1);
            }
            return self.merge_onto_stable(q, id, page, end, slot, visit);
        }
        if let Some(&partner) = self.unstable.get(&key)
            && partner != (PageRef { region: id, page })
            && let Some(merged) = self.merge_pair(q, id, page, end, partner, key, visit)?
        {
            return Ok(merged);
        }
        self.unstable.insert(key, PageRef { region: id, page });
        self.records.note_miss(id, page);
        Ok(1)
    }
}

/// The union of two lists of page runs, each sorted and disjoint: sorted, disjoint, and with
/// touching runs joined.
fn union_of_runs(a: Vec<Range<usize>>, b: Vec<Range<usize>>) -> Vec<Range<usize>> {
    let mut all = a;
    all.extend(b);
    all.sort_by_key(|run| run.start);
    let mut union: Vec<Range<usize>> = Vec::with_capacity(all.len());
    for run in all {
        match union.last_mut() {
            Some(last) if last.end >= run.start => last.end = last.end.max(run.end),
            _ => union.push(run),
        }
    }
    union
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_join_where_they_touch_or_overlap() {
        assert_eq!(
            union_of_runs(vec![0..2, 10..12], vec![2..4, 11..20, 30..31]),
            [0..4, 10..20, 30..31]
        );
        assert_eq!(union_of_runs(Vec::new(), vec![5..6; 1]), vec![5..6; 1]);
    }
}
