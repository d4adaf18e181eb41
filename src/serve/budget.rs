//! The host's memory budget over every function's pool.
//!
//! The budget is the host's proportional set size, the kernel's count of the memory the
//! process holds, in which a page merged across instances counts once. Before a new instance
//! is made, the host must have room for it: its PSS, what is promised to other instances
//! being made at the same moment, and what the function's last new instance added (measured
//! across that instance's instantiation and first request, after merging it) must fit, or
//! idle instances are evicted until it does. With nothing left to evict, no instance is made
//! rather than the budget broken.
//!
//! This file only counts: which instance to evict is the lifecycle's choice, handed in as
//! `evict`, so that the arrows run from the lifecycle down to here.

use std::time::{Duration, Instant};

use parking_lot::Mutex;
use samepage_runtime::measure::pss_bytes;

/// Why no instance could be made.
#[derive(Debug, thiserror::Error)]
#[error(
    "the host holds {} MiB of its {} MiB memory budget and a new instance needs about {} MiB, \
     with no idle instance left to evict",
    .pss >> 20,
    .budget >> 20,
    .need >> 20
)]
pub struct OverBudget {
    /// The host's PSS when it was refused.
    pub pss: u64,
    /// What the new instance was expected to add.
    pub need: u64,
    pub budget: u64,
}

/// The host's memory budget.
pub struct Budget {
    /// Most bytes of PSS; `None` for no cap (then nothing is measured).
    pub limit: Option<u64>,
    /// Bytes promised to instances being made, not yet in the PSS they are measured by:
    /// cold starts at the same moment see each other's.
    pending: Mutex<u64>,
    /// The last reading of the host's PSS and when it began (see [`Budget::pss`]).
    reading: Mutex<Option<(Instant, u64)>>,
}

/// How old a reading of the host's PSS may be to decide on room. Reading `smaps_rollup` walks
/// every mapping of the host, milliseconds with hundreds of instances, and the kernel reads
/// one file at a time: without sharing readings, a burst of cold starts on every handler
/// thread queued up behind each other's readings (measured with 24 functions at 45 requests a
/// second: every worker thread waiting in `seq_read`, the node unable to drain).
const READING_FRESH: Duration = Duration::from_millis(10);

/// Room made for one new instance: what it was promised, given back when dropped (once the
/// instance is made and measured, or was not made).
pub struct Room<'a> {
    budget: &'a Budget,
    promised: u64,
    /// The host's PSS before the instance, when there is a budget to measure against.
    pub pss_before: Option<u64>,
}

impl Drop for Room<'_> {
    fn drop(&mut self) {
        *self.budget.pending.lock() -= self.promised;
    }
}

impl Budget {
    pub fn new(limit: Option<u64>) -> Self {
        Self {
            limit,
            pending: Mutex::new(0),
            reading: Mutex::new(None),
        }
    }

    /// The host's PSS as read at `not_before` or later: a reading that began since is
    /// shared, and threads that ask during a reading wait for it rather than start another.
    fn pss(&self, not_before: Instant) -> u64 {
        let mut reading = self.reading.lock();
        if let Some((at, pss)) = *reading
            && at >= not_before
        {
            return pss;
        }
        let at = Instant::now();
        let pss = pss_bytes().unwrap_or(0);
        *reading = Some((at, pss));
        pss
    }

    /// What a decision may go by: a reading at most [`READING_FRESH`] old.
    fn fresh_enough() -> Instant {
        Instant::now()
            .checked_sub(READING_FRESH)
            .unwrap_or_else(Instant::now)
    }

    /// Makes room for a new instance expected to add `need` bytes: calls `evict` (which drops
    /// one idle instance, or says `false` when none is left) until the host's PSS, what is
    /// promised to instances being made, and `need` fit the budget.
    pub fn make_room(
        &self,
        need: u64,
        mut evict: impl FnMut() -> bool,
    ) -> Result<Room<'_>, OverBudget> {
        let Some(budget) = self.limit else {
            return Ok(Room {
                budget: self,
                promised: 0,
                pss_before: None,
            });
        };
        // After an eviction, only a reading that began after it tells what it freed.
        let mut not_before = Self::fresh_enough();
        loop {
            let pss = self.pss(not_before);
            {
                let mut pending = self.pending.lock();
                if pss + *pending + need <= budget {
                    *pending += need;
                    return Ok(Room {
                        budget: self,
                        promised: need,
                        pss_before: Some(pss),
                    });
                }
            }
            if !evict() {
                return Err(OverBudget { pss, need, budget });
            }
            not_before = Instant::now();
        }
    }

    /// Calls `evict` while the host is over its budget (instances grow as they serve), until
    /// it is within it or nothing is left to evict.
    pub fn enforce(&self, mut evict: impl FnMut() -> bool) {
        let Some(budget) = self.limit else {
            return;
        };
        let mut not_before = Self::fresh_enough();
        while self.pss(not_before) > budget && evict() {
            not_before = Instant::now();
        }
    }
}
