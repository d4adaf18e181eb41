//! The serve suite's cold starts on a trace: several functions of one component in a memory
//! budget too tight for their unmerged instances, sent the trace of `arrivals.rs` on time,
//! merging on and off, in rounds.

use std::fmt::Write as _;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use plotters::prelude::SeriesLabelPosition;

use super::arrivals::{Arrival, TRACE_FUNCTIONS, TRACE_RATE, TRACE_SEED, TRACE_ZIPF_S, schedule};
use super::http::get;
use super::metrics::{Metrics, scrape};
use super::server::Host;
use super::{Component, Params, REQUEST_TIMEOUT, ms, spread};
use crate::child::median;
use crate::{mib, table};

/// Tenants the trace's functions are split over.
const TRACE_TENANTS: usize = 2;
/// Requests of the trace.
pub(super) const TRACE_REQUESTS: usize = 600;
/// The trace's memory budget: the host alone serving the trace's functions (the larger of
/// merging on's and off's) and this much room for instances.
const TRACE_ROOM_MIB: u64 = 48;
/// Most instances of each function in the trace.
const TRACE_MAX_INSTANCES: u32 = 8;
/// How often the trace's server metrics are scraped (for the plot and peak PSS).
const TRACE_SCRAPE_EVERY: Duration = Duration::from_millis(500);

/// The trace's config: one function per route, the same component, tenants alternating,
/// each function in `samepage serve`'s default reuse.
fn trace_config(component: &Path, budget_mib: Option<u64>) -> String {
    functions_config(
        &[component],
        TRACE_FUNCTIONS,
        TRACE_TENANTS,
        TRACE_MAX_INSTANCES,
        budget_mib,
    )
}

/// A config of `functions` functions f0, f1, … on routes /f0, /f1, …, each of
/// `components` and of `tenants` tenants in turn, none made ahead of demand and at most
/// `max_instances` of each, in `samepage serve`'s default reuse, within `budget_mib`.
pub(crate) fn functions_config(
    components: &[&Path],
    functions: usize,
    tenants: usize,
    max_instances: u32,
    budget_mib: Option<u64>,
) -> String {
    let mut config = match budget_mib {
        Some(budget) => format!("[server]\nmemory_budget = \"{budget}MiB\"\n\n"),
        None => String::new(),
    };
    for k in 0..functions {
        let _ = write!(
            config,
            "[[function]]\nname = \"f{k}\"\nroute = \"/f{k}\"\ncomponent = {:?}\n\
             tenant = \"t{}\"\nmin_instances = 0\nmax_instances = {max_instances}\n\n",
            components[k % components.len()].display().to_string(),
            k % tenants
        );
    }
    config
}

/// What a trace request got: its status (`None`: no response) and its latency in seconds,
/// from its scheduled time to the end of its body.
struct Outcome {
    status: Option<u16>,
    seconds: f64,
}

/// One scrape during the trace: seconds from its start, cold starts so far, host PSS.
struct Sample {
    at: f64,
    cold_starts: f64,
    pss: f64,
}

struct TraceRun {
    outcomes: Vec<Outcome>,
    samples: Vec<Sample>,
    end: Metrics,
    base_pss: f64,
}

impl TraceRun {
    fn share_cold(&self) -> f64 {
        100.0 * self.end.sum("samepage_cold_starts_total")
            / self.end.sum("samepage_requests_total").max(1.0)
    }

    fn ok_latencies(&self) -> Vec<f64> {
        self.outcomes
            .iter()
            .filter(|o| o.status.is_some_and(|s| (200..300).contains(&s)))
            .map(|o| o.seconds)
            .collect()
    }

    fn count(&self, f: impl Fn(&Outcome) -> bool) -> usize {
        self.outcomes.iter().filter(|o| f(o)).count()
    }

    fn peak_pss(&self) -> f64 {
        self.samples.iter().map(|s| s.pss).fold(0.0, f64::max)
    }
}

pub(super) fn trace(
    rounds: u32,
    params: &Params,
    component: &Component,
    scratch: &Path,
    out: &Path,
) -> Result<(String, Vec<Vec<String>>)> {
    let plan = schedule(params.trace_requests);
    let config = scratch.join(format!("trace-{}.toml", component.key));
    // The host alone, serving the functions with no instance, each way.
    std::fs::write(&config, trace_config(&component.path, None))?;
    let config = config.to_str().context("a UTF-8 path")?.to_owned();
    let mut alone = [0.0; 2];
    for (index, mode) in ["on", "off"].into_iter().enumerate() {
        let mut host = Host::samepage(&["--config", &config, "--dedup", mode])?;
        std::thread::sleep(Duration::from_secs(1));
        alone[index] = host.metrics()?.sum("samepage_host_pss_bytes");
        host.stop()?;
    }
    let budget_mib = (alone[0].max(alone[1]) / 1048576.0).ceil() as u64 + TRACE_ROOM_MIB;
    std::fs::write(&config, trace_config(&component.path, Some(budget_mib)))?;
    let mut runs: [Vec<TraceRun>; 2] = [Vec::new(), Vec::new()];
    for round in 0..rounds as usize {
        for k in 0..2 {
            let index = (round + k) % 2;
            let mode = ["on", "off"][index];
            eprintln!(
                "bench: serve: {}: trace: round {} merging {mode}: {} requests over {:.0} s",
                component.key,
                round + 1,
                plan.len(),
                plan.last().map_or(0.0, |a| a.at)
            );
            let mut host = Host::samepage(&["--config", &config, "--dedup", mode])?;
            let base_pss = host.metrics()?.sum("samepage_host_pss_bytes");
            let (outcomes, samples) = run_trace(&host, &plan)?;
            let end = host.metrics()?;
            host.stop()?;
            runs[index].push(TraceRun {
                outcomes,
                samples,
                end,
                base_pss,
            });
        }
    }
    let mut rows = Vec::new();
    for (mode, runs) in ["on", "off"].iter().zip(&runs) {
        let sum = |name: &str| -> f64 { runs.iter().map(|r| r.end.sum(name)).sum() };
        let med = |f: &dyn Fn(&TraceRun) -> f64| median(runs.iter().map(f).collect());
        let shares: Vec<f64> = runs.iter().map(TraceRun::share_cold).collect();
        let p99s: Vec<f64> = runs
            .iter()
            .map(|r| percentile(&r.ok_latencies(), 0.99))
            .collect();
        let refused: usize = runs
            .iter()
            .map(|r| r.count(|o| o.status == Some(503)))
            .sum();
        let other: usize = runs
            .iter()
            .map(|r| {
                r.count(|o| {
                    o.status
                        .is_some_and(|s| !(200..300).contains(&s) && s != 503)
                })
            })
            .sum();
        let lost: usize = runs.iter().map(|r| r.count(|o| o.status.is_none())).sum();
        rows.push(vec![
            (*mode).to_owned(),
            format!(
                "**{}** ({:.0} of {:.0})",
                spread(&shares, |v| format!("{v:.1}%")),
                sum("samepage_cold_starts_total"),
                sum("samepage_requests_total")
            ),
            format!("{:.0}", sum("samepage_evictions_total")),
            format!(
                "{refused} ({:.0} over budget)",
                sum("samepage_over_budget_total")
            ),
            format!(
                "{other} / {lost} ({:.0} 5xx counted by the host)",
                sum("samepage_responses_5xx_total")
            ),
            ms(med(&|r| percentile(&r.ok_latencies(), 0.50))),
            spread(&p99s, ms),
            format!(
                "{} → {} → {}",
                mib(med(&|r| r.base_pss)),
                mib(med(&TraceRun::peak_pss)),
                mib(med(&|r| r.end.sum("samepage_host_pss_bytes")))
            ),
            format!("{:.0}", med(&|r| r.end.sum("samepage_function_instances"))),
        ]);
    }
    let (on, off) = (
        median(runs[0].iter().map(TraceRun::share_cold).collect()),
        median(runs[1].iter().map(TraceRun::share_cold).collect()),
    );
    let budget_column = format!("host PSS: alone → peak → end (budget {budget_mib} MiB)");
    let plot = format!("serve-cold-starts-{}.svg", component.key);
    crate::plot::lines(
        &out.join(&plot),
        &format!(
            "Cold starts on the trace, {} component, round 1",
            component.name
        ),
        ("seconds since the trace began", "cold starts so far"),
        &["on", "off"]
            .iter()
            .zip(&runs)
            .filter_map(|(mode, runs)| {
                let run = runs.first()?;
                Some((
                    format!("merging {mode}"),
                    run.samples.iter().map(|s| (s.at, s.cold_starts)).collect(),
                ))
            })
            .collect::<Vec<_>>(),
        false,
        SeriesLabelPosition::UpperLeft,
    )?;
    let mut shares = [0usize; TRACE_FUNCTIONS];
    for arrival in &plan {
        shares[arrival.function] += 1;
    }
    let shares: Vec<String> = shares
        .iter()
        .enumerate()
        .map(|(k, n)| format!("f{k} {:.0}%", 100.0 * *n as f64 / plan.len() as f64))
        .collect();
    let mut text = format!(
        "### Cold starts on a trace\n\n{TRACE_FUNCTIONS} functions of the same component \
         (`[[function]]`s f0 … f{} on routes /f0 … /f{}, `samepage serve`'s default reuse, \
         `min_instances = 0`, `max_instances = {TRACE_MAX_INSTANCES}`), in {TRACE_TENANTS} \
         tenants (f0, f2, … in t0; f1, f3, … in t1; each tenant its own merge domain), in one \
         memory budget of {budget_mib} MiB: the host alone serving these functions with no \
         instance ({} merging on, {} off, one start each) and {TRACE_ROOM_MIB} MiB for \
         instances. The trace is {} requests \
         with Poisson arrivals at {TRACE_RATE} requests/s (exponential gaps; {:.1} s in \
         all), each to function k with Zipf weight 1/(k+1)^{TRACE_ZIPF_S} ({}), drawn by \
         splitmix64 from seed {TRACE_SEED:#x}: the same trace for every run. Each request is \
         sent at its scheduled time on a thread of its own (a new connection, HTTP/1.1 GET, \
         `Connection: close`), whatever the others are doing, and timed from its scheduled \
         time to the end of its body (p50 and p99 over the 2xx responses). The cold-start \
         share is the host's cold starts over its requests (`samepage_cold_starts_total` / \
         `samepage_requests_total`): requests that found no ready instance of their \
         function, the first one of each function included. {rounds} round(s), alternating \
         which of on and off runs first; counts are summed over the rounds, the rest are \
         medians.\n\n{}\n![Cold starts over the trace's first round, merging on and off, \
         {} component]({plot})\n\n",
        TRACE_FUNCTIONS - 1,
        TRACE_FUNCTIONS - 1,
        mib(alone[0]),
        mib(alone[1]),
        plan.len(),
        plan.last().map_or(0.0, |a| a.at),
        shares.join(", "),
        table(
            &[
                "merging",
                "cold starts",
                "evictions",
                "503s",
                "other non-2xx / no response",
                "p50",
                "p99",
                &budget_column,
                "instances at end",
            ],
            &rows
        ),
        component.name
    );
    let _ = writeln!(
        text,
        "Cold starts on the trace, in {budget_mib} MiB, `--dedup on` against `--dedup off`: \
         {on:.1}% against {off:.1}% of requests (medians of the rounds).\n"
    );
    Ok((text, Vec::new()))
}

/// Sends the trace to `host`, each request at its time; scrapes the host's metrics meanwhile.
fn run_trace(host: &Host, plan: &[Arrival]) -> Result<(Vec<Outcome>, Vec<Sample>)> {
    let addr = host.addr;
    let admin = host.admin.context("the host has no admin address")?;
    let done = AtomicBool::new(false);
    let start = Instant::now();
    std::thread::scope(|scope| {
        let sampler = scope.spawn(|| {
            let mut samples = Vec::new();
            loop {
                let finished = done.load(Ordering::Acquire);
                if let Ok(metrics) = scrape(admin) {
                    samples.push(Sample {
                        at: start.elapsed().as_secs_f64(),
                        cold_starts: metrics.sum("samepage_cold_starts_total"),
                        pss: metrics.sum("samepage_host_pss_bytes"),
                    });
                }
                if finished {
                    break samples;
                }
                std::thread::sleep(TRACE_SCRAPE_EVERY);
            }
        });
        let mut requests = Vec::with_capacity(plan.len());
        for arrival in plan {
            let due = start + Duration::from_secs_f64(arrival.at);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            let path = format!("/f{}", arrival.function);
            requests.push(scope.spawn(move || {
                let status = get(addr, &path, REQUEST_TIMEOUT).ok().map(|r| r.status);
                Outcome {
                    status,
                    seconds: due.elapsed().as_secs_f64(),
                }
            }));
        }
        let outcomes: Vec<Outcome> = requests
            .into_iter()
            .map(|request| request.join().expect("a trace request panicked"))
            .collect();
        done.store(true, Ordering::Release);
        let samples = sampler.join().expect("the sampler panicked");
        Ok((outcomes, samples))
    })
}

/// The `q` quantile (0 to 1) of `values`, nearest rank; NaN for none.
pub(crate) fn percentile(values: &[f64], q: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}
