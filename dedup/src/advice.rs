//! Guest advice: which ranges of a region may merge, as `madvise(MADV_MERGEABLE /
//! MADV_UNMERGEABLE)` and `prctl(PR_SET_MEMORY_MERGE)` say it for Linux KSM.
//!
//! An engine has one [`MergeScope`], fixed when it starts: with [`MergeScope::All`] (the
//! default, as `PR_SET_MEMORY_MERGE`) every page of every region may merge unless advised
//! [`Advice::Unmergeable`]; with [`MergeScope::Advised`] (classic KSM) only pages advised
//! [`Advice::Mergeable`] may merge.
//!
//! The owner gives advice with its guard held ([`crate::Engine::advise`]), so advice takes
//! effect before the call returns:
//!
//! - **Unmergeable** gives every merged page of the range back to the region's own memfd,
//!   forgets the checksums the engine kept for it, and from then on the engine never reads
//!   the range: its pages are not hashed, indexed, compared, punched as zeros, nor taken into
//!   a run or window that another page starts. A secret never leaves its region's memory.
//! - **Mergeable** opts the range in (scope `Advised`) or undoes an earlier `Unmergeable`
//!   (scope `All`). The pages merge as the scanner or a merge-now finds them.
//!
//! A region holds at most [`MAX_ADVISED_RANGES`] advised ranges (maximal runs of pages with
//! the same advice); advice that would exceed it is refused and changes nothing. The engine
//! keeps advice per range (in an `AdviceMap`), not per page: a guest may advise gigabytes it never
//! touches, and a lookup searches a region's few ranges.

use std::ops::Range;

/// Which pages of a region may merge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Advice {
    /// May merge (scope `Advised`), or no longer unmergeable (scope `All`).
    Mergeable,
    /// Never merged, never read by the engine.
    Unmergeable,
}

/// Which pages may merge without advice.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MergeScope {
    /// Every page unless advised unmergeable (as KSM's `PR_SET_MEMORY_MERGE`).
    #[default]
    All,
    /// Only pages advised mergeable (as KSM's `MADV_MERGEABLE`).
    Advised,
}

/// Most advised ranges one region may hold: each is a run of pages with the same advice.
/// Ranges that touch and carry the same advice count once.
pub const MAX_ADVISED_RANGES: usize = 256;

/// A region's advised ranges: sorted, disjoint, and never two touching ranges with the same
/// advice. Pages outside every range have no advice.
#[derive(Clone, Default)]
pub(crate) struct AdviceMap {
    /// The ranges in page order, each with its advice.
    ranges: Vec<(Range<usize>, Advice)>,
}

impl AdviceMap {
    /// The advice page `page` has, if any.
    pub(crate) fn get(&self, page: usize) -> Option<Advice> {
        let at = self.ranges.partition_point(|(range, _)| range.end <= page);
        self.ranges
            .get(at)
            .filter(|(range, _)| range.start <= page)
            .map(|&(_, advice)| advice)
    }

    /// Gives pages `pages` advice `advice` (`None`: no advice), replacing what they had.
    pub(crate) fn set(&mut self, pages: Range<usize>, advice: Option<Advice>) {
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

    pub(crate) fn len(&self) -> usize {
        self.ranges.len()
    }

    pub(crate) fn metadata_bytes(&self) -> usize {
        self.ranges.capacity() * size_of::<(Range<usize>, Advice)>()
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
