//! The life of an instance, from its making to its retirement, and a request's journey
//! through it: take an idle instance or make one (within the memory budget), run the
//! request, then park or retire the instance.
//!
//! - **Cold start**: no idle instance, so the budget makes room for a new one (evicting
//!   idle instances of any function, least recently parked first) and it is instantiated on
//!   the request's path. With no room even after evicting all idle instances, the request
//!   is refused (503).
//! - **Pre-warm**: instances made ahead of requests (`min_instances`, at start and topped up
//!   in the background), sent the function's warm-up request, merged and parked. Pre-warming
//!   never evicts: it must not push out instances that serve.
//! - **After a request**, by the function's `reuse`: `warm` parks the instance (a new one is
//!   first settled: merged at once and its cost measured); `reset` retires it and makes its
//!   replacement off the next request's path; `fresh` retires it. A trap or a timeout
//!   retires it whatever the `reuse`: its state is not to be trusted.
//! - **Expire**: idle instances above `min_instances` are retired after `idle_timeout`.
//! - **Evict**: while the host is over its budget (instances grow as they serve), idle
//!   instances are retired, least recently parked first.
//!
//! A new instance's cost (what it added to the host's PSS, merged) is measured across its
//! instantiation and first request; the budget expects the function's next new instance to
//! cost the same. WAGI commands live one request: made, run and retired in `run_wagi`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;
use samepage_runtime::measure::pss_bytes;
use samepage_runtime::{Samepage, StoreOwner};

use super::budget::{Budget, Room};
use super::code::Code;
use super::config::Reuse;
use super::failure::Failure;
use super::pool::Function;
use super::proxy::{ProxyInstance, ProxyState, ResponseSender, WasiBody};
use super::response::full_body;
use super::wagi::{self, CgiRequest, WagiState};

/// Every function's pool, and what makes and merges their instances.
pub struct Pools {
    engine: wasmtime::Engine,
    /// The merge engine every instance's memories are registered with.
    samepage: Samepage,
    proxy_linker: wasmtime::component::Linker<ProxyState>,
    wagi_linker: wasmtime::Linker<WagiState>,
    pub functions: Vec<Arc<Function>>,
    pub budget: Budget,
    /// Set when the server drains: the pools stop topping up and replacing.
    draining: AtomicBool,
}

impl Pools {
    pub fn new(
        engine: wasmtime::Engine,
        samepage: Samepage,
        proxy_linker: wasmtime::component::Linker<ProxyState>,
        wagi_linker: wasmtime::Linker<WagiState>,
        functions: Vec<Arc<Function>>,
        budget: Budget,
    ) -> Self {
        Self {
            engine,
            samepage,
            proxy_linker,
            wagi_linker,
            functions,
            budget,
            draining: AtomicBool::new(false),
        }
    }

    pub fn samepage(&self) -> &Samepage {
        &self.samepage
    }

    /// Stops making instances ahead of requests: the server is draining.
    pub fn drain(&self) {
        self.draining.store(true, Ordering::Release);
    }

    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Serves `request` with an instance of `function` (on a blocking thread, holding one of
    /// the function's permits), then parks, replaces or retires it by the function's `reuse`.
    pub fn serve_proxy(
        &self,
        function: &Function,
        request: hyper::Request<WasiBody>,
        sender: ResponseSender,
    ) -> Result<(), Failure> {
        let (mut instance, room) = match function.take_idle() {
            Some(instance) => {
                function
                    .counters
                    .warm_starts
                    .fetch_add(1, Ordering::Relaxed);
                (instance, None)
            }
            None => {
                let room = self.cold_start(function)?;
                (self.instantiate(function)?, Some(room))
            }
        };
        if let Err(failure) = instance.handle(request, sender) {
            count_failure(function, &failure);
            function.retire(instance);
            return Err(failure);
        }
        match function.config.reuse {
            Reuse::Warm => {
                // Parked first: a request that takes it while it is merged waits only for
                // the owner's guard, not for a cold start.
                let owner = instance.owner.clone();
                function.park(instance);
                if let Some(room) = room {
                    settle_new(function, &owner, room);
                }
            }
            Reuse::Reset => {
                drop(room);
                function.retire(instance);
                if !self.draining() {
                    // Over budget, the next request makes its own (evicting as it may).
                    let _ = self.prewarm(function);
                }
            }
            Reuse::Fresh => {
                if let Some(room) = &room {
                    measure_cost(function, room);
                }
                function.retire(instance);
            }
        }
        Ok(())
    }

    /// Runs a WAGI command for `request` in an instance of its own, made and retired here.
    pub fn run_wagi(
        &self,
        function: &Function,
        request: &CgiRequest,
    ) -> Result<hyper::Response<Bytes>, Failure> {
        let Code::Wagi(module) = &function.code else {
            return Err(Failure::Internal("not a WAGI function".into()));
        };
        let _room = self.cold_start(function)?;
        let owner = self
            .samepage
            .owner_merging_on_instantiate(function.config.domain, false);
        function.born(&owner);
        let ran = wagi::run(
            &self.engine,
            &self.wagi_linker,
            module,
            &owner,
            &function.config,
            request,
        );
        function.forget(&owner);
        if let Err(failure) = &ran {
            count_failure(function, failure);
        }
        ran
    }

    /// Fills every pool to its `min_instances` before serving.
    pub fn prewarm_all(&self) {
        for function in &self.functions {
            let want = function.config.min_instances;
            while function.live() < want {
                let Ok(permit) = function.permits.clone().try_acquire_owned() else {
                    break;
                };
                let made = self.prewarm(function);
                drop(permit);
                if let Err(failure) = made {
                    eprintln!(
                        "samepage: function {}: {} of {want} instances pre-warmed: {failure}",
                        function.config.name,
                        function.live()
                    );
                    break;
                }
            }
        }
    }

    /// Until the server drains: expires idle instances, keeps the budget, and tops the
    /// pools up to their minimum, four times a second.
    pub fn keep(&self) {
        while !self.draining() {
            std::thread::sleep(Duration::from_millis(250));
            let now = Instant::now();
            for function in &self.functions {
                expire(function, now);
            }
            self.budget.enforce(|| self.evict_least_recent());
            for function in &self.functions {
                if function.live() >= function.config.min_instances {
                    continue;
                }
                let Ok(permit) = function.permits.clone().try_acquire_owned() else {
                    continue;
                };
                let _ = self.prewarm(function);
                drop(permit);
            }
        }
    }

    /// Counts a cold start of `function` and makes room for its new instance, evicting idle
    /// ones as needed.
    fn cold_start(&self, function: &Function) -> Result<Room<'_>, Failure> {
        function
            .counters
            .cold_starts
            .fetch_add(1, Ordering::Relaxed);
        self.budget
            .make_room(function.expected_cost(), || self.evict_least_recent())
            .map_err(|over| {
                function
                    .counters
                    .over_budget
                    .fetch_add(1, Ordering::Relaxed);
                Failure::OverBudget(over)
            })
    }

    /// A new instance of `function`'s component, counted live.
    fn instantiate(&self, function: &Function) -> Result<ProxyInstance, Failure> {
        let Code::Proxy(component) = &function.code else {
            return Err(Failure::Internal("a WAGI function has no pool".into()));
        };
        // An instance that serves one request is not merged first.
        let owner = self.samepage.owner_merging_on_instantiate(
            function.config.domain,
            function.config.reuse == Reuse::Warm,
        );
        function.born(&owner);
        ProxyInstance::new(
            &self.engine,
            &self.proxy_linker,
            component,
            owner.clone(),
            &function.config,
        )
        .inspect_err(|_| function.forget(&owner))
    }

    /// Makes one instance of `function` ahead of requests, within the budget without
    /// evicting, sends it the function's warm-up request, merges it and parks it.
    fn prewarm(&self, function: &Function) -> Result<(), Failure> {
        let room = self.budget.make_room(function.expected_cost(), || false)?;
        let mut instance = self.instantiate(function)?;
        if let Some(path) = &function.config.warmup
            && let Err(failure) = warm_up(&mut instance, path)
        {
            function.retire(instance);
            return Err(failure);
        }
        settle_new(function, &instance.owner, room);
        function.counters.prewarmed.fetch_add(1, Ordering::Relaxed);
        function.park(instance);
        Ok(())
    }

    /// Retires the least recently parked idle instance of all functions; `false` when none
    /// is idle.
    fn evict_least_recent(&self) -> bool {
        loop {
            let oldest = self
                .functions
                .iter()
                .filter_map(|function| Some((function.oldest_idle()?, function)))
                .min_by_key(|(since, _)| *since);
            let Some((since, function)) = oldest else {
                return false;
            };
            // Another thread may have taken it since; then look again.
            if let Some(instance) = function.take_oldest_if(|parked| parked == since) {
                function.retire(instance);
                function.counters.evictions.fetch_add(1, Ordering::Relaxed);
                return true;
            }
        }
    }
}

/// Retires `function`'s idle instances that have been idle `idle_timeout` by `now`, oldest
/// first, keeping `min_instances` live.
fn expire(function: &Function, now: Instant) {
    let config = &function.config;
    while function.live() > config.min_instances
        && let Some(instance) =
            function.take_oldest_if(|since| now.duration_since(since) >= config.idle_timeout)
    {
        function.retire(instance);
        function.counters.expired.fetch_add(1, Ordering::Relaxed);
    }
}

/// Merges a new instance at once and, under a budget, records what it added to the host's
/// PSS; then gives back the room it was promised.
fn settle_new(function: &Function, owner: &StoreOwner, room: Room<'_>) {
    if let Err(error) = owner.merge_now() {
        eprintln!(
            "samepage: function {}: merging a new instance: {error}",
            function.config.name
        );
    }
    measure_cost(function, &room);
}

/// Records what the instance `room` was made for added to the host's PSS, when there is a
/// budget to measure against.
fn measure_cost(function: &Function, room: &Room<'_>) {
    if let Some(before) = room.pss_before {
        let after = pss_bytes().unwrap_or(before);
        function.measured_cost(after.saturating_sub(before));
    }
}

/// Counts a request whose instance trapped or timed out.
fn count_failure(function: &Function, failure: &Failure) {
    let counter = match failure {
        Failure::TimedOut(_) => &function.counters.timeouts,
        Failure::Trapped(_) => &function.counters.traps,
        _ => return,
    };
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Sends a pre-warmed instance a GET for `path` and waits for its response's body.
fn warm_up(instance: &mut ProxyInstance, path: &str) -> Result<(), Failure> {
    let request = hyper::Request::get(path)
        .header(hyper::header::HOST, "localhost")
        .body(full_body(Bytes::new()))
        .map_err(|error| Failure::Internal(format!("warm-up request {path}: {error}")))?;
    let (sender, receiver): (ResponseSender, _) = tokio::sync::oneshot::channel();
    // The body is read while the handler writes it, as a client would.
    let drained = tokio::spawn(async move {
        match receiver.await {
            Ok(Ok(response)) => {
                let status = response.status();
                response
                    .into_body()
                    .collect()
                    .await
                    .map(|_| status)
                    .map_err(|e| e.to_string())
            }
            Ok(Err(code)) => Err(format!("{code:?}")),
            Err(_) => Err("no response".to_owned()),
        }
    });
    instance.handle(request, sender)?;
    let status = tokio::runtime::Handle::current()
        .block_on(drained)
        .map_err(|error| Failure::Internal(error.to_string()))?
        .map_err(|why| Failure::Trapped(format!("warm-up request {path}: {why}")))?;
    if !status.is_success() {
        return Err(Failure::Trapped(format!(
            "warm-up request {path} answered {status}"
        )));
    }
    Ok(())
}
