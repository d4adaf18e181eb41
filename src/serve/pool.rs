//! A function's pool of instances, and the host's memory budget over all pools.
//!
//! Each function has at most `max_instances` instances at once, busy and idle: a request
//! takes a permit of the function's semaphore before it takes an instance, so a request
//! beyond the maximum waits for one to come back. An instance serves one request at a time.
//! Idle instances wait in their function's queue in the order they parked: a request takes
//! the most recently parked (the warmest), the memory budget evicts the least recently
//! parked of all functions, and keep-alive drops those idle longer than `idle_timeout` down
//! to `min_instances`.
//!
//! The budget is the host's proportional set size, the kernel's count of the memory the
//! process holds, in which a page merged across instances counts once. Before a new instance
//! is made, the host must have room for it: its PSS plus what the function's last new
//! instance added (measured across that instance's instantiation and first request, after
//! merging it) must fit, or idle instances are evicted, least recently used first, until it
//! does. With no idle instance left to evict, the request is refused (503) rather than the
//! budget broken. A new instance is merged as soon as its first request is answered, so
//! that what it shares with the others stops counting before the next one is made; later,
//! warm instances are merged by the scanner as they park (scan on park).

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use parking_lot::Mutex;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use samepage_dedup::{OwnerId, OwnerStats};
use samepage_runtime::StoreOwner;
use tokio::sync::Semaphore;

use super::config::FunctionConfig;
use super::proxy::ProxyInstance;

/// What a function runs, compiled; clones share the compiled code and its module images.
#[derive(Clone)]
pub enum Code {
    Proxy(samepage_runtime::Component),
    Wagi(samepage_runtime::Module),
}

/// One function: its configuration, code, pool and counters.
pub struct Function {
    pub config: FunctionConfig,
    pub code: Code,
    /// Idle instances, oldest park first.
    idle: Mutex<VecDeque<Parked>>,
    /// One permit per instance the function may have at once.
    pub permits: Arc<Semaphore>,
    /// The owners of the function's live instances (idle, busy, starting), for its metrics.
    owners: Mutex<BTreeMap<OwnerId, StoreOwner>>,
    /// Bytes of PSS the function's last new instance added, merged; 0 until one was made.
    cost: AtomicU64,
    pub counters: FunctionCounters,
    /// Seconds from a request's arrival to its response's head.
    pub latency: Histogram,
}

/// An instance in its function's queue, and since when.
struct Parked {
    instance: ProxyInstance,
    since: Instant,
}

/// Counters of one function.
#[derive(Default)]
pub struct FunctionCounters {
    pub requests: AtomicU64,
    /// Requests that had to wait for an instance to be made.
    pub cold_starts: AtomicU64,
    /// Requests served by an instance that was already there.
    pub warm_starts: AtomicU64,
    /// Idle instances dropped to keep within the memory budget.
    pub evictions: AtomicU64,
    /// Idle instances dropped after `idle_timeout`.
    pub expired: AtomicU64,
    /// Instances made ahead of requests (`min_instances`, and reset's replacements).
    pub prewarmed: AtomicU64,
    pub traps: AtomicU64,
    pub timeouts: AtomicU64,
    /// Requests refused because no instance could be made within the memory budget.
    pub over_budget: AtomicU64,
    /// Responses by class: 2xx, 4xx, 5xx (others go with 2xx).
    pub responses_2xx: AtomicU64,
    pub responses_4xx: AtomicU64,
    pub responses_5xx: AtomicU64,
}

/// Instances of a function, and what merging saves them.
#[derive(Clone, Copy, Debug, Default)]
pub struct Usage {
    pub live: u64,
    pub idle: u64,
    pub linear_memory_bytes: u64,
    pub merged: OwnerStats,
}

impl Usage {
    pub fn add(&mut self, other: &Usage) {
        self.live += other.live;
        self.idle += other.idle;
        self.linear_memory_bytes += other.linear_memory_bytes;
        self.merged.pages_merged += other.merged.pages_merged;
        self.merged.zero_pages += other.merged.zero_pages;
        self.merged.profit_bytes += other.merged.profit_bytes;
    }
}

impl Function {
    pub fn new(config: FunctionConfig, code: Code) -> Self {
        let permits = Arc::new(Semaphore::new(config.max_instances));
        Self {
            config,
            code,
            idle: Mutex::new(VecDeque::new()),
            permits,
            owners: Mutex::new(BTreeMap::new()),
            cost: AtomicU64::new(0),
            counters: FunctionCounters::default(),
            // 0.5 ms to about 16 s.
            latency: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
        }
    }

    /// The most recently parked idle instance, if any.
    pub fn take_idle(&self) -> Option<ProxyInstance> {
        self.idle.lock().pop_back().map(|parked| parked.instance)
    }

    /// Parks `instance` for a later request.
    pub fn park(&self, instance: ProxyInstance) {
        self.idle.lock().push_back(Parked {
            instance,
            since: Instant::now(),
        });
    }

    /// When the least recently parked idle instance parked.
    fn oldest_idle(&self) -> Option<Instant> {
        self.idle.lock().front().map(|parked| parked.since)
    }

    /// Takes the least recently parked idle instance, if it parked at `since` (no other
    /// took it meanwhile).
    fn take_oldest(&self, since: Instant) -> Option<ProxyInstance> {
        let mut idle = self.idle.lock();
        if idle.front()?.since != since {
            return None;
        }
        idle.pop_front().map(|parked| parked.instance)
    }

    /// Drops idle instances that parked before `deadline`, keeping `min_instances` live.
    pub fn expire(&self, now: Instant) -> usize {
        let mut expired = Vec::new();
        {
            let mut idle = self.idle.lock();
            while self.live() > self.config.min_instances + expired.len()
                && idle.front().is_some_and(|parked| {
                    now.duration_since(parked.since) >= self.config.idle_timeout
                })
            {
                expired.extend(idle.pop_front());
            }
        }
        let count = expired.len();
        for parked in expired {
            self.retire(parked.instance);
        }
        self.counters
            .expired
            .fetch_add(count as u64, Ordering::Relaxed);
        count
    }

    /// Counts a request whose instance trapped or timed out.
    pub fn count_failure(&self, failure: &super::Failure) {
        let counter = match failure {
            super::Failure::TimedOut(_) => &self.counters.timeouts,
            super::Failure::Trapped(_) => &self.counters.traps,
            _ => return,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a new live instance's owner.
    pub fn born(&self, owner: &StoreOwner) {
        self.owners.lock().insert(owner.owner().id(), owner.clone());
    }

    /// Drops `instance`: its memories are unmapped and unregistered at once.
    pub fn retire(&self, instance: ProxyInstance) {
        self.forget(&instance.owner);
        drop(instance);
    }

    /// Stops counting an owner whose instance is gone (or never was).
    pub fn forget(&self, owner: &StoreOwner) {
        self.owners.lock().remove(&owner.owner().id());
    }

    /// Instances alive: idle, busy and starting.
    pub fn live(&self) -> usize {
        self.owners.lock().len()
    }

    pub fn idle_count(&self) -> usize {
        self.idle.lock().len()
    }

    /// What the function's instances hold and what merging saves them.
    pub fn usage(&self) -> Usage {
        let owners: Vec<StoreOwner> = self.owners.lock().values().cloned().collect();
        let mut usage = Usage {
            live: owners.len() as u64,
            idle: self.idle_count() as u64,
            ..Usage::default()
        };
        for owner in &owners {
            usage.linear_memory_bytes += owner.memory_bytes();
            let stats = owner.stats();
            usage.merged.pages_merged += stats.pages_merged;
            usage.merged.zero_pages += stats.zero_pages;
            usage.merged.profit_bytes += stats.profit_bytes;
        }
        usage
    }

    /// What the function's next new instance is expected to add to the host's PSS.
    pub fn expected_cost(&self) -> u64 {
        self.cost.load(Ordering::Relaxed)
    }

    /// Records what a new instance added, measured once it was merged.
    pub fn measured_cost(&self, bytes: u64) {
        self.cost.store(bytes, Ordering::Relaxed);
    }
}

/// Why no instance could be made.
#[derive(Debug)]
pub struct OverBudget {
    pub pss: u64,
    pub need: u64,
    pub budget: u64,
}

impl std::fmt::Display for OverBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the host holds {} MiB of its {} MiB memory budget and a new instance needs about \
             {} MiB, with no idle instance left to evict",
            self.pss >> 20,
            self.budget >> 20,
            self.need >> 20
        )
    }
}

/// The host's memory budget over every function's pool.
pub struct Budget {
    /// Most bytes of PSS; `None` for no cap (then nothing is measured).
    pub limit: Option<u64>,
    /// Bytes promised to instances being made, not yet in the PSS they are measured by:
    /// cold starts at the same moment see each other's.
    pending: Mutex<u64>,
}

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
        }
    }

    /// Makes room for a new instance of `function`: evicts idle instances of any function,
    /// least recently parked first, until the host's PSS, what is promised to instances
    /// being made, and the instance's expected cost fit the budget; with `evict` false
    /// (pre-warming, which must not push out instances that serve), only looks.
    pub fn make_room(
        &self,
        function: &Function,
        functions: &[Arc<Function>],
        evict: bool,
    ) -> Result<Room<'_>, OverBudget> {
        let Some(budget) = self.limit else {
            return Ok(Room {
                budget: self,
                promised: 0,
                pss_before: None,
            });
        };
        let need = function.expected_cost();
        loop {
            let pss = crate::measure::pss_bytes().unwrap_or(0);
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
            if !evict || !evict_least_recent(functions) {
                return Err(OverBudget { pss, need, budget });
            }
        }
    }

    /// Evicts idle instances while the host is over its budget (instances grow as they
    /// serve); `false` when it stays over with nothing idle.
    pub fn enforce(&self, functions: &[Arc<Function>]) -> bool {
        let Some(budget) = self.limit else {
            return true;
        };
        loop {
            let pss = crate::measure::pss_bytes().unwrap_or(0);
            if pss <= budget {
                return true;
            }
            if !evict_least_recent(functions) {
                return false;
            }
        }
    }
}

/// Drops the least recently parked idle instance of all `functions`; `false` when none is
/// idle.
fn evict_least_recent(functions: &[Arc<Function>]) -> bool {
    loop {
        let oldest = functions
            .iter()
            .filter_map(|function| Some((function.oldest_idle()?, function)))
            .min_by_key(|(since, _)| *since);
        let Some((since, function)) = oldest else {
            return false;
        };
        // Another thread may have taken it since; then look again.
        if let Some(instance) = function.take_oldest(since) {
            function.retire(instance);
            function.counters.evictions.fetch_add(1, Ordering::Relaxed);
            return true;
        }
    }
}
