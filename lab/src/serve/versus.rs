//! The serve suite against `wasmtime serve`: the same component, the same `oha` load at the
//! same connections, on `wasmtime serve` and on `samepage serve` in its default, `--reuse
//! fresh` and `--reuse warm`, in one run: requests/s, p50, p99 and the server process's PSS,
//! closed-loop and then open-loop at one rate for every server.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;

use super::oha::{Load, Offer, error_cell, oha};
use super::server::{Host, PSS_EVERY, Pss, PssSampler};
use super::{CONNECTIONS, Component, Params, Tools, ms, spread, yes_no};
use crate::child::median;
use crate::{mib, table};

/// The open-loop rate every server is offered: this share of `wasmtime serve`'s closed-loop
/// requests/s in the first round (where it runs first).
const OPEN_SHARE: f64 = 0.5;

/// The servers compared.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Server {
    Wasmtime,
    Default,
    Fresh,
    Warm,
}

impl Server {
    const ALL: [Self; 4] = [Self::Wasmtime, Self::Default, Self::Fresh, Self::Warm];

    fn label(self) -> &'static str {
        match self {
            Self::Wasmtime => "`wasmtime serve -Scli`",
            Self::Default => "`samepage serve` (default)",
            Self::Fresh => "`samepage serve --reuse fresh`",
            Self::Warm => "`samepage serve --reuse warm`",
        }
    }

    fn start(self, wasmtime: &Path, component: &Component) -> Result<Host> {
        let path = component.arg()?;
        match self {
            Self::Wasmtime => Host::wasmtime(wasmtime, &component.path),
            Self::Default => Host::samepage(&[path]),
            Self::Fresh => Host::samepage(&["--reuse", "fresh", path]),
            Self::Warm => Host::samepage(&["--reuse", "warm", path]),
        }
    }
}

/// One server's measured runs in one round.
struct Run {
    closed: Load,
    /// PSS during the closed-loop run: its peak and at its end.
    closed_peak: Pss,
    closed_end: f64,
    open: Load,
    open_peak: f64,
    /// samepage's cold starts during the closed-loop run, and its requests.
    cold: Option<(f64, f64)>,
    /// samepage's functions switched from reuse to per-request instances, and requests
    /// retried on a fresh instance, over the server's life.
    fallbacks: Option<(f64, f64)>,
}

/// Returns the section, its target rows, and the default's closed-loop requests/s (its peak
/// rate, for the open-loop shares of `interference.rs`).
pub(super) fn versus(
    rounds: u32,
    params: &Params,
    tools: &Tools,
    component: &Component,
) -> Result<(String, Vec<Vec<String>>, f64)> {
    let mut runs: Vec<Vec<Run>> = Server::ALL.iter().map(|_| Vec::new()).collect();
    let mut rate = None;
    for round in 0..rounds as usize {
        for k in 0..Server::ALL.len() {
            // Round r starts with the r-th server: each runs first once in four rounds, and
            // wasmtime serve runs first in the first, which sets the open-loop rate.
            let index = (round + k) % Server::ALL.len();
            let server = Server::ALL[index];
            eprintln!(
                "bench: serve: {}: against wasmtime serve: round {} {}",
                component.key,
                round + 1,
                server.label()
            );
            let mut host = server.start(&tools.wasmtime, component)?;
            let url = format!("http://{}/", host.addr);
            oha(&tools.oha, &url, CONNECTIONS, params.warmup, Offer::Closed)?;
            let counts = |host: &Host| -> Result<Option<(f64, f64)>> {
                Ok(match host.admin {
                    Some(_) => {
                        let m = host.metrics()?;
                        Some((
                            m.sum("samepage_cold_starts_total"),
                            m.sum("samepage_requests_total"),
                        ))
                    }
                    None => None,
                })
            };
            let before = counts(&host)?;
            let sampler = PssSampler::start(host.pid());
            let closed = oha(&tools.oha, &url, CONNECTIONS, params.load, Offer::Closed)?;
            let samples = sampler.stop();
            let cold = match (before, counts(&host)?) {
                (Some(b), Some(a)) => Some((a.0 - b.0, a.1 - b.1)),
                _ => None,
            };
            let rate = *rate.get_or_insert(OPEN_SHARE * closed.rps);
            let sampler = PssSampler::start(host.pid());
            let open = oha(
                &tools.oha,
                &url,
                CONNECTIONS,
                params.open,
                Offer::Rate(rate),
            )?;
            let open_samples = sampler.stop();
            let fallbacks = match host.admin {
                Some(_) => {
                    let m = host.metrics()?;
                    Some((
                        m.sum("samepage_reuse_fallbacks_total"),
                        m.sum("samepage_retries_total"),
                    ))
                }
                None => None,
            };
            host.stop()?;
            runs[index].push(Run {
                closed_peak: Pss::peak(&samples),
                closed_end: samples.last().map_or(0.0, |s| s.total),
                closed,
                open_peak: Pss::peak(&open_samples).total,
                open,
                cold,
                fallbacks,
            });
        }
    }
    let rate = rate.unwrap_or(f64::NAN);
    let of = |server: Server, field: fn(&Run) -> f64| -> Vec<f64> {
        runs[server as usize].iter().map(field).collect()
    };
    let med = |server: Server, field: fn(&Run) -> f64| median(of(server, field));
    let mut closed_rows = Vec::new();
    let mut open_rows = Vec::new();
    for server in Server::ALL {
        let r = &runs[server as usize];
        let cold = match server {
            Server::Wasmtime => "every request".to_owned(),
            _ => {
                let cold: f64 = r.iter().filter_map(|x| x.cold).map(|c| c.0).sum();
                let requests: f64 = r.iter().filter_map(|x| x.cold).map(|c| c.1).sum();
                format!(
                    "{cold:.0} of {requests:.0} ({:.1}%)",
                    100.0 * cold / requests.max(1.0)
                )
            }
        };
        closed_rows.push(vec![
            server.label().to_owned(),
            spread(&of(server, |x| x.closed.rps), |v| format!("{v:.0}")),
            ms(med(server, |x| x.closed.p50)),
            spread(&of(server, |x| x.closed.p99), ms),
            error_cell(r.iter().map(|x| &x.closed)),
            cold,
            spread(&of(server, |x| x.closed_peak.total), mib),
            median_parts(r),
            mib(med(server, |x| x.closed_end)),
        ]);
        open_rows.push(vec![
            server.label().to_owned(),
            format!("{:.0}", med(server, |x| x.open.rps)),
            ms(med(server, |x| x.open.p50)),
            spread(&of(server, |x| x.open.p99), ms),
            error_cell(r.iter().map(|x| &x.open)),
            spread(&of(server, |x| x.open_peak), mib),
        ]);
    }

    let rps = |s| med(s, |x| x.closed.rps);
    let p99 = |s| med(s, |x| x.closed.p99);
    let pss = |s| med(s, |x| x.closed_peak.total);
    let wt = Server::Wasmtime;
    let fresh_rps = rps(Server::Fresh) / rps(wt);
    let fresh_pss = pss(Server::Fresh) / pss(wt);
    let default_rps = rps(Server::Default) / rps(wt);
    let default_p99 = p99(Server::Default) / p99(wt);
    let errors: u64 = [Server::Wasmtime, Server::Default, Server::Fresh]
        .iter()
        .flat_map(|&s| &runs[s as usize])
        .map(|x| x.closed.errors + x.open.errors)
        .sum();
    let versus = format!("against `wasmtime serve -Scli`'s, at {CONNECTIONS} connections");
    let targets = vec![
        vec![
            "`--reuse fresh`: requests/s ≥ 1.0× `wasmtime serve`'s".into(),
            format!(
                "{:.0} against {:.0} ({versus}): {fresh_rps:.2}×",
                rps(Server::Fresh),
                rps(wt)
            ),
            yes_no(fresh_rps >= 1.0),
        ],
        vec![
            "`--reuse fresh`: peak PSS ≤ 1.1× `wasmtime serve`'s".into(),
            format!(
                "{} against {} ({versus}): {fresh_pss:.2}×",
                mib(pss(Server::Fresh)),
                mib(pss(wt))
            ),
            yes_no(fresh_pss <= 1.1),
        ],
        vec![
            "the default: requests/s ≥ 1.3× `wasmtime serve`'s".into(),
            format!(
                "{:.0} against {:.0} ({versus}): {default_rps:.2}×",
                rps(Server::Default),
                rps(wt)
            ),
            yes_no(default_rps >= 1.3),
        ],
        vec![
            "the default: p99 ≤ `wasmtime serve`'s".into(),
            format!(
                "{} against {} ({versus}): {default_p99:.2}×",
                ms(p99(Server::Default)),
                ms(p99(wt))
            ),
            yes_no(default_p99 <= 1.0),
        ],
        vec![
            "no errors from `wasmtime serve`, the default and `fresh` (non-2xx, connection \
             errors, timeouts)"
                .into(),
            format!("{errors} over their closed- and open-loop runs"),
            yes_no(errors == 0),
        ],
    ];

    let mut text = format!(
        "### Against `wasmtime serve`\n\nEach server in turn, the same component, `oha` at \
         {CONNECTIONS} connections (keep-alive): a warm-up run of {:.0} s, then a closed-loop \
         run of {:.0} s (each connection sends its next request when the last is answered), \
         then an open-loop run of {:.0} s at {rate:.0} requests/s for every server ({:.0}% of \
         `wasmtime serve`'s closed-loop requests/s in the first round, where it runs first; \
         each request timed from when it was due). {rounds} round(s), round r starting with \
         the r-th server of the table's order. `wasmtime serve` makes an instance per \
         request on its path; `samepage serve`'s default gives each request an instance of \
         its own, made ahead of demand off the request path; `--reuse fresh` makes each \
         request's instance on its path, as `wasmtime serve` does; `--reuse warm` reuses \
         instances across requests, state kept. No other option: each server as a user \
         would start it (merging on, samepage's default). Cold starts are samepage's \
         requests that found no ready instance during the closed-loop runs (summed over \
         rounds). Memory is the server process's PSS (`/proc/PID/smaps_rollup`), sampled \
         every {} ms during each measured run: its peak (and the peak's split into anonymous \
         memory, file mappings such as the compiled code, and shared memory such as memfd \
         memories, from the round with the median peak), and at the closed-loop run's \
         end.\n\nClosed loop, {CONNECTIONS} connections:\n\n{}\n",
        params.warmup.as_secs_f64(),
        params.load.as_secs_f64(),
        params.open.as_secs_f64(),
        100.0 * OPEN_SHARE,
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
                "its anon / file / shmem (MiB)",
                "PSS at end",
            ],
            &closed_rows
        )
    );
    let _ = writeln!(
        text,
        "Open loop, {rate:.0} requests/s offered to every server:\n\n{}",
        table(
            &["server", "requests/s", "p50", "p99", "errors", "PSS peak"],
            &open_rows
        )
    );
    for server in [Server::Default, Server::Fresh, Server::Warm] {
        let r = &runs[server as usize];
        let switched = r
            .iter()
            .filter(|x| x.fallbacks.is_some_and(|f| f.0 > 0.0))
            .count();
        let retried: f64 = r.iter().filter_map(|x| x.fallbacks).map(|f| f.1).sum();
        if switched > 0 || retried > 0.0 {
            let _ = writeln!(
                text,
                "{}: switched from reuse to per-request instances in {switched} of {} runs \
                 (`samepage_reuse_fallbacks_total`), {retried:.0} requests retried on a fresh \
                 instance (`samepage_retries_total`).\n",
                server.label(),
                r.len()
            );
        }
    }
    let met = |ok: bool| if ok { "met" } else { "**missed**" };
    let _ = writeln!(
        text,
        "Against `wasmtime serve -Scli`, closed loop at {CONNECTIONS} connections: `--reuse \
         fresh` serves **{fresh_rps:.2}×** its requests/s (target ≥ 1.0×: {}) at \
         **{fresh_pss:.2}×** its peak PSS (target ≤ 1.1×: {}); samepage's default serves \
         **{default_rps:.2}×** its requests/s (target ≥ 1.3×: {}) with **{default_p99:.2}×** \
         its p99 (target ≤ 1.0×: {}); `--reuse warm` serves {:.2}× its requests/s at {:.2}× \
         its peak PSS.\n",
        met(fresh_rps >= 1.0),
        met(fresh_pss <= 1.1),
        met(default_rps >= 1.3),
        met(default_p99 <= 1.0),
        rps(Server::Warm) / rps(wt),
        pss(Server::Warm) / pss(wt),
    );
    Ok((text, targets, rps(Server::Default)))
}

/// The anon / file / shmem split of the round whose closed-loop peak is the median.
fn median_parts(runs: &[Run]) -> String {
    let mut peaks: Vec<&Pss> = runs.iter().map(|x| &x.closed_peak).collect();
    peaks.sort_by(|a, b| a.total.total_cmp(&b.total));
    peaks
        .get(peaks.len() / 2)
        .map_or_else(|| "-".into(), |p| p.parts())
}
