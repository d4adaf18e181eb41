//! Guest advice: which ranges of a region may merge, as `madvise(MADV_MERGEABLE /
//! MADV_UNMERGEABLE)` and `prctl(PR_SET_MEMORY_MERGE)` say it for Linux KSM.
//!
//! An engine has one [`MergeScope`], fixed when it starts: with [`MergeScope::All`] (the
//! default, as `PR_SET_MEMORY_MERGE`) every page of every region may merge unless advised
//! [`Advice::Unmergeable`]; with [`MergeScope::Advised`] (classic KSM) only pages advised
//! [`Advice::Mergeable`] may merge.
//!
//! The owner gives advice with its guard held ([`crate::Engine::advise`]), so advice takes
//! effect before the call returns:
//!
//! - **Unmergeable** gives every merged page of the range back to the region's own memfd,
//!   forgets the checksums the engine kept for it, and from then on the engine never reads
//!   the range: its pages are not hashed, indexed, compared, punched as zeros, nor taken into
//!   a run or window that another page starts. A secret never leaves its region's memory.
//! - **Mergeable** opts the range in (scope `Advised`) or undoes an earlier `Unmergeable`
//!   (scope `All`). The pages merge as the scanner or a merge-now finds them.
//!
//! A region holds at most [`MAX_ADVISED_RANGES`] advised ranges (maximal runs of pages with
//! the same advice); advice that would exceed it is refused and changes nothing. The records
//! keep advice per page, so looking it up costs nothing in the scan.

/// Which pages of a region may merge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Advice {
    /// May merge (scope `Advised`), or no longer unmergeable (scope `All`).
    Mergeable,
    /// Never merged, never read by the engine.
    Unmergeable,
}

/// Which pages may merge without advice.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MergeScope {
    /// Every page unless advised unmergeable (as KSM's `PR_SET_MEMORY_MERGE`).
    #[default]
    All,
    /// Only pages advised mergeable (as KSM's `MADV_MERGEABLE`).
    Advised,
}

/// Most advised ranges one region may hold: each is a run of pages with the same advice.
/// Ranges that touch and carry the same advice count once.
pub const MAX_ADVISED_RANGES: usize = 256;
