//! The admin address: `/metrics` in the Prometheus (OpenMetrics) text format, and
//! `/healthz`.
//!
//! Every figure is read when scraped, so nothing is kept twice:
//!
//! - the merge engine's counters, each under its KSM name where KSM has the counter
//!   (`samepage_pages_sharing`, `samepage_general_profit`, `samepage_ksm_zero_pages`) and
//!   samepage's otherwise (`samepage_vmas`), with their documentation as help;
//! - per function and per tenant: instances live and idle, linear memory, what merging
//!   saves them under `/proc/PID/ksm_stat`'s names (`ksm_merging_pages`, `ksm_zero_pages`,
//!   `ksm_process_profit`);
//! - per function: requests, responses by class, cold and warm starts, pre-warmed
//!   instances, evictions, expiries, traps, timeouts, refusals over budget, warm reuse given
//!   up and requests served again after a reused instance failed them, and a histogram
//!   of the time from a request's arrival to its response's head;
//! - the host: its PSS and its memory budget.
//!
//! It reads the pools and the server's own counters, handed down in [`Figures`]; it never
//! reaches up into the server.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use bytes::Bytes;
use http_body_util::Full;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use samepage_dedup::stats::Value;
use samepage_runtime::measure::pss_bytes;
use wasmtime_wasi_http::io::TokioIo;

use super::lifecycle::Pools;
use super::pool::{FunctionCounters, Usage};

/// Counters of the whole server, beyond its functions'.
pub struct ServerCounters {
    /// Requests being handled, wasm and the work after the response included.
    pub in_flight: AtomicU64,
    /// Requests no function's route matched.
    pub unrouted: AtomicU64,
    /// When the server started, for its uptime.
    pub started: Instant,
}

impl Default for ServerCounters {
    fn default() -> Self {
        Self {
            in_flight: AtomicU64::new(0),
            unrouted: AtomicU64::new(0),
            started: Instant::now(),
        }
    }
}

/// What the admin address reads, shared with the server: the pools and the server's
/// counters. It is also the collector that reads them at each scrape.
#[derive(Clone)]
pub struct Figures {
    pub pools: Arc<Pools>,
    pub counters: Arc<ServerCounters>,
}

/// Serves `/metrics` and `/healthz` on `listener` for as long as the server runs.
pub async fn serve_admin(figures: Figures, listener: tokio::net::TcpListener) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        let figures = figures.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let figures = figures.clone();
                async move { Ok::<_, Infallible>(admin_response(&figures, &request)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(client), service)
                .await;
        });
    }
}

fn admin_response<B>(
    figures: &Figures,
    request: &hyper::Request<B>,
) -> hyper::Response<Full<Bytes>> {
    let (status, kind, body) = match request.uri().path() {
        "/metrics" => {
            // Reading PSS and every owner's figures walks page tables: off the async threads.
            let text = tokio::task::block_in_place(|| encode(figures));
            (
                200,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                text,
            )
        }
        "/healthz" if figures.pools.draining() => (503, "text/plain", "draining\n".to_owned()),
        "/healthz" => (200, "text/plain", "ok\n".to_owned()),
        _ => (
            404,
            "text/plain",
            "the admin address serves /metrics and /healthz\n".to_owned(),
        ),
    };
    let mut response = hyper::Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = hyper::StatusCode::from_u16(status).expect("a valid status");
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(kind),
    );
    response
}

/// The exposition of everything the server counts, now.
fn encode(figures: &Figures) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(figures.clone()));
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry)
        .expect("writing to a String cannot fail");
    text
}

impl std::fmt::Debug for Figures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Figures")
    }
}

type Labels<'a> = [(&'static str, &'a str); 2];

/// Where a function's counter is.
type CounterField = fn(&FunctionCounters) -> &AtomicU64;

/// A figure of a function's or a tenant's instances.
type UsageField = fn(&Usage) -> i64;

/// A function's counters, by metric name and help.
const FUNCTION_COUNTERS: &[(&str, &str, CounterField)] = &[
    (
        "samepage_requests",
        "Requests routed to the function.",
        |c| &c.requests,
    ),
    (
        "samepage_responses_2xx",
        "Responses with a status below 400.",
        |c| &c.responses_2xx,
    ),
    (
        "samepage_responses_4xx",
        "Responses with a 4xx status.",
        |c| &c.responses_4xx,
    ),
    (
        "samepage_responses_5xx",
        "Responses with a 5xx status.",
        |c| &c.responses_5xx,
    ),
    (
        "samepage_cold_starts",
        "Requests that waited for a new instance.",
        |c| &c.cold_starts,
    ),
    (
        "samepage_warm_starts",
        "Requests served by an instance that was ready.",
        |c| &c.warm_starts,
    ),
    (
        "samepage_prewarmed",
        "Instances made ahead of requests.",
        |c| &c.prewarmed,
    ),
    (
        "samepage_evictions",
        "Idle instances dropped to stay within the memory budget.",
        |c| &c.evictions,
    ),
    (
        "samepage_expired",
        "Idle instances dropped after their idle timeout.",
        |c| &c.expired,
    ),
    (
        "samepage_traps",
        "Requests whose instance trapped or did not answer (answered 500, instance dropped).",
        |c| &c.traps,
    ),
    (
        "samepage_timeouts",
        "Requests that ran out of time (answered 500, instance dropped).",
        |c| &c.timeouts,
    ),
    (
        "samepage_reuse_fallbacks",
        "Times warm reuse was given up for an instance per request (at most once).",
        |c| &c.reuse_fallbacks,
    ),
    (
        "samepage_retries",
        "Requests a reused instance failed, served again by a fresh instance.",
        |c| &c.retries,
    ),
    (
        "samepage_over_budget",
        "Requests refused (503): no instance fitted the memory budget.",
        |c| &c.over_budget,
    ),
];

/// Figures of a function's or a tenant's instances, by metric name and help.
const USAGE_GAUGES: &[(&str, &str, UsageField)] = &[
    (
        "instances",
        "Instances alive: idle, busy and starting.",
        |u| u.live as i64,
    ),
    (
        "idle_instances",
        "Instances parked, ready for a request.",
        |u| u.idle as i64,
    ),
    (
        "linear_memory_bytes",
        "Bytes of the instances' linear memories (their sizes).",
        |u| u.linear_memory_bytes as i64,
    ),
    (
        "ksm_merging_pages",
        "The instances' pages that map a merged page.",
        |u| u.merged.pages_merged as i64,
    ),
    (
        "ksm_zero_pages",
        "The instances' pages of zeros freed.",
        |u| u.merged.zero_pages as i64,
    ),
    (
        "ksm_process_profit",
        "Bytes merging saves the instances, less its metadata.",
        |u| u.merged.profit_bytes,
    ),
];

impl Collector for Figures {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let (pools, counters) = (&self.pools, &self.counters);
        if let Some(engine) = pools.samepage().dedup() {
            for (counter, value) in engine.stats().counters() {
                let name = format!("samepage_{}", counter.ksm.unwrap_or(counter.name));
                let metric =
                    encoder.encode_descriptor(&name, counter.help(), None, MetricType::Gauge)?;
                match value {
                    Value::Count(count) => ConstGauge::new(count as i64).encode(metric)?,
                    Value::Signed(signed) => ConstGauge::new(signed).encode(metric)?,
                }
            }
        }
        let pss = pss_bytes().unwrap_or(0);
        let metric = encoder.encode_descriptor(
            "samepage_host_pss_bytes",
            "The host process's proportional set size: its memory as the kernel counts it.",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(pss as i64).encode(metric)?;
        if let Some(budget) = pools.budget.limit {
            let metric = encoder.encode_descriptor(
                "samepage_memory_budget_bytes",
                "Most PSS the host may hold before it evicts idle instances.",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(budget as i64).encode(metric)?;
        }
        let metric = encoder.encode_descriptor(
            "samepage_uptime_seconds",
            "Seconds since the server started.",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(counters.started.elapsed().as_secs_f64()).encode(metric)?;
        let metric = encoder.encode_descriptor(
            "samepage_unrouted_requests",
            "Requests no function's route matched (answered 404).",
            None,
            MetricType::Counter,
        )?;
        ConstCounter::new(counters.unrouted.load(Ordering::Relaxed)).encode(metric)?;

        let functions: Vec<_> = pools
            .functions
            .iter()
            .map(|f| {
                (
                    f,
                    [
                        ("function", f.config.name.as_str()),
                        ("tenant", f.config.tenant.as_str()),
                    ],
                )
            })
            .collect();
        for (name, help, field) in FUNCTION_COUNTERS {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (function, labels) in &functions {
                let value = field(&function.counters).load(Ordering::Relaxed);
                ConstCounter::new(value).encode(family.encode_family(labels)?)?;
            }
        }
        let usage: Vec<(Labels, Usage)> = functions
            .iter()
            .map(|(function, labels)| (*labels, function.usage()))
            .collect();
        let mut tenants: BTreeMap<&str, Usage> = BTreeMap::new();
        for (labels, usage) in &usage {
            tenants.entry(labels[1].1).or_default().add(usage);
        }
        for (name, help, field) in USAGE_GAUGES {
            let (of_function, of_tenant) = (
                format!("samepage_function_{name}"),
                format!("samepage_tenant_{name}"),
            );
            let mut family =
                encoder.encode_descriptor(&of_function, help, None, MetricType::Gauge)?;
            for (labels, usage) in &usage {
                ConstGauge::new(field(usage)).encode(family.encode_family(labels)?)?;
            }
            let mut family =
                encoder.encode_descriptor(&of_tenant, help, None, MetricType::Gauge)?;
            for (tenant, usage) in &tenants {
                ConstGauge::new(field(usage))
                    .encode(family.encode_family(&[("tenant", *tenant)])?)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "samepage_request_duration_seconds",
            "Time from a request's arrival to its response's head.",
            None,
            MetricType::Histogram,
        )?;
        for (function, labels) in &functions {
            function.latency.encode(family.encode_family(labels)?)?;
        }
        Ok(())
    }
}
