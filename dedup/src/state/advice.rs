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
        let before: Vec<PageRecord> = self.region(id).pages[pages.clone()].to_vec();
        let scope = self.scope;
        for page in pages.clone() {
            let flags = self.record(id, page).flags;
            let flags = match advice {
                Advice::Unmergeable => (flags | UNMERGEABLE) & !ADVISED & !SEEN & !VOLATILE,
                Advice::Mergeable if scope == MergeScope::Advised => {
                    (flags | ADVISED) & !UNMERGEABLE
                }
                Advice::Mergeable => flags & !UNMERGEABLE,
            };
            self.set_flags(id, page, flags);
            let record = self.record_mut(id, page);
            if advice == Advice::Unmergeable {
                // Nothing of the bytes stays with the engine.
                record.checksum = 0;
                record.misses = 0;
            }
        }
        let records = &self.region(id).pages;
        let ranges = runs_of(records, |r| r.has(UNMERGEABLE)).count()
            + runs_of(records, |r| r.has(ADVISED)).count();
        if ranges > MAX_ADVISED_RANGES {
            for (page, record) in pages.zip(before) {
                self.set_flags(id, page, record.flags);
                *self.record_mut(id, page) = record;
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
