//! The engine's public face: creating an engine, registering regions, merging and unmerging
//! on an owner's behalf, settings and figures. The merge state behind it lives in `state/`,
//! the background scanner that drives it in `scanner.rs`, and what the engine's handles and
//! that thread share in `shared.rs`.

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use memfd::Memfd;
use parking_lot::{Condvar, Mutex};

use crate::advice::{Advice, MergeScope};
use crate::image::MemoryImage;
use crate::pagemap::Pagemap;
use crate::protect::{Protector, RunningMergesOff};
use crate::quiesce::{DomainId, Owner, OwnerGuard, OwnerId, Quiescent};
use crate::region::{Region, RegionId};
use crate::scanner::ScannerThread;
use crate::shared::Shared;
use crate::stable::StableStore;
use crate::state::{Audit, MergeState, Visit};
use crate::{Error, Knobs, OwnerStats, PAGE_SIZE, Stats};

/// How an engine starts.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Start the background scanner thread. Without it, passes run only when asked
    /// ([`Engine::scan_pass`]); tests use that for exact, repeatable steps.
    pub scanner: bool,
    /// Run the scanner at the lowest priority (nice 19), so that on a busy host it takes
    /// only the CPU the instances leave: what a host serving requests wants. Off by default,
    /// for runs that wait for merging to finish.
    pub scanner_yields: bool,
    /// Initial settings.
    pub knobs: Knobs,
    /// Address space reserved for the stable store's view; bounds the stable pages.
    pub stable_capacity_bytes: usize,
    /// Which pages may merge without advice ([`crate::advice`]).
    pub merge_scope: MergeScope,
    /// The process's map-count limit the budget is a share of: `vm.max_map_count` when
    /// `None`. A lower figure keeps the engine (and its margin for the rest of the process)
    /// within less, as if the sysctl were lower; a higher one is not taken.
    pub max_map_count: Option<u64>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            scanner: true,
            scanner_yields: false,
            knobs: Knobs::default(),
            stable_capacity_bytes: 64 << 30,
            merge_scope: MergeScope::All,
            max_map_count: None,
        }
    }
}

impl EngineConfig {
    /// An engine without a background scanner, at `knobs`: passes run only when the caller
    /// asks ([`Engine::scan_pass`]), for exact, repeatable steps in tests and benchmarks.
    pub fn manual(knobs: Knobs) -> Self {
        Self {
            scanner: false,
            knobs,
            ..Self::default()
        }
    }
}

/// The merge engine. Cloning gives another handle to the same engine; the scanner stops when
/// the last engine handle is gone (region handles keep the engine's state alive, not its
/// scanner).
#[derive(Clone)]
pub struct Engine {
    shared: Arc<Shared>,
    /// Joins the scanner when the last engine handle goes.
    _scanner: Arc<ScannerThread>,
}

/// A region registered with the engine. Dropping it unregisters the region and releases all
/// its sharing; drop it before unmapping the region.
pub struct RegionHandle {
    region: Arc<Region>,
    shared: Arc<Shared>,
}

/// What a merge-now call did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MergeNowReport {
    /// Pages of the range that map a stable page afterwards.
    pub pages_merged: u64,
    /// Pages of the range that held zeros and are freed.
    pub zero_pages: u64,
}

impl Engine {
    pub fn new(config: EngineConfig) -> Result<Self, Error> {
        config.knobs.validate()?;
        let page_size = rustix::param::page_size();
        if page_size != PAGE_SIZE {
            return Err(Error::PageSize(page_size));
        }
        let stable = StableStore::new(config.stable_capacity_bytes, config.knobs.max_page_sharing)?;
        let pagemap = Pagemap::open().map_err(Error::Pagemap)?;
        let protector = Protector::open();
        let shared = Arc::new(Shared {
            state: Mutex::new(MergeState::new(
                stable,
                pagemap,
                config.knobs,
                config.merge_scope,
                config.scanner,
                config.max_map_count,
                protector,
            )),
            wake: Condvar::new(),
            shutdown: Mutex::new(false),
            parked: Mutex::new(Vec::new()),
            scanner_cpu_ns: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            last_error: Mutex::new(None),
        });
        let scanner = ScannerThread::start(&shared, config.scanner, config.scanner_yields)?;
        Ok(Self {
            _scanner: Arc::new(scanner),
            shared,
        })
    }

    /// Registers `len` bytes at `base` for merging.
    ///
    /// # Safety
    /// `[base, base + len)` is a `MAP_SHARED` mapping of `memfd` from offset 0 that stays
    /// mapped until the returned handle is dropped; it may grow in place (then call
    /// [`RegionHandle::set_len`]). The owner writes it only while holding its guard
    /// ([`crate::quiesce`]), and nothing else maps the memfd's pages for writing.
    pub unsafe fn register(
        &self,
        owner: &Owner,
        memfd: Arc<Memfd>,
        base: *mut u8,
        len: usize,
    ) -> Result<RegionHandle, Error> {
        // SAFETY: the caller keeps `register`'s contract, which is this one's without image.
        unsafe { self.register_with_image(owner, memfd, base, len, None) }
    }

    /// Registers `len` bytes at `base` for merging, as [`Engine::register`], and maps
    /// `image` over their start: its pages begin merged (see [`crate::image`]).
    ///
    /// # Safety
    /// As for [`Engine::register`]; besides, every page of `memfd` reads zeros, and nobody
    /// touches the range before this returns (quiescence rule 6).
    pub unsafe fn register_with_image(
        &self,
        owner: &Owner,
        memfd: Arc<Memfd>,
        base: *mut u8,
        len: usize,
        image: Option<&MemoryImage>,
    ) -> Result<RegionHandle, Error> {
        let base = base as usize;
        if !base.is_multiple_of(PAGE_SIZE) || !len.is_multiple_of(PAGE_SIZE) {
            return Err(Error::Unaligned { base, len });
        }
        if let Some(image) = image {
            self.check_image(image, owner, len)?;
        }
        let region = Arc::new(Region::new(owner.clone(), memfd, base, len));
        let mut state = self.shared.state.lock();
        state.add_region(region.clone());
        match image {
            Some(image) => {
                let mapped = state.map_image(Quiescent::unpublished(owner), region.id, image.id);
                if let Err(error) = mapped {
                    let _ = state.remove_region(region.id);
                    return Err(error);
                }
            }
            None => state.note_pristine(region.id, None),
        }
        drop(state);
        self.shared.wake.notify_all();
        Ok(RegionHandle {
            region,
            shared: self.shared.clone(),
        })
    }

    /// Builds a module image of `bytes` (whole pages; the initial content of a region from
    /// its start) for regions of `domain` (see [`crate::image`]).
    pub fn image(&self, domain: DomainId, bytes: &[u8]) -> Result<MemoryImage, Error> {
        let id = self.shared.state.lock().publish_image(domain, bytes)?;
        Ok(MemoryImage::new(
            id,
            domain,
            bytes.len(),
            self.shared.clone(),
        ))
    }

    /// Puts `region` back to what it was when registered with `image` (or to zeros without
    /// one), in time proportional to the pages its owner touched since: what the owner wrote
    /// is freed, and the image's pages are mapped again. The region keeps its length. On an
    /// error (a failed remap) the region is part reset: the owner must not run on it until a
    /// later reset succeeds, or drop it.
    pub fn reset_region(
        &self,
        guard: &OwnerGuard,
        region: impl Into<RegionId>,
        image: Option<&MemoryImage>,
    ) -> Result<(), Error> {
        let id = region.into();
        let mut state = self.shared.state.lock();
        let len = state.region_len(id).ok_or(Error::UnknownRegion(id))?;
        state.checked_pages(guard, id, 0..len)?;
        if let Some(image) = image {
            let owner = state.region_owner(id).ok_or(Error::UnknownRegion(id))?;
            self.check_image(image, &owner, len)?;
        }
        state.reset_region(guard.quiescent(), id, image.map(|image| image.id), None)
    }

    /// [`Engine::reset_region`], and the region shortened to `len` bytes (page-aligned) if
    /// it grew past them: pages past `len` become reserved address space again, as they were
    /// before the region grew over them, and their memfd pages are punched, so that a growth
    /// later maps zeros there. For a host that reuses a memory for a new instance of the same
    /// module (the memory as it was registered). The caller shortens its own mapping's
    /// length to match ([`crate::MemfdMapping::reset`] does both).
    pub fn reset_region_to(
        &self,
        guard: &OwnerGuard,
        region: impl Into<RegionId>,
        image: Option<&MemoryImage>,
        len: usize,
    ) -> Result<(), Error> {
        reset_to(&self.shared, guard, region.into(), image, len)
    }

    /// Hands `region` over from the owner whose guard is `from` to `to`, in the same domain:
    /// from then on `to`'s guard is the one that keeps the engine off the region, and the
    /// region counts as `to`'s. Its pages and their sharing stay as they are; the advice the
    /// old owner gave is dropped (advice is the owner's word about its own data). For a host
    /// that reuses a memory, reset to its image, for a new instance: `to` must not be able to
    /// reach the region before this returns (a new instance's memories are not in use before
    /// its instantiation has them).
    pub fn reassign_region(
        &self,
        handle: &mut RegionHandle,
        from: &OwnerGuard,
        to: &Owner,
    ) -> Result<(), Error> {
        handle.reassign(from, to)
    }

    fn check_image(&self, image: &MemoryImage, owner: &Owner, len: usize) -> Result<(), Error> {
        check_image(&self.shared, image, owner, len)
    }

    /// Merges what can be merged in `range` (bytes, page-aligned) of `region` now, without
    /// waiting for its pages to stay unchanged for a pass. The guard proves the owner is not
    /// writing; matches in other owners' regions are merged when those owners are quiescent.
    /// On an engine with a scanner thread, freeing the region's own copies of the pages it
    /// merged is left to that thread, right after the call, so that the call returns sooner.
    pub fn merge_now(
        &self,
        guard: &OwnerGuard,
        region: impl Into<RegionId>,
        range: Range<usize>,
    ) -> Result<MergeNowReport, Error> {
        let id = region.into();
        let mut state = self.shared.state.lock();
        let pages = state.checked_pages(guard, id, range)?;
        state.owner_call(|state| {
            state.scan_range(guard.quiescent(), id, pages.clone(), Visit::Now)
        })?;
        let report = state.merged_pages(id, pages);
        drop(state);
        // The scanner frees the pages the merge replaced.
        self.shared.wake.notify_all();
        Ok(report)
    }

    /// Merges what can be merged in every region of the guard's owner now, as
    /// [`Engine::merge_now`] does for one range. A host calls it right after instantiation,
    /// when the memories hold just the module's data segments, the same in every instance:
    /// they then start out shared, as wasmtime's copy-on-write instantiation would have them.
    pub fn merge_owner_now(&self, guard: &OwnerGuard) -> Result<MergeNowReport, Error> {
        let report = self.shared.state.lock().merge_owner_now(guard);
        self.shared.wake.notify_all();
        report
    }

    /// Gives every merged page of `region` back to it (for memory that must not be shared,
    /// such as secrets): afterwards the region is one mapping of its own memfd again.
    pub fn unmerge_region(
        &self,
        guard: &OwnerGuard,
        region: impl Into<RegionId>,
    ) -> Result<(), Error> {
        let id = region.into();
        let mut state = self.shared.state.lock();
        state.checked_pages(guard, id, 0..0)?;
        state.unmerge_region(guard.quiescent(), id)
    }

    /// Takes the owner's advice for `range` (bytes, page-aligned) of `region`: see
    /// [`crate::advice`]. Unmergeable pages are back in the region's own memfd when this
    /// returns. Refused, changing nothing, when the region would hold more than
    /// [`crate::advice::MAX_ADVISED_RANGES`] advised ranges.
    pub fn advise(
        &self,
        guard: &OwnerGuard,
        region: impl Into<RegionId>,
        range: Range<usize>,
        advice: Advice,
    ) -> Result<(), Error> {
        let id = region.into();
        let mut state = self.shared.state.lock();
        let pages = state.checked_pages(guard, id, range)?;
        state.advise(guard.quiescent(), id, pages, advice)
    }

    /// The current length of `region` in bytes; `None` once it is unregistered.
    pub fn region_len(&self, region: impl Into<RegionId>) -> Option<usize> {
        self.shared.state.lock().region_len(region.into())
    }

    /// The current length of `region` in bytes while `owner` owns it; `None` once it is
    /// unregistered or handed to another owner ([`Engine::reassign_region`]).
    pub fn owned_region_len(&self, region: impl Into<RegionId>, owner: OwnerId) -> Option<usize> {
        let id = region.into();
        let state = self.shared.state.lock();
        (state.region_owner(id)?.id() == owner).then(|| state.region_len(id))?
    }

    /// Unmerges every region whose owner is quiescent, in the calling thread; returns how many
    /// regions were busy (and still hold merged pages).
    pub fn unmerge_all(&self) -> Result<usize, Error> {
        self.shared.state.lock().unmerge_all()
    }

    /// Runs scanner batches in the calling thread until the current pass completes.
    pub fn scan_pass(&self) -> Result<(), Error> {
        self.shared.state.lock().free_deferred();
        loop {
            if self.shared.state.lock().scan_batch()? {
                return Ok(());
            }
        }
    }

    /// Tells the engine that `owner` stopped running (a call returned): with
    /// `scan_on_park`, the scanner looks at its memory at once and again `park_recheck`
    /// later, and merges what did not change in between — merging follows activity instead
    /// of waiting for the cursor to come round.
    pub fn parked(&self, owner: &Owner) {
        self.shared.park(owner);
    }

    /// What merging saves `owner` (as Linux's `/proc/PID/ksm_stat`).
    pub fn owner_stats(&self, owner: OwnerId) -> OwnerStats {
        self.shared.state.lock().owner_stats(owner)
    }

    pub fn knobs(&self) -> Knobs {
        self.shared.state.lock().knobs.clone()
    }

    /// Changes the settings; the scanner picks them up at once.
    pub fn set_knobs(&self, knobs: Knobs) -> Result<(), Error> {
        knobs.validate()?;
        self.shared.state.lock().set_knobs(knobs)?;
        self.shared.wake.notify_all();
        Ok(())
    }

    /// Whether the engine merges owners while their guest code runs (they lend their gate
    /// for it: [`OwnerGuard::lend`]); if not, why: the `merge_running` knob, or the kernel
    /// (no `userfaultfd`, or one that cannot write-protect shared memory). Without it the
    /// engine merges parked owners only, as it always did.
    pub fn running_merges(&self) -> Result<(), RunningMergesOff> {
        self.shared.state.lock().running_merges().map(drop)
    }

    /// How long writes waited on write-protect windows so far.
    pub fn wait_figures(&self) -> crate::WaitFigures {
        self.shared.state.lock().wait_figures()
    }

    /// The pages saved ([`Stats::pages_sharing`]), read in constant time: for sampling it
    /// often while instances run, where [`Engine::stats`] would walk every page record.
    pub fn pages_sharing(&self) -> u64 {
        self.shared.state.lock().pages_sharing()
    }

    pub fn stats(&self) -> Stats {
        let mut stats = self.shared.state.lock().stats();
        stats.scanner_cpu_ns = self.shared.scanner_cpu_ns.load(Ordering::Relaxed);
        stats.errors = self.shared.errors.load(Ordering::Relaxed);
        stats
    }

    /// Walks every page record and stable page and checks that they agree.
    pub fn audit(&self) -> Audit {
        self.shared.state.lock().audit()
    }

    /// The last failure the background scanner met, if any.
    pub fn last_error(&self) -> Option<String> {
        self.shared.last_error.lock().clone()
    }
}

/// Refuses an image of another engine, of another domain than `owner`'s, or longer than
/// `len` bytes.
fn check_image(
    shared: &Arc<Shared>,
    image: &MemoryImage,
    owner: &Owner,
    len: usize,
) -> Result<(), Error> {
    if !Arc::ptr_eq(&image.shared, shared) {
        return Err(Error::ForeignImage);
    }
    if image.domain() != owner.domain() {
        return Err(Error::ImageDomain {
            image: image.domain(),
            region: owner.domain(),
        });
    }
    if image.len() > len {
        return Err(Error::ImageTooLong {
            image: image.len(),
            region: len,
        });
    }
    Ok(())
}

/// [`Engine::reset_region_to`], for the engine behind `shared`.
fn reset_to(
    shared: &Arc<Shared>,
    guard: &OwnerGuard,
    id: RegionId,
    image: Option<&MemoryImage>,
    len: usize,
) -> Result<(), Error> {
    let mut state = shared.state.lock();
    let current = state.region_len(id).ok_or(Error::UnknownRegion(id))?;
    state.checked_pages(guard, id, 0..current)?;
    if !len.is_multiple_of(PAGE_SIZE) {
        return Err(Error::Unaligned { base: 0, len });
    }
    if let Some(image) = image {
        let owner = state.region_owner(id).ok_or(Error::UnknownRegion(id))?;
        check_image(shared, image, &owner, len.min(current))?;
    }
    state.reset_region(
        guard.quiescent(),
        id,
        image.map(|image| image.id),
        Some(len),
    )
}

impl RegionHandle {
    pub fn id(&self) -> RegionId {
        self.region.id
    }

    /// [`Engine::reset_region_to`] of this region.
    pub fn reset_to(
        &self,
        guard: &OwnerGuard,
        image: Option<&MemoryImage>,
        len: usize,
    ) -> Result<(), Error> {
        reset_to(&self.shared, guard, self.region.id, image, len)
    }

    /// [`Engine::reassign_region`] of this region.
    pub fn reassign(&mut self, from: &OwnerGuard, to: &Owner) -> Result<(), Error> {
        let id = self.region.id;
        if from.owner() != self.region.owner.id() {
            return Err(Error::WrongOwner(id));
        }
        if to.domain() != self.region.owner.domain() {
            return Err(Error::OwnerDomain {
                region: id,
                domain: self.region.owner.domain(),
                owner: to.domain(),
            });
        }
        let region = Arc::new(self.region.with_owner(to.clone()));
        self.shared
            .state
            .lock()
            .reassign_region(id, region.clone())?;
        self.region = region;
        Ok(())
    }

    /// Records that the owner grew the region in place to `len` bytes. Call with the owner's
    /// guard held, after the new range is mapped.
    pub fn set_len(&self, len: usize) {
        self.region.set_len(len);
        // Counted now, not at the next visit: a merged last page and the new range are two
        // mappings from this moment, and the map-count budget must know. (An unknown region
        // is one being unregistered: nothing to count.)
        let _ = self.shared.state.lock().cover_length(self.region.id);
    }
}

impl From<&RegionHandle> for RegionId {
    fn from(handle: &RegionHandle) -> Self {
        handle.id()
    }
}

impl Drop for RegionHandle {
    fn drop(&mut self) {
        // Releasing stable pages can only fail to punch a hole, which leaks memory of the
        // stable store but no data; the region is going away either way.
        let _ = self.shared.state.lock().remove_region(self.region.id);
    }
}
