//! samepage-dedup: merges identical pages of memfd-backed memory regions into one
//! copy-on-write page. TODO design doc
pub mod error;
pub mod knobs;
pub mod quiesce;
pub mod stats;

mod engine;
mod pagemap;
mod region;
mod remap;
mod stable;
mod state;

pub use engine::{Engine, EngineConfig, MergeNowReport, RegionHandle};
pub use error::Error;
pub use knobs::{Knobs, RunMode};
pub use quiesce::{DomainId, Owner, OwnerGuard, OwnerId};
pub use region::RegionId;
pub use state::Audit;
pub use stats::Stats;

/// The page size samepage merges at. x86_64 and aarch64 Linux with 4 KiB pages.
pub const PAGE_SIZE: usize = 4096;
