//! Memfds, the files behind every page the engine handles: creating them, sealing them,
//! mapping read-only views of them, and punching holes in them.
//!
//! Every memfd the engine or a [`crate::MemfdMapping`] makes comes from [`create`], sealed
//! against shrinking: a mapped page past the end of its file raises `SIGBUS` in whoever
//! touches it, so no memfd that a region or the stable store maps may ever get shorter.
//! Growing stays allowed (wasm's `memory.grow`).
//!
//! # Punching holes
//!
//! A punch frees a memfd page at once, and a mapping of the page then reads zeros. So a punch
//! is sound only where nobody can observe the page's bytes through any mapping. There are
//! three kinds, and these are the only punches in the engine:
//!
//! - **A page of a region's own memfd** ([`punch_region`]). The region maps its memfd
//!   `MAP_SHARED`, so punching changes what the owner reads, unless the region no longer
//!   maps that page (a stable page was just mapped over it) or the page holds zeros (a zero
//!   page reads back the same). Both facts hold only while the owner cannot write, so this
//!   punch takes the owner's [`Quiescent`] token, like every remap.
//! - **A page of a region's own memfd that the region no longer maps**
//!   ([`punch_unmapped`]), when freeing the pages a merge replaced is left for after an
//!   owner's merge-now call. The region maps a stable slot there, so nobody reads the memfd
//!   page; the only way back to it is a restore (sharer-left recovery, unmerge, a bridged
//!   page given back to merge elsewhere), which writes
//!   the page and remaps it under the engine's state lock and updates the page's record under
//!   the same lock. So this punch needs no owner's token, but the state lock, and a record that
//!   still says the page is merged: the caller (`state::merge`) checks it page by page.
//! - **A stable slot that no region page shares** ([`punch_stable`]). Every region page whose
//!   mapping still covers such a slot holds a private anonymous copy (a window's differing
//!   page, or a sharer that wrote and has not been released yet): a private copy no longer
//!   refers to the file page, and quiescence rule 4 (owners never discard pages) keeps it from
//!   falling back to the file. No sharer means nobody reads the slot, so this punch needs no
//!   owner's token; the stable store calls it only for slots whose node says they have no
//!   sharer.

use std::io;
use std::ops::Range;
use std::os::fd::AsFd;

use crate::faults::Syscall;
use memfd::{FileSeal, Memfd, MemfdOptions};
use rustix::fs::{FallocateFlags, SeekFrom, fallocate, seek};
use rustix::mm::{MapFlags, ProtFlags, mmap, munmap};

use crate::PAGE_SIZE;
use crate::quiesce::Quiescent;
use crate::region::Region;

/// A new, empty memfd named `name` (the name shows in `/proc/PID/maps`), closed on exec and
/// sealed against shrinking.
pub(crate) fn create(name: &str) -> io::Result<Memfd> {
    let memfd = MemfdOptions::new()
        .close_on_exec(true)
        .allow_sealing(true)
        .create(name)
        .map_err(io::Error::other)?;
    memfd
        .add_seals(&[FileSeal::SealShrink, FileSeal::SealSeal])
        .map_err(io::Error::other)?;
    Ok(memfd)
}

/// A read-only `MAP_SHARED` view of the first `len` bytes of a memfd, unmapped on drop. Reads
/// see the file's pages as they are; a stray write faults instead of changing them.
pub(crate) struct ReadOnlyView {
    base: *const u8,
    len: usize,
}

// SAFETY: the view is a read-only mapping owned by this value; reading it from any thread is
// as sound as from the one that made it.
unsafe impl Send for ReadOnlyView {}

impl ReadOnlyView {
    /// Maps `len` bytes of `memfd` (no memory is reserved for them: `MAP_NORESERVE`).
    pub(crate) fn new(memfd: &Memfd, len: usize) -> io::Result<Self> {
        // SAFETY: a fresh mapping at an address the kernel picks; nothing else refers to it.
        crate::faults::check(Syscall::Mmap)?;
        let base = unsafe {
            mmap(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ,
                MapFlags::SHARED | MapFlags::NORESERVE,
                memfd.as_file(),
                0,
            )
        }?;
        Ok(Self {
            base: base.cast_const().cast(),
            len,
        })
    }

    /// The bytes of page `index`.
    ///
    /// # Safety
    /// The page is inside the view and nobody writes it through another mapping while the
    /// returned slice lives.
    pub(crate) unsafe fn page(&self, index: usize) -> &[u8] {
        debug_assert!((index + 1) * PAGE_SIZE <= self.len);
        // SAFETY: inside the view (caller's bound), and unchanging while borrowed (caller).
        unsafe { std::slice::from_raw_parts(self.base.add(index * PAGE_SIZE), PAGE_SIZE) }
    }
}

impl Drop for ReadOnlyView {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new` with this length; borrows of its pages end with
        // the `&self` they came from, so nothing refers to it any more.
        unsafe {
            let _ = munmap(self.base.cast_mut().cast(), self.len);
        }
    }
}

/// Frees the region's own memfd pages `first..first + count`: once the region no longer maps
/// them (stable pages were just mapped over them), or when they hold zeros.
pub(crate) fn punch_region(
    q: Quiescent<'_>,
    region: &Region,
    first: usize,
    count: usize,
) -> io::Result<()> {
    region.check_token(q, first, count);
    region
        .check_protected(q)
        .map_err(|error| io::Error::other(error.to_string()))?;
    punch(region.memfd.as_file(), first, count)
}

/// Frees the region's own memfd pages `first..first + count`, which it no longer maps (see
/// the module docs for why that needs the state lock and the pages' records, not a token).
pub(crate) fn punch_unmapped(region: &Region, first: usize, count: usize) -> io::Result<()> {
    punch(region.memfd.as_file(), first, count)
}

/// Frees stable pages `first..first + count` of the stable memfd, none of which any region
/// page shares (see the module docs for why that needs no owner's token).
pub(crate) fn punch_stable(stable: &Memfd, first: usize, count: usize) -> io::Result<()> {
    punch(stable.as_file(), first, count)
}

/// Punches pages `first..first + count` out of `fd`, keeping its size.
fn punch(fd: impl AsFd, first: usize, count: usize) -> io::Result<()> {
    crate::faults::check(Syscall::Fallocate)?;
    fallocate(
        fd,
        FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
        (first * PAGE_SIZE) as u64,
        (count * PAGE_SIZE) as u64,
    )?;
    Ok(())
}

/// The pages of `pages` that hold data in `memfd` (allocated, whatever their bytes), as
/// maximal runs in order, found with `SEEK_DATA` and `SEEK_HOLE`: a page never written has
/// no data, and costs nothing to pass over.
pub(crate) fn data_extents(memfd: &Memfd, pages: Range<usize>) -> io::Result<Vec<Range<usize>>> {
    let fd = memfd.as_file();
    let end = (pages.end as u64).saturating_mul(PAGE_SIZE as u64);
    let mut offset = pages.start as u64 * PAGE_SIZE as u64;
    let mut extents: Vec<Range<usize>> = Vec::new();
    while offset < end {
        let data = match seek(fd, SeekFrom::Data(offset)) {
            Ok(data) => data,
            // No data past `offset`.
            Err(rustix::io::Errno::NXIO) => break,
            Err(error) => return Err(error.into()),
        };
        if data >= end {
            break;
        }
        let hole = seek(fd, SeekFrom::Hole(data))?.min(end);
        let run = (data / PAGE_SIZE as u64) as usize..hole.div_ceil(PAGE_SIZE as u64) as usize;
        match extents.last_mut() {
            Some(last) if last.end >= run.start => last.end = last.end.max(run.end),
            _ => extents.push(run),
        }
        offset = hole;
    }
    Ok(extents)
}
