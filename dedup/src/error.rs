//! Errors of the merge engine: one variant per failure, each saying what was refused and why.

use std::io;
use std::ops::Range;

use crate::RegionId;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the system page size is {0} bytes; samepage merges 4096-byte pages only")]
    PageSize(usize),
    #[error("cannot create the stable memfd: {0}")]
    StableMemfd(#[source] io::Error),
    #[error("cannot reserve {bytes} bytes of address space for the stable store: {source}")]
    StableReserve { bytes: usize, source: io::Error },
    #[error("cannot open /proc/self/pagemap: {0}")]
    Pagemap(#[source] io::Error),
    #[error("cannot start the scanner thread: {0}")]
    SpawnScanner(#[source] io::Error),
    #[error("region base {base:#x} or length {len} is not page-aligned")]
    Unaligned { base: usize, len: usize },
    #[error("region {0:?} is not registered (it was unregistered or belongs to another engine)")]
    UnknownRegion(RegionId),
    #[error("the guard belongs to another owner than region {0:?}")]
    WrongOwner(RegionId),
    #[error("range {range:?} is outside region {region:?} of {len} bytes, or not page-aligned")]
    OutOfRange {
        region: RegionId,
        range: Range<usize>,
        len: usize,
    },
    #[error("{knob} = {value} is out of range: accepted {accepted}")]
    InvalidKnob {
        knob: &'static str,
        value: u64,
        accepted: &'static str,
    },
    #[error(
        "max_page_sharing cannot change while pages are shared ({pages_shared} stable pages): \
         unmerge everything first (run mode unmerge)"
    )]
    SharingLimitInUse { pages_shared: u64 },
    #[error("remapping region {region:?} failed: {source}")]
    Remap { region: RegionId, source: io::Error },
}
