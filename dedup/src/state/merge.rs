//! Step 3 of a page's journey: a match becomes a merged run or window.
//!
//! A visit that found a match calls one of two methods:
//!
//! - [`MergeState::merge_onto_stable`] when the match is a stable page: the run grows while
//!   the region's next page equals the next stable slot (a later sharer of a run merged
//!   earlier finds page `i + 1` in slot `s + 1`), and is mapped onto those slots;
//! - [`MergeState::merge_pair`] when the match is another unmerged page in the unstable
//!   index: the run grows while both regions' next pages are equal, gets fresh contiguous
//!   stable slots, and is mapped in both regions.
//!
//! Either way the run may bridge a few differing pages (a *window*, see `layout.rs`), which
//! keep private copies of their own bytes (and are visited again: a bridged page whose
//! bytes match is given back to its memfd by [`MergeState::unbridge`], as the page that
//! matched or as the partner found, once the match is checked, and merged when the merge's
//! mappings fit the budget). [`MergeState::map_window`] does the remapping for
//! both, after asking [`super::budget`] whether the mappings it costs may be spent. The order
//! of its steps is what keeps every byte the owner sees unchanged: compare (under the gate),
//! map the stable slots, copy the differing pages' own bytes in, and only then punch the
//! region's memfd; a failure before the punch maps the memfd back.

use std::ops::Range;
use std::sync::Arc;

use xxhash_rust::xxh3::xxh3_64;

use crate::layout::{grow_window, runs_of};
use crate::pagemap::PageBacking;
use crate::protect::Window;
use crate::quiesce::{OwnerGuard, Quiescent, RunningGuard};
use crate::region::{Region, RegionId};
use crate::stable::{ContentKey, Slot};
use crate::{Error, remap};

use super::MergeState;
use super::records::{COPY, PageRecord, SEEN, VOLATILE, ZERO};
use super::scan::{PageRef, Visit, zero_page_hash};

/// Pages of a partner region's page map read at a time while extending a run.
const BACKING_CHUNK: usize = 64;

/// The region pages that merges on owners' calls replaced, freed later by the scanner thread
/// so that the calls return sooner ([`MergeState::owner_call`]).
pub(super) struct DeferredPunches {
    /// Whether merges on owners' calls leave the freeing to the scanner thread (only
    /// engines that have one).
    after_calls: bool,
    /// Set while such a call merges.
    in_owner_call: bool,
    /// Ranges of regions' own memfd pages waiting to be freed
    /// ([`MergeState::free_deferred`]).
    ranges: Vec<(Arc<Region>, Range<usize>)>,
}

impl DeferredPunches {
    /// Deferring punches when `after_calls`, that is, on an engine with a scanner thread.
    pub(super) fn new(after_calls: bool) -> Self {
        Self {
            after_calls,
            in_owner_call: false,
            ranges: Vec::new(),
        }
    }
}

/// A merge partner's pages held still ([`MergeState::hold_partner`]).
enum PartnerHold {
    /// By the token of the page that matched (same owner, and inside its window if any).
    Same,
    /// By the gate of the partner's parked owner.
    Parked(OwnerGuard),
    /// By a window on them, under the same running owner's hold as the page that matched.
    Window(Window),
    /// By a window on them under the host lock of the partner's running owner (the window
    /// closes first: fields drop in order).
    Running { window: Window, _host: RunningGuard },
}

impl PartnerHold {
    /// The partner's token; `None` for [`PartnerHold::Same`], whose token is the caller's.
    fn quiescent(&self) -> Option<Quiescent<'_>> {
        match self {
            PartnerHold::Same => None,
            PartnerHold::Parked(guard) => Some(guard.quiescent()),
            PartnerHold::Window(window) | PartnerHold::Running { window, .. } => {
                Some(window.quiescent())
            }
        }
    }
}

/// What a page that differs does to a growing window: bridged as a private copy of its own
/// bytes while the owner is parked (`Some(false)`), but the end of the window while it runs
/// (`None`), since the copy would be filled in only after the stable page is mapped, and a
/// read meanwhile would see the stable page's bytes (`crate::protect`).
fn bridge_unless_running(share: bool, q: Quiescent<'_>) -> Option<bool> {
    (share || !q.running()).then_some(share)
}

impl MergeState {
    /// Merges the window starting at `page` onto the stable slots starting at `slot`: it
    /// extends while the next region page equals the next stable page, and bridges differing
    /// pages, which keep private copies (see `layout::grow_window`).
    pub(super) fn merge_onto_stable(
        &mut self,
        q: Quiescent<'_>,
        id: RegionId,
        page: usize,
        end: usize,
        slot: Slot,
        visit: Visit,
    ) -> Result<usize, Error> {
        let region = self.records.region(id).region.clone();
        let domain = region.owner.domain();
        let records = &self.records.region(id).pages;
        let shares = grow_window(end - page, |n| {
            let (next, next_slot) = (page + n, slot + n as Slot);
            let record = records.get(next);
            let Some(node) = self.stable.node(next_slot) else {
                return Ok::<_, Error>(None);
            };
            if record.stable() != 0
                || !self.may_merge(id, next)
                || self.backing.of(next) != PageBacking::File
                || node.key.0 != domain
            {
                return Ok(None);
            }
            let share = self.stable.has_room_at(next_slot)
                && (visit == Visit::Now
                    || (record.has(SEEN) && record.checksum() == node.key.1))
                // SAFETY: gate held (`q`, a window's if the owner runs), `next` below the
                // length read under it and, if the owner runs, inside the window (`end`).
                && unsafe { region.page(next) } == self.stable.page(next_slot);
            Ok(bridge_unless_running(share, q))
        })?;
        self.map_window(q, id, page, &shares, slot)?;
        Ok(shares.len())
    }

    /// Merges the run at `page` of region `id` with the equal run at `partner` into new
    /// stable pages, giving either page back to its memfd first if it is bridged. `None`
    /// when the partner is gone, changed, busy or not equal, or a bridged page's unbridging
    /// does not fit the map budget.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn merge_pair(
        &mut self,
        q: Quiescent<'_>,
        id: RegionId,
        page: usize,
        end: usize,
        partner: PageRef,
        key: ContentKey,
        visit: Visit,
    ) -> Result<Option<usize>, Error> {
        if !self.records.regions.contains_key(&partner.region) {
            return Ok(None);
        }
        let other_pages = self.cover_length(partner.region)?;
        let other = self.records.region(partner.region);
        let other_region = other.region.clone();
        // Unmerged, or bridged (a private copy of its own bytes, given back to its memfd below).
        let still_there = |r: PageRecord| !r.shares() && r.has(SEEN) && r.checksum() == key.1;
        let partner_bridged = other.pages.get(partner.page).has(COPY);
        if partner.page >= other_pages
            || !still_there(other.pages.get(partner.page))
            || !self.may_merge(partner.region, partner.page)
        {
            return Ok(None);
        }
        // Runs within one region must not overlap.
        let mut limit = (end - page).min(other_pages - partner.page);
        if partner.region == id {
            limit = limit.min(page.abs_diff(partner.page));
        }
        let Some(hold) = self.hold_partner(q, &other_region, partner.page, &mut limit)? else {
            self.counters.regions_busy_skips += 1;
            return Ok(None);
        };
        let other_q = hold.quiescent().unwrap_or(q);
        let region = self.records.region(id).region.clone();
        // SAFETY: both gates are held (`q`, `other_q`), both pages below the lengths read
        // under them and inside the windows, if the owners run.
        let (content, other_content) =
            unsafe { (region.page(page), other_region.page(partner.page)) };
        if content != other_content {
            return Ok(None);
        }
        // Bridged pages go back to their memfds only now, with the partner there, unchanged,
        // not busy and equal: the merge is all but certain.
        if self.records.record(id, page).has(COPY) && !self.unbridge(q, id, page)?
            || partner_bridged && !self.unbridge(other_q, partner.region, partner.page)?
        {
            return Ok(None);
        }

        // Extend the run while both next pages are unmerged, resident, unchanged since the
        // partner's last visit and equal.
        // The partner's backing, read a chunk at a time as the run grows: most runs are short.
        let mut other_backing: Vec<PageBacking> = Vec::new();
        let mut keys = vec![Some(key)];
        let shares = grow_window(limit, |n| {
            if n >= other_backing.len() {
                let from = other_backing.len();
                let chunk = (limit - from).min(BACKING_CHUNK);
                let more = self
                    .pagemap
                    .read(other_region.page_addr(partner.page + from), chunk)
                    .map_err(|source| Error::PagemapRead {
                        region: partner.region,
                        source,
                    })?;
                other_backing.extend(more);
            }
            let mine = self.records.record(id, page + n);
            let theirs = self.records.record(partner.region, partner.page + n);
            if mine.stable() != 0
                || theirs.stable() != 0
                || !self.may_merge(id, page + n)
                || !self.may_merge(partner.region, partner.page + n)
                || self.backing.of(page + n) != PageBacking::File
                || other_backing[n] != PageBacking::File
            {
                return Ok(None);
            }
            let settled = theirs.has(SEEN)
                && (visit == Visit::Now
                    || (mine.has(SEEN) && mine.checksum() == theirs.checksum()));
            // SAFETY: as above.
            let next = unsafe { region.page(page + n) };
            let checksum = if settled { xxh3_64(next) } else { 0 };
            let next_key = (key.0, checksum);
            if settled
                && checksum == theirs.checksum()
                && (self.stable.has_room(next_key)
                    || (self.knobs.use_zero_pages && checksum == zero_page_hash()))
            {
                // Already stable with room, or zeros: the page's own visit deals with it.
                return Ok(None);
            }
            let share = settled
                && checksum == theirs.checksum()
                // SAFETY: as above.
                && next == unsafe { other_region.page(partner.page + n) };
            keys.push(share.then_some(next_key));
            Ok(bridge_unless_running(share, q).and(bridge_unless_running(share, other_q)))
        })?;
        keys.truncate(shares.len());
        let run = keys.len();

        // The run's slots are not chosen yet; any fresh contiguous numbers stand for them.
        let fresh = u32::MAX - run as u32;
        let delta = self
            .records
            .region(id)
            .mapping_delta(page..page + run, fresh)
            + self
                .records
                .region(partner.region)
                .mapping_delta(partner.page..partner.page + run, fresh);
        if !self.budget_allows(delta, run) {
            return Ok(Some(run));
        }
        // SAFETY: as above.
        let bytes = unsafe { region.pages(page..page + run) };
        let Some(slot) = self.stable.publish(bytes, &keys)? else {
            return Ok(None);
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
            unpublished?;
            return Ok(Some(run));
        }
        self.map_window(q, id, page, &shares, slot)?;
        if matches!(hold, PartnerHold::Window(_) | PartnerHold::Running { .. })
            && other_region.protection_lost()
        {
            return Err(Error::Protect {
                region: partner.region,
                source: crate::ProtectError::Lost,
            });
        }
        Ok(Some(run))
    }

    /// What keeps pages `first..first + limit` of `other`, a merge partner's, from changing
    /// while they are compared and remapped: the token `q` already, the partner's gate if it
    /// is parked, or a window if its guest code runs (rule 7 of `quiesce`); `limit` shrinks
    /// so that two windows on one region never overlap. `None` when the partner's owner is
    /// busy.
    fn hold_partner(
        &self,
        q: Quiescent<'_>,
        other: &Arc<Region>,
        first: usize,
        limit: &mut usize,
    ) -> Result<Option<PartnerHold>, Error> {
        if other.owner.id() == q.owner() {
            let Some((region, pages)) = q.window() else {
                return Ok(Some(PartnerHold::Same));
            };
            if region == other.id && pages.contains(&first) {
                *limit = (*limit).min(pages.end - first);
                return Ok(Some(PartnerHold::Same));
            }
            if region == other.id && first < pages.start {
                *limit = (*limit).min(pages.start - first);
            }
            let window = self.open_window(q, other, first..first + *limit)?;
            return Ok(Some(PartnerHold::Window(window)));
        }
        if let Some(guard) = other.owner.try_enter() {
            return Ok(Some(PartnerHold::Parked(guard)));
        }
        let running = match self.merges_running() {
            true => other.owner.try_running(self.knobs.merge_running_after),
            false => None,
        };
        let Some(running) = running else {
            return Ok(None);
        };
        let window = self.open_window(running.quiescent(), other, first..first + *limit)?;
        Ok(Some(PartnerHold::Running {
            window,
            _host: running,
        }))
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
        let record = self.records.region(id);
        let delta = record.mapping_delta(page..page + len, slot + 1);
        let region = record.region.clone();
        if !self.budget_allows(delta, len) {
            return Ok(false);
        }
        remap::map_stable(q, &region, page, len, self.stable.fd(), u64::from(slot))?;
        let filled = runs_of(shares, |&share| !share).try_for_each(|copies| {
            remap::fill_private_from_own(q, &region, page + copies.start, copies.len())
        });
        if let Err(error) = filled {
            // The region's memfd still holds every byte: map it back, and nothing happened.
            remap::map_own(q, &region, page, len)?;
            return Err(error);
        }
        // From here on the merge stands; a failed punch only leaves memory unfreed.
        if shares.contains(&false) && self.stable.punch_empty(slot, len as Slot).is_err() {
            self.counters.punch_failures += 1;
        }
        self.add_mappings(id, delta);
        self.note_window(id, page, shares, slot);
        self.reconcile_edges(id, page..page + len);
        self.counters.merges_this_pass += 1;
        self.counters.news();
        // A new stable page, or a new sharer of one, wherever the merge came from (a pass,
        // an owner's call, a park visit): idle regions may hold its bytes.
        self.counters.host_awake = true;
        if self.deferred.after_calls && self.deferred.in_owner_call {
            // The merge stands; freeing the replaced pages can wait for the scanner.
            self.deferred.ranges.push((region, page..page + len));
        } else if crate::memfds::punch_region(q, &region, page, len).is_err() {
            self.counters.punch_failures += 1;
        }
        Ok(true)
    }

    /// Records that pages `page..` of region `id` now map the slots from `slot`: where
    /// `shares` is true as sharers, where false as private copies.
    pub(super) fn note_window(&mut self, id: RegionId, page: usize, shares: &[bool], slot: Slot) {
        let len = shares.len();
        // One lookup of the region's records for the whole window: this loop runs once per
        // merged page.
        let (records, counts) = self.records.pages_and_flags(id);
        records.update(page..page + len, |p, record| {
            let n = p - page;
            let page_slot = slot + n as Slot;
            record.set_stable(page_slot + 1);
            // A zero page read back in since it was punched, merged now, is no longer one.
            let flags = record.flags() & !ZERO;
            let flags = if shares[n] {
                // A merged page's checksum is its stable page's, and ends any smart-scan
                // streak and volatility.
                record.set_checksum(self.stable.add_sharer(page_slot));
                record.set_misses(0);
                (flags | SEEN) & !VOLATILE
            } else {
                self.stable.add_copy(page_slot);
                flags | COPY
            };
            counts.set_flags(record, flags);
        });
    }

    /// Runs `f`, a merge on an owner's call (merge-now, merge on instantiation): on an engine
    /// with a scanner thread, the pages it replaces are freed afterwards, by the scanner.
    pub(crate) fn owner_call<R>(&mut self, f: impl FnOnce(&mut Self) -> R) -> R {
        self.deferred.in_owner_call = true;
        let result = f(self);
        self.deferred.in_owner_call = false;
        result
    }

    /// Frees the pages that merges on owners' calls replaced: every page of the recorded
    /// ranges whose region is still registered and whose record still says it is merged
    /// (a page given back since holds the owner's bytes again, and stays). Returns whether
    /// there was anything to do.
    pub(crate) fn free_deferred(&mut self) -> bool {
        if self.deferred.ranges.is_empty() {
            return false;
        }
        for (region, range) in std::mem::take(&mut self.deferred.ranges) {
            let Some(record) = self
                .records
                .regions
                .get(&region.id)
                .filter(|record| Arc::ptr_eq(&record.region, &region))
            else {
                continue;
            };
            for run in record.pages.runs(range, |p| p.stable() != 0) {
                if crate::memfds::punch_unmapped(&region, run.start, run.len()).is_err() {
                    self.counters.punch_failures += 1;
                }
            }
        }
        true
    }
}
