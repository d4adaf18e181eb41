//! The serve suite: `samepage serve`, the serverless host, against `wasmtime serve`, the host
//! users would otherwise run, on real wasi:http components (CPython's, built with
//! componentize-py, and JavaScript's, built with componentize-js). For each component, four
//! parts, each a server in a child process on loopback, every run bounded in count and time:
//!
//! - `versus.rs`: throughput, latency and the server process's peak PSS of `wasmtime serve`,
//!   `samepage serve`'s default (an instance per request, made ahead of demand), `--reuse
//!   fresh` (an instance per request, on its path) and `--reuse warm`, under the same load;
//! - `interference.rs`: latency with merging on and off (`--dedup on|off`), closed-loop and
//!   open-loop at shares of the peak rate, and the CPU the scanner took;
//! - `density.rs`: warm instances held in a memory budget, merging on and off;
//! - `trace.rs`: cold starts on a trace of requests to several functions in a memory budget.
//!
//! The load is `oha`'s and the other server is `wasmtime serve`, both pinned and installed by
//! `scripts/install-bench-tools` into `target/bench-tools/bin/`. The trace is sent by a small
//! HTTP/1.1 client here, a thread per request at its scheduled time.
//!
//! This file runs the parts for each component and writes the report's frame. What the parts
//! share has a file each: the servers in child processes, their PSS and CPU (`server.rs`),
//! the trace's arrivals (`arrivals.rs`), the admin endpoint's metrics (`metrics.rs`), the
//! HTTP client (`http.rs`) and the `oha` driver (`oha.rs`).

pub(crate) mod arrivals;
mod density;
pub(crate) mod http;
mod interference;
pub(crate) mod metrics;
mod oha;
pub(crate) mod server;
pub(crate) mod trace;
mod versus;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::{repo_path, table};
use crate::child::median;

/// Concurrent connections of every `oha` load, against every server.
const CONNECTIONS: u32 = 16;

/// The JavaScript component, built by `scripts/build-http-components`.
const JS_PATH: &str = "target/http-components/js-app.wasm";

/// Longest any one request may take, the trace's and oha's.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The durations and sizes of the parts. Setting `SAMEPAGE_SERVE_BENCH_QUICK` shortens them,
/// for a smoke test; the report says so. `SAMEPAGE_SERVE_BENCH_ONLY=python` (or `js`) runs one
/// component, for the same purpose.
struct Params {
    /// The warm-up run before each server's measured runs.
    warmup: Duration,
    /// Each closed-loop measured run.
    load: Duration,
    /// Each open-loop measured run.
    open: Duration,
    /// Requests of the trace.
    trace_requests: usize,
    /// The density budget above the host alone.
    density_room_mib: u64,
    quick: bool,
    only: Option<String>,
}

impl Params {
    fn get() -> Self {
        let only = std::env::var("SAMEPAGE_SERVE_BENCH_ONLY").ok();
        if std::env::var_os("SAMEPAGE_SERVE_BENCH_QUICK").is_some() {
            Self {
                warmup: Duration::from_secs(1),
                load: Duration::from_secs(2),
                open: Duration::from_secs(2),
                trace_requests: 150,
                density_room_mib: 64,
                quick: true,
                only,
            }
        } else {
            Self {
                warmup: Duration::from_secs(2),
                load: Duration::from_secs(6),
                open: Duration::from_secs(5),
                trace_requests: trace::TRACE_REQUESTS,
                density_room_mib: density::DENSITY_ROOM_MIB,
                quick: false,
                only,
            }
        }
    }
}

/// The installed tools.
struct Tools {
    oha: PathBuf,
    wasmtime: PathBuf,
}

/// A component the suite serves.
struct Component {
    /// For file names and `SAMEPAGE_SERVE_BENCH_ONLY`.
    key: &'static str,
    /// For headings.
    name: &'static str,
    path: PathBuf,
    about: &'static str,
}

impl Component {
    fn arg(&self) -> Result<&str> {
        self.path.to_str().context("a UTF-8 path")
    }
}

pub fn suite(rounds: u32, out: &Path) -> Result<String> {
    let params = Params::get();
    let tools = install_tools()?;
    let python = python_component()?;
    let js = repo_path(JS_PATH);
    let scratch = std::env::temp_dir().join(format!("samepage-serve-{}", std::process::id()));
    std::fs::create_dir_all(&scratch)?;

    let load_before = load_average();
    let mut report = String::from(ABOUT);
    let _ = writeln!(
        report,
        "`samepage serve`'s default is what it does with no `--reuse` (its `--help`: \
         \"{}\").\n",
        default_reuse()
    );
    if params.quick {
        report.push_str(
            "**A smoke run** (`SAMEPAGE_SERVE_BENCH_QUICK` set): loads, the density budget \
             and the trace are shortened; the figures are not the suite's.\n\n",
        );
    }
    let mut components = vec![Component {
        key: "python",
        name: "Python",
        path: python,
        about: PYTHON,
    }];
    if js.exists() {
        components.push(Component {
            key: "js",
            name: "JavaScript",
            path: js,
            about: JS,
        });
    } else {
        eprintln!(
            "bench: serve: {} is missing: the JavaScript component is skipped",
            js.display()
        );
        let _ = writeln!(
            report,
            "**The JavaScript component was not measured**: `{JS_PATH}` was missing when the \
             suite ran (`scripts/build-http-components` builds it).\n"
        );
    }
    if let Some(only) = &params.only {
        components.retain(|c| c.key == only);
        let _ = writeln!(
            report,
            "**One component only** (`SAMEPAGE_SERVE_BENCH_ONLY={only}`).\n"
        );
    }
    let mut targets = Vec::new();
    for component in &components {
        let _ = writeln!(
            report,
            "## {} component\n\n{}\n",
            component.name, component.about
        );
        let mut local = Vec::new();
        let peak = part(&mut report, &mut local, "Against `wasmtime serve`", || {
            versus::versus(rounds, &params, &tools, component)
        });
        part(
            &mut report,
            &mut local,
            "Merging on and off under load",
            || {
                interference::interference(rounds, &params, &tools, component, peak)
                    .map(|(text, targets)| (text, targets, ()))
            },
        );
        part(&mut report, &mut local, "Density", || {
            density::density(rounds, &params, component)
        });
        part(&mut report, &mut local, "Cold starts on a trace", || {
            trace::trace(rounds, &params, component, &scratch, out)
                .map(|(text, targets)| (text, targets, ()))
        });
        targets.extend(local.into_iter().map(|mut row| {
            row.insert(0, component.name.to_owned());
            row
        }));
    }
    report.push_str(&format!(
        "## Targets\n\n{}\n",
        table(&["component", "target", "figures", "met"], &targets)
    ));
    let _ = writeln!(
        report,
        "The machine's load average (over a minute, `/proc/loadavg`) was {load_before} when \
         the suite began and {} when it ended (its own server and load generator count in \
         it).\n",
        load_average()
    );
    std::fs::remove_dir_all(&scratch).ok();
    Ok(report)
}

/// Runs one part: its section and its target rows, or, when it failed, a section and a
/// target row that say so (the other parts still run).
fn part<T>(
    report: &mut String,
    targets: &mut Vec<Vec<String>>,
    title: &str,
    run: impl FnOnce() -> Result<(String, Vec<Vec<String>>, T)>,
) -> Option<T> {
    let started = std::time::Instant::now();
    let result = run();
    eprintln!(
        "bench: serve: {title}: {:.0} s",
        started.elapsed().as_secs_f64()
    );
    match result {
        Ok((text, rows, value)) => {
            report.push_str(&text);
            targets.extend(rows);
            Some(value)
        }
        Err(error) => {
            eprintln!("bench: serve: {title}: failed: {error:#}");
            let _ = writeln!(report, "### {title}\n\n**Not measured**: {error:#}\n");
            targets.push(vec![
                title.to_owned(),
                "not measured (the part failed; its section says why)".into(),
                "**no**".into(),
            ]);
            None
        }
    }
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
pub(crate) fn python_component() -> Result<PathBuf> {
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

/// What `samepage serve --help` says `--reuse` defaults to.
fn default_reuse() -> String {
    let help = std::env::current_exe()
        .ok()
        .and_then(|exe| Command::new(exe).args(["serve", "--help"]).output().ok())
        .map(|output| String::from_utf8_lossy(&output.stdout).into_owned())
        .unwrap_or_default();
    let Some(at) = help.find("--reuse") else {
        return "unknown: no --reuse in its help".into();
    };
    let rest = &help[at..];
    let end = rest[2..]
        .find("\n  -")
        .or_else(|| rest[2..].find("\n      --"))
        .map_or(rest.len(), |end| end + 2);
    let text = rest[..end].split_whitespace().collect::<Vec<_>>().join(" ");
    match text.find("[default: ") {
        Some(start) => {
            let tail = &text[start + "[default: ".len()..];
            format!("default: {}", tail.split(']').next().unwrap_or(tail))
        }
        None => text,
    }
}

/// The one-minute load average.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|text| text.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "unknown".into())
}

fn ms(seconds: f64) -> String {
    if seconds.is_nan() {
        "-".into()
    } else {
        format!("{:.2} ms", seconds * 1e3)
    }
}

fn yes_no(met: bool) -> String {
    if met { "yes" } else { "**no**" }.into()
}

/// The median of `values`, with their range when there are several.
fn spread(values: &[f64], show: impl Fn(f64) -> String) -> String {
    let mid = median(values.to_vec());
    if values.len() < 2 {
        return show(mid);
    }
    let low = values.iter().copied().fold(f64::INFINITY, f64::min);
    let high = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{} ({}–{})", show(mid), show(low), show(high))
}

const ABOUT: &str = "\
# samepage serve against wasmtime serve: throughput, latency, memory, density, cold starts\n\n\
`samepage serve`, the serverless host, and `wasmtime serve`, the host users would otherwise \
run, serving the same wasi:http components: CPython's (componentize-py) and JavaScript's \
(componentize-js), each built by `scripts/build-http-components`. Every server runs in a child \
process on loopback ports, is read for readiness from its stderr (`samepage: serving …`, \
printed once its pools are pre-warmed; `Serving HTTP on …` for `wasmtime serve`), measured \
through its admin `/metrics` (OpenMetrics: instances, cold starts, evictions, the merge \
engine's counters) and from `/proc` (its PSS from `smaps_rollup`, its CPU time and its \
threads'), and stopped with SIGTERM. Memory is always PSS, not RSS. Merging on and off are \
`--dedup on|off`; off is what a host without samepage does, wasmtime's own copy-on-write \
module images and pooling, never merged, so on against off isolates merging. The load \
generator is `oha` 1.16.0 and the other server `wasmtime serve -Scli` of wasmtime-cli 48.0.8 \
(the project's wasmtime), both built by `scripts/install-bench-tools`; every load is oha's, \
at the same connections for every server. Every run is bounded in count and time. Figures \
are medians over rounds, with their range (lowest–highest) where shown; rounds rotate the \
order of the servers, and of merging on and off. Each section says its protocol; the \
targets are checked at the end.\n\n";

const PYTHON: &str = "\
`target/http-components/python-app.wasm`: `examples/http/app.py` built with componentize-py \
(CPython; a 20,000-entry table built at start-up, `GET /` answered with a line of JSON).";

const JS: &str = "\
`target/http-components/js-app.wasm`: `examples/http/app.js` built with componentize-js \
(StarlingMonkey; a table of 20,000 strings built at start-up, in the snapshot, `GET /` \
answered with a line of JSON). StarlingMonkey serves one request per instance, so `--reuse \
warm` is not for it: its rows show what happens when it is forced.";
