//! Advice from a region's owner (see [`crate::advice`]): which of its pages may merge.
//!
//! Advice is kept per range, not per page ([`crate::advice::AdviceMap`]): a guest may advise
//! gigabytes it never touches, and pages nobody touched have no record (see
//! [`super::records`]).
//! [`MergeState::may_merge`] is asked by the visit before it reads a page, and by both run
//! growers before they compare one; it searches a region's few ranges.

use std::ops::Range;

use crate::Error;
use crate::advice::{Advice, MAX_ADVISED_RANGES, MergeScope};
use crate::quiesce::Quiescent;
use crate::region::RegionId;

use super::MergeState;

impl MergeState {
    /// Whether the engine may read and merge page `page` of region `id`.
    pub(super) fn may_merge(&self, id: RegionId, page: usize) -> bool {
        match self.records.region(id).advice.get(page) {
            Some(Advice::Unmergeable) => false,
            Some(Advice::Mergeable) => true,
            None => self.scope == MergeScope::All,
        }
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
        let scope = self.scope;
        let region = self.records.region_mut(id);
        let mut advised = region.advice.clone();
        // Under scope `All`, mergeable is what a page without advice is.
        let kept = match advice {
            Advice::Mergeable if scope == MergeScope::All => None,
            advice => Some(advice),
        };
        advised.set(pages.clone(), kept);
        if advised.len() > MAX_ADVISED_RANGES {
            return Err(Error::TooManyAdvisedRanges {
                region: id,
                limit: MAX_ADVISED_RANGES,
            });
        }
        region.advice = advised;
        if advice == Advice::Unmergeable {
            let merged = region.pages.runs(pages.clone(), |r| r.stable() != 0);
            for run in merged {
                self.restore(q, id, run)?;
            }
            // Nothing of the bytes stays with the engine.
            self.records.forget_contents(id, pages);
        }
        // What may merge changed: the region needs visits again, whoever ran.
        let region = self.records.region_mut(id);
        region.quiet_at = None;
        region.visit.1 = false;
        Ok(())
    }
}
