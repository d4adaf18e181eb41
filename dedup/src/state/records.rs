//! What the engine keeps for each region and each of its pages, and the counts that follow.
//!
//! # Only pages that exist
//!
//! A region may be gigabytes of address space of which a guest touched a few pages; KSM keeps
//! an `rmap_item` only for pages that are present, and so does this engine. A page has a
//! record once a visit found bytes in it (its memfd page exists) or a merge mapped a stable
//! page there; a page nobody touched has none, costs nothing, and is never visited (the scan
//! finds pages that exist from the memfd's data extents and the records, see
//! [`super::scan`]).
//!
//! Records live in a [`PageTable`]: chunks of [`CHUNK_PAGES`] records, allocated the first
//! time a page of the chunk gets a record, in a B-tree keyed by chunk. A dense region costs
//! 12 bytes a page plus about 16 bytes a chunk; a page alone in its chunk costs the chunk.
//!
//! # The record
//!
//! A `PageRecord` is 12 bytes: the checksum of the last visit, and one word holding the stable
//! slot the page maps (if any), the flags, and the smart-scan streak. Flags that counts
//! follow (`VOLATILE`, `ZERO`) change only through [`Records::set_flags`] or
//! [`FlagCounts::set_flags`], which keep those counts equal to the number of records that
//! carry them. Advice is not kept per page but per range ([`super::advice::AdviceMap`]): a
//! guest may advise gigabytes it never touches.
//!
//! # Regions
//!
//! [`Records`] holds every registered region ([`RegionPages`]: its page table, its advice,
//! what its mapping costs, whether it is idle) with the flag counts, and the methods that
//! touch nothing else. What the records say a change of mappings costs is theirs too
//! ([`RegionPages::mapping_delta`]); whether the budget can pay it is [`super::budget`]'s.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::sync::Arc;

use crate::advice::AdviceMap;
use crate::layout::boundary;
use crate::quiesce::OwnerId;
use crate::region::{Region, RegionId};
use crate::stable::{MAX_SLOTS, Slot};

/// What the engine remembers of one page of a region.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C, packed(4))]
pub(super) struct PageRecord {
    /// xxh3 of the content at the last visit (valid when `SEEN`).
    checksum: u64,
    /// Bits 0..25: the stable slot this page maps, plus one (zero when the page maps its own
    /// memfd). Bits 25..29: the flags. Bits 29..32: consecutive visits in which the page was
    /// unchanged but stayed unmerged (smart scan), saturating at 7.
    word: u32,
}

const STABLE_BITS: u32 = 25;
const STABLE_MASK: u32 = (1 << STABLE_BITS) - 1;
const FLAGS_SHIFT: u32 = STABLE_BITS;
const FLAGS_MASK: u32 = 0xf << FLAGS_SHIFT;
const MISSES_SHIFT: u32 = FLAGS_SHIFT + 4;
const MAX_MISSES: u8 = 7;

const _: () = assert!(size_of::<PageRecord>() == 12);
const _: () = assert!(MAX_SLOTS < STABLE_MASK);

/// The page was visited at least once: `checksum` is valid.
pub(super) const SEEN: u8 = 1;
/// The page's checksum changed between its last two visits.
pub(super) const VOLATILE: u8 = 2;
/// The page held zeros and was punched out of its region's memfd.
pub(super) const ZERO: u8 = 4;
/// The page lies in a merged window but holds a private copy of its own bytes.
pub(super) const COPY: u8 = 8;

impl PageRecord {
    pub(super) fn checksum(&self) -> u64 {
        self.checksum
    }
    pub(super) fn set_checksum(&mut self, checksum: u64) {
        self.checksum = checksum;
    }
    /// The stable slot this page maps, plus one; zero when it maps its own memfd.
    pub(super) fn stable(&self) -> u32 {
        self.word & STABLE_MASK
    }
    pub(super) fn set_stable(&mut self, stable: u32) {
        debug_assert!(stable <= STABLE_MASK);
        self.word = self.word & !STABLE_MASK | stable;
    }
    pub(super) fn flags(&self) -> u8 {
        ((self.word & FLAGS_MASK) >> FLAGS_SHIFT) as u8
    }
    /// Sets the flags without touching the counts: only for flags no count follows
    /// (`SEEN`, `COPY`), or through [`FlagCounts::set_flags`].
    fn put_flags(&mut self, flags: u8) {
        self.word = self.word & !FLAGS_MASK | (u32::from(flags & 0xf) << FLAGS_SHIFT);
    }
    pub(super) fn misses(&self) -> u8 {
        (self.word >> MISSES_SHIFT) as u8
    }
    pub(super) fn set_misses(&mut self, misses: u8) {
        let misses = u32::from(misses.min(MAX_MISSES));
        self.word = self.word & !(0x7 << MISSES_SHIFT) | (misses << MISSES_SHIFT);
    }
    pub(super) fn slot(&self) -> Option<Slot> {
        self.stable().checked_sub(1)
    }
    /// Whether the page maps a stable page it shares.
    pub(super) fn shares(&self) -> bool {
        self.stable() != 0 && !self.has(COPY)
    }
    pub(super) fn has(&self, flag: u8) -> bool {
        self.flags() & flag != 0
    }
    /// Whether the record holds anything (a page with no record reads as the default).
    pub(super) fn in_use(&self) -> bool {
        *self != Self::default()
    }
    /// Ends the page's merge: it maps its own memfd again.
    pub(super) fn unmap_stable(&mut self) {
        self.set_stable(0);
        let flags = self.flags() & !COPY;
        self.put_flags(flags);
    }
}

/// Records per chunk of a [`PageTable`]: 32 pages (128 KiB of memory) in 384 bytes.
pub(super) const CHUNK_PAGES: usize = 32;

type Chunk = [PageRecord; CHUNK_PAGES];

/// The chunks that hold the records of pages `range` (none for an empty range).
fn chunks_of(range: &Range<usize>) -> Range<usize> {
    let first = range.start / CHUNK_PAGES;
    first..range.end.div_ceil(CHUNK_PAGES).max(first)
}

/// The records of one region's pages that exist, in chunks (see the module docs). A page
/// without a record reads as `PageRecord::default()`: unseen, unmerged.
#[derive(Default)]
pub(super) struct PageTable {
    chunks: BTreeMap<usize, Box<Chunk>>,
}

impl PageTable {
    /// The record of page `page` (the default when it has none).
    pub(super) fn get(&self, page: usize) -> PageRecord {
        self.chunks
            .get(&(page / CHUNK_PAGES))
            .map_or_else(PageRecord::default, |chunk| chunk[page % CHUNK_PAGES])
    }

    /// The record of page `page`, made if it has none.
    pub(super) fn get_mut(&mut self, page: usize) -> &mut PageRecord {
        &mut self.chunk_mut(page / CHUNK_PAGES)[page % CHUNK_PAGES]
    }

    fn chunk_mut(&mut self, chunk: usize) -> &mut Chunk {
        self.chunks
            .entry(chunk)
            .or_insert_with(|| Box::new([PageRecord::default(); CHUNK_PAGES]))
    }

    /// Calls `f` with every page of `range` and its record, making records where there are
    /// none (for merges, which give every page of a window a record).
    pub(super) fn update(
        &mut self,
        range: Range<usize>,
        mut f: impl FnMut(usize, &mut PageRecord),
    ) {
        let mut page = range.start;
        while page < range.end {
            let chunk = page / CHUNK_PAGES;
            let end = range.end.min((chunk + 1) * CHUNK_PAGES);
            let records = self.chunk_mut(chunk);
            for p in page..end {
                f(p, &mut records[p % CHUNK_PAGES]);
            }
            page = end;
        }
    }

    /// Calls `f` with every record of `range` that exists, and its page; makes none.
    pub(super) fn update_existing(
        &mut self,
        range: Range<usize>,
        mut f: impl FnMut(usize, &mut PageRecord),
    ) {
        for (&chunk, records) in self.chunks.range_mut(chunks_of(&range)) {
            let first = chunk * CHUNK_PAGES;
            for p in first.max(range.start)..(first + CHUNK_PAGES).min(range.end) {
                if records[p - first].in_use() {
                    f(p, &mut records[p - first]);
                }
            }
        }
    }

    /// The records of `range` that are in use, with their pages, in page order.
    pub(super) fn existing(
        &self,
        range: Range<usize>,
    ) -> impl Iterator<Item = (usize, PageRecord)> + '_ {
        self.chunks
            .range(chunks_of(&range))
            .flat_map(move |(&chunk, records)| {
                let first = chunk * CHUNK_PAGES;
                (first.max(range.start)..(first + CHUNK_PAGES).min(range.end))
                    .map(move |p| (p, records[p - first]))
                    .filter(|(_, record)| record.in_use())
            })
    }

    /// Every record in use, with its page.
    pub(super) fn all(&self) -> impl Iterator<Item = (usize, PageRecord)> + '_ {
        self.existing(0..usize::MAX)
    }

    /// Maximal runs of pages in `range` whose records satisfy `pred`, which must be false for
    /// a page without a record.
    pub(super) fn runs(
        &self,
        range: Range<usize>,
        pred: impl Fn(&PageRecord) -> bool,
    ) -> Vec<Range<usize>> {
        let mut runs: Vec<Range<usize>> = Vec::new();
        for (page, record) in self.existing(range) {
            if !pred(&record) {
                continue;
            }
            match runs.last_mut() {
                Some(run) if run.end == page => run.end += 1,
                _ => runs.push(page..page + 1),
            }
        }
        runs
    }

    /// Bytes the table takes: its chunks, and per chunk its B-tree entry (key and pointer)
    /// with the allocator's header, an estimate of the tree's nodes.
    pub(super) fn metadata_bytes(&self) -> usize {
        self.chunks.len() * (size_of::<Chunk>() + 2 * size_of::<usize>() + 16)
    }
}

/// A registered region and the engine's records of its pages.
pub(super) struct RegionPages {
    pub(super) region: Arc<Region>,
    /// Records of the pages that exist (see the module docs).
    pub(super) pages: PageTable,
    /// The region's length in pages at the last visit.
    pub(super) len: usize,
    /// The owner's advice, by range.
    pub(super) advice: AdviceMap,
    /// Mappings the engine's merges split this region's mapping into, beyond the first.
    pub(super) vmas: u64,
    /// Pages where the kernel starts a mapping although the page before maps the slot
    /// before (their mappings' anonymous memory differs: `vma.rs`), so that the records
    /// alone imply one boundary fewer; each is counted in `vmas`.
    pub(super) kernel_splits: BTreeSet<usize>,
    /// The owner's gate entries (see [`crate::Owner`]) at which a whole visit of the region
    /// found nothing left to do: every page shared, a hole, advised never to merge, or (with
    /// smart scan) looked at only on every 32nd pass. While the owner has not entered since,
    /// the scanner skips the region, but on those passes if anything was awake since the
    /// last of them (see [`super::scan`]).
    pub(super) quiet_at: Option<u64>,
    /// The visit in progress: the owner's entries when it began, and whether it has found
    /// nothing to do so far.
    pub(super) visit: (u64, bool),
    /// Whether the last visit (or the one in progress) met pages of the region's own that
    /// smart scan looks at only on every 32nd pass: pages that may yet merge with a stable
    /// page made since, unlike shared pages and holes.
    pub(super) holds_back: bool,
    /// The region's mappings as its registration or last reset left them, if the image
    /// was mapped whole; see [`Pristine`].
    pub(super) pristine: Option<Pristine>,
    /// [`Region::layout`] when [`super::compact`] last looked at the region: it looks again
    /// only once the region's mappings changed.
    pub(super) compacted_at: Option<u64>,
}

/// What a region's mappings were right after its registration or a reset mapped its image
/// whole (every run onto its stable pages, none written into the memfd for want of
/// mappings). While [`Region::layout`] still reads `layout`, nothing has been merged,
/// given back or grown over since: every page maps the image's stable page or the region's
/// own memfd, as then, and a reset to the same image needs to drop only what the owner
/// wrote (`super::image`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Pristine {
    /// [`Region::layout`] then.
    pub(super) layout: u64,
    /// The image then mapped, or `None` for zeros.
    pub(super) image: Option<u64>,
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

/// How many records carry the flags that [`crate::Stats`] counts. Kept beside the records,
/// and changed only with them ([`FlagCounts::set_flags`]), so that the figures need no walk
/// of every record and cannot drift from what the records say.
#[derive(Default)]
pub(super) struct FlagCounts {
    /// Records with `VOLATILE` (KSM `pages_volatile`).
    volatile: u64,
    /// Records with `ZERO`: pages of zeros punched out of their memfds.
    zero: u64,
}

impl FlagCounts {
    /// Sets `record`'s flags to `flags`, keeping the counts in step; for loops that hold a
    /// region's records already.
    pub(super) fn set_flags(&mut self, record: &mut PageRecord, flags: u8) {
        let was = record.flags();
        record.put_flags(flags);
        if (was ^ flags) & (VOLATILE | ZERO) == 0 {
            return;
        }
        self.forget_flags(was);
        for (flag, count) in self.counts() {
            if flags & flag != 0 {
                *count += 1;
            }
        }
    }

    fn forget_flags(&mut self, flags: u8) {
        for (flag, count) in self.counts() {
            if flags & flag != 0 {
                *count -= 1;
            }
        }
    }

    fn counts(&mut self) -> [(u8, &mut u64); 2] {
        [(VOLATILE, &mut self.volatile), (ZERO, &mut self.zero)]
    }
}

/// Every registered region's records, and the flag counts that follow them. All that the
/// engine knows of a region's pages is here; what the pages share is the stable store's.
#[derive(Default)]
pub(super) struct Records {
    /// The registered regions, by id: the order the scanner's cursor walks them in.
    pub(super) regions: BTreeMap<RegionId, RegionPages>,
    /// Private, so that no flag it follows changes without it.
    flags: FlagCounts,
}

impl Records {
    /// Takes region `region` in, with no records yet.
    pub(super) fn add(&mut self, region: Arc<Region>) {
        self.regions.insert(
            region.id,
            RegionPages {
                region,
                pages: PageTable::default(),
                len: 0,
                advice: AdviceMap::default(),
                vmas: 0,
                kernel_splits: BTreeSet::new(),
                quiet_at: None,
                visit: (0, false),
                holds_back: false,
                pristine: None,
                compacted_at: None,
            },
        );
    }

    /// The records of region `id`, which the caller knows is registered (it was found under
    /// the same lock).
    pub(super) fn region(&self, id: RegionId) -> &RegionPages {
        self.regions
            .get(&id)
            .expect("a region found under the state lock stays registered")
    }

    pub(super) fn region_mut(&mut self, id: RegionId) -> &mut RegionPages {
        self.regions
            .get_mut(&id)
            .expect("a region found under the state lock stays registered")
    }

    /// The records of region `id` and the flag counts they feed, borrowed together, for
    /// loops over many pages (one lookup of the region for all of them).
    pub(super) fn pages_and_flags(&mut self, id: RegionId) -> (&mut PageTable, &mut FlagCounts) {
        let region = self
            .regions
            .get_mut(&id)
            .expect("a region found under the state lock stays registered");
        (&mut region.pages, &mut self.flags)
    }

    /// The record of page `page` of region `id`.
    pub(super) fn record(&self, id: RegionId, page: usize) -> PageRecord {
        self.region(id).pages.get(page)
    }

    /// The record of page `page` of region `id`, made if it has none.
    pub(super) fn record_mut(&mut self, id: RegionId, page: usize) -> &mut PageRecord {
        self.region_mut(id).pages.get_mut(page)
    }

    /// The regions of `owner`.
    pub(super) fn regions_of(&self, owner: OwnerId) -> Vec<RegionId> {
        self.regions
            .iter()
            .filter(|(_, r)| r.region.owner.id() == owner)
            .map(|(&id, _)| id)
            .collect()
    }

    /// Stores a visit's checksum and whether the page counts as volatile; a change (or a
    /// merge) ends a smart-scan streak.
    pub(super) fn record_visit(&mut self, id: RegionId, page: usize, checksum: u64, settled: bool) {
        let (records, counts) = self.pages_and_flags(id);
        let record = records.get_mut(page);
        if record.checksum() != checksum || !settled {
            record.set_misses(0);
        }
        record.set_checksum(checksum);
        let flags = (record.flags() | SEEN) & !VOLATILE | if settled { 0 } else { VOLATILE };
        counts.set_flags(record, flags);
    }

    /// One more visit in which the page was unchanged and stayed unmerged: it matched
    /// nothing, or the map budget refused its merge (smart scan).
    pub(super) fn note_miss(&mut self, id: RegionId, page: usize) {
        let record = self.record_mut(id, page);
        record.set_misses(record.misses().saturating_add(1));
    }

    /// Sets a page's flags, keeping the counts derived from them in step.
    pub(super) fn set_flags(&mut self, id: RegionId, page: usize, flags: u8) {
        let (records, counts) = self.pages_and_flags(id);
        counts.set_flags(records.get_mut(page), flags);
    }

    /// Forgets what the records of pages `pages` of region `id` say of their bytes (checksum,
    /// smart-scan streak, volatility): for pages advised never to be read.
    pub(super) fn forget_contents(&mut self, id: RegionId, pages: Range<usize>) {
        let (records, counts) = self.pages_and_flags(id);
        records.update_existing(pages, |_, record| {
            record.set_checksum(0);
            record.set_misses(0);
            let flags = record.flags() & !SEEN & !VOLATILE;
            counts.set_flags(record, flags);
        });
    }

    /// Takes the flags of a page whose record is gone out of the counts.
    pub(super) fn forget_flags(&mut self, flags: u8) {
        self.flags.forget_flags(flags);
    }

    /// Records with `VOLATILE`.
    pub(super) fn volatile_pages(&self) -> u64 {
        self.flags.volatile
    }

    /// Records with `ZERO`.
    pub(super) fn zero_pages(&self) -> u64 {
        self.flags.zero
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_packs_slot_flags_and_streak_into_one_word() {
        let mut record = PageRecord::default();
        assert!(!record.in_use());
        record.set_stable(MAX_SLOTS + 1);
        record.put_flags(SEEN | COPY);
        record.set_misses(200);
        record.set_checksum(u64::MAX);
        assert_eq!(record.stable(), MAX_SLOTS + 1);
        assert_eq!(record.flags(), SEEN | COPY);
        assert_eq!(record.misses(), MAX_MISSES);
        assert_eq!(record.checksum(), u64::MAX);
        record.unmap_stable();
        assert_eq!((record.stable(), record.flags()), (0, SEEN));
        assert_eq!(record.misses(), MAX_MISSES);
    }

    #[test]
    fn a_table_keeps_chunks_only_where_pages_have_records() {
        let mut table = PageTable::default();
        let far = (4usize << 30) / crate::PAGE_SIZE - 1;
        table.get_mut(far).set_checksum(7);
        table.get_mut(3).set_stable(5);
        assert_eq!(table.chunks.len(), 2);
        assert_eq!(table.get(far).checksum(), 7);
        assert_eq!(table.get(far - 1), PageRecord::default());
        let pages: Vec<usize> = table.all().map(|(page, _)| page).collect();
        assert_eq!(pages, [3, far]);
        assert_eq!(table.runs(2..far + 1, |r| r.in_use()), [3..4, far..far + 1]);
        assert_eq!(
            table.runs(0..usize::MAX, |r| r.stable() != 0),
            vec![3..4; 1]
        );
        table.update(30..34, |_, record| record.set_stable(1));
        assert_eq!(table.chunks.len(), 3);
        assert_eq!(table.runs(0..100, |r| r.stable() != 0), [3..4, 30..34]);
        let mut seen = Vec::new();
        table.update_existing(0..40, |page, _| seen.push(page));
        assert_eq!(seen, [3, 30, 31, 32, 33]);
        assert!(table.metadata_bytes() < 2048);
    }
}
