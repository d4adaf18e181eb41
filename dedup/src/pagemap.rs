//! Reading `/proc/self/pagemap` to learn, without any hook in the write path, whether a merged
//! page is still the stable file page or has become the instance's private copy.
//!
//! Linux 6.7 and later answer with `PAGEMAP_SCAN`: one `ioctl` gives the range as runs of
//! pages alike (present, file, swapped), which for the long runs of a region costs a fraction
//! of reading an entry per page. Older kernels are read the classic way: each virtual page has
//! a 64-bit entry, bit 63 present, bit 62 swapped, bit 61 "file page or shared anonymous".
//! Either way the flags are readable without privileges (the frame number is not).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use linux_raw_sys::general::{
    PAGE_IS_FILE, PAGE_IS_PRESENT, PAGE_IS_SWAPPED, page_region, pm_scan_arg,
};
use rustix::io::Errno;

const PRESENT: u64 = 1 << 63;
const SWAPPED: u64 = 1 << 62;
const FILE_OR_SHARED: u64 = 1 << 61;

/// What the page tables say about one virtual page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PageBacking {
    /// No page table entry: nothing touched it since it was mapped.
    Untouched,
    /// A page of the file behind the mapping.
    File,
    /// An anonymous page: in a `MAP_PRIVATE` file mapping, the copy a write made.
    Private,
}

pub(crate) struct Pagemap {
    file: File,
    buf: Vec<u64>,
    /// `PAGEMAP_SCAN`'s runs, or `None` once the kernel said it has no such call.
    runs: Option<Vec<page_region>>,
}

/// `PAGEMAP_SCAN`: `_IOWR('f', 16, struct pm_scan_arg)`.
const PAGEMAP_SCAN: u32 = (3 << 30) | ((size_of::<pm_scan_arg>() as u32) << 16) | (0x66 << 8) | 16;

/// The categories that tell the three backings apart.
const CATEGORIES: u64 = (PAGE_IS_PRESENT | PAGE_IS_FILE | PAGE_IS_SWAPPED) as u64;

/// The `PAGEMAP_SCAN` call, which returns how many runs it wrote.
struct Scan<'a>(&'a mut pm_scan_arg);

// SAFETY: the opcode is `PAGEMAP_SCAN`'s, whose argument is the `pm_scan_arg` the pointer
// points to, which the kernel reads and writes (so: mutating).
unsafe impl rustix::ioctl::Ioctl for Scan<'_> {
    type Output = usize;
    const IS_MUTATING: bool = true;

    fn opcode(&self) -> rustix::ioctl::Opcode {
        PAGEMAP_SCAN as _
    }

    fn as_ptr(&mut self) -> *mut std::ffi::c_void {
        std::ptr::from_mut(self.0).cast()
    }

    unsafe fn output_from_ptr(
        out: rustix::ioctl::IoctlOutput,
        _: *mut std::ffi::c_void,
    ) -> rustix::io::Result<usize> {
        Ok(out.max(0) as usize)
    }
}

fn backing_of(categories: u64) -> PageBacking {
    if categories & u64::from(PAGE_IS_SWAPPED) != 0 {
        PageBacking::Private
    } else if categories & u64::from(PAGE_IS_PRESENT) == 0 {
        PageBacking::Untouched
    } else if categories & u64::from(PAGE_IS_FILE) != 0 {
        PageBacking::File
    } else {
        PageBacking::Private
    }
}

impl Pagemap {
    pub(crate) fn open() -> io::Result<Self> {
        Ok(Self {
            file: File::open("/proc/self/pagemap")?,
            buf: Vec::new(),
            runs: Some(Vec::new()),
        })
    }

    /// The backing of `count` pages starting at address `addr`, in order.
    pub(crate) fn read(
        &mut self,
        addr: usize,
        count: usize,
    ) -> io::Result<impl Iterator<Item = PageBacking> + '_> {
        crate::faults::check(crate::faults::Syscall::PagemapRead)?;
        match self.scan(addr, count) {
            Ok(()) => {}
            Err(Errno::NOTTY | Errno::INVAL) => {
                // A kernel before 6.7: entry by entry, from now on.
                self.runs = None;
                self.read_entries(addr, count)?;
            }
            Err(errno) => return Err(errno.into()),
        }
        Ok(self.buf.iter().map(|&categories| backing_of(categories)))
    }

    /// Fills `buf` with the categories of the `count` pages at `addr`, from `PAGEMAP_SCAN`.
    fn scan(&mut self, addr: usize, count: usize) -> Result<(), Errno> {
        let Some(runs) = &mut self.runs else {
            return Err(Errno::NOTTY);
        };
        self.buf.clear();
        let end = (addr + count * crate::PAGE_SIZE) as u64;
        let mut start = addr as u64;
        while start < end {
            runs.clear();
            runs.reserve(count.clamp(1, 4096));
            let mut arg = pm_scan_arg {
                size: size_of::<pm_scan_arg>() as u64,
                flags: 0,
                start,
                end,
                walk_end: 0,
                vec: runs.as_mut_ptr() as u64,
                vec_len: runs.capacity() as u64,
                max_pages: 0,
                category_inverted: 0,
                category_mask: 0,
                category_anyof_mask: 0,
                return_mask: CATEGORIES,
            };
            // SAFETY: `PAGEMAP_SCAN` reads and writes `arg`, and writes at most `vec_len` runs
            // at `vec`, which `runs` has room for; it changes nothing in the address space
            // (no write-protect flag is set).
            let filled = unsafe { rustix::ioctl::ioctl(&self.file, Scan(&mut arg)) }?;
            // SAFETY: the kernel initialised the first `filled` runs.
            unsafe { runs.set_len(filled.min(runs.capacity())) };
            for run in runs.iter() {
                // Pages the walk skipped (no mapping there) read as untouched, as in the
                // page map.
                let from = (run.start.max(start) - addr as u64) as usize / crate::PAGE_SIZE;
                self.buf.resize(from, 0);
                let pages = ((run.end - run.start.max(start)) as usize) / crate::PAGE_SIZE;
                self.buf
                    .extend(std::iter::repeat_n(run.categories & CATEGORIES, pages));
            }
            if arg.walk_end <= start {
                break;
            }
            start = arg.walk_end;
        }
        self.buf.resize(count, 0);
        Ok(())
    }

    /// Fills `buf` with the categories of the `count` pages at `addr`, from their entries.
    fn read_entries(&mut self, addr: usize, count: usize) -> io::Result<()> {
        self.buf.resize(count, 0);
        // SAFETY: u64 has no invalid bit patterns, and the byte view covers exactly `buf`.
        let bytes = unsafe {
            std::slice::from_raw_parts_mut(self.buf.as_mut_ptr().cast::<u8>(), count * 8)
        };
        self.file
            .read_exact_at(bytes, (addr / crate::PAGE_SIZE * 8) as u64)?;
        for entry in &mut self.buf {
            let mut categories = 0;
            for (bit, category) in [
                (PRESENT, PAGE_IS_PRESENT),
                (SWAPPED, PAGE_IS_SWAPPED),
                (FILE_OR_SHARED, PAGE_IS_FILE),
            ] {
                if *entry & bit != 0 {
                    categories |= u64::from(category);
                }
            }
            *entry = categories;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::mm::{MapFlags, ProtFlags, mmap, munmap};

    #[test]
    fn the_scan_and_the_entries_agree_on_every_backing() {
        let memfd = memfd::MemfdOptions::new()
            .create("pagemap-test")
            .expect("memfd");
        memfd.as_file().set_len(8 * 4096).expect("length");
        // SAFETY: a fresh private mapping of the test's own memfd, unmapped below.
        let base = unsafe {
            mmap(
                std::ptr::null_mut(),
                8 * 4096,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::PRIVATE,
                memfd.as_file(),
                0,
            )
        }
        .expect("map") as *mut u8;
        // SAFETY: offsets inside the 8 pages just mapped.
        unsafe {
            base.add(4096).read_volatile(); // a file page
            base.add(2 * 4096).write_volatile(1); // a private copy
            base.add(3 * 4096).read_volatile();
            base.add(5 * 4096).write_volatile(1);
        }
        let mut pagemap = Pagemap::open().expect("pagemap");
        let scanned: Vec<PageBacking> = pagemap.read(base as usize, 8).expect("scan").collect();
        pagemap.runs = None;
        let read: Vec<PageBacking> = pagemap.read(base as usize, 8).expect("read").collect();
        // SAFETY: the mapping made above, no longer used.
        unsafe { munmap(base.cast(), 8 * 4096) }.expect("unmap");
        assert_eq!(scanned, read);
        assert_eq!(read[0], PageBacking::Untouched);
        assert_eq!(read[1], PageBacking::File);
        assert_eq!(read[2], PageBacking::Private);
        assert_eq!(read[5], PageBacking::Private);
    }
}
