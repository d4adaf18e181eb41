//! The engine's test tools, from `samepage-stress` (which the soak benchmark shares).

pub use samepage_stress::*;
