//! The serve suite under `oha`'s load: latency with merging on and off, and `samepage serve`
//! against `wasmtime serve` (throughput, latency, cold starts and the server's PSS).

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};

use super::oha::{Load, error_cell, oha};
use super::server::{Host, PSS_EVERY, PssSampler};
use super::{Params, Tools, ms, yes_no};
use crate::child::median;
use crate::{mib, table};

/// Concurrent connections of the latency runs.
const LATENCY_CONNECTIONS: u32 = 16;
/// Instances pre-warmed for the latency runs: one per connection.
const LATENCY_INSTANCES: u32 = 16;
/// Concurrent connections against `wasmtime serve`.
const VERSUS_CONNECTIONS: u32 = 64;

pub(super) fn latency(
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

pub(super) fn versus(params: &Params, tools: &Tools, component: &Path) -> Result<String> {
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
