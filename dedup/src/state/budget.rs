//! What a merge may cost in mappings. Every mapping the engine creates counts against the
//! process-wide `vm.max_map_count`, shared with wasmtime's code, reservations and thread
//! stacks; past it `mmap` and `mprotect` fail with `ENOMEM` for everyone in the process. So
//! each merge first asks [`MergeState::budget_allows`], which keeps the engine's own mappings
//! within `map_budget_percent` of the limit, keeps a margin below the limit for the rest of
//! the process (a thirty-second of the limit, counted from `/proc/self/maps` at most every
//! 250 ms), and, once three
//! quarters of the budget is spent, merges only runs long enough to be worth their two
//! mappings.
//!
//! [`MapBudget`] holds the count and the limit; what a change costs is read from the records
//! (`RegionPages::mapping_delta`, in [`super::records`]), and the region's share of the count
//! is kept with its records.

use std::ops::Range;
use std::time::Instant;

use crate::Knobs;
use crate::layout::boundary;

use super::MergeState;
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

/// The mappings the engine holds, and what it knows of the limit they count against.
pub(super) struct MapBudget {
    /// Mappings the engine holds: the stable view plus every region's `vmas`.
    vmas: u64,
    /// `vm.max_map_count`, read at start, or the lower limit the engine was given.
    max_map_count: u64,
    /// Mappings in the whole process at the last reading of `/proc/self/maps`, our `vmas`
    /// at that time, and when it was read (at most every [`MAPS_READ_INTERVAL`], and only
    /// when a merge needs it: the file is long when the process holds many mappings, and
    /// reading it on every instantiation made instantiation cost grow with the number of
    /// instances).
    process_maps: (u64, u64, Option<Instant>),
    /// Regions registered since the engine started: the budget counts a few mappings for
    /// each one since the last reading of `/proc/self/maps`.
    registrations: u64,
    /// `registrations` at the last reading of `/proc/self/maps`.
    registrations_at_reading: u64,
}

impl MapBudget {
    /// A budget under `vm.max_map_count`, or under `limit` if that is lower.
    pub(super) fn new(limit: Option<u64>) -> Self {
        let system = std::fs::read_to_string("/proc/sys/vm/max_map_count")
            .ok()
            .and_then(|text| text.trim().parse().ok())
            .unwrap_or(65_530);
        Self {
            vmas: 1,
            max_map_count: limit.map_or(system, |limit| limit.min(system)),
            process_maps: (0, 0, None),
            registrations: 0,
            registrations_at_reading: 0,
        }
    }

    /// Mappings the engine holds.
    pub(super) fn vmas(&self) -> u64 {
        self.vmas
    }

    /// Counts `delta` more mappings (fewer when negative).
    pub(super) fn add(&mut self, delta: i64) {
        self.vmas = self.vmas.saturating_add_signed(delta);
    }

    /// Stops counting `vmas` mappings that went with a region (unregistered, or reset).
    pub(super) fn remove(&mut self, vmas: u64) {
        self.vmas = self.vmas.saturating_sub(vmas);
    }

    /// A region was registered: its owner's mappings come before the next reading.
    pub(super) fn note_registration(&mut self) {
        self.registrations += 1;
    }

    /// The mappings the engine may hold: its share of `vm.max_map_count`.
    pub(super) fn share(&self, knobs: &Knobs) -> u64 {
        self.max_map_count * u64::from(knobs.map_budget_percent) / 100
    }

    /// Whether the engine's mappings have passed a quarter of its share: from then on,
    /// regions that merges left in pieces are compacted (`super::compact`).
    pub(super) fn crowded(&self, knobs: &Knobs) -> bool {
        self.vmas * 4 >= self.share(knobs)
    }

    /// Whether `delta` more mappings for a run of `run` pages fit.
    fn allows(&mut self, knobs: &Knobs, delta: i64, run: usize) -> bool {
        if delta <= 0 {
            return true;
        }
        let budget = self.share(knobs);
        let used = self.vmas + delta as u64;
        let process_after = self.process_maps_now() + delta as u64;
        used <= budget
            && process_after + self.max_map_count / MAP_COUNT_MARGIN_DIVISOR <= self.max_map_count
            && (used * 4 <= budget * 3 || run >= TIGHT_MIN_RUN)
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
            self.process_maps = (count, self.vmas, Some(Instant::now()));
            self.registrations_at_reading = self.registrations;
        }
        let (count, ours, _) = self.process_maps;
        let new_regions = self
            .registrations
            .saturating_sub(self.registrations_at_reading);
        (count + self.vmas + new_regions * MAPPINGS_PER_NEW_REGION).saturating_sub(ours)
    }
}

impl MergeState {
    /// After pages `range` of region `id` were remapped and their records updated: inside
    /// the range the mapping is a fresh one, with no boundary the records do not imply; at
    /// its two edges, where the records say the pages join consecutive slots, the kernel says
    /// whether they did ([`crate::vma::joined`]). Keeps `vmas` what the kernel counts.
    pub(super) fn reconcile_edges(&mut self, id: RegionId, range: Range<usize>) {
        let Some(record) = self.records.regions.get_mut(&id) else {
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
        self.budget.add(delta);
    }

    /// Whether a merge adding `delta` mappings for a run of `run` pages fits the budget;
    /// counts the run as skipped when it does not.
    pub(super) fn budget_allows(&mut self, delta: i64, run: usize) -> bool {
        let allowed = self.budget.allows(&self.knobs, delta, run);
        if !allowed {
            self.counters.pages_skipped_map_budget += run as u64;
        }
        allowed
    }

    /// Counts `delta` more mappings of region `id` (fewer when negative), in the region's
    /// share and in the engine's.
    pub(super) fn add_mappings(&mut self, id: RegionId, delta: i64) {
        let record = self.records.region_mut(id);
        record.vmas = record.vmas.saturating_add_signed(delta);
        self.budget.add(delta);
    }
}
