//! `samepage bench`: figures, not timed tests.

pub mod engine;
