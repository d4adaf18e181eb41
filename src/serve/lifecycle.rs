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
//!   then settled by the pool keeper, off every request's path: merged at once and its cost
//!   measured); `reset` retires it and makes its replacement after the response, off the
//!   next request's path, while the pool keeper keeps as many ready as were in flight at
//!   once lately; `fresh` retires it. A trap or a
//!   timeout retires it whatever the `reuse`: its state is not to be trusted; a reused
//!   instance's failure may switch its function from `warm` to `reset` (see
//!   [`Pools::serve_proxy`]).
//! - **Expire**: idle instances above what the function keeps (`min_instances` alive, or
//!   for `reset` its recent demand ready) are retired after `idle_timeout`.
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
use parking_lot::{Condvar, Mutex};
use samepage_runtime::measure::pss_bytes;
use samepage_runtime::{Lifetime, Samepage, StoreOwner};

use super::answer::{self, Answer};
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
    /// Wakes the pool keeper when a request used an instance up or left one to merge.
    keeper: Alarm,
    /// New warm instances that served their first request, for the pool keeper to merge.
    unsettled: Mutex<Vec<Unsettled>>,
    /// Set when the server drains: the pools stop topping up and replacing.
    draining: AtomicBool,
}

/// How long a function's peak of requests in flight is remembered: one to two periods
/// (see [`super::pool::Demand`]).
const DEMAND_PERIOD: Duration = Duration::from_secs(10);

/// A new warm instance to merge, and what its cost is measured from.
struct Unsettled {
    function: Arc<Function>,
    owner: StoreOwner,
    /// The host's PSS before it was made, under a budget.
    pss_before: Option<u64>,
}

/// A wake-up call for a thread that naps between rounds.
#[derive(Default)]
struct Alarm {
    rung: Mutex<bool>,
    bell: Condvar,
}

impl Alarm {
    fn wake(&self) {
        *self.rung.lock() = true;
        self.bell.notify_one();
    }

    /// Sleeps up to `most`, or until woken (at once if woken since the last nap).
    fn nap(&self, most: Duration) {
        let mut rung = self.rung.lock();
        if !*rung {
            self.bell.wait_for(&mut rung, most);
        }
        *rung = false;
    }
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
            keeper: Alarm::default(),
            unsettled: Mutex::default(),
            draining: AtomicBool::new(false),
        }
    }

    pub fn samepage(&self) -> &Samepage {
        &self.samepage
    }

    /// Stops making instances ahead of requests: the server is draining.
    pub fn drain(&self) {
        self.draining.store(true, Ordering::Release);
        self.keeper.wake();
    }

    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Serves `request` with an instance of `function` (on a blocking thread, holding one of
    /// the function's permits), then parks, replaces or retires it by the function's `reuse`.
    ///
    /// A reused instance that fails the request (answers 5xx or a wasi:http error, sends
    /// nothing, traps or times out) is not trusted again. When the request can be sent twice
    /// ([`replayable`]), it is served again by a fresh instance; if that one answers it, the
    /// failure was the reuse's, and the function gives warm reuse up for instances of their
    /// own per request (logged once). A request that cannot be sent twice gets the failure,
    /// and the function gives reuse up on the reused instance's word.
    pub fn serve_proxy(
        &self,
        function: &Arc<Function>,
        request: hyper::Request<WasiBody>,
        client: ResponseSender,
    ) -> Result<(), Failure> {
        // Counted until the replacement is made too: measured, counting only the handler's
        // time keeps too few ready (p99 219 ms against 94 ms at 16 connections).
        let _demand = function.demand.enter();
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
        // Warm reuse is what can fail a request a fresh instance would serve.
        let reused = instance.served > 0 && function.reuse() == Reuse::Warm;
        let again = reused.then(|| replayable(&request)).flatten();
        let (handler, watch) = answer::watch(client, again.is_some());
        let handled = instance.handle(request, handler);
        let (failure, client) = match (handled, watch.finish()) {
            (Ok(()), Answer::Sent(_)) => {
                self.after_request(function, instance, room);
                return Ok(());
            }
            (Err(failure), answer) => {
                count_failure(function, &failure);
                (failure, held_client(answer))
            }
            (Ok(()), Answer::Held { client, why }) => {
                let failure = Failure::Unanswered(why);
                count_failure(function, &failure);
                (failure, Some(client))
            }
        };
        function.retire(instance);
        drop(room);
        let Some(client) = client else {
            // The client has the head of a response already; the failure is the log's.
            return Err(failure);
        };
        if !reused {
            let _ = client.send(Ok(failure.response()));
            return Err(failure);
        }
        let Some(again) = again else {
            let _ = client.send(Ok(failure.response()));
            give_up_reuse(function, &failure, false);
            return Err(failure);
        };
        function.counters.retries.fetch_add(1, Ordering::Relaxed);
        eprintln!(
            "samepage: function {}: a reused instance failed a request ({failure}); serving \
             it again with a fresh instance",
            function.config.name
        );
        if self.serve_fresh(function, again, client)? {
            give_up_reuse(function, &failure, true);
        }
        Ok(())
    }

    /// Serves `request` with a new instance, forwarding whatever it answers; `true` when it
    /// answered without a 5xx.
    fn serve_fresh(
        &self,
        function: &Arc<Function>,
        request: hyper::Request<WasiBody>,
        client: ResponseSender,
    ) -> Result<bool, Failure> {
        let room = self.cold_start(function)?;
        let mut instance = self.instantiate(function)?;
        let (handler, watch) = answer::watch(client, false);
        let handled = instance.handle(request, handler);
        match (handled, watch.finish()) {
            (Ok(()), Answer::Sent(status)) => {
                self.after_request(function, instance, Some(room));
                Ok(!status.is_server_error())
            }
            (handled, answer) => {
                let failure = handled
                    .err()
                    .unwrap_or_else(|| Failure::Unanswered("it sent no response".into()));
                count_failure(function, &failure);
                function.retire(instance);
                if let Some(client) = held_client(answer) {
                    let _ = client.send(Ok(failure.response()));
                }
                Err(failure)
            }
        }
    }

    /// Parks, replaces or retires an instance that served a request, by the function's
    /// `reuse` as it stands now.
    fn after_request(
        &self,
        function: &Arc<Function>,
        instance: ProxyInstance,
        room: Option<Room<'_>>,
    ) {
        match function.reuse() {
            Reuse::Warm => {
                // Parked first: a request that takes it while it is merged waits only for
                // the owner's guard, not for a cold start.
                let owner = instance.owner.clone();
                function.park(instance);
                if let Some(room) = room {
                    // Merged by the pool keeper, off every request's path. The room goes
                    // now: until merged, the instance's PSS counts it whole.
                    self.unsettled.lock().push(Unsettled {
                        function: function.clone(),
                        owner,
                        pss_before: room.pss_before,
                    });
                    self.keeper.wake();
                }
            }
            Reuse::Reset => {
                drop(room);
                function.retire(instance);
                // Its replacement is made here, after the response, while this request still
                // holds its permit (so within `max_instances`); the pool keeper makes any
                // more that the recent demand asks for.
                if self.draining() || function.ready_shortfall() == 0 {
                    return;
                }
                // Over budget, the next request makes its own (evicting as it may).
                let _ = self.prewarm(function);
                if function.ready_shortfall() > 0 {
                    self.keeper.wake();
                }
            }
            Reuse::Fresh => {
                if let Some(room) = &room {
                    measure_cost(function, room);
                }
                function.retire(instance);
            }
        }
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
            .owner_for(function.config.domain, Lifetime::OneCall);
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
            if let Err(failure) = self.top_up(function) {
                eprintln!(
                    "samepage: function {}: {} of {} instances pre-warmed: {failure}",
                    function.config.name,
                    function.live(),
                    function.config.min_instances
                );
            }
        }
    }

    /// Until the server drains: merges new warm instances, returns free heap memory once
    /// requests pause, expires idle instances, keeps the budget, and tops the pools up (to
    /// their minimum, and to their recent demand where each request takes an instance of its
    /// own), four times a second and whenever a request used an instance up or left one to
    /// merge.
    pub fn keep(&self) {
        let mut period_start = Instant::now();
        // Requests counted at the last round, and at the last return of free heap memory.
        let (mut seen, mut trimmed) = (0, 0);
        while !self.draining() {
            self.keeper.nap(Duration::from_millis(250));
            // What requests freed stays in the malloc arenas of the threads that ran them
            // (10 MiB after 16 connections of the Python component, measured) until it is
            // returned; once a round passed with no request, it is.
            let requests = self.requests();
            if requests == seen && requests != trimmed {
                crate::resources::return_free_heap();
                trimmed = requests;
            }
            seen = requests;
            self.settle_unsettled();
            let now = Instant::now();
            if now.duration_since(period_start) >= DEMAND_PERIOD {
                period_start = now;
                for function in &self.functions {
                    function.demand.roll();
                }
            }
            for function in &self.functions {
                expire(function, now);
            }
            let mut trimmed = false;
            self.budget.enforce(|| self.make_memory(&mut trimmed));
            for function in &self.functions {
                // Over budget or at its maximum, requests make their own (evicting as they
                // may); the next round tries again.
                let _ = self.top_up(function);
            }
        }
    }

    /// Merges the new warm instances that served their first request, and records what
    /// each added to the host's PSS.
    fn settle_unsettled(&self) {
        let unsettled = std::mem::take(&mut *self.unsettled.lock());
        for new in unsettled {
            merge_new(&new.function, &new.owner);
            measure_cost_since(&new.function, new.pss_before);
        }
    }

    /// Requests routed to any function so far.
    fn requests(&self) -> u64 {
        self.functions
            .iter()
            .map(|function| function.counters.requests.load(Ordering::Relaxed))
            .sum()
    }

    /// Makes instances of `function` ahead of requests while it is short of them and a
    /// permit is free.
    fn top_up(&self, function: &Function) -> Result<(), Failure> {
        while function.ready_shortfall() > 0 && !self.draining() {
            let Ok(permit) = function.permits.clone().try_acquire_owned() else {
                return Ok(());
            };
            self.prewarm(function)?;
            drop(permit);
        }
        Ok(())
    }

    /// Counts a cold start of `function` and makes room for its new instance, evicting idle
    /// ones as needed.
    fn cold_start(&self, function: &Function) -> Result<Room<'_>, Failure> {
        function
            .counters
            .cold_starts
            .fetch_add(1, Ordering::Relaxed);
        self.budget
            .make_room(function.expected_cost(), {
                let mut trimmed = false;
                move || self.make_memory(&mut trimmed)
            })
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
        let lifetime = match function.reuse() {
            Reuse::Warm => Lifetime::Kept,
            Reuse::Reset | Reuse::Fresh => Lifetime::OneCall,
        };
        let owner = self.samepage.owner_for(function.config.domain, lifetime);
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
    /// evicting, sends it the function's warm-up request, merges it (unless it will serve
    /// one request and no warm-up wrote to it) and parks it.
    fn prewarm(&self, function: &Function) -> Result<(), Failure> {
        let room = self.budget.make_room(function.expected_cost(), || false)?;
        let mut instance = self.instantiate(function)?;
        if let Some(path) = &function.config.warmup
            && let Err(failure) = warm_up(&mut instance, path)
        {
            function.retire(instance);
            return Err(failure);
        }
        if function.reuse() == Reuse::Warm || function.config.warmup.is_some() {
            settle_new(function, &instance.owner, room);
        } else {
            // An instance that will serve one request holds its images, mapped, and what
            // instantiation wrote: merging that would cost more than it saves.
            measure_cost(function, &room);
        }
        function.counters.prewarmed.fetch_add(1, Ordering::Relaxed);
        function.park(instance);
        Ok(())
    }

    /// Frees memory for the budget: retires the least recently parked idle instance of all
    /// functions or, with none idle, lets the memories kept ready for new instances go, or
    /// returns the free heap memory that requests left in the malloc arenas, once per search
    /// for room (`trimmed`); `false` when there was none of these. (Once: the arenas of busy
    /// threads always have a little to give back, and a search that counted that as room
    /// made looped for good, reading the host's PSS and trimming, and kept the host from
    /// draining: found by the cluster suite.)
    fn make_memory(&self, trimmed: &mut bool) -> bool {
        self.evict_least_recent()
            || self.samepage.release_idle_slots() > 0
            || (!std::mem::replace(trimmed, true) && crate::resources::return_free_heap())
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
/// first, keeping those it keeps (see [`Function::has_surplus`]).
fn expire(function: &Function, now: Instant) {
    let config = &function.config;
    while function.has_surplus()
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
    merge_new(function, owner);
    measure_cost(function, &room);
}

/// Merges a new instance's memories now, rather than when the scanner comes round.
fn merge_new(function: &Function, owner: &StoreOwner) {
    if let Err(error) = owner.merge_now() {
        eprintln!(
            "samepage: function {}: merging a new instance: {error}",
            function.config.name
        );
    }
}

/// Records what the instance `room` was made for added to the host's PSS, when there is a
/// budget to measure against.
fn measure_cost(function: &Function, room: &Room<'_>) {
    measure_cost_since(function, room.pss_before);
}

/// Records what a new instance of `function` added to the host's PSS since it read
/// `pss_before` (none without a budget).
fn measure_cost_since(function: &Function, pss_before: Option<u64>) {
    if let Some(before) = pss_before {
        let after = pss_bytes().unwrap_or(before);
        function.measured_cost(after.saturating_sub(before));
    }
}

/// Counts a request whose instance trapped, answered nothing or timed out.
fn count_failure(function: &Function, failure: &Failure) {
    let counter = match failure {
        Failure::TimedOut(_) => &function.counters.timeouts,
        Failure::Trapped(_) | Failure::Unanswered(_) => &function.counters.traps,
        _ => return,
    };
    counter.fetch_add(1, Ordering::Relaxed);
}

/// The client's channel when the client has no response yet.
fn held_client(answer: Answer) -> Option<ResponseSender> {
    match answer {
        Answer::Held { client, .. } => Some(client),
        Answer::Sent(_) => None,
    }
}

/// A copy of `request` to serve again, when sending it twice is safe: an idempotent method
/// without side effects by definition (GET, HEAD) and no body, which has been read.
fn replayable(request: &hyper::Request<WasiBody>) -> Option<hyper::Request<WasiBody>> {
    use hyper::body::Body;
    let safe = matches!(*request.method(), hyper::Method::GET | hyper::Method::HEAD);
    if !safe || request.body().size_hint().exact() != Some(0) {
        return None;
    }
    let mut again = hyper::Request::new(full_body(Bytes::new()));
    *again.method_mut() = request.method().clone();
    *again.uri_mut() = request.uri().clone();
    *again.version_mut() = request.version();
    *again.headers_mut() = request.headers().clone();
    Some(again)
}

/// Gives `function`'s warm reuse up after `failure` of a reused instance, with one line in
/// the log; `proven` when a fresh instance then served the request.
fn give_up_reuse(function: &Function, failure: &Failure, proven: bool) {
    if function.config.reuse != Reuse::Warm || !function.give_up_reuse() {
        return;
    }
    eprintln!(
        "samepage: function {}: a reused instance failed a request ({failure}){}: switched to \
         per-request instances",
        function.config.name,
        if proven {
            " that a fresh one served"
        } else {
            ""
        }
    );
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
