//! Module images in the stable store, and resetting a region to one (see [`crate::image`]).
//!
//! An image is a list of *segments*: runs of its non-zero pages, each held by contiguous
//! stable slots that the image pins. Zero pages need nothing: a fresh memfd reads zeros;
//! but a short run of them between two non-zero pages is taken into the segment, so that
//! it does not cost every instance two mappings ([`MAX_ZERO_BRIDGE`]). A
//! segment whose bytes are already stable in the image's domain (another module's image, or
//! pages the scanner merged) reuses those slots, so images of two modules share the pages
//! where they agree; other stretches are published anew and indexed, so the scanner merges
//! later pages onto them like onto any stable page.
//!
//! Mapping an image into a region maps each segment onto its slots with one `mmap`, and the
//! region's records say those pages share their slots: from then on they are ordinary
//! sharers (copy-on-write on write, sharer-left recovery). A segment whose slots hold
//! `max_page_sharing` sharers gets a *copy*: the same bytes in fresh slots, which the stable
//! index chains as dups, pinned by the image too. When the map-count budget cannot pay for a
//! segment's mapping, its bytes are written into the region's memfd instead.
//!
//! Resetting a region to its image (a memory kept for the next instance) comes in two
//! kinds. If nothing changed the region's mappings since its image was mapped whole (no
//! merge, no page given back, no growth: [`Pristine`]), the reset only drops what the owner
//! wrote, with one `madvise(MADV_DONTNEED)` over the region (its private copies of image
//! pages) and a punch of its memfd's written extents, as wasmtime resets a pooled slot.
//! Otherwise every page leaves its stable slot, the region's own memfd is mapped over it
//! whole, the written extents are punched, and the image is mapped again.

use std::collections::HashMap;
use std::os::unix::fs::FileExt;

use xxhash_rust::xxh3::xxh3_64;

use crate::quiesce::{DomainId, Quiescent};
use crate::region::{Region, RegionId};
use crate::stable::{ContentKey, Slot};
use crate::{Error, PAGE_SIZE, remap};

use super::MergeState;
use super::records::{PageRecord, Pristine, SEEN};

/// The module images the state holds.
#[derive(Default)]
pub(super) struct Images {
    /// The images, by number.
    by_number: HashMap<u64, ImageRecord>,
    /// The number the next image gets. Numbers are never reused, so that the number of an
    /// image dropped meanwhile names no other.
    next: u64,
}

impl Images {
    /// Takes `record` in; returns its number.
    fn add(&mut self, record: ImageRecord) -> u64 {
        let id = self.next;
        self.next += 1;
        self.by_number.insert(id, record);
        id
    }
}

/// An image the state holds: its runs of non-zero pages.
struct ImageRecord {
    /// In page order; the pages between them are zeros, which need no slot.
    segments: Vec<ImageSegment>,
}

/// A run of an image's non-zero pages.
struct ImageSegment {
    /// First page of the run in the image.
    page: usize,
    /// Pages in the run.
    len: usize,
    /// The first slot of each copy of the run's bytes, all pinned by the image; the first
    /// copy with room for one more sharer on every page is the one mapped.
    copies: Vec<Slot>,
    /// The first slot of the copy made with the image, which stays while the image does.
    original: Slot,
}

fn is_zero(page: &[u8]) -> bool {
    page == [0; PAGE_SIZE]
}

/// Zero runs an image's segment takes in (with a stable page of zeros for each) rather than
/// end on: runs of at most this many zero pages between two non-zero ones. Each such run
/// left out would split every instance's mapping of the image in two, with a piece of its
/// memfd between (two mappings an instance, and a page of zeros allocated in its memfd if
/// read); taken in, it costs its pages once.
const MAX_ZERO_BRIDGE: usize = 16;

/// Which of an image's zero pages (`zero`) its segments take in: those of runs no longer
/// than [`MAX_ZERO_BRIDGE`] with non-zero pages on both sides.
fn bridged_zeros(zero: &[bool]) -> Vec<bool> {
    let mut bridged = vec![false; zero.len()];
    for run in crate::layout::runs_of(zero, |&zero| zero) {
        let inside = run.start > 0 && run.end < zero.len();
        if inside && run.len() <= MAX_ZERO_BRIDGE {
            bridged[run].fill(true);
        }
    }
    bridged
}

impl MergeState {
    /// Builds an image of `bytes` (whole pages) for regions of `domain`; returns its number.
    pub(crate) fn publish_image(&mut self, domain: DomainId, bytes: &[u8]) -> Result<u64, Error> {
        if !bytes.len().is_multiple_of(PAGE_SIZE) {
            return Err(Error::ImageUnaligned(bytes.len()));
        }
        let pages = bytes.len() / PAGE_SIZE;
        // New stable pages, which idle regions' pages may match.
        self.counters.host_awake = true;
        let page_bytes = |p: usize| &bytes[p * PAGE_SIZE..(p + 1) * PAGE_SIZE];
        // Each page hashed once; `None` for zero pages that need no slot.
        let zero: Vec<bool> = (0..pages).map(|p| is_zero(page_bytes(p))).collect();
        let bridged = bridged_zeros(&zero);
        let hashes: Vec<Option<u64>> = (0..pages)
            .map(|p| (!zero[p] || bridged[p]).then(|| xxh3_64(page_bytes(p))))
            .collect();
        let key = |p: usize| -> ContentKey { (domain, hashes[p].expect("a non-zero page")) };
        let mut segments = Vec::new();
        let mut page = 0;
        let built = (|| {
            while page < pages {
                if hashes[page].is_none() {
                    page += 1;
                    continue;
                }
                let (len, first) =
                    if let Some(slot) = self.stable.lookup(key(page), page_bytes(page)) {
                        // Already stable: take the slots for as long as the bytes go on agreeing.
                        let mut len = 1;
                        while page + len < pages {
                            let next = slot + len as Slot;
                            let agrees = hashes[page + len].is_some()
                                && self
                                    .stable
                                    .node(next)
                                    .is_some_and(|node| node.key.0 == domain)
                                && self.stable.has_room_at(next)
                                && self.stable.page(next) == page_bytes(page + len);
                            if !agrees {
                                break;
                            }
                            len += 1;
                        }
                        (len, slot)
                    } else {
                        let mut len = 1;
                        while page + len < pages
                            && hashes[page + len].is_some()
                            && self
                                .stable
                                .lookup(key(page + len), page_bytes(page + len))
                                .is_none()
                        {
                            len += 1;
                        }
                        let keys: Vec<Option<ContentKey>> =
                            (page..page + len).map(|p| Some(key(p))).collect();
                        let run = &bytes[page * PAGE_SIZE..(page + len) * PAGE_SIZE];
                        let slot = self
                            .stable
                            .publish(run, &keys)?
                            .ok_or(Error::StableFull { pages: len })?;
                        (len, slot)
                    };
                for n in 0..len {
                    self.stable.pin(first + n as Slot);
                }
                segments.push(ImageSegment {
                    page,
                    len,
                    copies: vec![first],
                    original: first,
                });
                page += len;
            }
            Ok(())
        })();
        let record = ImageRecord { segments };
        if let Err(error) = built {
            // Unpin what was pinned: nothing maps it yet.
            self.release_image(record)?;
            return Err(error);
        }
        Ok(self.images.add(record))
    }

    /// The bytes of image `image`, `len` of them, read back from its stable pages.
    pub(crate) fn read_image(&self, image: u64, len: usize) -> Vec<u8> {
        let mut bytes = vec![0; len];
        if let Some(record) = self.images.by_number.get(&image) {
            for segment in &record.segments {
                for n in 0..segment.len {
                    let at = (segment.page + n) * PAGE_SIZE;
                    bytes[at..at + PAGE_SIZE]
                        .copy_from_slice(self.stable.page(segment.original + n as Slot));
                }
            }
        }
        bytes
    }

    /// Forgets image `image`: its pages go once no region page shares them.
    pub(crate) fn drop_image(&mut self, image: u64) -> Result<(), Error> {
        // The image's pages stop being pinned: stable pages may go, or have room.
        self.counters.host_awake = true;
        match self.images.by_number.remove(&image) {
            Some(record) => self.release_image(record),
            None => Ok(()),
        }
    }

    fn release_image(&mut self, record: ImageRecord) -> Result<(), Error> {
        let mut result = Ok(());
        for segment in &record.segments {
            for &first in &segment.copies {
                result = self
                    .stable
                    .unpin_run(first, segment.len as Slot)
                    .and(result);
            }
        }
        result
    }

    /// Maps image `image` into region `id` from its first page, whose pages map the region's
    /// own memfd and hold zeros there (a fresh region, or one just reset); `q` proves its
    /// gate held, or that it is being registered. Then the region is [`Pristine`] if every
    /// run was mapped.
    pub(crate) fn map_image(
        &mut self,
        q: Quiescent<'_>,
        id: RegionId,
        image: u64,
    ) -> Result<(), Error> {
        self.records.region_mut(id).pristine = None;
        // The records' length first: a segment's boundary at the region's end would go
        // uncounted past a length not yet read.
        self.cover_length(id)?;
        let mut whole = true;
        let segments = self.images.by_number[&image].segments.len();
        for index in 0..segments {
            let (page, len) = {
                let segment = &self.images.by_number[&image].segments[index];
                (segment.page, segment.len)
            };
            let first = self.copy_with_room(image, index)?;
            let region = self.records.region(id);
            let delta = region.mapping_delta(page..page + len, first + 1);
            let region = region.region.clone();
            if !self.budget_allows(delta, len) {
                // No mappings to spare: the region gets the bytes in its own memfd instead.
                whole = false;
                for n in 0..len {
                    crate::faults::check(crate::faults::Syscall::Pwrite)
                        .map_err(std::io::Error::from)
                        .and_then(|()| {
                            region.memfd.as_file().write_all_at(
                                self.stable.page(first + n as Slot),
                                ((page + n) * PAGE_SIZE) as u64,
                            )
                        })
                        .map_err(|source| Error::ImageWrite { region: id, source })?;
                }
                continue;
            }
            remap::map_stable(q, &region, page, len, self.stable.fd(), u64::from(first))?;
            self.add_mappings(id, delta);
            self.note_window(id, page, &vec![true; len], first);
            self.reconcile_edges(id, page..page + len);
        }
        if whole {
            self.note_pristine(id, Some(image));
        }
        Ok(())
    }

    /// Takes note that region `id`'s mappings are, as of now, what mapping `image` (or
    /// none) whole left.
    pub(crate) fn note_pristine(&mut self, id: RegionId, image: Option<u64>) {
        let record = self.records.region_mut(id);
        record.pristine = Some(Pristine {
            layout: record.region.layout(),
            image,
        });
    }

    /// The first copy of segment `index` of `image` with room for a sharer on every page;
    /// made when there is none.
    fn copy_with_room(&mut self, image: u64, index: usize) -> Result<Slot, Error> {
        let segment = &self.images.by_number[&image].segments[index];
        let len = segment.len as Slot;
        if let Some(&first) = segment
            .copies
            .iter()
            .find(|&&first| (first..first + len).all(|slot| self.stable.has_room_at(slot)))
        {
            return Ok(first);
        }
        let original = segment.original;
        let mut bytes = Vec::with_capacity(segment.len * PAGE_SIZE);
        let mut keys = Vec::with_capacity(segment.len);
        for slot in original..original + len {
            bytes.extend_from_slice(self.stable.page(slot));
            keys.push(self.stable.node(slot).map(|node| node.key));
        }
        let first = self
            .stable
            .publish(&bytes, &keys)?
            .ok_or(Error::StableFull { pages: segment.len })?;
        for slot in first..first + len {
            self.stable.pin(slot);
        }
        self.images
            .by_number
            .get_mut(&image)
            .expect("looked up above")
            .segments[index]
            .copies
            .push(first);
        Ok(first)
    }

    /// Lets go of the copies of image runs, beyond each run's first, that no region page
    /// shares any more (as KSM prunes stale dups): they were made for sharers that have
    /// left, and the next instantiation that needs one makes it again.
    pub(super) fn prune_image_copies(&mut self) -> Result<(), Error> {
        let mut idle: Vec<(Slot, usize)> = Vec::new();
        for record in self.images.by_number.values_mut() {
            for segment in &mut record.segments {
                let len = segment.len as Slot;
                let stable = &self.stable;
                segment.copies.retain(|&first| {
                    let original = first == segment.original;
                    let unused = (first..first + len).all(|slot| stable.unshared(slot));
                    if unused && !original {
                        idle.push((first, segment.len));
                    }
                    original || !unused
                });
            }
        }
        let mut result = Ok(());
        for (first, len) in idle {
            result = self.stable.unpin_run(first, len as Slot).and(result);
        }
        result
    }

    /// Puts region `id` back as it was when made with `image` (or empty without one), in time
    /// proportional to what changed: every page leaves its stable slot, one mapping of the
    /// region's memfd replaces whatever lay over it (private copies with it), the memfd's
    /// pages with data are punched, and the image is mapped again. With `shrink_to` (bytes,
    /// page-aligned, no longer than the region), pages past it become reserved address space
    /// again and the region that length: the region as it was registered, if it grew since.
    pub(crate) fn reset_region(
        &mut self,
        q: Quiescent<'_>,
        id: RegionId,
        image: Option<u64>,
        shrink_to: Option<usize>,
    ) -> Result<(), Error> {
        let pages = self.cover_length(id)?;
        let keep = shrink_to.map_or(pages, |len| (len / PAGE_SIZE).min(pages));
        let record = self.records.region(id);
        let unmoved = Pristine {
            layout: record.region.layout(),
            image,
        };
        if keep == pages && record.pristine == Some(unmoved) {
            return self.reset_in_place(q, id, pages);
        }
        let record = self.records.region_mut(id);
        let records = std::mem::take(&mut record.pages);
        let vmas = std::mem::take(&mut record.vmas);
        record.kernel_splits.clear();
        let region = record.region.clone();
        record.quiet_at = None;
        record.visit.1 = false;
        self.budget.remove(vmas);
        let result = self.forget_records(&records);
        if keep < pages {
            // The pages past the new end were the owner's own memfd or merged pages, whose
            // records are gone: no sharer is left there, so dropping the mappings loses
            // nothing anyone tracks (their memfd pages are punched below).
            remap::reserve(q, &region, keep, pages - keep)?;
            region.set_len(keep * PAGE_SIZE);
            self.records.region_mut(id).len = keep;
        }
        remap::map_own(q, &region, 0, keep)?;
        punch_written(q, &region, pages)?;
        match image {
            Some(image) => result.and(self.map_image(q, id, image)),
            None => {
                self.note_pristine(id, None);
                result
            }
        }
    }

    /// [`MergeState::reset_region`] of a region whose mappings are as its image left them
    /// ([`Pristine`]) and whose length did not change: what the owner wrote is dropped
    /// (private copies of image pages, and its own memfd's pages), and nothing is remapped.
    /// The image's pages stay mapped and shared; the records of every other page go, and
    /// those of the image's pages read as just mapped.
    fn reset_in_place(
        &mut self,
        q: Quiescent<'_>,
        id: RegionId,
        pages: usize,
    ) -> Result<(), Error> {
        let region = self.records.region(id).region.clone();
        remap::drop_private_copies(q, &region, 0, pages)?;
        punch_written(q, &region, pages)?;
        let record = self.records.region_mut(id);
        record.quiet_at = None;
        record.visit.1 = false;
        let stable = &self.stable;
        let (records, counts) = self.records.pages_and_flags(id);
        records.update_existing(0..pages, |_, record| match record.slot() {
            Some(slot) => {
                debug_assert!(record.shares(), "a pristine region holds no private copy");
                record.set_checksum(stable.node(slot).map_or(0, |node| node.key.1));
                record.set_misses(0);
                counts.set_flags(record, SEEN);
            }
            None => {
                counts.set_flags(record, 0);
                *record = PageRecord::default();
            }
        });
        self.counters.regions_reset_in_place += 1;
        Ok(())
    }
}

/// Punches what the owner wrote into the region's memfd among pages `0..pages`.
fn punch_written(q: Quiescent<'_>, region: &Region, pages: usize) -> Result<(), Error> {
    let written = crate::memfds::data_extents(&region.memfd, 0..pages).map_err(|source| {
        Error::DataExtents {
            region: region.id,
            source,
        }
    })?;
    for run in written {
        crate::memfds::punch_region(q, region, run.start, run.len()).map_err(|source| {
            Error::Punch {
                region: region.id,
                source,
            }
        })?;
    }
    Ok(())
}
