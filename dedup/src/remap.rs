//! Every system call that changes what a region maps. Each takes a [`Quiescent`] token for
//! the region's owner: see [`crate::quiesce`] for the rules that make these calls sound, and
//! [`crate::memfds`] for the one other change a region can observe, punching its memfd.

use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;

use rustix::mm::{MapFlags, ProtFlags, mmap};

use crate::faults::Syscall;
use crate::quiesce::Quiescent;
use crate::region::Region;
use crate::{Error, PAGE_SIZE};

/// Maps `count` pages of `file` from `offset` over the region's pages from `first`, in
/// place of whatever mapped them. Callers hold the owner's token `q` (checked) and map pages
/// that hold the bytes the owner saw there. Inside a window (the owner runs), the new mapping
/// is write-protected again at once: the window's later steps may compare and remap these
/// pages again, and they must not change meanwhile.
fn replace_pages(
    q: Quiescent<'_>,
    region: &Region,
    first: usize,
    count: usize,
    sharing: MapFlags,
    file: impl AsFd,
    offset: u64,
) -> Result<(), Error> {
    region.check_protected(q)?;
    region.note_layout_change();
    // SAFETY: the range lies inside the region's mapping (callers bound it by the length
    // read under the gate), which the engine is allowed to replace (module contract); the
    // owner cannot write it meanwhile (callers hold its token: parked, or a window that
    // write-protects the range); and the new pages hold the bytes the owner saw, so nothing
    // it can observe changes, even if it reads them meanwhile.
    change_backing(region, || unsafe {
        mmap(
            region.page_addr(first) as *mut _,
            count * PAGE_SIZE,
            ProtFlags::READ | ProtFlags::WRITE,
            sharing | MapFlags::FIXED,
            file,
            offset,
        )
        .map(drop)
    })?;
    // The remap stands whatever happens next; pages a window could not protect again are
    // noted, and refuse the window's later remaps.
    if region.rewatch(first, count, q.running()).is_err() {
        region.note_protection_lost();
    }
    Ok(())
}

/// Makes `call`, a system call that changes what backs the region's pages (unless fault
/// injection fails it first), and gives its error as the engine's.
fn change_backing(
    region: &Region,
    call: impl FnOnce() -> rustix::io::Result<()>,
) -> Result<(), Error> {
    crate::faults::check(Syscall::Mmap)
        .and_then(|()| call())
        .map_err(|e| Error::Remap {
            region: region.id,
            source: e.into(),
        })
}

/// Makes pages `first..first + count` of the region inaccessible address space again
/// (`PROT_NONE`, nothing behind it), as they were before the region grew over them: for a
/// reset that shrinks the region, once nothing of what the owner wrote is left there.
pub(crate) fn reserve(
    q: Quiescent<'_>,
    region: &Region,
    first: usize,
    count: usize,
) -> Result<(), Error> {
    region.check_token(q, first, count);
    region.note_layout_change();
    // SAFETY: the range lies inside the region's reservation (callers bound it by the length
    // read under the gate), which only the region's mapping uses; the owner cannot touch it
    // meanwhile (the token), and it is about to lose the range: the caller shortens the
    // region's length right after, under the same token.
    change_backing(region, || unsafe {
        rustix::mm::mmap_anonymous(
            region.page_addr(first) as *mut _,
            count * PAGE_SIZE,
            ProtFlags::empty(),
            MapFlags::PRIVATE | MapFlags::NORESERVE | MapFlags::FIXED,
        )
        .map(drop)
    })?;
    region.unwatch_from(first);
    Ok(())
}

/// Maps `count` stable pages starting at `slot` of `stable` over the region's pages starting
/// at `first`, copy-on-write. The caller has checked that the region's bytes there equal the
/// stable pages' bytes, under the same token.
pub(crate) fn map_stable(
    q: Quiescent<'_>,
    region: &Region,
    first: usize,
    count: usize,
    stable: impl AsFd,
    slot: u64,
) -> Result<(), Error> {
    region.check_token(q, first, count);
    // The new pages hold the same bytes (the caller compared them under the same token).
    replace_pages(
        q,
        region,
        first,
        count,
        MapFlags::PRIVATE,
        stable,
        slot * PAGE_SIZE as u64,
    )
}

/// Gives the region back its own pages `first..first + count`: copies what the owner sees
/// there (stable pages, private copies a write made, or a window's private copies) into the
/// region's memfd, then maps
/// the memfd over the range again. Adjacent pieces of the memfd mapping merge back into one.
pub(crate) fn restore_own(
    q: Quiescent<'_>,
    region: &Region,
    first: usize,
    count: usize,
) -> Result<(), Error> {
    region.check_token(q, first, count);
    // SAFETY: the token keeps the owner from writing, so the bytes stay as read; the range is
    // inside the mapping (caller's bound).
    let bytes = unsafe { region.pages(first..first + count) };
    crate::faults::check(Syscall::Pwrite)
        .map_err(std::io::Error::from)
        .and_then(|()| {
            region
                .memfd
                .as_file()
                .write_all_at(bytes, (first * PAGE_SIZE) as u64)
        })
        .map_err(|source| Error::RestoreWrite {
            region: region.id,
            source,
        })?;
    // The memfd now holds exactly the bytes the owner saw. Populated: a page the new
    // mapping has no entry for reads as never touched in the page map, and the scanner
    // would pass it over as a hole until the owner next touched it, so that unmerged pages
    // never merged again. Every page has data now, so populating allocates nothing.
    replace_pages(
        q,
        region,
        first,
        count,
        MapFlags::SHARED | MapFlags::POPULATE,
        region.memfd.as_file(),
        (first * PAGE_SIZE) as u64,
    )
}

/// Maps the region's own memfd over pages `first..first + count` again. Only for pages whose
/// bytes the memfd holds: after `restore_own` copied them in, or when a merge is undone
/// before the memfd was punched.
pub(crate) fn map_own(
    q: Quiescent<'_>,
    region: &Region,
    first: usize,
    count: usize,
) -> Result<(), Error> {
    region.check_token(q, first, count);
    replace_pages(
        q,
        region,
        first,
        count,
        MapFlags::SHARED,
        region.memfd.as_file(),
        (first * PAGE_SIZE) as u64,
    )
}

/// Gives pages `first..first + count`, just mapped over a window of stable slots, their own
/// bytes back as private copies: reads them from the region's memfd (which still holds them;
/// it is punched afterwards) into the mapping, whose copy-on-write makes each page private.
pub(crate) fn fill_private_from_own(
    q: Quiescent<'_>,
    region: &Region,
    first: usize,
    count: usize,
) -> Result<(), Error> {
    region.check_token(q, first, count);
    // Private copies now lie where the window's stable pages were mapped.
    region.note_layout_change();
    // SAFETY: the range lies inside the region's mapping (caller's bound); the owner cannot
    // touch it (the token); what is written is the owner's own bytes, read from its memfd.
    let target = unsafe {
        std::slice::from_raw_parts_mut(region.page_addr(first) as *mut u8, count * PAGE_SIZE)
    };
    region
        .memfd
        .as_file()
        .read_exact_at(target, (first * PAGE_SIZE) as u64)
        .map_err(|source| Error::PrivateCopy {
            region: region.id,
            source,
        })
}

/// Writes `bytes` (whole pages) over the region's pages from `first`, just mapped over
/// stable slots, as private copies: the owner's own bytes of those pages, read out under the
/// same token before the remap (a compacted stretch's own pages, `state::compact`).
pub(crate) fn write_private(q: Quiescent<'_>, region: &Region, first: usize, bytes: &[u8]) {
    region.check_token(q, first, bytes.len() / PAGE_SIZE);
    // Private copies now lie where the stable pages were mapped.
    region.note_layout_change();
    // SAFETY: the range lies inside the region's mapping (caller's bound, as `bytes` is
    // whole pages of it); the owner cannot touch it (the token); what is written is the
    // owner's own bytes, which it saw there before the remap.
    let target =
        unsafe { std::slice::from_raw_parts_mut(region.page_addr(first) as *mut u8, bytes.len()) };
    target.copy_from_slice(bytes);
}

/// Drops every private copy in pages `first..first + count`: a page of a `MAP_PRIVATE`
/// window that its owner wrote reads its stable page again, and a page of the region's own
/// `MAP_SHARED` memfd mapping loses only its page-table entry (the memfd keeps its bytes).
/// For a reset, whose caller then punches what the owner wrote into the memfd: the owner is
/// to see the mapped pages as they were before it wrote.
pub(crate) fn drop_private_copies(
    q: Quiescent<'_>,
    region: &Region,
    first: usize,
    count: usize,
) -> Result<(), Error> {
    region.check_token(q, first, count);
    // The mappings stay as they are: not a change of layout (`Region::layout`).
    // SAFETY: the range lies inside the region's mapping (caller's bound), which the engine
    // is allowed to change (module contract); the owner cannot touch it meanwhile (the
    // token), and what it will read there afterwards is what the caller's reset promises
    // (the mapped file's pages). No memory the process uses besides the region is affected.
    change_backing(region, || unsafe {
        rustix::mm::madvise(
            region.page_addr(first) as *mut _,
            count * PAGE_SIZE,
            rustix::mm::Advice::LinuxDontNeed,
        )
    })
}
