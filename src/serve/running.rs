//! How many handlers run at once: about as many as the machine has CPUs, as `wasmtime serve`
//! runs them.
//!
//! `wasmtime serve` runs handlers on tokio's worker threads, one per CPU: a handler that
//! computes holds its worker until it finishes or waits, and the requests behind it wait
//! without an instance. samepage runs each handler on a blocking thread of its own, so
//! without a limit every request admitted by its function's `max_instances` runs at once.
//! Measured on the Python component at 16 connections on 2 CPUs (`oha -z 10s -c 16`,
//! `--reuse fresh`): with every admitted handler running at once, 16 instances written at
//! once and a malloc arena for each of their threads peaked at 118.8 MiB of PSS, with a p99
//! of 118 ms; with two at once, 63.8 MiB and 94 ms, where `wasmtime serve` peaked at 64.0
//! MiB (`docs/benchmarks/serve.md` has the suite's figures).
//!
//! A request therefore takes one of a fixed number of [`RunSlots`] before its handler runs,
//! and gives it back when it is done. What the slot cannot know is whether its handler is
//! computing or waiting (a slow client, a sleep): so a slot is held for at most
//! [`RunSlots::QUANTUM`], after which the handler runs on without it and the next request
//! starts. A handler that waits therefore delays the requests behind it by one quantum at
//! most, never for as long as it waits.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The slots handlers take to run, in arrival order.
pub struct RunSlots {
    slots: Arc<Semaphore>,
}

/// One request's slot, given back when dropped or when its quantum is over, whichever
/// comes first.
pub struct RunSlot(Arc<Mutex<Option<OwnedSemaphorePermit>>>);

impl RunSlots {
    /// Longest a handler holds its slot: several times a computing handler's time on the
    /// bundled components (about 5 ms of CPU for Python, 2 for JavaScript), well below a
    /// request timeout.
    pub const QUANTUM: Duration = Duration::from_millis(50);

    /// `count` slots; at least one.
    pub fn new(count: usize) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(count.max(1))),
        }
    }

    /// As many slots as CPUs this process may run on: the default.
    pub fn per_cpu() -> usize {
        std::thread::available_parallelism().map_or(1, usize::from)
    }

    /// Waits for a slot, behind the requests that came first. Must be called within the
    /// tokio runtime, whose timer takes the slot back after the quantum.
    pub async fn take(&self) -> RunSlot {
        let permit = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .expect("the run slots' semaphore is never closed");
        let slot = Arc::new(Mutex::new(Some(permit)));
        let expiring = Arc::downgrade(&slot);
        tokio::spawn(async move {
            tokio::time::sleep(Self::QUANTUM).await;
            if let Some(slot) = expiring.upgrade() {
                slot.lock().take();
            }
        });
        RunSlot(slot)
    }

    #[cfg(test)]
    fn free(&self) -> usize {
        self.slots.available_permits()
    }
}

impl Drop for RunSlot {
    fn drop(&mut self) {
        self.0.lock().take();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_slot_comes_back_when_dropped_or_after_its_quantum() {
        let slots = RunSlots::new(1);
        let first = slots.take().await;
        assert_eq!(slots.free(), 0);
        drop(first);
        assert_eq!(slots.free(), 1);

        let _held = slots.take().await;
        let waiting = tokio::time::timeout(RunSlots::QUANTUM / 2, slots.take()).await;
        assert!(
            waiting.is_err(),
            "a second request ran while the slot was held"
        );
        // The quantum ends: the next request runs although the first still holds its slot.
        let next = tokio::time::timeout(RunSlots::QUANTUM * 4, slots.take()).await;
        assert!(next.is_ok(), "the slot did not come back after its quantum");
    }
}
