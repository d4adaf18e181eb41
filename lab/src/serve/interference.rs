//! The serve suite's merging on and off under load: `samepage serve` in its default with
//! `--dedup on` and `--dedup off`, closed-loop and open-loop at shares of the peak rate: the
//! latency merging costs requests, and the CPU the scanner took meanwhile.

use std::fmt::Write as _;

use anyhow::{Context, Result};

use super::oha::{Load, Offer, error_cell, oha};
use super::server::{Cpu, Host};
use super::{CONNECTIONS, Component, Params, Tools, ms, spread, yes_no};
use crate::child::median;
use crate::table;

/// The open-loop rates, as shares of the peak rate.
const SHARES: [f64; 2] = [0.5, 0.8];
/// The most p99 with merging on may exceed off's.
const WITHIN: f64 = 0.10;

/// One load of one run: what oha measured and the CPU the server took meanwhile.
struct Measured {
    load: Load,
    cpu: Cpu,
}

/// `peak` is the default's closed-loop requests/s measured against `wasmtime serve`; without
/// it, a closed-loop run with merging on measures it first.
pub(super) fn interference(
    rounds: u32,
    params: &Params,
    tools: &Tools,
    component: &Component,
    peak: Option<f64>,
) -> Result<(String, Vec<Vec<String>>)> {
    let path = component.arg()?;
    let (peak, peak_from) = match peak {
        Some(peak) if peak.is_finite() && peak > 0.0 => (
            peak,
            "the default's median closed-loop requests/s against `wasmtime serve`, above",
        ),
        _ => {
            eprintln!(
                "bench: serve: {}: interference: measuring the peak rate",
                component.key
            );
            let mut host = Host::samepage(&[path])?;
            let url = format!("http://{}/", host.addr);
            oha(&tools.oha, &url, CONNECTIONS, params.warmup, Offer::Closed)?;
            let load = oha(&tools.oha, &url, CONNECTIONS, params.load, Offer::Closed)?;
            host.stop()?;
            (
                load.rps,
                "a closed-loop run of the default with merging on, before these",
            )
        }
    };
    // Per mode (on, off), per load (closed, then each share), the rounds' measurements.
    let mut runs: [Vec<Vec<Measured>>; 2] = [
        (0..=SHARES.len()).map(|_| Vec::new()).collect(),
        (0..=SHARES.len()).map(|_| Vec::new()).collect(),
    ];
    for round in 0..rounds as usize {
        for k in 0..2 {
            let index = (round + k) % 2;
            let mode = ["on", "off"][index];
            eprintln!(
                "bench: serve: {}: merging on and off: round {} merging {mode}",
                component.key,
                round + 1
            );
            let mut host = Host::samepage(&["--dedup", mode, path])?;
            let url = format!("http://{}/", host.addr);
            oha(&tools.oha, &url, CONNECTIONS, params.warmup, Offer::Closed)?;
            let offers = std::iter::once((Offer::Closed, params.load)).chain(
                SHARES
                    .iter()
                    .map(|share| (Offer::Rate(share * peak), params.open)),
            );
            for (load_index, (offer, duration)) in offers.enumerate() {
                let before = Cpu::of(host.pid());
                let load = oha(&tools.oha, &url, CONNECTIONS, duration, offer)?;
                let cpu = Cpu::of(host.pid()).since(before);
                runs[index][load_index].push(Measured { load, cpu });
            }
            host.stop().context("stopping the server")?;
        }
    }

    let of = |mode: usize, load: usize, field: fn(&Measured) -> f64| -> Vec<f64> {
        runs[mode][load].iter().map(field).collect()
    };
    let med = |mode: usize, load: usize, field: fn(&Measured) -> f64| median(of(mode, load, field));
    let names: Vec<String> = std::iter::once(format!("closed loop, {CONNECTIONS} connections"))
        .chain(SHARES.iter().map(|share| {
            format!(
                "open loop, {:.0}% of peak: {:.0} requests/s",
                100.0 * share,
                share * peak
            )
        }))
        .collect();
    let mut rows = Vec::new();
    let mut targets = Vec::new();
    let mut summary = Vec::new();
    for (load, name) in names.iter().enumerate() {
        for (mode, label) in ["on", "off"].into_iter().enumerate() {
            rows.push(vec![
                name.clone(),
                label.to_owned(),
                format!("{:.0}", med(mode, load, |m| m.load.rps)),
                ms(med(mode, load, |m| m.load.p50)),
                spread(&of(mode, load, |m| m.load.p99), ms),
                error_cell(runs[mode][load].iter().map(|m| &m.load)),
                format!(
                    "{:.2} s / {:.2} s",
                    med(mode, load, |m| m.cpu.total),
                    med(mode, load, |m| m.cpu.scanner)
                ),
            ]);
        }
        let (on, off) = (med(0, load, |m| m.load.p99), med(1, load, |m| m.load.p99));
        let change = on / off - 1.0;
        let met = on <= (1.0 + WITHIN) * off;
        targets.push(vec![
            format!("p99 with merging on at most 10% above off's: {name}"),
            format!(
                "{} against {} (`samepage serve` default, `--dedup on` against `--dedup off`): \
                 {:+.1}%",
                ms(on),
                ms(off),
                100.0 * change
            ),
            yes_no(met),
        ]);
        summary.push(format!(
            "{name}: {:+.1}% ({})",
            100.0 * change,
            if met { "met" } else { "**missed**" }
        ));
    }
    let errors: u64 = runs.iter().flatten().flatten().map(|m| m.load.errors).sum();
    targets.push(vec![
        "no errors with merging on and off under load".into(),
        format!("{errors} over every run"),
        yes_no(errors == 0),
    ]);

    let mut text = format!(
        "### Merging on and off under load\n\n`samepage serve` in its default (no option but \
         `--dedup on` or `--dedup off`), `oha` at {CONNECTIONS} connections: a warm-up run of \
         {:.0} s, a closed-loop run of {:.0} s, then open-loop runs of {:.0} s at {} of the \
         peak rate, {peak:.0} requests/s ({peak_from}), each request timed from when it was \
         due. {rounds} round(s), alternating which of on and off runs first. The CPU column \
         is the server process's CPU time during the run, all threads, and its scanner \
         thread's (`samepage-scan`).\n\n{}\n",
        params.warmup.as_secs_f64(),
        params.load.as_secs_f64(),
        params.open.as_secs_f64(),
        SHARES
            .iter()
            .map(|s| format!("{:.0}%", 100.0 * s))
            .collect::<Vec<_>>()
            .join(" and "),
        table(
            &[
                "load",
                "merging",
                "requests/s",
                "p50",
                "p99",
                "errors",
                "CPU: server / scanner",
            ],
            &rows
        )
    );
    let _ = writeln!(
        text,
        "p99 with merging on against off (target: at most 10% above): {}. Closed loop, \
         merging on serves {:.2}× the requests/s of merging off.\n",
        summary.join("; "),
        med(0, 0, |m| m.load.rps) / med(1, 0, |m| m.load.rps)
    );
    Ok((text, targets))
}
