//! Regions: memfd-backed mappings registered for merging.
//!
//! A region is `len` bytes at `base`, mapped `MAP_SHARED` from offset 0 of its memfd. The
//! engine may replace any page of it by a `MAP_PRIVATE` mapping of a stable page, and later
//! put the region's own memfd page back; the owner sees the same bytes throughout. A region
//! may grow (wasm `memory.grow`) but never moves while registered; it shrinks only inside a
//! reset ([`crate::Engine::reset_region_to`]), under its owner's gate, when nothing is left
//! of what the owner wrote. A region changes owner only between owners
//! ([`crate::Engine::reassign_region`]), both gates' worth of quiescence held.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use memfd::Memfd;

use crate::protect::{ProtectError, Protector};
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
    /// The `userfaultfd` the region is registered with, once a window was opened on it
    /// (`crate::protect`).
    watched_by: OnceLock<Arc<Protector>>,
    /// Bytes from `base` registered with it; every remap below keeps them registered.
    watched_len: AtomicUsize,
    /// Set when a window could not write-protect pages it remapped again: a later remap in
    /// the window would rely on pages that can change meanwhile, so remaps under windows'
    /// tokens are refused until every window on the region closed.
    protection_lost: AtomicBool,
    /// Windows open on the region (at most two: a visit's and a merge partner's).
    open_windows: AtomicUsize,
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
            watched_by: OnceLock::new(),
            watched_len: AtomicUsize::new(0),
            protection_lost: AtomicBool::new(false),
            open_windows: AtomicUsize::new(0),
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
            watched_by: self.watched_by.clone(),
            watched_len: AtomicUsize::new(self.watched_len.load(Ordering::Acquire)),
            protection_lost: AtomicBool::new(self.protection_lost.load(Ordering::Acquire)),
            open_windows: AtomicUsize::new(self.open_windows.load(Ordering::Acquire)),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.len.load(Ordering::Acquire)
    }

    /// Sets the length (growth, or a reset's shrink). A region registered whole with the
    /// engine's `userfaultfd` gets what it grew by registered too, so that its new mapping
    /// can join the one before it, as it did before the registration.
    pub(crate) fn set_len(&self, len: usize) {
        let old = self.len.swap(len, Ordering::AcqRel);
        if let Some(by) = self.watched_by.get()
            && len > old
            && self.watched_len.load(Ordering::Acquire) >= old
            && by.register(self.base + old, len - old).is_ok()
        {
            self.watched_len.store(len, Ordering::Release);
        }
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
    pub(crate) fn check_owner(&self, q: Quiescent<'_>) {
        assert_eq!(
            q.owner(),
            self.owner.id(),
            "remap of region {:?} without its owner's gate",
            self.id
        );
    }

    /// Refuses a token that does not let pages `first..first + count` be remapped: another
    /// owner's, or a window's (rule 7 of [`crate::quiesce`]) that does not cover them.
    pub(crate) fn check_token(&self, q: Quiescent<'_>, first: usize, count: usize) {
        self.check_owner(q);
        if let Some((region, pages)) = q.window() {
            assert!(
                region == self.id && pages.start <= first && first + count <= pages.end,
                "remap of pages {first}..{} of region {:?} outside the window {pages:?} of \
                 region {region:?}",
                first + count,
                self.id
            );
        }
    }

    /// Refuses a remap under a window's token once the window lost its protection of pages
    /// it remapped (`protection_lost`).
    pub(crate) fn check_protected(&self, q: Quiescent<'_>) -> Result<(), crate::Error> {
        match q.running() && self.protection_lost.load(Ordering::Acquire) {
            true => Err(crate::Error::Protect {
                region: self.id,
                source: ProtectError::Lost,
            }),
            false => Ok(()),
        }
    }

    pub(crate) fn note_protection_lost(&self) {
        self.protection_lost.store(true, Ordering::Release);
    }

    /// Whether a window open on the region lost its protection of pages it remapped.
    pub(crate) fn protection_lost(&self) -> bool {
        self.protection_lost.load(Ordering::Acquire)
    }

    /// A window opens on the region.
    pub(crate) fn window_opened(&self) {
        self.open_windows.fetch_add(1, Ordering::AcqRel);
    }

    /// A window on the region closed: once none is open, no remap relies on a protection
    /// that was lost.
    pub(crate) fn window_closed(&self) {
        if self.open_windows.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.protection_lost.store(false, Ordering::Release);
        }
    }

    /// Registers the region with `protector` up to its length, unless it is already.
    pub(crate) fn watch(&self, protector: &Arc<Protector>) -> Result<(), ProtectError> {
        let len = self.len();
        let by = self.watched_by.get_or_init(|| protector.clone());
        debug_assert!(Arc::ptr_eq(by, protector), "one engine per region");
        if self.watched_len.load(Ordering::Acquire) < len {
            by.register(self.base, len)?;
            self.watched_len.store(len, Ordering::Release);
        }
        Ok(())
    }

    /// After a remap of pages `first..first + count`: registers the new mapping if the region
    /// is registered there, so that it stays registered whole (`crate::protect`), and inside
    /// a window (`protect`) write-protects it again. A failed registration leaves the new
    /// mapping unregistered (a later window registers the region whole again), which inside
    /// a window is an error: the pages could not be protected.
    pub(crate) fn rewatch(
        &self,
        first: usize,
        count: usize,
        protect: bool,
    ) -> Result<(), ProtectError> {
        let Some(by) = self.watched_by.get() else {
            return Ok(());
        };
        let (addr, len) = (self.page_addr(first), count * crate::PAGE_SIZE);
        if (first + count) * crate::PAGE_SIZE > self.watched_len.load(Ordering::Acquire) {
            return Ok(());
        }
        let registered = by.register(addr, len);
        if registered.is_err() {
            self.watched_len
                .fetch_min(first * crate::PAGE_SIZE, Ordering::AcqRel);
        }
        match protect {
            true => registered.and_then(|()| by.protect(addr, len)),
            false => Ok(()),
        }
    }

    /// After pages from `first` on became reservation again (a reset that shrinks the
    /// region): they are no longer registered.
    pub(crate) fn unwatch_from(&self, first: usize) {
        self.watched_len
            .fetch_min(first * crate::PAGE_SIZE, Ordering::AcqRel);
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
