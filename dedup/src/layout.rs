//! How a region's pages are mapped, and what a change costs in mappings.
//!
//! Every page of a region maps either the region's own memfd or a slot of the stable memfd.
//! The kernel keeps neighbouring pages in one mapping (VMA) when both map the region's memfd,
//! or both map the stable memfd at consecutive slots (unless their mappings' anonymous memory
//! differs, which only the kernel knows: `vma.rs`); every other neighbour pair is a
//! boundary between two mappings. Since mappings are what runs out first (the process-wide
//! `vm.max_map_count`), the engine merges whole runs and *windows*: a window maps a stretch
//! of pages onto consecutive slots with one mapping, and its pages that differ from their
//! slot get private copies of their own bytes.

use std::ops::Range;

/// A window bridges at most this many differing pages in a row. Each costs a private copy
/// (a copy-on-write fault, about 2 µs); each window saves the two mappings that merging its
/// pieces separately would cost, and `vm.max_map_count` is what runs out first.
pub(crate) const MAX_GAP: usize = 8;

/// Cuts a window (true: a page that shares, false: one that gets a private copy) to one that
/// ends on a shared page and copies no more pages than it shares; past that ratio, only the
/// leading run of shared pages is kept.
pub(crate) fn trim_window(shares: &mut Vec<bool>) {
    while shares.last() == Some(&false) {
        shares.pop();
    }
    let shared = shares.iter().filter(|&&share| share).count();
    if shares.len() - shared > shared {
        let lead = shares.iter().take_while(|&&share| share).count();
        shares.truncate(lead);
    }
}

/// Grows a window page by page from its first page, which shares: `next(n)` says whether
/// page `n` of the window shares (`Some(true)`), differs but may be bridged with a private
/// copy (`Some(false)`), or ends the window (`None`). Growth stops at `limit` pages, at the
/// first `None`, or before a gap of more than [`MAX_GAP`] differing pages; the window is then
/// cut by [`trim_window`].
pub(crate) fn grow_window<E>(
    limit: usize,
    mut next: impl FnMut(usize) -> Result<Option<bool>, E>,
) -> Result<Vec<bool>, E> {
    let mut shares = vec![true];
    let mut gap = 0;
    while shares.len() < limit {
        let Some(share) = next(shares.len())? else {
            break;
        };
        gap = if share { 0 } else { gap + 1 };
        if gap > MAX_GAP {
            break;
        }
        shares.push(share);
    }
    trim_window(&mut shares);
    Ok(shares)
}

/// Maximal runs of consecutive items that satisfy `pred`.
pub(crate) fn runs_of<'a, T>(
    pages: &'a [T],
    pred: impl Fn(&T) -> bool + 'a,
) -> impl Iterator<Item = Range<usize>> + 'a {
    let mut page = 0;
    std::iter::from_fn(move || {
        while page < pages.len() && !pred(&pages[page]) {
            page += 1;
        }
        let start = page;
        while page < pages.len() && pred(&pages[page]) {
            page += 1;
        }
        (start < page).then_some(start..page)
    })
}

/// 1 when neighbouring pages that map `left` and `right` (0: the region's memfd; s + 1:
/// stable slot s) lie in two mappings, 0 when the kernel keeps them in one.
pub(crate) fn boundary(left: u32, right: u32) -> i64 {
    let joined = (left == 0 && right == 0) || (left != 0 && right == left.wrapping_add(1));
    i64::from(!joined)
}

/// How many mappings a region of `len` pages gains when pages `range` change to map what
/// `kind(n)` says for page `range.start + n`; `before(p)` says what page `p` maps now. A kind
/// is 0 for the region's own memfd and s + 1 for stable slot s. Only boundaries touching the
/// range can change. Page by page: the reference the engine's sparse count
/// (`RegionPages::mapping_delta`) is tested against.
#[cfg(test)]
pub(crate) fn mapping_delta(
    before: impl Fn(usize) -> u32,
    len: usize,
    range: Range<usize>,
    kind: impl Fn(usize) -> u32,
) -> i64 {
    let after = |p: usize| {
        if range.contains(&p) {
            kind(p - range.start)
        } else {
            before(p)
        }
    };
    let first = range.start.max(1);
    let last = range.end.min(len.saturating_sub(1));
    (first..=last)
        .map(|p| boundary(after(p - 1), after(p)) - boundary(before(p - 1), before(p)))
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delta(now: &[u32], range: Range<usize>, new: &[u32]) -> i64 {
        mapping_delta(|p| now[p], now.len(), range.clone(), |n| new[n])
    }

    #[test]
    fn merging_splits_or_joins_mappings() {
        // A run in the middle of the region's own mapping: two more mappings.
        assert_eq!(delta(&[0, 0, 0, 0, 0], 1..3, &[8, 9]), 2);
        // The whole region: still one mapping.
        assert_eq!(delta(&[0, 0, 0], 0..3, &[4, 5, 6]), 0);
        // Extending a merged run by its next slot joins it: one mapping fewer.
        assert_eq!(delta(&[0, 0, 5, 6, 0], 4..5, &[7]), -1);
        // Slots that do not follow each other split even inside a merged stretch.
        assert_eq!(delta(&[0, 0, 0], 0..3, &[4, 9, 6]), 2);
        // Giving pages back to the memfd undoes the split.
        assert_eq!(delta(&[0, 8, 9, 0], 1..3, &[0, 0]), -2);
    }

    #[test]
    fn a_window_ends_on_a_shared_page_and_copies_no_more_than_it_shares() {
        let trimmed = |shares: &[bool]| {
            let mut shares = shares.to_vec();
            trim_window(&mut shares);
            shares
        };
        assert_eq!(trimmed(&[true, false, true, false]), [true, false, true]);
        assert_eq!(
            trimmed(&[true, false, false, true]),
            [true, false, false, true]
        );
        assert_eq!(trimmed(&[true, false, false, false, true]), [true]);
        assert_eq!(
            trimmed(&[true, true, false, true]),
            [true, true, false, true]
        );
        assert_eq!(trimmed(&[true, false, false]), [true]);
    }

    #[test]
    fn a_window_grows_to_its_limit_its_end_or_its_longest_gap() {
        let grown = |limit: usize, pages: &[bool]| {
            grow_window(limit, |n| Ok::<_, ()>(pages.get(n - 1).copied())).expect("infallible")
        };
        // Up to the limit.
        assert_eq!(grown(3, &[true; 10]), [true; 3]);
        // Up to the end the caller names.
        assert_eq!(grown(10, &[true, false, true]), [true, true, false, true]);
        // A gap of MAX_GAP bridges; one more ends the window before it, then trims.
        let mut bridged = vec![false; MAX_GAP];
        bridged.extend([true; MAX_GAP]);
        assert_eq!(grown(100, &bridged).len(), 1 + 2 * MAX_GAP);
        let mut too_long = vec![true; 2 * MAX_GAP];
        too_long.extend(vec![false; MAX_GAP + 1]);
        too_long.push(true);
        assert_eq!(grown(100, &too_long), vec![true; 1 + 2 * MAX_GAP]);
        // Errors pass through.
        assert_eq!(
            grow_window(5, |_| Err::<Option<bool>, _>("pagemap")),
            Err("pagemap")
        );
    }

    #[test]
    fn runs_are_maximal() {
        let runs: Vec<_> = runs_of(&[1, 1, 0, 1, 0, 0, 1], |&x| x == 1).collect();
        assert_eq!(runs, [0..2, 3..4, 6..7]);
    }
}
