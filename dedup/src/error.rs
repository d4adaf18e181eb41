//! Errors of the merge engine: one variant per failure, each saying what was refused or what
//! failed, and why.

use std::io;
use std::ops::Range;

use crate::{KnobRange, RegionId};

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
    #[error("region {region:?} is of domain {domain}; it cannot go to an owner of domain {owner}")]
    OwnerDomain {
        region: RegionId,
        domain: u32,
        owner: u32,
    },
    #[error("the mapping is not registered with an engine")]
    NotRegistered,
    #[error("range {range:?} is outside region {region:?} of {len} bytes, or not page-aligned")]
    OutOfRange {
        region: RegionId,
        range: Range<usize>,
        len: usize,
    },
    #[error("{} = {value} is out of range: accepted {knob}", knob.name)]
    InvalidKnob { knob: KnobRange, value: u64 },
    #[error(
        "advisor_min_pages_to_scan = {min} is above advisor_max_pages_to_scan = {max}: the \
         minimum must be at most the maximum"
    )]
    AdvisorBounds { min: usize, max: usize },
    #[error(
        "max_page_sharing cannot change while pages are shared ({pages_shared} stable pages): \
         unmerge everything first (run mode unmerge)"
    )]
    SharingLimitInUse { pages_shared: u64 },
    #[error("region {region:?} would hold more than {limit} advised ranges")]
    TooManyAdvisedRanges { region: RegionId, limit: usize },
    #[error("reading the page map of region {region:?} failed: {source}")]
    PagemapRead { region: RegionId, source: io::Error },
    #[error("finding the pages that hold data in the memfd of region {region:?} failed: {source}")]
    DataExtents { region: RegionId, source: io::Error },
    #[error("the stable store is full: no room for {pages} more pages of a module image")]
    StableFull { pages: usize },
    #[error("a module image must be whole pages, got {0} bytes")]
    ImageUnaligned(usize),
    #[error("a module image of {image} bytes does not fit a region of {region} bytes")]
    ImageTooLong { image: usize, region: usize },
    #[error("a module image of domain {image} cannot go into a region of domain {region}")]
    ImageDomain { image: u32, region: u32 },
    #[error("the module image belongs to another engine")]
    ForeignImage,
    #[error("writing a module image into region {region:?} failed: {source}")]
    ImageWrite { region: RegionId, source: io::Error },
    #[error("writing new stable pages into the stable memfd failed: {0}")]
    StableWrite(#[source] io::Error),
    #[error("freeing stable pages nobody shares any more failed: {0}")]
    StablePunch(#[source] io::Error),
    #[error("write-protecting pages of running region {region:?} failed: {source}")]
    Protect {
        region: RegionId,
        source: crate::ProtectError,
    },
    #[error("remapping region {region:?} failed: {source}")]
    Remap { region: RegionId, source: io::Error },
    #[error("copying merged pages of region {region:?} back into its memfd failed: {source}")]
    RestoreWrite { region: RegionId, source: io::Error },
    #[error("giving pages of region {region:?} private copies of their bytes failed: {source}")]
    PrivateCopy { region: RegionId, source: io::Error },
    #[error("freeing pages of zeros in region {region:?}'s memfd failed: {source}")]
    Punch { region: RegionId, source: io::Error },
}
