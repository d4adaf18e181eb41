//! Advice from a region's owner (see [`crate::advice`]): which of its pages may merge.
//!
//! Advice is kept per range, not per page ([`AdviceMap`]): a guest may advise gigabytes it
//! never touches, and pages nobody touched have no record (see [`super::records`]).
//! [`MergeState::may_merge`] is asked by the visit before it reads a page, and by both run
//! growers before they compare one; it searches a region's few ranges.

use std::ops::Range;

use crate::Error;
use crate::advice::{Advice, MAX_ADVISED_RANGES, MergeScope};
use crate::quiesce::Quiescent;
use crate::region::RegionId;

use super::MergeState;
use super::records::{SEEN, VOLATILE};

/// A region's advised ranges: sorted, disjoint, and never two touching ranges with the same
/// advice. Pages outside every range have no advice.
#[derive(Clone, Default)]
pub(super) struct AdviceMap {
    ranges: Vec<(Range<usize>, Advice)>,
}

impl AdviceMap {
    /// The advice page `page` has, if any.
    pub(super) fn get(&self, page: usize) -> Option<Advice> {
        let at = self.ranges.partition_point(|(range, _)| range.end <= page);
        self.ranges
            .get(at)
            .filter(|(range, _)| range.start <= page)
            .map(|&(_, advice)| advice)
    }

    /// Gives pages `pages` advice `advice` (`None`: no advice), replacing what they had.
    pub(super) fn set(&mut self, pages: Range<usize>, advice: Option<Advice>) {
        if pages.is_empty() {
            return;
        }
        let mut ranges = Vec::with_capacity(self.ranges.len() + 2);
        for (range, had) in self.ranges.drain(..) {
            // What is left of each old range outside `pages`.
            for piece in [
                range.start..range.end.min(pages.start),
                range.start.max(pages.end)..range.end,
            ] {
                if !piece.is_empty() {
                    ranges.push((piece, had));
                }
            }
        }
        if let Some(advice) = advice {
            ranges.push((pages, advice));
        }
        ranges.sort_by_key(|(range, _)| range.start);
        for (range, advice) in ranges {
            match self.ranges.last_mut() {
                Some((last, had)) if last.end == range.start && *had == advice => {
                    last.end = range.end;
                }
                _ => self.ranges.push((range, advice)),
            }
        }
    }

    pub(super) fn len(&self) -> usize {
        self.ranges.len()
    }

    pub(super) fn metadata_bytes(&self) -> usize {
        self.ranges.capacity() * size_of::<(Range<usize>, Advice)>()
    }
}

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
            let (records, counts) = self.records.pages_and_flags(id);
            records.update_existing(pages, |_, record| {
                record.set_checksum(0);
                record.set_misses(0);
                let flags = record.flags() & !SEEN & !VOLATILE;
                counts.set_flags(record, flags);
            });
        }
        // What may merge changed: the region needs visits again, whoever ran.
        let region = self.records.region_mut(id);
        region.quiet_at = None;
        region.visit.1 = false;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advice_ranges_split_replace_and_join() {
        let mut map = AdviceMap::default();
        map.set(0..100, Some(Advice::Mergeable));
        map.set(10..20, Some(Advice::Unmergeable));
        assert_eq!(map.len(), 3);
        assert_eq!(map.get(9), Some(Advice::Mergeable));
        assert_eq!(map.get(10), Some(Advice::Unmergeable));
        assert_eq!(map.get(20), Some(Advice::Mergeable));
        assert_eq!(map.get(100), None);
        map.set(10..20, Some(Advice::Mergeable));
        assert_eq!(map.len(), 1);
        map.set(50..1 << 40, None);
        assert_eq!(
            (map.len(), map.get(49), map.get(50)),
            (1, Some(Advice::Mergeable), None)
        );
    }
}
