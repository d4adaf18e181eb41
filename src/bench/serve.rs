//! The serve suite: `samepage serve`, the serverless host, on the CPython wasi:http component
//! (`examples/http/app.py`). Four parts, each a server in a child process on loopback, every
//! run bounded in count and time: how many warm instances fit a memory budget with merging on
//! and off (density), latency under load with merging on and off, `samepage serve` against
//! `wasmtime serve`, and cold starts on a trace of requests to several functions in a
//! memory budget too tight for unmerged instances.
//!
//! The load is `oha`'s and the other server is `wasmtime serve`, both pinned and installed by
//! `scripts/install-bench-tools` into `target/bench-tools/bin/`. The trace is sent by a small
//! HTTP/1.1 client here, a thread per request at its scheduled time.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use plotters::prelude::*;
use serde_json::Value;

use super::child::median;
use super::{mib, repo_path, table};

/// The memory budget of the density runs (the host's PSS, as `samepage serve` counts it).
const DENSITY_BUDGET_MIB: u64 = 640;
/// Instances each density run asks for: more than fit, so that the budget decides.
const DENSITY_INSTANCES: u32 = 1000;
/// Concurrent connections of the latency runs.
const LATENCY_CONNECTIONS: u32 = 16;
/// Instances pre-warmed for the latency runs: one per connection.
const LATENCY_INSTANCES: u32 = 16;
/// Concurrent connections against `wasmtime serve`.
const VERSUS_CONNECTIONS: u32 = 64;
/// How long each measured load runs, and the warm-up run before it.
const LOAD: Duration = Duration::from_secs(10);
const LOAD_WARMUP: Duration = Duration::from_secs(3);
/// How often the server's PSS is sampled during a load.
const PSS_EVERY: Duration = Duration::from_millis(200);

/// The trace: functions (all the same component, on routes /f0 … /f7), split over tenants.
const TRACE_FUNCTIONS: usize = 8;
const TRACE_TENANTS: usize = 2;
/// Requests of the trace, their mean rate (Poisson arrivals) and the Zipf exponent of the
/// functions' popularity (function k, from 0, is drawn with weight 1 / (k + 1)^s).
const TRACE_REQUESTS: usize = 1500;
const TRACE_RATE: f64 = 30.0;
const TRACE_ZIPF_S: f64 = 1.0;
const TRACE_SEED: u64 = 0x5a3e_9a9e_2026_0001;
/// The trace's memory budget. The host alone serving the trace's functions (which share one
/// compiled component) holds about 60 MiB merging off and 90 MiB merging on, so it leaves
/// room for about 7 unmerged instances (12-13 MiB each), fewer than the functions, against
/// some 40 merged ones.
const TRACE_BUDGET_MIB: u64 = 160;
/// Most instances of each function in the trace.
const TRACE_MAX_INSTANCES: u32 = 8;
/// How often the trace's server metrics are scraped (for the plot and peak PSS).
const TRACE_SCRAPE_EVERY: Duration = Duration::from_millis(500);

/// Longest any one request may take, the trace's and oha's.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest a server may take from its start to serving (compiling, pre-warming).
const START_TIMEOUT: Duration = Duration::from_secs(20 * 60);

/// Setting `SAMEPAGE_SERVE_BENCH_QUICK` shortens the loads and the trace, for a smoke test.
/// The report says so.
struct Params {
    load: Duration,
    warmup: Duration,
    trace_requests: usize,
    quick: bool,
}

impl Params {
    fn get() -> Self {
        if std::env::var_os("SAMEPAGE_SERVE_BENCH_QUICK").is_some() {
            Self {
                load: Duration::from_secs(2),
                warmup: Duration::from_secs(1),
                trace_requests: 300,
                quick: true,
            }
        } else {
            Self {
                load: LOAD,
                warmup: LOAD_WARMUP,
                trace_requests: TRACE_REQUESTS,
                quick: false,
            }
        }
    }
}

/// The installed tools.
struct Tools {
    oha: PathBuf,
    wasmtime: PathBuf,
}

pub fn suite(rounds: u32, out: &Path) -> Result<String> {
    let params = Params::get();
    let tools = install_tools()?;
    let component = component()?;
    let scratch = std::env::temp_dir().join(format!("samepage-serve-{}", std::process::id()));
    std::fs::create_dir_all(&scratch)?;

    let mut report = String::from(ABOUT);
    if params.quick {
        report.push_str(
            "**A smoke run** (`SAMEPAGE_SERVE_BENCH_QUICK` set): loads and the trace are \
             shortened; the figures are not the suite's.\n\n",
        );
    }
    let mut targets = Vec::new();
    report.push_str(&density(rounds, &component, &mut targets)?);
    report.push_str(&latency(rounds, &params, &tools, &component, &mut targets)?);
    report.push_str(&versus(&params, &tools, &component)?);
    report.push_str(&trace(&params, &component, &scratch, out)?);
    report.push_str(&format!(
        "## Targets\n\n{}\n",
        table(&["target", "figures", "met"], &targets)
    ));
    std::fs::remove_dir_all(&scratch).ok();
    Ok(report)
}

/// Runs `scripts/install-bench-tools` (it keeps what is installed at its version).
fn install_tools() -> Result<Tools> {
    let script = repo_path("scripts/install-bench-tools");
    eprintln!("bench: serve: installing oha and wasmtime (scripts/install-bench-tools)");
    let status = Command::new(&script)
        .status()
        .with_context(|| format!("running {}", script.display()))?;
    if !status.success() {
        bail!("{} failed: {status}", script.display());
    }
    let bin = repo_path("target/bench-tools/bin");
    let tools = Tools {
        oha: bin.join("oha"),
        wasmtime: bin.join("wasmtime"),
    };
    for tool in [&tools.oha, &tools.wasmtime] {
        if !tool.exists() {
            bail!("{} is missing after installing", tool.display());
        }
    }
    Ok(tools)
}

/// The CPython component, built by `scripts/build-http-components` if it is missing.
fn component() -> Result<PathBuf> {
    let component = repo_path("target/http-components/python-app.wasm");
    if !component.exists() {
        let script = repo_path("scripts/build-http-components");
        let status = Command::new(&script)
            .status()
            .with_context(|| format!("running {}", script.display()))?;
        if !status.success() || !component.exists() {
            bail!("{} did not build {}", script.display(), component.display());
        }
    }
    Ok(component)
}

// ---------------------------------------------------------------------------------------------
// Density.

/// What one density run found.
struct DensityRun {
    instances: f64,
    pss: f64,
    ready_seconds: f64,
    vmas: f64,
    map_budget: f64,
    skipped_map_budget: f64,
    stopped: String,
}

fn density(rounds: u32, component: &Path, targets: &mut Vec<Vec<String>>) -> Result<String> {
    let budget = format!("{DENSITY_BUDGET_MIB}MiB");
    // The host alone, each way: what the instances are counted above, and its start time.
    let mut base = Vec::new();
    for mode in ["on", "off"] {
        eprintln!("bench: serve: density: the host alone, merging {mode}");
        let mut host = Host::samepage(&[
            "--dedup",
            mode,
            "--memory-budget",
            &budget,
            component.to_str().context("a UTF-8 path")?,
        ])?;
        std::thread::sleep(Duration::from_secs(1));
        let metrics = host.metrics()?;
        base.push((
            metrics.sum("samepage_host_pss_bytes"),
            host.ready.as_secs_f64(),
        ));
        host.stop()?;
    }
    let mut runs: [Vec<DensityRun>; 2] = [Vec::new(), Vec::new()];
    for round in 0..rounds as usize {
        for k in 0..2 {
            let index = (round + k) % 2;
            let mode = ["on", "off"][index];
            eprintln!(
                "bench: serve: density: round {} merging {mode} (pre-warming up to {DENSITY_INSTANCES})",
                round + 1
            );
            runs[index].push(density_run(component, mode, &budget)?);
        }
    }
    let med = |runs: &[DensityRun], field: fn(&DensityRun) -> f64| {
        median(runs.iter().map(field).collect())
    };
    let mut rows = Vec::new();
    for (index, mode) in ["on", "off"].into_iter().enumerate() {
        let r = &runs[index];
        let (base_pss, base_ready) = base[index];
        let instances = med(r, |d| d.instances);
        let pss = med(r, |d| d.pss);
        let vmas = med(r, |d| d.vmas);
        let map_budget = med(r, |d| d.map_budget);
        let mut stopped: Vec<&str> = r.iter().map(|d| d.stopped.as_str()).collect();
        stopped.dedup();
        rows.push(vec![
            mode.to_owned(),
            format!("**{instances:.0}**"),
            mib(pss),
            mib(base_pss),
            mib((pss - base_pss) / instances.max(1.0)),
            format!("{:.1} s", med(r, |d| d.ready_seconds) - base_ready),
            if map_budget > 0.0 {
                format!(
                    "{vmas:.0} / {map_budget:.0} ({:.0}%)",
                    100.0 * vmas / map_budget
                )
            } else {
                "-".into()
            },
            if mode == "on" {
                format!("{:.0}", med(r, |d| d.skipped_map_budget))
            } else {
                "-".into()
            },
            stopped.join("; "),
        ]);
    }
    let on = med(&runs[0], |d| d.instances);
    let off = med(&runs[1], |d| d.instances);
    let ratio = on / off.max(1.0);
    let met = ratio >= 3.0;
    targets.push(vec![
        "density: ≥ 3× the warm instances with merging on".into(),
        format!("{on:.0} against {off:.0}: {ratio:.1}×"),
        yes_no(met),
    ]);
    let mut text = format!(
        "## Density\n\nWarm instances held within a memory budget of {DENSITY_BUDGET_MIB} MiB, \
         asking for {DENSITY_INSTANCES} (`--min-instances {DENSITY_INSTANCES} --max-instances \
         {DENSITY_INSTANCES} --warmup /`). Medians of {rounds} round(s).\n\n{}\n",
        table(
            &[
                "merging",
                "instances",
                "host PSS",
                "host alone",
                "PSS per instance",
                "pre-warm",
                "engine mappings / map budget",
                "page visits skipped for the map budget",
                "pre-warming stopped",
            ],
            &rows
        )
    );
    let _ = writeln!(
        text,
        "Merging on holds **{ratio:.1}×** as many warm instances as merging off (target ≥ 3×: {}).\n",
        if met { "met" } else { "**missed**" }
    );
    let (vmas, map_budget, skipped) = (
        med(&runs[0], |d| d.vmas),
        med(&runs[0], |d| d.map_budget),
        med(&runs[0], |d| d.skipped_map_budget),
    );
    if map_budget > 0.0 && (skipped > 0.0 || vmas >= 0.95 * map_budget) {
        let _ = writeln!(
            text,
            "With merging on the engine's mappings reached {:.0}% of its map-count budget \
             ({vmas:.0} of {map_budget:.0}, `map_budget_percent` of `vm.max_map_count`), and \
             {skipped:.0} page visits left pages unmerged for want of mappings \
             (`samepage_pages_skipped_map_budget`, counted at every visit): the map-count \
             budget, not the pages themselves, is what limits merging here, so each instance \
             keeps more private memory than it would with more mappings allowed.\n",
            100.0 * vmas / map_budget
        );
    } else if map_budget > 0.0 {
        let _ = writeln!(
            text,
            "The map-count budget did not bind: the engine's mappings stayed at {:.0}% of it \
             ({vmas:.0} of {map_budget:.0}) and no page was skipped for it.\n",
            100.0 * vmas / map_budget
        );
    }
    Ok(text)
}

fn density_run(component: &Path, mode: &str, budget: &str) -> Result<DensityRun> {
    let instances = DENSITY_INSTANCES.to_string();
    let mut host = Host::samepage(&[
        "--dedup",
        mode,
        "--memory-budget",
        budget,
        "--min-instances",
        &instances,
        "--max-instances",
        &instances,
        "--warmup",
        "/",
        component.to_str().context("a UTF-8 path")?,
    ])?;
    // The pool keeper tops the pool up four times a second while memory allows: wait until
    // the count holds still (at most 10 s).
    std::thread::sleep(Duration::from_secs(2));
    let mut metrics = host.metrics()?;
    for _ in 0..8 {
        std::thread::sleep(Duration::from_secs(1));
        let next = host.metrics()?;
        let same =
            next.sum("samepage_function_instances") == metrics.sum("samepage_function_instances");
        metrics = next;
        if same {
            break;
        }
    }
    let stopped = host
        .log_lines()
        .into_iter()
        .find(|line| line.contains("instances pre-warmed"))
        .map_or_else(
            || "asked-for count reached".to_owned(),
            |line| {
                if line.contains("memory budget") {
                    "at the memory budget".to_owned()
                } else {
                    line.rsplit_once("pre-warmed: ")
                        .map_or(line.clone(), |(_, why)| why.to_owned())
                }
            },
        );
    let run = DensityRun {
        instances: metrics.sum("samepage_function_instances"),
        pss: metrics.sum("samepage_host_pss_bytes"),
        ready_seconds: host.ready.as_secs_f64(),
        vmas: metrics.sum("samepage_vmas"),
        map_budget: metrics.sum("samepage_map_budget"),
        skipped_map_budget: metrics.sum("samepage_pages_skipped_map_budget"),
        stopped,
    };
    host.stop()?;
    Ok(run)
}

// ---------------------------------------------------------------------------------------------
// Latency under load.

fn latency(
    rounds: u32,
    params: &Params,
    tools: &Tools,
    component: &Path,
    targets: &mut Vec<Vec<String>>,
) -> Result<String> {
    // Per mode: (load, cold starts during the measured run, instances after it).
    let mut runs: [Vec<(Load, f64, f64)>; 2] = [Vec::new(), Vec::new()];
    for round in 0..rounds as usize {
        for k in 0..2 {
            let index = (round + k) % 2;
            let mode = ["on", "off"][index];
            eprintln!("bench: serve: latency: round {} merging {mode}", round + 1);
            let mut host = Host::samepage(&[
                "--dedup",
                mode,
                "--reuse",
                "warm",
                "--min-instances",
                &LATENCY_INSTANCES.to_string(),
                "--warmup",
                "/",
                component.to_str().context("a UTF-8 path")?,
            ])?;
            let url = format!("http://{}/", host.addr);
            oha(&tools.oha, &url, LATENCY_CONNECTIONS, params.warmup)?;
            let before = host.metrics()?;
            let load = oha(&tools.oha, &url, LATENCY_CONNECTIONS, params.load)?;
            let after = host.metrics()?;
            let cold =
                after.sum("samepage_cold_starts_total") - before.sum("samepage_cold_starts_total");
            runs[index].push((load, cold, after.sum("samepage_function_instances")));
            host.stop()?;
        }
    }
    let med = |runs: &[(Load, f64, f64)], field: fn(&(Load, f64, f64)) -> f64| {
        median(runs.iter().map(field).collect())
    };
    let mut rows = Vec::new();
    for (index, mode) in ["on", "off"].into_iter().enumerate() {
        let r = &runs[index];
        rows.push(vec![
            mode.to_owned(),
            format!("{:.0}", med(r, |x| x.0.rps)),
            ms(med(r, |x| x.0.p50)),
            ms(med(r, |x| x.0.p99)),
            error_cell(r.iter().map(|x| &x.0)),
            format!("{:.0}", med(r, |x| x.1)),
            format!("{:.0}", med(r, |x| x.2)),
        ]);
    }
    let (p50_on, p50_off) = (med(&runs[0], |x| x.0.p50), med(&runs[1], |x| x.0.p50));
    let (p99_on, p99_off) = (med(&runs[0], |x| x.0.p99), med(&runs[1], |x| x.0.p99));
    let errors: u64 = runs.iter().flatten().map(|x| x.0.errors).sum();
    let within = |a: f64, b: f64| a.max(b) <= 1.10 * a.min(b);
    for (name, on, off) in [("p50", p50_on, p50_off), ("p99", p99_on, p99_off)] {
        targets.push(vec![
            format!("latency: {name} with merging on within 10% of off's"),
            format!(
                "{} against {} ({:+.1}%)",
                ms(on),
                ms(off),
                100.0 * (on / off - 1.0)
            ),
            yes_no(within(on, off)),
        ]);
    }
    targets.push(vec![
        "latency: no errors (non-2xx or connection errors)".into(),
        format!("{errors} over every measured run"),
        yes_no(errors == 0),
    ]);
    let mut text = format!(
        "## Latency under load\n\n`oha` at {LATENCY_CONNECTIONS} connections (keep-alive) for \
         {:.0} s against `samepage serve --reuse warm --min-instances {LATENCY_INSTANCES} \
         --warmup /` (at most 64 instances), after a warm-up run of {:.0} s. Medians of \
         {rounds} round(s); errors are summed over them. Cold starts are those during the \
         measured run (a request that found no idle instance: the others were busy or not \
         parked yet).\n\n{}\n",
        params.load.as_secs_f64(),
        params.warmup.as_secs_f64(),
        table(
            &[
                "merging",
                "requests/s",
                "p50",
                "p99",
                "errors",
                "cold starts",
                "instances after",
            ],
            &rows
        )
    );
    let _ = writeln!(
        text,
        "Merging on against off: p50 {:+.1}%, p99 {:+.1}% (target: within 10%: {}); \
         {errors} errors (target 0: {}).\n",
        100.0 * (p50_on / p50_off - 1.0),
        100.0 * (p99_on / p99_off - 1.0),
        if within(p50_on, p50_off) && within(p99_on, p99_off) {
            "met"
        } else {
            "**missed**"
        },
        if errors == 0 { "met" } else { "**missed**" }
    );
    Ok(text)
}

// ---------------------------------------------------------------------------------------------
// Against wasmtime serve.

fn versus(params: &Params, tools: &Tools, component: &Path) -> Result<String> {
    let path = component.to_str().context("a UTF-8 path")?;
    let max = VERSUS_CONNECTIONS.to_string();
    let mut rows = Vec::new();
    for (label, kind) in [
        ("`wasmtime serve -Scli`", 0),
        ("`samepage serve --reuse fresh`", 1),
        ("`samepage serve --reuse warm --max-instances 64`", 2),
    ] {
        eprintln!("bench: serve: against wasmtime serve: {label}");
        let mut host = match kind {
            0 => Host::wasmtime(&tools.wasmtime, component)?,
            1 => Host::samepage(&["--reuse", "fresh", "--max-instances", &max, path])?,
            _ => Host::samepage(&["--reuse", "warm", "--max-instances", &max, path])?,
        };
        let url = format!("http://{}/", host.addr);
        oha(&tools.oha, &url, VERSUS_CONNECTIONS, params.warmup)?;
        let cold = |host: &Host| -> Result<Option<f64>> {
            Ok(match host.admin {
                Some(_) => Some(host.metrics()?.sum("samepage_cold_starts_total")),
                None => None,
            })
        };
        let cold_before = cold(&host)?;
        let sampler = PssSampler::start(host.pid());
        let load = oha(&tools.oha, &url, VERSUS_CONNECTIONS, params.load)?;
        let samples = sampler.stop();
        let cold_starts = match (cold_before, cold(&host)?) {
            (Some(before), Some(after)) => format!("{:.0}", after - before),
            _ => "every request".into(),
        };
        let peak = samples.iter().copied().max().unwrap_or(0) as f64;
        let end = samples.last().copied().unwrap_or(0) as f64;
        rows.push(vec![
            label.to_owned(),
            format!("{:.0}", load.rps),
            ms(load.p50),
            ms(load.p99),
            error_cell([&load]),
            cold_starts,
            mib(peak),
            mib(end),
        ]);
        host.stop()?;
    }
    Ok(format!(
        "## Against `wasmtime serve`\n\nThe same component, `oha` at {VERSUS_CONNECTIONS} \
         connections (keep-alive) for {:.0} s after a warm-up run of {:.0} s, one run each. \
         `wasmtime serve` makes an instance per request, as `--reuse fresh` does; `--reuse \
         warm` keeps up to 64 instances (made by the warm-up run) and merges them; cold \
         starts are samepage's during the measured run. Memory is \
         the server process's PSS (`/proc/PID/smaps_rollup`), sampled every {} ms during the \
         measured run: its peak, and at the run's end.\n\n{}\n",
        params.load.as_secs_f64(),
        params.warmup.as_secs_f64(),
        PSS_EVERY.as_millis(),
        table(
            &[
                "server",
                "requests/s",
                "p50",
                "p99",
                "errors",
                "cold starts",
                "PSS peak",
                "PSS at end"
            ],
            &rows
        )
    ))
}

// ---------------------------------------------------------------------------------------------
// Cold starts on a trace.

/// One scheduled request: when (seconds from the trace's start) and to which function.
#[derive(Clone, Copy)]
struct Arrival {
    at: f64,
    function: usize,
}

/// The trace, the same every run: Poisson arrivals at [`TRACE_RATE`], functions drawn by
/// Zipf popularity.
fn schedule(requests: usize) -> Vec<Arrival> {
    let mut rng = SplitMix64(TRACE_SEED);
    let weights: Vec<f64> = (1..=TRACE_FUNCTIONS)
        .map(|rank| 1.0 / (rank as f64).powf(TRACE_ZIPF_S))
        .collect();
    let total: f64 = weights.iter().sum();
    let mut cdf = Vec::with_capacity(weights.len());
    let mut sum = 0.0;
    for weight in &weights {
        sum += weight / total;
        cdf.push(sum);
    }
    let mut at = 0.0;
    (0..requests)
        .map(|_| {
            at += -(1.0 - rng.unit()).ln() / TRACE_RATE;
            let u = rng.unit();
            let function = cdf
                .iter()
                .position(|&c| u < c)
                .unwrap_or(TRACE_FUNCTIONS - 1);
            Arrival { at, function }
        })
        .collect()
}

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

fn trace(params: &Params, component: &Path, scratch: &Path, out: &Path) -> Result<String> {
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
    super::plot::lines(
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

/// splitmix64 (Steele, Lea and Flood): a seeded generator, enough for a trace.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
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

// ---------------------------------------------------------------------------------------------
// Servers in child processes.

/// A server in a child process, serving.
struct Host {
    child: Child,
    addr: SocketAddr,
    admin: Option<SocketAddr>,
    /// From its start to its saying that it serves.
    ready: Duration,
    /// Everything it printed on stderr so far.
    log: Arc<Mutex<Vec<String>>>,
    name: String,
}

impl Host {
    /// `samepage serve` with `args`, on ports of loopback the kernel picks.
    fn samepage(args: &[&str]) -> Result<Self> {
        let exe = std::env::current_exe().context("locating the samepage binary")?;
        let mut command = Command::new(exe);
        command
            .args([
                "serve",
                "--addr",
                "127.0.0.1:0",
                "--admin-addr",
                "127.0.0.1:0",
            ])
            .args(args);
        Self::start("samepage serve", command, |line, host| {
            if let Some(addr) = line.strip_prefix("samepage: admin http://") {
                host.1 = addr.trim().parse().ok();
            }
            if let Some(addr) = line.strip_prefix("samepage: serving http://") {
                host.0 = addr.trim().parse().ok();
            }
        })
    }

    /// `wasmtime serve` with every WASI interface (componentize-py components import
    /// wasi:cli), on a free port of loopback.
    fn wasmtime(wasmtime: &Path, component: &Path) -> Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let mut command = Command::new(wasmtime);
        command
            .args(["serve", "-Scli", "--addr"])
            .arg(format!("127.0.0.1:{port}"))
            .arg(component);
        Self::start("wasmtime serve", command, |line, host| {
            // "Serving HTTP on http://127.0.0.1:PORT/"
            if let Some(at) = line.find("http://") {
                let rest = &line[at + "http://".len()..];
                host.0 = rest.trim().trim_end_matches('/').parse().ok();
            }
        })
    }

    /// Starts `command` and reads its stderr until `ready` found its address (a thread
    /// keeps reading it after, so that the server never blocks writing).
    fn start(
        name: &str,
        mut command: Command,
        ready: fn(&str, &mut (Option<SocketAddr>, Option<SocketAddr>)),
    ) -> Result<Self> {
        let started = Instant::now();
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        let stderr = child.stderr.take().expect("stderr is piped");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (lines, received) = mpsc::channel();
        {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    log.lock().expect("log lock").push(line.clone());
                    let _ = lines.send(line);
                }
            });
        }
        let mut found = (None, None);
        let mut host = Self {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            admin: None,
            ready: Duration::ZERO,
            log,
            name: name.to_owned(),
        };
        loop {
            let left = START_TIMEOUT.saturating_sub(started.elapsed());
            match received.recv_timeout(left) {
                Ok(line) => {
                    ready(&line, &mut found);
                    if let Some(addr) = found.0 {
                        host.addr = addr;
                        host.admin = found.1;
                        host.ready = started.elapsed();
                        return Ok(host);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    bail!(
                        "{name} was not serving after {START_TIMEOUT:?}:\n{}",
                        host.tail()
                    )
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let status = host.child.wait()?;
                    bail!("{name} ended before serving ({status}):\n{}", host.tail());
                }
            }
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log_lines(&self) -> Vec<String> {
        self.log.lock().expect("log lock").clone()
    }

    /// The last lines it printed.
    fn tail(&self) -> String {
        let log = self.log.lock().expect("log lock");
        log[log.len().saturating_sub(20)..].join("\n")
    }

    fn metrics(&self) -> Result<Metrics> {
        scrape(self.admin.context("the host has no admin address")?)
    }

    /// SIGTERM, then waits for it to drain and exit (a minute at most, then SIGKILL).
    fn stop(&mut self) -> Result<ExitStatus> {
        let pid = rustix::process::Pid::from_child(&self.child);
        rustix::process::kill_process(pid, rustix::process::Signal::TERM)
            .with_context(|| format!("stopping {}", self.name))?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                self.child.kill().ok();
                self.child.wait().ok();
                bail!("{} did not stop within a minute of SIGTERM", self.name);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.child.kill().ok();
            self.child.wait().ok();
        }
    }
}

/// Samples a process's PSS on a thread until stopped.
struct PssSampler {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<u64>>,
}

impl PssSampler {
    fn start(pid: u32) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut samples = Vec::new();
                loop {
                    let last = stop.load(Ordering::Acquire);
                    samples.extend(pss_of(pid));
                    if last {
                        break samples;
                    }
                    std::thread::sleep(PSS_EVERY);
                }
            })
        };
        Self { stop, thread }
    }

    /// Stops sampling (after one last sample) and returns the samples, in bytes.
    fn stop(self) -> Vec<u64> {
        self.stop.store(true, Ordering::Release);
        self.thread.join().expect("the PSS sampler panicked")
    }
}

/// A process's PSS, from `/proc/PID/smaps_rollup`.
fn pss_of(pid: u32) -> Option<u64> {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    crate::measure::pss_in_rollup(&rollup)
}

// ---------------------------------------------------------------------------------------------
// Metrics and HTTP.

/// Samples of an OpenMetrics exposition: (name, labels, value).
struct Metrics(Vec<(String, String, f64)>);

impl Metrics {
    fn parse(text: &str) -> Self {
        let samples = text
            .lines()
            .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
            .filter_map(|line| {
                let name_end = line.find(['{', ' '])?;
                let (name, rest) = line.split_at(name_end);
                let (labels, rest) = match rest.strip_prefix('{') {
                    Some(rest) => {
                        let close = rest.find('}')?;
                        (&rest[..close], &rest[close + 1..])
                    }
                    None => ("", rest),
                };
                let value = rest.split_whitespace().next()?.parse().ok()?;
                Some((name.to_owned(), labels.to_owned(), value))
            })
            .collect();
        Self(samples)
    }

    /// The sum of every sample named `name` (0 when none is).
    fn sum(&self, name: &str) -> f64 {
        self.0
            .iter()
            .filter(|(n, _, _)| n == name)
            .map(|(_, _, v)| v)
            .sum()
    }
}

fn scrape(admin: SocketAddr) -> Result<Metrics> {
    let response = get(admin, "/metrics", REQUEST_TIMEOUT)?;
    if response.status != 200 {
        bail!("GET /metrics answered {}", response.status);
    }
    Ok(Metrics::parse(&String::from_utf8_lossy(&response.body)))
}

struct Response {
    status: u16,
    body: Vec<u8>,
}

/// An HTTP/1.1 GET on a connection of its own: the status and the body (by its length,
/// chunked, or to the end of the connection).
fn get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<Response> {
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.set_nodelay(true)?;
    stream.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| anyhow!("not an HTTP status line: {line:?}"))?;
    let (mut length, mut chunked) = (None, false);
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            bail!("the connection ended in the headers");
        }
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                length = value.parse::<usize>().ok();
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = value.to_ascii_lowercase().contains("chunked");
            }
        }
    }
    let mut body = Vec::new();
    if chunked {
        loop {
            line.clear();
            reader.read_line(&mut line)?;
            let size = line.trim().split(';').next().unwrap_or("");
            let size = usize::from_str_radix(size.trim(), 16)
                .map_err(|_| anyhow!("a bad chunk size: {line:?}"))?;
            if size == 0 {
                // Trailers, up to the blank line.
                loop {
                    line.clear();
                    if reader.read_line(&mut line)? == 0 || line.trim().is_empty() {
                        break;
                    }
                }
                break;
            }
            let start = body.len();
            body.resize(start + size, 0);
            reader.read_exact(&mut body[start..])?;
            line.clear();
            reader.read_line(&mut line)?;
        }
    } else if let Some(length) = length {
        body.resize(length, 0);
        reader.read_exact(&mut body)?;
    } else {
        reader.read_to_end(&mut body)?;
    }
    Ok(Response { status, body })
}

// ---------------------------------------------------------------------------------------------
// oha.

/// What an `oha` run measured: requests/s, p50 and p99 in seconds, and errors (non-2xx
/// responses and requests without one).
struct Load {
    rps: f64,
    p50: f64,
    p99: f64,
    errors: u64,
    /// What they were, as oha names them.
    error_kinds: String,
}

/// Runs `oha` against `url` for `duration` at `connections` connections. Requests still
/// running at the end are waited for (`-w`), so that none counts as an error for being cut.
fn oha(oha: &Path, url: &str, connections: u32, duration: Duration) -> Result<Load> {
    let output = Command::new(oha)
        .args(["--no-tui", "--output-format", "json", "-w"])
        .arg("-z")
        .arg(format!("{}ms", duration.as_millis()))
        .arg("-c")
        .arg(connections.to_string())
        .arg("-t")
        .arg(format!("{}s", REQUEST_TIMEOUT.as_secs()))
        .arg(url)
        .stdin(Stdio::null())
        .output()
        .context("running oha")?;
    if !output.status.success() {
        bail!(
            "oha {url} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let report: Value = serde_json::from_slice(&output.stdout).context("parsing oha's JSON")?;
    let number = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    // Errors by kind: oha's (connection errors, timeouts) and statuses other than 2xx.
    let mut kinds = Vec::new();
    for (field, keep) in [
        ("errorDistribution", false),
        ("statusCodeDistribution", true),
    ] {
        if let Some(map) = report[field].as_object() {
            for (key, n) in map {
                if !(keep && key.starts_with('2')) {
                    kinds.push((key.clone(), n.as_u64().unwrap_or(0)));
                }
            }
        }
    }
    let errors = kinds.iter().map(|(_, n)| n).sum();
    let error_kinds = kinds
        .iter()
        .map(|(kind, n)| format!("{n} × {kind}"))
        .collect::<Vec<_>>()
        .join(", ");
    Ok(Load {
        rps: number(&report["summary"]["requestsPerSec"]),
        p50: number(&report["latencyPercentiles"]["p50"]),
        p99: number(&report["latencyPercentiles"]["p99"]),
        errors,
        error_kinds,
    })
}

// ---------------------------------------------------------------------------------------------
// Report helpers.

fn ms(seconds: f64) -> String {
    if seconds.is_nan() {
        "-".into()
    } else {
        format!("{:.2} ms", seconds * 1e3)
    }
}

/// Errors of some loads: their count, and their kinds when there are any.
fn error_cell<'a>(loads: impl IntoIterator<Item = &'a Load>) -> String {
    let loads: Vec<&Load> = loads.into_iter().collect();
    let errors: u64 = loads.iter().map(|load| load.errors).sum();
    if errors == 0 {
        return "0".into();
    }
    let kinds: Vec<&str> = loads
        .iter()
        .map(|load| load.error_kinds.as_str())
        .filter(|kinds| !kinds.is_empty())
        .collect();
    format!("**{errors}** ({})", kinds.join("; "))
}

fn yes_no(met: bool) -> String {
    if met { "yes" } else { "**no**" }.into()
}

const ABOUT: &str = "\
# samepage serve: density, latency and cold starts\n\n\
`samepage serve`, the serverless host, serving the CPython wasi:http component of \
`examples/http/app.py` (built by `scripts/build-http-components` with componentize-py: a \
20,000-entry table built at start-up, `GET /` answered with a line of JSON). Every server \
runs in a child process on loopback ports, is read for readiness from its stderr (`samepage: \
serving …`, printed once its pools are pre-warmed), measured through its admin `/metrics` \
(OpenMetrics: instances, the host's PSS, cold starts, evictions, the merge engine's \
counters) and stopped with SIGTERM. Merging on and off are `--dedup on|off`: the same memfd \
memories, merged or never merged. The load generator is `oha` 1.16.0 and the other server \
`wasmtime serve` of wasmtime-cli 48.0.8 (the project's wasmtime), both built by \
`scripts/install-bench-tools`. Every run is bounded in count and time. Where a figure is a \
median of rounds, its section says so; rounds alternate the order of merging on and off. \
Each section says its protocol; the targets are checked at the end.\n\n";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_summed_over_labels() {
        let metrics = Metrics::parse(
            "# HELP x y\nsamepage_vmas 12\nsamepage_requests_total{function=\"a\",tenant=\"t\"} 3\n\
             samepage_requests_total{function=\"b\",tenant=\"t\"} 4\n# EOF\n",
        );
        assert_eq!(metrics.sum("samepage_vmas"), 12.0);
        assert_eq!(metrics.sum("samepage_requests_total"), 7.0);
        assert_eq!(metrics.sum("samepage_requests"), 0.0);
    }

    #[test]
    fn the_trace_is_the_same_every_time_and_zipf_ordered() {
        let (a, b) = (schedule(2000), schedule(2000));
        assert!(
            a.iter()
                .zip(&b)
                .all(|(x, y)| x.at == y.at && x.function == y.function)
        );
        let mut counts = [0usize; TRACE_FUNCTIONS];
        for arrival in &a {
            counts[arrival.function] += 1;
        }
        assert!(counts[0] > counts[1] && counts[1] > counts[TRACE_FUNCTIONS - 1]);
        let mean_gap = a.last().unwrap().at / a.len() as f64;
        assert!((mean_gap * TRACE_RATE - 1.0).abs() < 0.1, "{mean_gap}");
    }
}
