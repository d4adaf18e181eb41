//! What the engine keeps for each page of a region, and the counters that follow from it.
//!
//! A `PageRecord` is 16 bytes: the checksum of the last visit, the stable slot the page maps
//! (if any) and a few flags. Flags that counters follow (`VOLATILE`, `ZERO`) change only
//! through [`MergeState::set_flags`], which keeps `pages_volatile` and `zero_pages` equal to
//! the number of records that carry them.

use crate::region::RegionId;
use crate::stable::Slot;

use super::MergeState;

/// What the engine remembers of one page of a region.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct PageRecord {
    /// xxh3 of the content at the last visit (valid when `SEEN`).
    pub(super) checksum: u64,
    /// The stable slot this page maps, plus one; zero when the page maps its own memfd.
    pub(super) stable: u32,
    /// `SEEN`, `VOLATILE`, `ZERO`, `COPY`, `UNMERGEABLE`, `ADVISED`.
    pub(super) flags: u8,
    /// Consecutive visits in which the page was unchanged but matched nothing (smart scan).
    pub(super) misses: u8,
}

/// The page was visited at least once: `checksum` is valid.
pub(super) const SEEN: u8 = 1;
/// The page's checksum changed between its last two visits.
pub(super) const VOLATILE: u8 = 2;
/// The page held zeros and was punched out of its region's memfd.
pub(super) const ZERO: u8 = 4;
/// The page lies in a merged window but holds a private copy of its own bytes.
pub(super) const COPY: u8 = 8;
/// The owner advised the page unmergeable: the engine never reads it.
pub(super) const UNMERGEABLE: u8 = 16;
/// The owner advised the page mergeable (what merge scope `Advised` asks for).
pub(super) const ADVISED: u8 = 32;

impl PageRecord {
    pub(super) fn slot(&self) -> Option<Slot> {
        self.stable.checked_sub(1)
    }
    /// Whether the page maps a stable page it shares.
    pub(super) fn shares(&self) -> bool {
        self.stable != 0 && !self.has(COPY)
    }
    pub(super) fn has(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }
}

/// Counters kept by the state (the rest of [`crate::Stats`] is derived).
#[derive(Default)]
pub(super) struct Counters {
    pub(super) pages_scanned: u64,
    pub(super) full_scans: u64,
    pub(super) pages_skipped_map_budget: u64,
    pub(super) regions_busy_skips: u64,
    /// Records with `VOLATILE`.
    pub(super) pages_volatile: u64,
    /// Records with `ZERO`.
    pub(super) zero_pages: u64,
    /// Page visits smart scan skipped (KSM `pages_skipped`).
    pub(super) pages_skipped: u64,
    pub(super) regions_idle_skips: u64,
    /// Hole punches that failed (memory left allocated, no data affected).
    pub(super) punch_failures: u64,
    /// Pages visited in the pass in progress, and whether the last whole pass visited none
    /// (every region idle): then the scanner may sleep longer.
    pub(super) pages_visited_this_pass: u64,
    pub(super) last_pass_idle: bool,
    pub(super) merges_this_pass: u64,
    pub(super) merges_last_pass: u64,
}

impl MergeState {
    /// Stores a visit's checksum and whether the page counts as volatile; a change (or a
    /// merge) ends a smart-scan streak.
    pub(super) fn record_visit(&mut self, id: RegionId, page: usize, checksum: u64, settled: bool) {
        let record = self.record_mut(id, page);
        if record.checksum != checksum || !settled {
            record.misses = 0;
        }
        record.checksum = checksum;
        let flags = (record.flags | SEEN) & !VOLATILE | if settled { 0 } else { VOLATILE };
        self.set_flags(id, page, flags);
    }

    /// One more visit in which the page was unchanged and matched nothing (smart scan).
    pub(super) fn note_miss(&mut self, id: RegionId, page: usize) {
        let record = self.record_mut(id, page);
        record.misses = record.misses.saturating_add(1);
    }

    /// Sets a page's flags, keeping the counters derived from them in step.
    pub(super) fn set_flags(&mut self, id: RegionId, page: usize, flags: u8) {
        let (records, counters) = self.records_and_counters(id);
        counters.set_flags(&mut records[page], flags);
    }

    /// Takes a page's flags out of the counters derived from them.
    pub(super) fn forget_flags(&mut self, flags: u8) {
        self.counters.forget_flags(flags);
    }
}

impl Counters {
    /// Sets `record`'s flags to `flags`, keeping the counters derived from them in step; for
    /// loops that hold a region's records already.
    pub(super) fn set_flags(&mut self, record: &mut PageRecord, flags: u8) {
        let was = std::mem::replace(&mut record.flags, flags);
        self.forget_flags(was);
        for (flag, counter) in self.flag_counters() {
            if flags & flag != 0 {
                *counter += 1;
            }
        }
    }

    fn forget_flags(&mut self, flags: u8) {
        for (flag, counter) in self.flag_counters() {
            if flags & flag != 0 {
                *counter -= 1;
            }
        }
    }

    fn flag_counters(&mut self) -> [(u8, &mut u64); 2] {
        [
            (VOLATILE, &mut self.pages_volatile),
            (ZERO, &mut self.zero_pages),
        ]
    }
}
