//! What a merge may cost in mappings. Every mapping the engine creates counts against the
//! process-wide `vm.max_map_count`, shared with wasmtime's code, reservations and thread
//! stacks; past it `mmap` and `mprotect` fail with `ENOMEM` for everyone in the process. So
//! each merge first asks [`MergeState::budget_allows`], which keeps the engine's own mappings
//! within `map_budget_percent` of the limit, keeps a margin below the limit for the rest of
//! the process (a thirty-second of the limit, counted from `/proc/self/maps` at most every
//! 250 ms), and, once three
//! quarters of the budget is spent, merges only runs long enough to be worth their two
//! mappings.

use std::ops::Range;

use crate::Knobs;
use crate::layout::boundary;

use super::{MergeState, RegionPages};
use crate::region::RegionId;

/// Runs shorter than this are not merged while the map-count budget is tight (more than
/// three quarters used): an isolated page costs two mappings and saves one page.
const TIGHT_MIN_RUN: usize = 16;

/// The share of `vm.max_map_count` kept free for the rest of the process (wasmtime's code
/// and reservations, thread stacks) between two readings of the real count: 2,047 mappings
/// at the default limit of 65,530, and 62 at a limit of 2,000. A fixed margin would exceed a
/// small limit and stop merging altogether.
const MAP_COUNT_MARGIN_DIVISOR: u64 = 32;

/// Mappings counted for each region registered since the last reading: a new instance's
/// memory is a reservation, its memfd mapping and a guard, and wasmtime maps a little more
/// beside it. Instances that start quickly while the engine merges would otherwise outrun
/// the margin between two readings.
const MAPPINGS_PER_NEW_REGION: u64 = 4;

/// How often the count of the whole process's mappings is read again, at most. Between two
/// readings the rest of the process may add mappings the estimate does not see (a new
/// instance adds a handful); the margin is what covers them.
const MAPS_READ_INTERVAL: std::time::Duration = std::time::Duration::from_millis(250);

/// The mappings the engine may hold: its share of `vm.max_map_count`.
pub(super) fn map_budget(knobs: &Knobs, max_map_count: u64) -> u64 {
    max_map_count * u64::from(knobs.map_budget_percent) / 100
}

impl RegionPages {
    /// How many mappings the region gains when pages `range` change to map what `first`
    /// says: 0 for the region's own memfd (every page of the range), or `s + 1` for stable
    /// slot `s` at the range's first page and the slots after it for the pages after it. That
    /// is every change the engine makes (a merged run or window onto consecutive slots, or
    /// pages given back), so inside the range the pages join; what they were joined to before
    /// is read from the records that exist, not page by page. `layout::mapping_delta` is the same
    /// count for any change, page by page (the tests check the two agree).
    pub(super) fn mapping_delta(&self, range: Range<usize>, first: u32) -> i64 {
        let len = self.len.max(range.end);
        if range.is_empty() || len < 2 {
            return 0;
        }
        let kind = |n: usize| {
            if first == 0 {
                0
            } else {
                first.wrapping_add(n as u32)
            }
        };
        let before = |p: usize| self.pages.get(p).stable();
        let after = |p: usize| {
            if range.contains(&p) {
                kind(p - range.start)
            } else {
                before(p)
            }
        };
        // Pairs (p - 1, p) for p in lo..=hi touch the range.
        let (lo, hi) = (range.start.max(1), range.end.min(len - 1));
        let mut delta = 0;
        // After the change only the range's two edges can be boundaries.
        for p in [range.start, range.end] {
            if (lo..=hi).contains(&p) {
                delta += boundary(after(p - 1), after(p));
            }
        }
        // Before it, boundaries lie only next to pages that map a stable slot.
        let mut pairs: Vec<usize> = Vec::new();
        for (page, record) in self.pages.existing(lo - 1..hi + 1) {
            if record.stable() != 0 {
                for p in [page, page + 1] {
                    if (lo..=hi).contains(&p) && pairs.last() != Some(&p) {
                        pairs.push(p);
                    }
                }
            }
        }
        for p in pairs {
            delta -= boundary(before(p - 1), before(p));
        }
        delta
    }
}

impl MergeState {
    /// After pages `range` of region `id` were remapped and their records updated: inside
    /// the range the mapping is a fresh one, with no boundary the records do not imply; at
    /// its two edges, where the records say the pages join consecutive slots, the kernel says
    /// whether they did ([`crate::vma::joined`]). Keeps `vmas` what the kernel counts.
    pub(super) fn reconcile_edges(&mut self, id: RegionId, range: Range<usize>) {
        let Some(record) = self.regions.get_mut(&id) else {
            return;
        };
        let mut delta = 0i64;
        let stale: Vec<usize> = record
            .kernel_splits
            .range(range.start..=range.end)
            .copied()
            .collect();
        for page in stale {
            record.kernel_splits.remove(&page);
            delta -= 1;
        }
        for page in [range.start, range.end] {
            if page == 0 || page >= record.len {
                continue;
            }
            let (left, right) = (
                record.pages.get(page - 1).stable(),
                record.pages.get(page).stable(),
            );
            // Only stable neighbours can hold different anonymous memory; the region's own
            // mapping is shared and has none.
            if right == 0 || boundary(left, right) == 1 {
                continue;
            }
            if crate::vma::joined(record.region.page_addr(page)) == Some(false) {
                record.kernel_splits.insert(page);
                delta += 1;
            }
        }
        record.vmas = record.vmas.saturating_add_signed(delta);
        self.vmas = self.vmas.saturating_add_signed(delta);
    }

    /// Whether a merge adding `delta` mappings for a run of `run` pages fits the budget;
    /// counts the run as skipped when it does not.
    pub(super) fn budget_allows(&mut self, delta: i64, run: usize) -> bool {
        if delta <= 0 {
            return true;
        }
        let budget = map_budget(&self.knobs, self.max_map_count);
        let used = self.vmas + delta as u64;
        let process_after = self.process_maps_now() + delta as u64;
        let allowed = used <= budget
            && process_after + self.max_map_count / MAP_COUNT_MARGIN_DIVISOR <= self.max_map_count
            && (used * 4 <= budget * 3 || run >= TIGHT_MIN_RUN);
        if !allowed {
            self.counters.pages_skipped_map_budget += run as u64;
        }
        allowed
    }

    /// Mappings in the process now, estimated from the last reading of `/proc/self/maps` and
    /// the engine's own changes since; re-read at most every [`MAPS_READ_INTERVAL`].
    fn process_maps_now(&mut self) -> u64 {
        if self
            .process_maps
            .2
            .is_none_or(|at| at.elapsed() >= MAPS_READ_INTERVAL)
        {
            let count = std::fs::read("/proc/self/maps")
                .map(|text| text.iter().filter(|&&b| b == b'\n').count() as u64)
                .unwrap_or(0);
            self.process_maps = (count, self.vmas, Some(std::time::Instant::now()));
            self.registrations_at_reading = self.registrations;
        }
        let (count, ours, _) = self.process_maps;
        let new_regions = self
            .registrations
            .saturating_sub(self.registrations_at_reading);
        (count + self.vmas + new_regions * MAPPINGS_PER_NEW_REGION).saturating_sub(ours)
    }
}
