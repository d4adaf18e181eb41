//! Beside the journey: a region whose merges left its mappings in pieces is compacted onto
//! *layout copies*.
//!
//! A merge maps a run onto stable slots with one mapping, but it cannot choose what lies
//! beside the run. An interpreter's instance writes pages scattered over its module image;
//! each written page that merges with the other instances' maps a slot of its own between
//! two stretches of image slots, and costs two mappings; each written page that stays the
//! instance's own maps its memfd there, and costs two more. Measured on the bundled Python
//! function: 15 mappings per instance before its first request, about 280 after it. The
//! process-wide `vm.max_map_count` then bounds a host to about a hundred instances, long
//! before its memory does.
//!
//! Compaction looks at a region in aligned stretches of [`STRETCH_PAGES`] pages. A stretch
//! that the records say is cut into at least three mappings, at least half of whose pages
//! share stable pages or are holes (an eighth at least sharing), and none of whose pages is
//! advised against merging, is mapped instead onto a layout copy: contiguous slots that
//! hold, page for page, the bytes of the stable pages the stretch shares and zeros for its
//! holes, with one mapping. Its other pages (pages of its memfd, private copies in a merged
//! window, shared pages its owner wrote since) become private copies of their bytes over
//! the copy's slots (`COPY`, as in a merged window), which cost what they cost before.
//!
//! Instances that went through the same requests map the same sequence of stable pages, so
//! a layout copy is found again by the hash of the stretch's sequence of contents (a page
//! of its own counts as "any"); the copy costs its pages once, and each instance one
//! mapping per stretch instead of dozens. Before a copy is reused, every one of its pages
//! is compared with the page the stretch maps now, as a merge compares.
//!
//! A copy holds pages that are also the image's (or another run's): pages for mappings.
//! So compaction starts only once the engine's mappings pass a quarter of its budget
//! ([`super::budget`]), and looks at a region again only when its mappings changed since
//! ([`crate::region::Region::layout`]).
//!
//! Soundness is a merge's: the owner's gate is held (`q`); a page shares the copy only if
//! the page map says the owner has not written its stable page (no private copy), and every
//! other page's bytes are read out of the region before the remap and written back as a
//! private copy right after it, so every byte the owner sees stays. A page of its memfd is
//! taken only if present: a hole would become a private page of zeros.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

use xxhash_rust::xxh3::Xxh3;

use crate::layout::{boundary, runs_of};
use crate::pagemap::PageBacking;
use crate::quiesce::Quiescent;
use crate::region::{Region, RegionId};
use crate::stable::{ContentKey, Slot, StableStore};
use crate::{Error, PAGE_SIZE, remap};

use super::MergeState;
use super::records::COPY;
use super::scan::zero_page_hash;

/// Pages in a stretch: a layout copy costs up to this many pages once, and saves each
/// region that maps it all but one of the stretch's mappings. Measured on the Python
/// function's instances (60 of them): stretches of 32 pages leave 82 mappings per instance,
/// of 64 pages 46, of 128 pages 26, of 256 pages 39 (longer stretches more often hold a
/// page that is neither shared nor present).
pub(super) const STRETCH_PAGES: usize = 128;

/// A stretch is compacted only if the records cut it into at least this many mappings: a
/// stretch of two already costs one boundary, which compacting would move, not remove.
const MIN_PIECES: i64 = 3;

/// A stretch is compacted only if at least this fraction (one in this many) of its pages
/// share stable pages; its holes count with them towards half, as pages of zeros in the
/// copy. Measured on the JavaScript component: its instances' stretches were mostly holes
/// (its image's zero pages) around a few dozen image pages, and left as they were they kept
/// about 48 mappings an instance, enough to fill the map budget at 484 instances.
const MIN_SHARED_DIVISOR: usize = 8;

/// The layout copies made so far, by the hash of their sequence of contents.
#[derive(Default)]
pub(super) struct LayoutCopies {
    /// Hash of a stretch's contents (see [`stretch_hash`]) -> the copies made for it; more
    /// than one when a copy's pages reached `max_page_sharing`.
    by_hash: HashMap<u64, Vec<LayoutCopy>>,
    /// Stable pages the copies pin ([`LayoutCopy::hold`]): what compaction costs.
    pub(super) pinned: u64,
}

/// A layout copy: contiguous slots, one per page of a stretch.
struct LayoutCopy {
    /// Its first slot.
    first: Slot,
    /// Per page, the content key of the stable page it holds, or `None` where the stretch
    /// it was made for had a page of its own (the slot holds no content of its own then, a
    /// place for private copies).
    keys: Box<[Option<ContentKey>]>,
}

impl LayoutCopy {
    /// Whether the copy still holds, for every page with a key in `keys`, the bytes of
    /// `sources` there (each with room for one more sharer), and a slot in use (which a
    /// private copy may lie over) wherever `keys` has none.
    fn fits(
        &self,
        stable: &StableStore,
        keys: &[Option<ContentKey>],
        sources: &[Option<Slot>],
    ) -> bool {
        self.keys.len() == keys.len()
            && keys.iter().enumerate().all(|(n, key)| {
                let slot = self.first + n as Slot;
                match key {
                    None => stable.node(slot).is_some(),
                    Some(key) => {
                        stable.node(slot).is_some_and(|node| node.key == *key)
                            && stable.has_room_at(slot)
                            && stable.page(slot) == source_bytes(stable, sources[n])
                    }
                }
            })
    }

    /// Whether any region page maps the copy still (beyond the copy's own hold on its
    /// slots, see [`LayoutCopy::hold`]).
    fn in_use(&self, stable: &StableStore) -> bool {
        self.keys.iter().enumerate().any(|(n, key)| {
            stable
                .node(self.first + n as Slot)
                .is_some_and(|node| node.sharers > 0 || node.copies > u32::from(key.is_none()))
        })
    }

    /// Keeps the copy's slots for regions still to come, as an image keeps its pages: its
    /// stable pages pinned, and a private copy counted over each of its other slots, so that
    /// none goes when the last region that maps it leaves, writes or unbridges it.
    fn hold(&self, stable: &mut StableStore) {
        for (n, key) in self.keys.iter().enumerate() {
            let slot = self.first + n as Slot;
            match key {
                Some(_) => stable.pin(slot),
                None => stable.add_copy(slot),
            }
        }
    }

    /// Lets go of what [`LayoutCopy::hold`] kept: the slots go now if no region maps them.
    fn release(&self, stable: &mut StableStore) -> Result<(), Error> {
        let mut result = Ok(());
        for (n, key) in self.keys.iter().enumerate() {
            let slot = self.first + n as Slot;
            match key {
                Some(_) => result = stable.unpin(slot).and(result),
                None => stable.drop_copy(slot),
            }
        }
        result
    }
}

/// The hash a stretch's layout copy is found by: its pages' content keys in order.
fn stretch_hash(keys: &[Option<ContentKey>]) -> u64 {
    let mut hasher = Xxh3::new();
    for key in keys {
        match key {
            Some((domain, hash)) => {
                hasher.update(&[1]);
                hasher.update(&domain.to_le_bytes());
                hasher.update(&hash.to_le_bytes());
            }
            None => hasher.update(&[0]),
        }
    }
    hasher.digest()
}

/// What a stretch maps now, when it may be compacted.
struct Stretch {
    /// Per page, the content key of the stable page it shares; `None` for a page whose bytes
    /// are its own (a page of its memfd, a private copy in a window, a shared page its owner
    /// wrote since).
    keys: Vec<Option<ContentKey>>,
    /// Per page, the slot it maps (shared, or under a private copy: `true`), if any.
    slots: Vec<Option<(Slot, bool)>>,
}

impl Stretch {
    /// Where each page's bytes are, where it has a key: the slot it shares, or `None` for a
    /// hole of its memfd, which reads zeros.
    fn sources(&self) -> Vec<Option<Slot>> {
        self.slots
            .iter()
            .map(|slot| match slot {
                Some((slot, false)) => Some(*slot),
                _ => None,
            })
            .collect()
    }
}

/// The bytes a page of a stretch has where it has a key: those of the slot it shares, or
/// zeros for a hole.
fn source_bytes(stable: &StableStore, source: Option<Slot>) -> &[u8] {
    const ZEROS: &[u8] = &[0; PAGE_SIZE];
    source.map_or(ZEROS, |slot| stable.page(slot))
}

impl MergeState {
    /// Compacts region `id`, whose gate `q` proves held, if the engine's mappings are
    /// crowding its budget and the region's changed since it was last compacted.
    pub(super) fn compact_region(&mut self, q: Quiescent<'_>, id: RegionId) -> Result<(), Error> {
        if !self.budget.crowded(&self.knobs) {
            return Ok(());
        }
        let record = self.records.region(id);
        let region = record.region.clone();
        if record.compacted_at == Some(region.layout()) {
            return Ok(());
        }
        let pages = self.cover_length(id)?;
        let stretches = pages / STRETCH_PAGES;
        for stretch in 0..stretches {
            let range = stretch * STRETCH_PAGES..(stretch + 1) * STRETCH_PAGES;
            if let Some(found) = self.stretch_to_compact(id, &region, range.clone())? {
                self.compact_stretch(q, id, &region, range, found)?;
            }
        }
        self.records.region_mut(id).compacted_at = Some(region.layout());
        Ok(())
    }

    /// What pages `range` of region `id` map, if compacting them would save mappings: they
    /// are in at least [`MIN_PIECES`] pieces, none is advised against merging, at least half
    /// of them share stable pages their owner has not written or are holes, and at least
    /// one in [`MIN_SHARED_DIVISOR`] shares.
    fn stretch_to_compact(
        &mut self,
        id: RegionId,
        region: &Region,
        range: Range<usize>,
    ) -> Result<Option<Stretch>, Error> {
        let records = &self.records.region(id).pages;
        let pieces: i64 = 1
            + (range.start + 1..range.end)
                .map(|p| boundary(records.get(p - 1).stable(), records.get(p).stable()))
                .sum::<i64>();
        if pieces < MIN_PIECES {
            return Ok(None);
        }
        if (range.clone()).any(|page| !self.may_merge(id, page)) {
            return Ok(None);
        }
        let backing: Vec<PageBacking> = self
            .pagemap
            .read(region.page_addr(range.start), range.len())
            .map_err(|source| Error::PagemapRead { region: id, source })?
            .collect();
        let data = crate::memfds::data_extents(&region.memfd, range.clone())
            .map_err(|source| Error::DataExtents { region: id, source })?;
        let domain = region.owner.domain();
        let mut keys = Vec::with_capacity(range.len());
        let mut slots = Vec::with_capacity(range.len());
        for (page, backing) in range.zip(backing) {
            let record = records.get(page);
            let slot = record.slot().map(|slot| (slot, record.has(COPY)));
            let key = match slot {
                // A hole of its memfd (a zero page of the image, say) reads zeros: it shares
                // a page of zeros in the copy, rather than becoming a private page of them.
                None if backing == PageBacking::Untouched
                    && !data.iter().any(|extent| extent.contains(&page)) =>
                {
                    Some((domain, zero_page_hash()))
                }
                // Shared and not written since: the stable page holds its bytes.
                Some((slot, false)) if backing != PageBacking::Private => {
                    match self.stable.node(slot).filter(|node| node.content) {
                        Some(node) => Some(node.key),
                        None => return Ok(None),
                    }
                }
                _ => None,
            };
            keys.push(key);
            slots.push(slot);
        }
        // Mostly bytes of its own (the copy would save little memory beside mappings), or
        // hardly any stable page among holes (a copy of zeros for a few pages).
        let shared = slots
            .iter()
            .zip(&keys)
            .filter(|(slot, key)| matches!((slot, key), (Some((_, false)), Some(_))))
            .count();
        let keyed = keys.iter().filter(|key| key.is_some()).count();
        if keyed * 2 < keys.len() || shared * MIN_SHARED_DIVISOR < keys.len() {
            return Ok(None);
        }
        Ok(Some(Stretch { keys, slots }))
    }

    /// Maps pages `range` of region `id` onto a layout copy of what they map now
    /// (`stretch`): one found for the same contents, or a new one.
    fn compact_stretch(
        &mut self,
        q: Quiescent<'_>,
        id: RegionId,
        region: &Arc<Region>,
        range: Range<usize>,
        stretch: Stretch,
    ) -> Result<(), Error> {
        let sources = stretch.sources();
        let Stretch { keys, slots } = stretch;
        let len = range.len();
        let hash = stretch_hash(&keys);
        let found = self
            .layout_copies
            .by_hash
            .get(&hash)
            .and_then(|copies| {
                copies
                    .iter()
                    .find(|copy| copy.fits(&self.stable, &keys, &sources))
            })
            .map(|copy| copy.first);
        let first = match found {
            Some(first) => first,
            None => {
                // Fresh numbers stand for the slots not chosen yet, as for a new merge.
                let fresh = u32::MAX - len as u32;
                let delta = self.records.region(id).mapping_delta(range.clone(), fresh);
                if delta >= 0 {
                    return Ok(());
                }
                let mut bytes = vec![0; len * PAGE_SIZE];
                for (n, key) in keys.iter().enumerate() {
                    if key.is_some() {
                        bytes[n * PAGE_SIZE..(n + 1) * PAGE_SIZE]
                            .copy_from_slice(source_bytes(&self.stable, sources[n]));
                    }
                }
                let Some(first) = self.stable.publish(&bytes, &keys)? else {
                    return Ok(());
                };
                first
            }
        };
        let delta = self
            .records
            .region(id)
            .mapping_delta(range.clone(), first + 1);
        if delta >= 0 {
            if found.is_none() {
                self.stable.unpublish(first, len as Slot)?;
            }
            return Ok(());
        }
        let shares: Vec<bool> = keys.iter().map(Option::is_some).collect();
        // The bytes of the pages that are the region's own (in its memfd, or private copies
        // the remap discards), read before the remap; they come back as private copies
        // right after it.
        let own: Vec<(Range<usize>, Vec<u8>)> = runs_of(&shares, |&share| !share)
            .map(|run| {
                let pages = range.start + run.start..range.start + run.end;
                // SAFETY: the gate is held (`q`); the stretch lies below the length read
                // under it.
                (run, unsafe { region.pages(pages) }.to_vec())
            })
            .collect();
        let mapped = remap::map_stable(q, region, range.start, len, self.stable.fd(), first.into());
        if let Err(error) = mapped {
            if found.is_none() {
                self.stable.unpublish(first, len as Slot)?;
            }
            return Err(error);
        }
        for (run, bytes) in &own {
            remap::write_private(q, region, range.start + run.start, bytes);
        }
        // From here on the stretch maps the copy; a failed punch only leaves memory unfreed.
        if shares.contains(&false) && self.stable.punch_empty(first, len as Slot).is_err() {
            self.counters.punch_failures += 1;
        }
        self.add_mappings(id, delta);
        // The new sharers first, then the old ones leave: a slot both maps never goes free.
        self.note_window(id, range.start, &shares, first);
        for &(slot, copy) in slots.iter().flatten() {
            self.leave_slot(slot, copy)?;
        }
        self.reconcile_edges(id, range.clone());
        // Pages that were the memfd's are private copies now: the memfd's pages go.
        for run in runs_of(&slots, Option::is_none) {
            if crate::memfds::punch_region(q, region, range.start + run.start, run.len()).is_err() {
                self.counters.punch_failures += 1;
            }
        }
        self.counters.stretches_compacted += 1;
        if found.is_none() {
            let copy = LayoutCopy {
                first,
                keys: keys.into_boxed_slice(),
            };
            copy.hold(&mut self.stable);
            self.layout_copies.pinned += copy.keys.iter().flatten().count() as u64;
            self.layout_copies
                .by_hash
                .entry(hash)
                .or_default()
                .push(copy);
        }
        Ok(())
    }

    /// The slots over which layout copies count a private copy of their own (see
    /// [`LayoutCopy::hold`]), for the audit.
    pub(super) fn layout_copy_holds(&self) -> impl Iterator<Item = Slot> + '_ {
        self.layout_copies
            .by_hash
            .values()
            .flatten()
            .flat_map(|copy| {
                copy.keys
                    .iter()
                    .enumerate()
                    .filter(|(_, key)| key.is_none())
                    .map(|(n, _)| copy.first + n as Slot)
            })
    }

    /// Lets go of the layout copies no region maps any more (as KSM prunes stale dups): the
    /// same stretch made again gets a new copy.
    pub(super) fn forget_unused_layout_copies(&mut self) -> Result<(), Error> {
        let mut unused = Vec::new();
        let stable = &self.stable;
        self.layout_copies.by_hash.retain(|_, copies| {
            let (kept, gone): (Vec<_>, Vec<_>) = std::mem::take(copies)
                .into_iter()
                .partition(|copy| copy.in_use(stable));
            *copies = kept;
            unused.extend(gone);
            !copies.is_empty()
        });
        let mut result = Ok(());
        for copy in unused {
            self.layout_copies.pinned -= copy.keys.iter().flatten().count() as u64;
            result = copy.release(&mut self.stable).and(result);
        }
        result
    }
}
