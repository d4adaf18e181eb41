//! The serve suite's load: `oha` run for a while at some connections, its JSON report read
//! into throughput, latency percentiles and errors.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use super::REQUEST_TIMEOUT;

/// What an `oha` run measured: requests/s, p50 and p99 in seconds, and errors (non-2xx
/// responses and requests without one).
pub(super) struct Load {
    pub(super) rps: f64,
    pub(super) p50: f64,
    pub(super) p99: f64,
    pub(super) errors: u64,
    /// What they were, as oha names them.
    error_kinds: String,
}

/// How `oha` offers its load.
#[derive(Clone, Copy)]
pub(super) enum Offer {
    /// Closed loop: each connection sends its next request when the last one is answered.
    Closed,
    /// Open loop: this many requests a second, whatever the answers (`-q`), each timed from
    /// when it was due (`--latency-correction`), so that a slow answer delays no
    /// measurement.
    Rate(f64),
}

/// Runs `oha` against `url` for `duration` at `connections` connections, offering `offer`.
/// Requests still running at the end are waited for (`-w`), so that none counts as an error
/// for being cut.
pub(super) fn oha(
    oha: &Path,
    url: &str,
    connections: u32,
    duration: Duration,
    offer: Offer,
) -> Result<Load> {
    let mut command = Command::new(oha);
    if let Offer::Rate(rate) = offer {
        command
            .arg("-q")
            .arg(format!("{:.0}", rate.max(1.0)))
            .arg("--latency-correction");
    }
    let output = command
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

/// Errors of some loads: their count, and their kinds when there are any.
pub(super) fn error_cell<'a>(loads: impl IntoIterator<Item = &'a Load>) -> String {
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
