//! Regions: memfd-backed mappings registered for merging.
//!
//! A region is `len` bytes at `base`, mapped `MAP_SHARED` from offset 0 of its memfd. The
//! engine may replace any page of it by a `MAP_PRIVATE` mapping of a stable page, and later
//! put the region's own memfd page back; the owner sees the same bytes throughout. A region
//! may grow (wasm `memory.grow`) but never moves while registered; it shrinks only inside a
//! reset ([`crate::Engine::reset_region_to`]), under its owner's gate, when nothing is left
//! of what the owner wrote. A region changes owner only between owners
//! ([`crate::Engine::reassign_region`]), both gates' worth of quiescence held.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use memfd::Memfd;

use crate::quiesce::{Owner, Quiescent};

/// Identifies a region for as long as the process runs (ids are never reused).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RegionId(pub(crate) u64);

static NEXT_REGION: AtomicU64 = AtomicU64::new(1);

/// A registered region as the engine sees it. Shared by the engine and the owner's
/// [`crate::RegionHandle`].
pub(crate) struct Region {
    pub(crate) id: RegionId,
    /// Whose gate must be held to remap this region (see [`crate::quiesce`]).
    pub(crate) owner: Owner,
    /// The region's own backing file: every page not merged lives here.
    pub(crate) memfd: Arc<Memfd>,
    /// Start of the mapping; fixed for the region's life.
    pub(crate) base: usize,
    /// Accessible bytes, a multiple of the page size. Changed only by the owner under its
    /// gate, so a reader holding the gate sees a length that stays put.
    len: AtomicUsize,
    /// How many times the engine changed what backs the region's pages (every call in
    /// [`crate::remap`] that maps, reserves or fills private copies counts one): equal
    /// counts mean the same mappings, which lets a reset skip remapping what did not move.
    layout: AtomicU64,
}

impl Region {
    pub(crate) fn new(owner: Owner, memfd: Arc<Memfd>, base: usize, len: usize) -> Self {
        Self {
            id: RegionId(NEXT_REGION.fetch_add(1, Ordering::Relaxed)),
            owner,
            memfd,
            base,
            len: AtomicUsize::new(len),
            layout: AtomicU64::new(0),
        }
    }

    /// The same region (id, memfd, base, length) under another owner: what the records and
    /// the handle hold once [`crate::Engine::reassign_region`] handed the region over.
    pub(crate) fn with_owner(&self, owner: Owner) -> Self {
        Self {
            id: self.id,
            owner,
            memfd: self.memfd.clone(),
            base: self.base,
            len: AtomicUsize::new(self.len()),
            layout: AtomicU64::new(self.layout()),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.len.load(Ordering::Acquire)
    }

    pub(crate) fn set_len(&self, len: usize) {
        self.len.store(len, Ordering::Release);
    }

    /// The count of the engine's changes to what backs the region's pages so far.
    pub(crate) fn layout(&self) -> u64 {
        self.layout.load(Ordering::Acquire)
    }

    /// Counts a change to what backs the region's pages; only [`crate::remap`] makes them.
    pub(crate) fn note_layout_change(&self) {
        self.layout.fetch_add(1, Ordering::AcqRel);
    }

    /// Refuses a token of another owner: it would let the engine remap memory that someone
    /// may be writing. Engine code never builds one; this catches it if it ever does.
    pub(crate) fn check_token(&self, q: Quiescent<'_>) {
        assert_eq!(
            q.owner(),
            self.owner.id(),
            "remap of region {:?} without its owner's gate",
            self.id
        );
    }

    /// Address of page `index`.
    pub(crate) fn page_addr(&self, index: usize) -> usize {
        self.base + index * crate::PAGE_SIZE
    }

    /// The bytes of page `index`.
    ///
    /// # Safety
    /// The caller holds the owner's gate (so nobody writes the page) and `index` is below
    /// `len() / PAGE_SIZE`.
    pub(crate) unsafe fn page(&self, index: usize) -> &[u8] {
        // SAFETY: the page lies inside the registered, accessible mapping (caller's bound),
        // and the gate held by the caller keeps writers out while the slice lives.
        unsafe { std::slice::from_raw_parts(self.page_addr(index) as *const u8, crate::PAGE_SIZE) }
    }

    /// The bytes of pages `range`; same contract as [`Region::page`].
    pub(crate) unsafe fn pages(&self, range: std::ops::Range<usize>) -> &[u8] {
        // SAFETY: as for `page`, over a range the caller bounds by `len()`.
        unsafe {
            std::slice::from_raw_parts(
                self.page_addr(range.start) as *const u8,
                range.len() * crate::PAGE_SIZE,
            )
        }
    }
}
