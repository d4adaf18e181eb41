//! What the kernel says of the process's mappings, where the engine's model of them
//! (`layout.rs`) cannot know.
//!
//! The model joins neighbouring pages that map consecutive stable slots into one mapping.
//! The kernel joins two such mappings only when their anonymous memory allows it: a private
//! (`MAP_PRIVATE`) mapping gets an anonymous-memory root (`anon_vma`) at its first
//! copy-on-write fault, and two mappings with different roots stay apart. Two windows of a
//! region, each mapped by its own `mmap` and each with a private copy, therefore stay two
//! mappings when a merge of the pages between them makes their slots consecutive. Which
//! mapping has which root is the kernel's; so after each remap the engine asks whether the
//! pages at its edges joined ([`joined`]).
//!
//! The question is one `PROCMAP_QUERY` ioctl on `/proc/self/maps` (Linux 6.11 and later),
//! or, on older kernels, a reading of `/proc/self/maps`.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::OnceLock;

use crate::PAGE_SIZE;

/// `struct procmap_query` of `<linux/fs.h>`.
#[repr(C)]
#[derive(Default)]
struct ProcmapQuery {
    size: u64,
    query_flags: u64,
    query_addr: u64,
    vma_start: u64,
    vma_end: u64,
    vma_flags: u64,
    vma_page_size: u64,
    vma_offset: u64,
    inode: u64,
    dev_major: u32,
    dev_minor: u32,
    vma_name_size: u32,
    build_id_size: u32,
    vma_name_addr: u64,
    build_id_addr: u64,
}

/// `PROCMAP_QUERY`: `_IOWR(PROCFS_IOCTL_MAGIC, 17, struct procmap_query)`.
const PROCMAP_QUERY: rustix::ioctl::Opcode =
    rustix::ioctl::opcode::read_write::<ProcmapQuery>(b'f', 17);

/// `/proc/self/maps`, opened once: the ioctl's file, and the fallback's.
static MAPS: OnceLock<Option<File>> = OnceLock::new();

/// Whether the page that ends at `addr` and the page that starts there lie in one mapping.
/// `None` when the kernel cannot say (no `/proc`, or no mapping there).
pub(crate) fn joined(addr: usize) -> Option<bool> {
    let maps = MAPS
        .get_or_init(|| File::open("/proc/self/maps").ok())
        .as_ref()?;
    let before = addr.checked_sub(PAGE_SIZE)?;
    mapping_end_ioctl(maps, before)
        .or_else(|| mapping_end_read(maps, before))
        .map(|end| end > addr)
}

/// The end of the mapping that holds `addr`, by `PROCMAP_QUERY`.
fn mapping_end_ioctl(maps: &File, addr: usize) -> Option<usize> {
    let mut query = ProcmapQuery {
        size: std::mem::size_of::<ProcmapQuery>() as u64,
        query_addr: addr as u64,
        ..ProcmapQuery::default()
    };
    // SAFETY: `PROCMAP_QUERY` reads and writes one `struct procmap_query`, whose layout
    // `ProcmapQuery` repeats field for field; `size` says how much of it the kernel may use,
    // and the name and build-id buffers are absent (sizes 0).
    unsafe {
        rustix::ioctl::ioctl(
            maps,
            rustix::ioctl::Updater::<PROCMAP_QUERY, ProcmapQuery>::new(&mut query),
        )
    }
    .ok()?;
    (query.vma_start as usize <= addr).then_some(query.vma_end as usize)
}

/// The end of the mapping that holds `addr`, from the text of `/proc/self/maps`.
fn mapping_end_read(maps: &File, addr: usize) -> Option<usize> {
    let mut chunk = vec![0u8; 1 << 16];
    let mut bytes = Vec::new();
    loop {
        let read = maps.read_at(&mut chunk, bytes.len() as u64).ok()?;
        if read == 0 {
            break;
        }
        bytes.extend_from_slice(&chunk[..read]);
    }
    String::from_utf8_lossy(&bytes).lines().find_map(|line| {
        let (start, end) = line.split(' ').next()?.split_once('-')?;
        let (start, end) = (
            usize::from_str_radix(start, 16).ok()?,
            usize::from_str_radix(end, 16).ok()?,
        );
        (start <= addr && addr < end).then_some(end)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ioctl_and_the_text_agree() {
        let maps = File::open("/proc/self/maps").expect("maps");
        // A mapping of three pages, its middle page remapped: three mappings.
        let len = 3 * PAGE_SIZE;
        // SAFETY: a fresh anonymous mapping nobody else knows of; unmapped below.
        let base = unsafe {
            rustix::mm::mmap_anonymous(
                std::ptr::null_mut(),
                len,
                rustix::mm::ProtFlags::READ,
                rustix::mm::MapFlags::PRIVATE,
            )
        }
        .expect("mmap") as usize;
        // SAFETY: the middle page of the mapping made above, replaced by one of other
        // protection (so that the kernel cannot join it to its neighbours).
        unsafe {
            rustix::mm::mprotect(
                (base + PAGE_SIZE) as *mut _,
                PAGE_SIZE,
                rustix::mm::MprotectFlags::READ | rustix::mm::MprotectFlags::WRITE,
            )
        }
        .expect("mprotect");
        for addr in [base, base + PAGE_SIZE, base + 2 * PAGE_SIZE] {
            let read = mapping_end_read(&maps, addr);
            assert!(read.is_some());
            if let Some(ioctl) = mapping_end_ioctl(&maps, addr) {
                assert_eq!(Some(ioctl), read);
            }
        }
        assert_eq!(joined(base + PAGE_SIZE), Some(false));
        assert_eq!(joined(base + 2 * PAGE_SIZE), Some(false));
        // SAFETY: the mapping made above, used by nothing else.
        unsafe { rustix::mm::munmap(base as *mut _, len) }.expect("munmap");
    }
}
