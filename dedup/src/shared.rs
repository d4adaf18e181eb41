//! What the engine's handles, region handles, image handles and scanner thread share: the
//! merge state behind its lock, and what the scanner thread needs besides (its wake-up, the
//! park visits owed, its figures). It lives apart from `engine.rs`, which builds it, and
//! from `scanner.rs` and `image.rs`, which use it, so that all of them can name it without
//! naming each other.

use std::sync::atomic::AtomicU64;
use std::time::Instant;

use parking_lot::{Condvar, Mutex};

use crate::quiesce::Owner;
use crate::state::MergeState;

/// What the engine's handles, region handles and scanner thread share.
pub(crate) struct Shared {
    pub(crate) state: Mutex<MergeState>,
    /// Signalled when the knobs change or the engine shuts down, to wake a sleeping scanner.
    pub(crate) wake: Condvar,
    /// Set when the last engine handle is dropped.
    pub(crate) shutdown: Mutex<bool>,
    /// Owners that parked, waiting for their park visits (see [`crate::Engine::parked`]).
    /// Apart from the state so that parking never waits for a batch.
    pub(crate) parked: Mutex<Vec<ParkVisit>>,
    /// CPU time spent by the scanner thread, in nanoseconds.
    pub(crate) scanner_cpu_ns: AtomicU64,
    /// Failures the scanner met (it cannot return them).
    pub(crate) errors: AtomicU64,
    /// The last of those failures, for [`crate::Engine::last_error`].
    pub(crate) last_error: Mutex<Option<String>>,
}

/// A visit owed to an owner that parked (the scanner thread makes them: `scanner.rs`).
pub(crate) struct ParkVisit {
    pub(crate) owner: Owner,
    /// When the visit is due.
    pub(crate) due: Instant,
    /// Visits still owed: the first records checksums, the second merges what stayed.
    pub(crate) visits_left: u8,
}
