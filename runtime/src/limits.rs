//! Limits on what one instance may use, with the meanings of `wasmtime run`'s `-W fuel`,
//! `-W timeout` and `-W max-memory-size`:
//!
//! - **fuel**: the store starts with this much fuel (wasmtime's `consume_fuel`); a guest that
//!   uses it up traps with [`wasmtime::Trap::OutOfFuel`];
//! - **timeout**: wall time from the store's creation, enforced by epoch interruption. One
//!   ticker thread per host advances the engine's epoch every [`EPOCH_TICK`]; each store's
//!   deadline is the number of ticks its timeout spans, so a guest stops within one tick of
//!   its timeout with [`wasmtime::Trap::Interrupt`];
//! - **max memory size**: the most bytes any one linear memory may have; a larger initial
//!   size fails instantiation, and growth beyond it makes `memory.grow` return -1.
//!
//! Fuel and epochs cost compiled code a check at every loop head and call, so the host turns
//! each on only when its limit is set.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use wasmtime::{Store, StoreLimits, StoreLimitsBuilder};

/// How often the ticker advances the epoch: a timeout's granularity.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// Limits applied to every instance of a host.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    /// Fuel each store starts with; `None` for no fuel accounting.
    pub fuel: Option<u64>,
    /// Wall time each instance may run, counted from its store's creation.
    pub timeout: Option<Duration>,
    /// Most bytes of any one linear memory.
    pub max_memory_size: Option<usize>,
}

impl Limits {
    /// Turns on in `config` what these limits need.
    pub fn configure(&self, config: &mut wasmtime::Config) {
        if self.fuel.is_some() {
            config.consume_fuel(true);
        }
        if self.timeout.is_some() {
            config.epoch_interruption(true);
        }
    }

    /// The store's own limiter for the memory limit (install it with `Store::limiter`).
    pub fn store_limits(&self) -> StoreLimits {
        let mut builder = StoreLimitsBuilder::new();
        if let Some(bytes) = self.max_memory_size {
            builder = builder.memory_size(bytes);
        }
        builder.build()
    }

    /// Gives a store its fuel and its deadline, counted from now: at its creation, or before
    /// each call for a per-call limit.
    pub fn apply<T>(&self, store: &mut Store<T>) -> wasmtime::Result<()> {
        if let Some(fuel) = self.fuel {
            store.set_fuel(fuel)?;
        }
        // Without a timeout the deadline is never: an engine may have epochs on for other
        // stores' timeouts, and a store's deadline starts at the current epoch. (wasmtime adds
        // the ticks to the current epoch, so "never" is half the range, not all of it.)
        let ticks = self.timeout.map_or(u64::MAX / 2, |timeout| {
            // One tick more than the timeout spans: the first tick may come at once.
            let ticks = timeout.as_nanos().div_ceil(EPOCH_TICK.as_nanos()) + 1;
            u64::try_from(ticks).unwrap_or(u64::MAX / 2)
        });
        store.set_epoch_deadline(ticks);
        Ok(())
    }
}

/// The thread that advances a host's epoch while any timeout is set; stops when dropped.
pub struct EpochTicker {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EpochTicker {
    /// Starts ticking `engine`'s epoch every [`EPOCH_TICK`].
    pub fn start(engine: &wasmtime::Engine) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new()
            .name("samepage-epoch".into())
            .spawn({
                let (engine, stop) = (engine.clone(), stop.clone());
                move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(EPOCH_TICK);
                        engine.increment_epoch();
                    }
                }
            })?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
