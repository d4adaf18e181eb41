//! Write-protect windows: how the engine merges the pages of an owner that is running.
//!
//! A parked owner cannot write (rule 1 of [`crate::quiesce`]), so the engine may compare a
//! page and map a stable page over it at leisure. A running owner's guest code writes its
//! memory at any moment, so the engine first makes the pages it is about to look at unwritable
//! for a moment, as KSM write-protects a page-table entry before it compares a page:
//!
//! 1. The engine opens a *window* over a few pages of the region (at most
//!    [`WINDOW_PAGES`]): it write-protects them with `userfaultfd` (`UFFDIO_WRITEPROTECT`).
//!    When the call returns, no thread can change them: a write takes a write-protect fault
//!    and its thread sleeps in the kernel. Reads go on as before.
//! 2. Inside the window the engine does what it does for a parked owner: compares, maps
//!    stable pages over runs of pages whose bytes they hold, gives written merged pages back
//!    to the region's memfd. Every one of these keeps the bytes a reader sees unchanged at
//!    every instant, so that reads racing with them stay right; for that, a window never
//!    bridges differing pages (their private copies would be filled in only after the stable
//!    page is mapped) and never compacts (`state::compact` writes its private copies the
//!    same way).
//! 3. The engine closes the window: it lifts the protection of whatever still maps the old
//!    pages and wakes every thread that faulted in the range. A woken thread retries its
//!    write: on a page merged meanwhile, that is the kernel's copy-on-write of the stable
//!    page, which holds the bytes it had; on a page that stayed, the write lands as if
//!    nothing happened. A window is closed on every path, errors included (`Drop`): a thread
//!    left asleep would be a guest hung for good.
//!
//! So a guest thread waits at most for one window: the wait is measured and kept
//! ([`WaitFigures`]).
//!
//! # Kernel-mode writes
//!
//! The engine opens its `userfaultfd` with `UFFD_USER_MODE_ONLY`, the only mode an unprivileged
//! process gets under the default `vm.unprivileged_userfaultfd = 0`. In it a fault raised by
//! the kernel itself (a `read(2)` into guest memory, as WASI's `fd_read` does) is not waited
//! on but fails with `EFAULT`. So the engine opens windows only while the owner's guest code
//! runs and no host code of the owner does (rule 7 of [`crate::quiesce`]): host code takes the
//! gate back first, waiting for at most one window. Writes by the owner's user-mode code
//! anywhere (guest code, wasmtime's own `memory.copy`, host functions once they hold the gate)
//! simply wait.
//!
//! # Registration
//!
//! A range must be registered with the `userfaultfd` before it can be write-protected, and a
//! mapping made over part of a registered one is not registered. So the engine registers a
//! region whole at its first window (and again once it grew), and after every remap of a
//! registered region it registers the new mapping too ([`crate::remap`]): then the region's
//! mappings differ only where their backing does, and the kernel keeps merging neighbours as
//! it did before. Registration costs a running region the kernel's fault-around on reads.

use std::ops::Range;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use linux_raw_sys::general::{
    UFFD_API, UFFD_FEATURE_WP_HUGETLBFS_SHMEM, UFFD_USER_MODE_ONLY, uffd_msg, uffdio_api,
    uffdio_range, uffdio_register, uffdio_writeprotect,
};
use linux_raw_sys::ioctl::{UFFDIO_API, UFFDIO_REGISTER, UFFDIO_WAKE, UFFDIO_WRITEPROTECT};
use parking_lot::Mutex;
use rustix::io::Errno;
use rustix::ioctl::{Updater, ioctl};

use crate::PAGE_SIZE;
use crate::quiesce::Quiescent;
use crate::region::Region;

/// Most pages one window write-protects: a writer that meets a window waits for the visit of
/// at most this many pages (and the merges among them).
pub(crate) const WINDOW_PAGES: usize = 64;

/// `UFFDIO_REGISTER_MODE_WP`.
const REGISTER_MODE_WP: u64 = 1 << 1;
/// `UFFDIO_WRITEPROTECT_MODE_WP`.
const WRITEPROTECT_MODE_WP: u64 = 1 << 0;

/// Why the engine cannot merge running owners (it then merges parked ones only).
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProtectError {
    #[error(
        "userfaultfd is not allowed ({0}): vm.unprivileged_userfaultfd, seccomp or a kernel \
         without it"
    )]
    Open(Errno),
    #[error("userfaultfd cannot write-protect shared memory ({0}): the kernel is older than 5.19")]
    Features(Errno),
    #[error("registering {len} bytes at {addr:#x} with userfaultfd failed: {errno}")]
    Register {
        addr: usize,
        len: usize,
        errno: Errno,
    },
    #[error("write-protecting {len} bytes at {addr:#x} failed: {errno}")]
    Protect {
        addr: usize,
        len: usize,
        errno: Errno,
    },
    #[error(
        "pages remapped in a write-protect window could not be protected again; the window's \
         later remaps were refused"
    )]
    Lost,
}

/// Why the engine merges parked owners only ([`crate::Engine::running_merges`]).
#[derive(Debug, Clone, thiserror::Error)]
pub enum RunningMergesOff {
    #[error("running merges are switched off (merge_running = 0)")]
    Knob,
    #[error(transparent)]
    Kernel(#[from] ProtectError),
}

/// The engine's `userfaultfd`, in write-protect mode, and the figures of its windows.
pub(crate) struct Protector {
    uffd: OwnedFd,
    waits: Mutex<WaitFigures>,
}

/// How long guest threads waited on windows.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WaitFigures {
    /// Windows opened.
    pub windows: u64,
    /// Write faults that met a window (each a thread that slept until it closed).
    pub waiters: u64,
    /// Windows that some thread waited on, by how long the window was open, which bounds
    /// the wait: bucket `b` counts windows open for less than `bucket_bound(b)`.
    buckets: Vec<u64>,
    /// The longest such window.
    pub longest: Duration,
}

/// Buckets of [`WaitFigures`]: four per power of two from 1 µs, so a percentile is known to
/// within 19%.
const SUB_BUCKETS: u32 = 4;
const BUCKETS: usize = 4 * 24;

impl WaitFigures {
    fn record(&mut self, waiters: u64, open: Duration) {
        self.windows += 1;
        if waiters == 0 {
            return;
        }
        self.waiters += waiters;
        self.longest = self.longest.max(open);
        let us = open.as_micros().max(1) as u64;
        let log = 63 - us.leading_zeros();
        let sub = if log >= 2 {
            (us >> (log - 2)) & 3
        } else {
            (us << (2 - log)) & 3
        };
        let bucket = ((log * SUB_BUCKETS) as usize + sub as usize).min(BUCKETS - 1);
        if self.buckets.is_empty() {
            self.buckets = vec![0; BUCKETS];
        }
        self.buckets[bucket] += 1;
    }

    /// The upper bound of bucket `b`.
    fn bucket_bound(b: usize) -> Duration {
        let log = b as u32 / SUB_BUCKETS;
        let sub = u64::from(b as u32 % SUB_BUCKETS) + 1;
        Duration::from_nanos(((4 + sub) << log) * 1000 / 4)
    }

    /// The wait that `share` (0 to 1) of the windows some thread waited on stayed under, to
    /// within a bucket; zero when nobody waited.
    pub fn percentile(&self, share: f64) -> Duration {
        let total: u64 = self.buckets.iter().sum();
        if total == 0 {
            return Duration::ZERO;
        }
        let wanted = ((total as f64 * share).ceil() as u64).max(1);
        let mut seen = 0;
        for (b, count) in self.buckets.iter().enumerate() {
            seen += count;
            if seen >= wanted {
                return Self::bucket_bound(b).min(self.longest);
            }
        }
        self.longest
    }
}

impl Protector {
    /// Opens a `userfaultfd` for write-protecting shared memory, or says why it cannot.
    pub(crate) fn open() -> Result<Arc<Self>, ProtectError> {
        let flags = rustix::mm::UserfaultfdFlags::CLOEXEC
            | rustix::mm::UserfaultfdFlags::NONBLOCK
            | rustix::mm::UserfaultfdFlags::from_bits_retain(UFFD_USER_MODE_ONLY);
        crate::faults::check(crate::faults::Syscall::Userfaultfd).map_err(ProtectError::Open)?;
        // SAFETY: the descriptor only ever write-protects ranges of regions the engine may
        // remap, inside windows this module closes on every path (module docs); it never
        // registers missing-page faults, so nothing but windows can make a thread wait.
        let uffd = unsafe { rustix::mm::userfaultfd(flags) }.map_err(ProtectError::Open)?;
        let mut api = uffdio_api {
            api: u64::from(UFFD_API),
            features: u64::from(UFFD_FEATURE_WP_HUGETLBFS_SHMEM),
            ioctls: 0,
        };
        // SAFETY: `UFFDIO_API` reads and writes a `uffdio_api`, which `api` is.
        unsafe { ioctl(&uffd, Updater::<{ UFFDIO_API as _ }, _>::new(&mut api)) }
            .map_err(ProtectError::Features)?;
        Ok(Arc::new(Self {
            uffd,
            waits: Mutex::new(WaitFigures::default()),
        }))
    }

    /// The figures of the windows so far.
    pub(crate) fn waits(&self) -> WaitFigures {
        self.waits.lock().clone()
    }

    /// Registers `len` bytes at `addr` for write-protection.
    pub(crate) fn register(&self, addr: usize, len: usize) -> Result<(), ProtectError> {
        let mut register = uffdio_register {
            range: range(addr, len),
            mode: REGISTER_MODE_WP,
            ioctls: 0,
        };
        crate::faults::check(crate::faults::Syscall::Userfaultfd)
            // SAFETY: `UFFDIO_REGISTER` reads and writes a `uffdio_register`; registering
            // changes nothing a thread observes until a range is write-protected.
            .and_then(|()| unsafe {
                ioctl(
                    &self.uffd,
                    Updater::<{ UFFDIO_REGISTER as _ }, _>::new(&mut register),
                )
            })
            .map_err(|errno| ProtectError::Register { addr, len, errno })
    }

    /// Write-protects `len` bytes at `addr`, registered: for pages a window remapped, which
    /// it must keep still until it closes.
    pub(crate) fn protect(&self, addr: usize, len: usize) -> Result<(), ProtectError> {
        self.write_protect(addr, len, true)
            .map_err(|errno| ProtectError::Protect { addr, len, errno })
    }

    fn write_protect(&self, addr: usize, len: usize, protect: bool) -> Result<(), Errno> {
        let mut wp = uffdio_writeprotect {
            range: range(addr, len),
            // Lifting the protection also wakes the threads that faulted in the range.
            mode: if protect { WRITEPROTECT_MODE_WP } else { 0 },
        };
        // SAFETY: `UFFDIO_WRITEPROTECT` reads and writes a `uffdio_writeprotect`; the
        // range is a window's, whose caller may keep its owner from writing (module docs).
        unsafe {
            ioctl(
                &self.uffd,
                Updater::<{ UFFDIO_WRITEPROTECT as _ }, _>::new(&mut wp),
            )
        }
    }

    fn wake(&self, addr: usize, len: usize) {
        let mut wake = range(addr, len);
        // SAFETY: `UFFDIO_WAKE` reads a `uffdio_range`; waking a thread only lets it retry
        // its fault. It fails only for a range outside the address space, which a window's
        // is not.
        let _ = unsafe {
            ioctl(
                &self.uffd,
                Updater::<{ UFFDIO_WAKE as _ }, _>::new(&mut wake),
            )
        };
    }

    /// Reads the fault messages waiting (each a thread asleep on a window); returns how many.
    fn take_faults(&self) -> u64 {
        let mut msg = [0u8; std::mem::size_of::<uffd_msg>()];
        let mut count = 0;
        while matches!(rustix::io::read(&self.uffd, &mut msg), Ok(n) if n == msg.len()) {
            count += 1;
        }
        count
    }
}

fn range(addr: usize, len: usize) -> uffdio_range {
    uffdio_range {
        start: addr as u64,
        len: len as u64,
    }
}

/// Pages of one region write-protected until the window is dropped (module docs).
pub(crate) struct Window {
    protector: Arc<Protector>,
    region: Arc<Region>,
    pages: Range<usize>,
    opened: Instant,
}

impl Window {
    /// Write-protects pages `pages` of `region`, whose owner's gate `q` proves held while its
    /// guest code runs (or while it is parked: a window is then merely redundant). Registers
    /// the region first if it is not registered up to its length.
    pub(crate) fn open(
        protector: &Arc<Protector>,
        q: Quiescent<'_>,
        region: &Arc<Region>,
        pages: Range<usize>,
    ) -> Result<Self, ProtectError> {
        region.check_owner(q);
        region.watch(protector)?;
        let (addr, len) = (region.page_addr(pages.start), pages.len() * PAGE_SIZE);
        protector.protect(addr, len)?;
        region.window_opened();
        Ok(Self {
            protector: protector.clone(),
            region: region.clone(),
            pages,
            opened: Instant::now(),
        })
    }

    /// The token for remapping the window's pages while it is open.
    pub(crate) fn quiescent(&self) -> Quiescent<'_> {
        Quiescent::window_of(self.region.owner.id(), self.region.id, self.pages.clone())
    }
}

impl Drop for Window {
    fn drop(&mut self) {
        let waiters = self.protector.take_faults();
        let (addr, len) = (
            self.region.page_addr(self.pages.start),
            self.pages.len() * PAGE_SIZE,
        );
        if self.protector.write_protect(addr, len, false).is_err() {
            // Part of the range is a mapping that could not be registered after a remap (it
            // holds no protected page, being new): lift the protection page by page where
            // the old mappings are left, then wake every sleeper in the range.
            for page in self.pages.clone() {
                let _ = self
                    .protector
                    .write_protect(self.region.page_addr(page), PAGE_SIZE, false);
            }
        }
        self.protector.wake(addr, len);
        self.region.window_closed();
        self.protector
            .waits
            .lock()
            .record(waiters, self.opened.elapsed());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_fall_within_a_bucket_of_the_waits() {
        let mut figures = WaitFigures::default();
        for us in 1..=1000u64 {
            figures.record(1, Duration::from_micros(us));
        }
        figures.record(0, Duration::from_secs(1));
        assert_eq!(figures.windows, 1001);
        assert_eq!(figures.waiters, 1000);
        let p50 = figures.percentile(0.5).as_micros() as f64;
        assert!((500.0..=500.0 * 1.25).contains(&p50), "p50 {p50}");
        let p99 = figures.percentile(0.99).as_micros() as f64;
        assert!((990.0..=1000.0).contains(&p99), "p99 {p99}");
        assert_eq!(figures.percentile(1.0), Duration::from_micros(1000));
    }
}
