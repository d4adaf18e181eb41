//! Advice from a region's owner (see [`crate::advice`]): which of its pages may merge. Advice
//! lives in the page records' flags, so that every step of the journey checks it for free:
//! [`MergeState::may_merge`] is asked by the visit before it reads a page, and by both run
//! growers before they compare one.

use std::ops::Range;

use crate::Error;
use crate::advice::{Advice, MAX_ADVISED_RANGES, MergeScope};
use crate::layout::runs_of;
use crate::quiesce::Quiescent;
use crate::region::RegionId;

use super::MergeState;
use super::records::{ADVISED, PageRecord, SEEN, UNMERGEABLE, VOLATILE};

impl MergeState {
    /// Whether the engine may read and merge the page of `record`.
    pub(super) fn may_merge(&self, record: &PageRecord) -> bool {
        !record.has(UNMERGEABLE) && (self.scope == MergeScope::All || record.has(ADVISED))
    }

    /// Takes the owner's advice for pages `pages` of region `id` (the caller checked the
    /// range against the region's length under the gate `q` proves held).
    pub(crate) fn advise(
        &mut self,
        q: Quiescent<'_>,
        id: RegionId,
        pages: Range<usize>,
        advice: Advice,
    ) -> Result<(), Error> {
        self.cover_length(id)?;
        let scope = self.scope;
        // One lookup of the region's records for the whole range.
        let (records, counters) = self.records_and_counters(id);
        let records = &mut records[pages.clone()];
        let before: Vec<PageRecord> = records.to_vec();
        for record in records.iter_mut() {
            let flags = match advice {
                Advice::Unmergeable => {
                    // Nothing of the bytes stays with the engine.
                    record.checksum = 0;
                    record.misses = 0;
                    (record.flags | UNMERGEABLE) & !ADVISED & !SEEN & !VOLATILE
                }
                Advice::Mergeable if scope == MergeScope::Advised => {
                    (record.flags | ADVISED) & !UNMERGEABLE
                }
                Advice::Mergeable => record.flags & !UNMERGEABLE,
            };
            counters.set_flags(record, flags);
        }
        let all = &self.region(id).pages;
        let ranges =
            runs_of(all, |r| r.has(UNMERGEABLE)).count() + runs_of(all, |r| r.has(ADVISED)).count();
        if ranges > MAX_ADVISED_RANGES {
            let (records, counters) = self.records_and_counters(id);
            for (record, was) in records[pages].iter_mut().zip(before) {
                counters.set_flags(record, was.flags);
                *record = was;
            }
            return Err(Error::TooManyAdvisedRanges {
                region: id,
                limit: MAX_ADVISED_RANGES,
            });
        }
        if advice == Advice::Unmergeable {
            let records = &self.region(id).pages[pages.clone()];
            let merged: Vec<Range<usize>> = runs_of(records, |r| r.stable != 0)
                .map(|run| pages.start + run.start..pages.start + run.end)
                .collect();
            for run in merged {
                self.restore(q, id, run)?;
            }
        }
        // What may merge changed: the region needs visits again, whoever ran.
        let region = self.region_mut(id);
        region.quiet_at = None;
        region.visit.1 = false;
        Ok(())
    }
}
