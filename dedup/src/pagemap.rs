//! Reading `/proc/self/pagemap` to learn, without any hook in the write path, whether a merged
//! page is still the stable file page or has become the instance's private copy.
//!
//! Each virtual page has a 64-bit entry: bit 63 present, bit 62 swapped, bit 61 "file page or
//! shared anonymous". The flag bits are readable without privileges (the frame number is not).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

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
}

impl Pagemap {
    pub(crate) fn open() -> io::Result<Self> {
        Ok(Self {
            file: File::open("/proc/self/pagemap")?,
            buf: Vec::new(),
        })
    }

    /// The backing of `count` pages starting at address `addr`, in order.
    pub(crate) fn read(
        &mut self,
        addr: usize,
        count: usize,
    ) -> io::Result<impl Iterator<Item = PageBacking> + '_> {
        self.buf.resize(count, 0);
        // SAFETY: u64 has no invalid bit patterns, and the byte view covers exactly `buf`.
        let bytes = unsafe {
            std::slice::from_raw_parts_mut(self.buf.as_mut_ptr().cast::<u8>(), count * 8)
        };
        crate::faults::check(crate::faults::Syscall::PagemapRead)?;
        self.file
            .read_exact_at(bytes, (addr / crate::PAGE_SIZE * 8) as u64)?;
        Ok(self.buf.iter().map(|&entry| {
            if entry & SWAPPED != 0 {
                PageBacking::Private
            } else if entry & PRESENT == 0 {
                PageBacking::Untouched
            } else if entry & FILE_OR_SHARED != 0 {
                PageBacking::File
            } else {
                PageBacking::Private
            }
        }))
    }
}
