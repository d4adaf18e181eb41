//! A function's pool of instances: its idle queue, the owners of its live instances, and
//! its counters. This file keeps the pool; when an instance is made, parked, evicted or
//! expired is the lifecycle's (`lifecycle.rs`) to decide.
//!
//! Each function has at most `max_instances` instances at once, busy and idle: a request
//! takes a permit of the function's semaphore before it takes an instance, so a request
//! beyond the maximum waits for one to come back. An instance serves one request at a time.
//! Idle instances wait in their function's queue in the order they parked, so that the most
//! recently parked (the warmest) is at one end and the least recently parked (the first to
//! evict or expire) at the other. Every live instance's owner is counted from its birth to
//! its retirement, busy or idle, so that `live` and the metrics see instances being made
//! and serving, not only those parked.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use parking_lot::Mutex;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use samepage_dedup::{OwnerId, OwnerStats};
use samepage_runtime::StoreOwner;
use tokio::sync::Semaphore;

use super::code::Code;
use super::config::{FunctionConfig, Reuse};
use super::proxy::ProxyInstance;

/// One function: its configuration, code, pool and counters.
pub struct Function {
    pub config: FunctionConfig,
    /// Its program compiled, shared with other functions of the same file.
    pub code: Code,
    /// Idle instances, oldest park first.
    idle: Mutex<VecDeque<Parked>>,
    /// One permit per instance the function may have at once.
    pub permits: Arc<Semaphore>,
    /// The owners of the function's live instances (idle, busy, starting), for its metrics.
    owners: Mutex<BTreeMap<OwnerId, StoreOwner>>,
    /// Bytes of PSS the function's last new instance added, merged; 0 until one was made.
    cost: AtomicU64,
    /// Set once a reused instance failed a request that a fresh one then served: the
    /// function's requests get instances of their own from then on, whatever `reuse` says.
    per_request: AtomicBool,
    /// Requests in flight and their recent peak: how many ready instances to keep.
    pub demand: Demand,
    /// Read at each scrape; never reset.
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
    /// Requests routed to the function.
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
    /// Requests whose instance trapped (or whose command exited with a failure).
    pub traps: AtomicU64,
    /// Requests that ran out of time in wasm.
    pub timeouts: AtomicU64,
    /// Requests refused because no instance could be made within the memory budget.
    pub over_budget: AtomicU64,
    /// Times warm reuse was given up for per-request instances (at most once).
    pub reuse_fallbacks: AtomicU64,
    /// Requests a reused instance failed that were served again by a fresh instance.
    pub retries: AtomicU64,
    /// Responses by class: 2xx, 4xx, 5xx (others go with 2xx).
    pub responses_2xx: AtomicU64,
    pub responses_4xx: AtomicU64,
    pub responses_5xx: AtomicU64,
}

/// A function's requests in flight (each until its instance's replacement is made), and the
/// most there were at once lately: the number of ready instances worth keeping when each
/// request takes one. The window is two periods of the pool keeper's [`Demand::roll`], so a
/// burst is remembered for one to two periods.
#[derive(Default)]
pub struct Demand {
    in_flight: AtomicUsize,
    /// The peak of the current period and of the one before it.
    peak: AtomicUsize,
    previous_peak: AtomicUsize,
}

impl Demand {
    /// Counts a request in flight until the guard is dropped.
    pub fn enter(&self) -> DemandGuard<'_> {
        let now = self.in_flight.fetch_add(1, Ordering::AcqRel) + 1;
        self.peak.fetch_max(now, Ordering::AcqRel);
        DemandGuard(self)
    }

    /// The most requests in flight at once over the last one to two periods.
    pub fn recent_peak(&self) -> usize {
        self.peak
            .load(Ordering::Acquire)
            .max(self.previous_peak.load(Ordering::Acquire))
    }

    /// Starts a new period: the current peak becomes the previous one.
    pub fn roll(&self) {
        let now = self.in_flight.load(Ordering::Acquire);
        let ended = self.peak.swap(now, Ordering::AcqRel);
        self.previous_peak.store(ended, Ordering::Release);
    }
}

/// A request counted in flight by [`Demand::enter`].
pub struct DemandGuard<'a>(&'a Demand);

impl Drop for DemandGuard<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Instances of a function, and what merging saves them.
#[derive(Clone, Copy, Debug, Default)]
pub struct Usage {
    /// Instances alive: idle, busy and starting.
    pub live: u64,
    /// Instances parked, ready for a request.
    pub idle: u64,
    /// The sizes of the instances' linear memories, added up.
    pub linear_memory_bytes: u64,
    /// What merging saves the instances, added up.
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
            per_request: AtomicBool::new(false),
            demand: Demand::default(),
            counters: FunctionCounters::default(),
            // 0.5 ms to about 16 s.
            latency: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
        }
    }

    /// What becomes of the function's instances after a request: its `reuse`, unless warm
    /// reuse was given up.
    pub fn reuse(&self) -> Reuse {
        if self.per_request.load(Ordering::Acquire) {
            Reuse::Reset
        } else {
            self.config.reuse
        }
    }

    /// Gives warm reuse up for instances of their own per request, once; `true` the first
    /// time. Idle instances already parked keep whatever an earlier request left, so they go.
    pub fn give_up_reuse(&self) -> bool {
        if self.per_request.swap(true, Ordering::AcqRel) {
            return false;
        }
        self.counters
            .reuse_fallbacks
            .fetch_add(1, Ordering::Relaxed);
        let parked: Vec<Parked> = self.idle.lock().drain(..).collect();
        for parked in parked {
            self.retire(parked.instance);
        }
        true
    }

    /// How many more instances the pool keeper should make ahead of requests. A function
    /// whose instances serve many requests keeps `min_instances` alive; one whose requests
    /// each take an instance of their own keeps that many ready, or as many as were in
    /// flight at once lately if more. Never past `max_instances` alive.
    pub fn ready_shortfall(&self) -> usize {
        let short = match self.reuse() {
            Reuse::Reset => self.ready_target().saturating_sub(self.idle_count()),
            Reuse::Warm | Reuse::Fresh => self.config.min_instances.saturating_sub(self.live()),
        };
        short.min(self.config.max_instances.saturating_sub(self.live()))
    }

    /// Whether the function has more instances than it keeps: idle ones may then expire.
    pub fn has_surplus(&self) -> bool {
        match self.reuse() {
            Reuse::Reset => self.idle_count() > self.ready_target(),
            Reuse::Warm | Reuse::Fresh => self.live() > self.config.min_instances,
        }
    }

    /// The ready instances a function whose requests each take one keeps.
    fn ready_target(&self) -> usize {
        let target = self.config.min_instances.max(self.demand.recent_peak());
        target.min(self.config.max_instances)
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
    pub fn oldest_idle(&self) -> Option<Instant> {
        self.idle.lock().front().map(|parked| parked.since)
    }

    /// Takes the least recently parked idle instance if `take` says so of when it parked:
    /// the check and the taking are one step, so that no other request takes it between.
    pub fn take_oldest_if(&self, take: impl FnOnce(Instant) -> bool) -> Option<ProxyInstance> {
        let mut idle = self.idle.lock();
        if !take(idle.front()?.since) {
            return None;
        }
        idle.pop_front().map(|parked| parked.instance)
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
