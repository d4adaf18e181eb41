//! Tools that keep the merge engine honest, shared by its tests and `samepage bench --suite
//! soak`:
//!
//! - [`TestRegion`]: a memfd region registered with an engine, written only through methods
//!   that also write a shadow copy, which every check compares it against;
//! - [`kernel`]: the kernel's view of such regions, read without privileges from
//!   `/proc/self/maps` and `/proc/self/pagemap`, and the [`kernel::checkpoint`] that checks
//!   pages, the engine's audit and accounting, and that view;
//! - [`run`]: the differential stress run, short in CI and as long as asked in the soak.
//!
//! Checks are assertions: a divergence panics with what diverged and where.

pub mod kernel;
mod random;
mod region;
pub mod run;

pub use random::Random;
pub use region::{TestRegion, advised_only_engine, manual_engine};
/// Deterministic content: page `page` of a region filled with `seed`.
pub use samepage_dedup::pattern::page as page_content;
