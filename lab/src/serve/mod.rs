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
//!
//! This file runs the four parts and writes the report's frame. The parts are `density.rs`,
//! `load.rs` (latency under load, and against `wasmtime serve`) and `trace.rs`; what they
//! share has a file each: the servers in child processes and their PSS (`server.rs`), the
//! trace's arrivals (`arrivals.rs`), the admin endpoint's metrics (`metrics.rs`), the HTTP
//! client (`http.rs`) and the `oha` driver (`oha.rs`).

mod arrivals;
mod density;
mod http;
mod load;
mod metrics;
mod oha;
mod server;
mod trace;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::{repo_path, table};

/// How long each measured load runs, and the warm-up run before it.
const LOAD: Duration = Duration::from_secs(10);
const LOAD_WARMUP: Duration = Duration::from_secs(3);

/// Longest any one request may take, the trace's and oha's.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

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
                trace_requests: trace::TRACE_REQUESTS,
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
    report.push_str(&density::density(rounds, &component, &mut targets)?);
    report.push_str(&load::latency(
        rounds,
        &params,
        &tools,
        &component,
        &mut targets,
    )?);
    report.push_str(&load::versus(&params, &tools, &component)?);
    report.push_str(&trace::trace(&params, &component, &scratch, out)?);
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
