//! The serve suite's cold starts on a trace: several functions of one component in a memory
//! budget too tight for their unmerged instances, sent the trace of `arrivals.rs` on time,
//! merging on and off.

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
use super::{Params, REQUEST_TIMEOUT, ms};
use crate::{mib, table};

/// Tenants the trace's functions are split over.
const TRACE_TENANTS: usize = 2;
/// Requests of the trace.
pub(super) const TRACE_REQUESTS: usize = 1500;
/// The trace's memory budget. The host alone serving the trace's functions (which share one
/// compiled component) holds about 60 MiB merging off and 90 MiB merging on, so it leaves
/// room for about 7 unmerged instances (12-13 MiB each), fewer than the functions, against
/// some 40 merged ones.
const TRACE_BUDGET_MIB: u64 = 160;
/// Most instances of each function in the trace.
const TRACE_MAX_INSTANCES: u32 = 8;
/// How often the trace's server metrics are scraped (for the plot and peak PSS).
const TRACE_SCRAPE_EVERY: Duration = Duration::from_millis(500);

/// The trace's config: one function per route, the same component, tenants alternating.
fn trace_config(component: &Path) -> String {
    let mut config = format!("[server]\nmemory_budget = \"{TRACE_BUDGET_MIB}MiB\"\n\n");
    for k in 0..TRACE_FUNCTIONS {
        let _ = write!(
            config,
            "[[function]]\nname = \"f{k}\"\nroute = \"/f{k}\"\ncomponent = {:?}\n\
             tenant = \"t{}\"\nreuse = \"warm\"\nmin_instances = 0\nmax_instances = \
             {TRACE_MAX_INSTANCES}\n\n",
            component.display().to_string(),
            k % TRACE_TENANTS
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

pub(super) fn trace(
    params: &Params,
    component: &Path,
    scratch: &Path,
    out: &Path,
) -> Result<String> {
    let plan = schedule(params.trace_requests);
    let config = scratch.join("trace.toml");
    std::fs::write(&config, trace_config(component))?;
    let config = config.to_str().context("a UTF-8 path")?.to_owned();
    let mut runs = Vec::new();
    for mode in ["on", "off"] {
        eprintln!(
            "bench: serve: trace: {} requests over {:.0} s, merging {mode}",
            plan.len(),
            plan.last().map_or(0.0, |a| a.at)
        );
        let mut host = Host::samepage(&["--config", &config, "--dedup", mode])?;
        let base_pss = host.metrics()?.sum("samepage_host_pss_bytes");
        let (outcomes, samples) = run_trace(&host, &plan)?;
        let end = host.metrics()?;
        host.stop()?;
        runs.push(TraceRun {
            outcomes,
            samples,
            end,
            base_pss,
        });
    }
    let mut rows = Vec::new();
    for (mode, run) in ["on", "off"].iter().zip(&runs) {
        let requests = run.end.sum("samepage_requests_total");
        let cold = run.end.sum("samepage_cold_starts_total");
        let ok: Vec<f64> = run
            .outcomes
            .iter()
            .filter(|o| o.status.is_some_and(|s| (200..300).contains(&s)))
            .map(|o| o.seconds)
            .collect();
        let count = |f: &dyn Fn(&Outcome) -> bool| run.outcomes.iter().filter(|o| f(o)).count();
        let refused = count(&|o| o.status == Some(503));
        let other = count(&|o| {
            o.status
                .is_some_and(|s| !(200..300).contains(&s) && s != 503)
        });
        let lost = count(&|o| o.status.is_none());
        let peak = run.samples.iter().map(|s| s.pss).fold(0.0, f64::max);
        rows.push(vec![
            (*mode).to_owned(),
            format!(
                "**{:.1}%** ({cold:.0} of {requests:.0})",
                100.0 * cold / requests.max(1.0)
            ),
            format!("{:.0}", run.end.sum("samepage_evictions_total")),
            format!(
                "{refused} ({:.0} over budget)",
                run.end.sum("samepage_over_budget_total")
            ),
            format!(
                "{other} / {lost} ({:.0} 5xx counted by the host)",
                run.end.sum("samepage_responses_5xx_total")
            ),
            ms(percentile(&ok, 0.50)),
            ms(percentile(&ok, 0.99)),
            format!("{} → {}", mib(run.base_pss), mib(peak)),
            format!("{:.0}", run.end.sum("samepage_function_instances")),
        ]);
    }
    let budget_column = format!("host PSS: alone → peak (budget {TRACE_BUDGET_MIB} MiB)");
    let plot = "serve-cold-starts.svg";
    crate::plot::lines(
        &out.join(plot),
        "Cold starts on the trace",
        ("seconds since the trace began", "cold starts so far"),
        &["on", "off"]
            .iter()
            .zip(&runs)
            .map(|(mode, run)| {
                (
                    format!("merging {mode}"),
                    run.samples.iter().map(|s| (s.at, s.cold_starts)).collect(),
                )
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
    Ok(format!(
        "## Cold starts on a trace\n\n{TRACE_FUNCTIONS} functions of the same component \
         (`[[function]]`s f0 … f{} on routes /f0 … /f{}, `reuse = \"warm\"`, `min_instances = \
         0`, `max_instances = {TRACE_MAX_INSTANCES}`), in {TRACE_TENANTS} tenants (f0, f2, … \
         in t0; f1, f3, … in t1; each tenant its own merge domain), in one memory budget of \
         {TRACE_BUDGET_MIB} MiB. The trace is {} requests with Poisson arrivals at {TRACE_RATE} \
         requests/s (exponential gaps; {:.1} s in all), each to function k with Zipf weight \
         1/(k+1)^{TRACE_ZIPF_S} ({}), drawn by splitmix64 from seed {TRACE_SEED:#x}: the same \
         trace for both runs. Each request is sent at its scheduled time on a thread of its \
         own (a new connection, HTTP/1.1 GET, `Connection: close`), whatever the others are \
         doing, and timed from its scheduled time to the end of its body (p50 and p99 over \
         the 2xx responses). The cold-start share is the host's cold starts over its \
         requests (`samepage_cold_starts_total` / `samepage_requests_total`): requests that \
         found no idle instance of their function, the first one of each function included. \
         One run each way.\n\n{}\n![Cold starts over the trace, merging on and off]({plot})\n\n",
        TRACE_FUNCTIONS - 1,
        TRACE_FUNCTIONS - 1,
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
        )
    ))
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
fn percentile(values: &[f64], q: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}
