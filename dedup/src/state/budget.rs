//! What a merge may cost in mappings. Every mapping the engine creates counts against the
//! process-wide `vm.max_map_count`, shared with wasmtime's code, reservations and thread
//! stacks; past it `mmap` and `mprotect` fail with `ENOMEM` for everyone in the process. So
//! each merge first asks [`MergeState::budget_allows`], which keeps the engine's own mappings
//! within `map_budget_percent` of the limit, keeps a margin below the limit for the rest of
//! the process (counted from `/proc/self/maps` once a pass), and, once three quarters of the
//! budget is spent, merges only runs long enough to be worth their two mappings.

use std::ops::Range;

use crate::Knobs;
use crate::layout::mapping_delta;

use super::{MergeState, RegionPages};

/// Runs shorter than this are not merged while the map-count budget is tight (more than
/// three quarters used): an isolated page costs two mappings and saves one page.
const TIGHT_MIN_RUN: usize = 16;

/// Mappings kept free below `vm.max_map_count` for the rest of the process (wasmtime's code
/// and reservations, thread stacks, new instances) between two readings of the real count.
const MAP_COUNT_MARGIN: u64 = 2048;

/// The mappings the engine may hold: its share of `vm.max_map_count`.
pub(super) fn map_budget(knobs: &Knobs, max_map_count: u64) -> u64 {
    max_map_count * u64::from(knobs.map_budget_percent) / 100
}

impl RegionPages {
    /// [`mapping_delta`] over the region's page records. What the pages of the range and
    /// their two neighbours map now is read in one sweep over the records that exist (pages
    /// without one map the memfd), not page by page.
    pub(super) fn mapping_delta(&self, range: Range<usize>, kind: impl Fn(usize) -> u32) -> i64 {
        let len = self.len.max(range.end);
        let from = range.start.saturating_sub(1);
        let mut now = vec![0; range.end + 1 - from];
        for (page, record) in self.pages.existing(from..range.end + 1) {
            now[page - from] = record.stable();
        }
        mapping_delta(|p| now[p - from], len, range, kind)
    }
}

impl MergeState {
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
            && process_after + MAP_COUNT_MARGIN <= self.max_map_count
            && (used * 4 <= budget * 3 || run >= TIGHT_MIN_RUN);
        if !allowed {
            self.counters.pages_skipped_map_budget += run as u64;
        }
        allowed
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
}
