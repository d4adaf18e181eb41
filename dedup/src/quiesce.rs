//! The quiescence contract: who may remap which page, and when.
//!
//! Merging replaces the mapping under a page of somebody else's memory. That is only sound
//! while nobody can write the page: a write that lands between "compare the bytes" and "map
//! the stable copy" would be lost, and a write that lands between "copy the page out" and
//! "remap it" during an unmerge would be lost too. samepage never stops a running instance to
//! merge it; instead every region has an [`Owner`], and the rules are:
//!
//! 1. **The owner writes only while it holds its gate.** Whoever runs guest code, or reads or
//!    writes a region's memory from the host, or grows it, first takes an [`OwnerGuard`] with
//!    [`Owner::enter`] and keeps it for the whole time. An instance that is not running holds
//!    no guard: it is *quiescent*.
//! 2. **The engine changes a region's mappings only while it holds that region's gate.** The
//!    background scanner never waits for a gate: it try-locks, and when an owner is busy it
//!    skips that owner's regions for this batch and counts the skip (`regions_busy_skips`).
//!    Because the scanner never blocks on a gate, an owner may call into the engine while it
//!    holds its own gate (for example the merge-now host call) without risk of deadlock.
//! 3. **Calls made by the owner prove quiescence with the guard.** Engine entry points that
//!    remap on behalf of an owner ([`crate::Engine::merge_now`],
//!    [`crate::Engine::unmerge_region`]) take `&OwnerGuard` and refuse a guard of another owner.
//! 4. **The owner changes its memory only by writing it.** It never discards pages of a
//!    registered region (`MADV_DONTNEED`, `MADV_FREE`, punching its memfd): a discarded
//!    private copy would read back whatever its stable slot holds. Growing is fine.
//! 5. **Stable pages are immutable once mapped.** The engine writes a stable page only before
//!    its first sharer maps it, and keeps its own view of the stable memfd read-only, so a
//!    stray write through that view faults instead of corrupting every sharer.
//!
//! 6. **A region is quiescent until its registration returns.** The caller of
//!    [`crate::Engine::register_with_image`] promises that nobody touches the range before the
//!    call returns (its address has not been handed out yet), so the engine maps the module
//!    image into it then, with a token made for that alone (`Quiescent::unpublished`).
//! 7. **A running owner may lend its gate to running merges.** While its guest code runs, an
//!    owner may [`OwnerGuard::lend`] its gate: it keeps the gate (rules 1 to 3 hold for
//!    everyone else as before), but gives up its *host lock*, which it holds whenever its
//!    host code runs. The scanner may then take the host lock ([`Owner::try_running`]) and,
//!    holding it, remap pages of the owner's regions only inside write-protect windows
//!    (`crate::protect`): a window makes its pages unwritable before the engine compares
//!    them, and every remap inside it keeps what a reader sees unchanged at every instant,
//!    since the guest goes on reading. Before its host code runs again (a host function, the
//!    return of the call), the owner takes the host lock back ([`LentGate::reclaim`]),
//!    waiting for at most one window: so the kernel never writes guest memory on the host's
//!    behalf (`read(2)` into it) while a window is open, which an unprivileged
//!    `userfaultfd` would fail with `EFAULT`. The token of a window
//!    ([`crate::protect::Window::quiescent`]) covers the window's pages only, and `remap`
//!    refuses any other page with it.
//!
//! The kernel does the rest: a sharer's mapping of a stable page is `MAP_PRIVATE`, so a write
//! by the instance (with its guard held, by rule 1) takes a copy-on-write fault and never
//! reaches the stable page or any other sharer.
//!
//! Every system call that changes a region's mapping lives in the engine's `remap` module
//! and takes a `Quiescent` token, which only this module produces: from a held gate, or, for
//! a running owner, for the pages of a window that `crate::protect` has write-protected
//! (`Quiescent::window_of`, called by `Window::quiescent` alone).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use std::ops::Range;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use parking_lot::lock_api::ArcMutexGuard;
use parking_lot::{Mutex, RawMutex};

use crate::region::RegionId;

/// Identifies the tenant a region belongs to: pages merge only within one domain.
pub type DomainId = u32;

/// Identifies an owner for as long as the process runs (ids are never reused).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OwnerId(u64);

/// Something that writes a set of regions, typically one wasm instance and its store.
#[derive(Clone, Debug)]
pub struct Owner {
    /// Unique id, used to recognise a guard as this owner's.
    id: OwnerId,
    /// Tenant domain: the engine merges pages only between regions of the same domain.
    domain: DomainId,
    /// Held while the owner may write its regions (rule 1).
    gate: Arc<Mutex<()>>,
    /// Held with the gate while the owner's host code may run; free while its guest code
    /// runs with the gate lent (rule 7), and then taken by the scanner for each window.
    host: Arc<Mutex<()>>,
    /// Whether the gate is lent (rule 7). Changed only with `host` held by the owner.
    lent: Arc<AtomicBool>,
    /// When the owner last took its gate, in nanoseconds since [`epoch`]: how long its call
    /// has run, for `merge_running_after`.
    entered_at: Arc<AtomicU64>,
    /// Times the owner took its gate. By rule 1, a region whose owner has not taken it since
    /// the engine last looked cannot have changed: the scanner skips such regions when that
    /// look found nothing left to do.
    entries: Arc<AtomicU64>,
}

/// Proof that an owner is quiescent for the engine: while it lives, the owner cannot write.
///
/// Owned (not borrowed) so that an embedder can keep it inside the object that runs the
/// instance, across threads.
pub struct OwnerGuard {
    owner: Owner,
    gate: ArcMutexGuard<RawMutex, ()>,
    _host: ArcMutexGuard<RawMutex, ()>,
}

/// The gate of an owner whose guest code runs, lent to running merges (rule 7): the owner
/// still holds the gate, but not its host lock. [`LentGate::reclaim`] gives the guard back.
pub struct LentGate {
    owner: Owner,
    gate: ArcMutexGuard<RawMutex, ()>,
}

/// The scanner's hold on a running owner's host lock (rule 7): while it lives, the owner's
/// host code cannot run, and its guest code may, so pages may change only inside windows.
pub(crate) struct RunningGuard {
    owner: OwnerId,
    _host: ArcMutexGuard<RawMutex, ()>,
}

/// A token that a region's gate is held by the party about to remap it. Only this module
/// creates one; [`crate::remap`] demands one for every mapping change.
#[derive(Clone, Copy)]
pub(crate) struct Quiescent<'a> {
    owner: OwnerId,
    /// `None` while the owner is parked: every page of its regions may be remapped. Else its
    /// guest code runs (rule 7), and only these pages of this region may be: a window's, or
    /// none at all for the scanner's [`RunningGuard`] itself.
    window: Option<(RegionId, usize, usize)>,
    _held: std::marker::PhantomData<&'a OwnerGuard>,
}

static NEXT_OWNER: AtomicU64 = AtomicU64::new(1);

/// Nanoseconds since the first time anyone asked, on the monotonic clock.
fn since_epoch() -> u64 {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

impl Owner {
    /// A new owner in `domain`.
    pub fn new(domain: DomainId) -> Self {
        Self {
            id: OwnerId(NEXT_OWNER.fetch_add(1, Ordering::Relaxed)),
            domain,
            gate: Arc::new(Mutex::new(())),
            host: Arc::new(Mutex::new(())),
            lent: Arc::new(AtomicBool::new(false)),
            entered_at: Arc::new(AtomicU64::new(0)),
            entries: Arc::new(AtomicU64::new(0)),
        }
    }

    pub fn id(&self) -> OwnerId {
        self.id
    }

    pub fn domain(&self) -> DomainId {
        self.domain
    }

    /// Takes the gate before running guest code or touching the owner's memory (rule 1).
    /// Waits at most for one scanner batch over this owner's regions.
    pub fn enter(&self) -> OwnerGuard {
        let gate = self.gate.lock_arc();
        self.entries.fetch_add(1, Ordering::AcqRel);
        self.entered_at.store(since_epoch(), Ordering::Release);
        // Free whenever the gate is, but for a window the scanner may still have open on a
        // gate lent and given up without being reclaimed: only a gate holder lends it, and
        // only the scanner takes it from a lent gate, never waiting.
        let host = self.host.lock_arc();
        self.lent.store(false, Ordering::Release);
        OwnerGuard {
            owner: self.clone(),
            gate,
            _host: host,
        }
    }

    /// Times the owner took its gate so far; read under the gate, it cannot change until the
    /// gate is released.
    pub(crate) fn entries(&self) -> u64 {
        self.entries.load(Ordering::Acquire)
    }

    /// The gate if it is free right now, else `None`: the scanner's side of rule 2, and a
    /// host's when it must not wait (it may hold the gate itself further up its stack).
    pub fn try_enter(&self) -> Option<OwnerGuard> {
        let gate = self.gate.try_lock_arc()?;
        let host = self.host.try_lock_arc()?;
        Some(OwnerGuard {
            owner: self.clone(),
            gate,
            _host: host,
        })
    }

    /// The host lock of an owner whose guest code runs with its gate lent, if it is free right
    /// now (rule 7): the scanner's way in to merge a running owner's pages in windows.
    /// Only once its call has run for `after`: a call that ends sooner is merged once parked.
    pub(crate) fn try_running(&self, after: Duration) -> Option<RunningGuard> {
        let host = self.host.try_lock_arc()?;
        let ran = since_epoch().saturating_sub(self.entered_at.load(Ordering::Acquire));
        let long = ran >= after.as_nanos() as u64;
        (long && self.lent.load(Ordering::Acquire)).then(|| RunningGuard {
            owner: self.id,
            _host: host,
        })
    }
}

impl OwnerGuard {
    pub fn owner(&self) -> OwnerId {
        self.owner.id
    }

    pub(crate) fn quiescent(&self) -> Quiescent<'_> {
        Quiescent {
            owner: self.owner.id,
            window: None,
            _held: std::marker::PhantomData,
        }
    }

    /// Lends the gate to running merges while the owner's guest code runs, and no host code
    /// of it (rule 7). Only for an owner of an engine that merges running owners
    /// ([`crate::Engine::merges_running`]); on another, the lent gate merely stays held.
    pub fn lend(self) -> LentGate {
        self.owner.lent.store(true, Ordering::Release);
        LentGate {
            owner: self.owner,
            gate: self.gate,
        }
    }
}

impl LentGate {
    /// Takes the host lock back before the owner's host code runs (rule 7); waits at most
    /// for the window the scanner has open on the owner's pages.
    pub fn reclaim(self) -> OwnerGuard {
        let host = self.owner.host.lock_arc();
        self.owner.lent.store(false, Ordering::Release);
        OwnerGuard {
            owner: self.owner,
            gate: self.gate,
            _host: host,
        }
    }

    pub fn owner(&self) -> OwnerId {
        self.owner.id
    }
}

impl RunningGuard {
    /// The token that opens windows on the owner's regions; by itself it lets nothing be
    /// remapped.
    pub(crate) fn quiescent(&self) -> Quiescent<'_> {
        Quiescent {
            owner: self.owner,
            window: Some((RegionId(0), 0, 0)),
            _held: std::marker::PhantomData,
        }
    }
}

impl<'a> Quiescent<'a> {
    pub(crate) fn owner(&self) -> OwnerId {
        self.owner
    }

    /// Whether the owner's guest code may be running: then only a window's pages may be
    /// remapped, with the window's own token.
    pub(crate) fn running(&self) -> bool {
        self.window.is_some()
    }

    /// The region and pages the token lets be remapped, when the owner may be running.
    pub(crate) fn window(&self) -> Option<(RegionId, Range<usize>)> {
        self.window.map(|(region, start, end)| (region, start..end))
    }

    /// The token of a window over `pages` of `region`: made only by
    /// [`crate::protect::Window::quiescent`], once the pages are write-protected.
    pub(crate) fn window_of(owner: OwnerId, region: RegionId, pages: Range<usize>) -> Self {
        Quiescent {
            owner,
            window: Some((region, pages.start, pages.end)),
            _held: std::marker::PhantomData,
        }
    }
}

impl Quiescent<'static> {
    /// The token for a region that is being registered (rule 6): nobody but the engine can
    /// reach it yet, whoever holds its owner's gate. Only `Engine::register_with_image` makes
    /// one, for the region it is registering.
    pub(crate) fn unpublished(owner: &Owner) -> Self {
        Quiescent {
            owner: owner.id,
            window: None,
            _held: std::marker::PhantomData,
        }
    }
}

impl std::fmt::Debug for OwnerGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OwnerGuard")
            .field("owner", &self.owner.id)
            .finish()
    }
}
