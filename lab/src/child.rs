//! The child runner the compare and defaults suites share: `samepage run --json` in a child
//! process (so that no mode inherits another's memory), and reading figures off its JSON
//! report.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};
use serde_json::Value;

pub fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

/// Runs `samepage run` in a child process and returns its JSON report.
pub fn run_child(
    module: &Path,
    instances: u32,
    mode: &str,
    options: &[String],
    guest_args: &[String],
) -> Result<Value> {
    let exe = std::env::current_exe().context("locating the samepage binary")?;
    // The bench's protocol, unless the options say otherwise: merging starts once every
    // instance ran (so that the report has memory before merging), guests' output is
    // dropped, and every run compiles afresh.
    let given = |flag: &str| options.iter().any(|o| o.starts_with(flag));
    let protocol = [
        ("--merge-while-starting", "--merge-while-starting=off"),
        ("--stdio", "--stdio=drop"),
        ("-C", "-Ccache=n"),
    ]
    .into_iter()
    .filter(|(flag, _)| !given(flag))
    .map(|(_, setting)| setting);
    let output = Command::new(exe)
        .arg("run")
        .args([
            "--instances",
            &instances.to_string(),
            "--dedup",
            mode,
            "--json",
        ])
        .args(protocol)
        .args(options)
        .arg(module)
        .arg("--")
        .args(guest_args)
        .output()
        .context("running samepage run")?;
    if !output.status.success() {
        bail!(
            "samepage run {} --dedup {mode} failed: {}",
            module.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    serde_json::from_slice(&output.stdout).context("parsing the run's JSON report")
}

/// Runs `module` as `instances` instances under every mode, `rounds` times, the modes' order
/// rotating from round to round so that drift of the machine hits them all alike; returns
/// each mode's reports, in the order of `modes`. `label` names the runs in the progress lines.
pub fn rotating_rounds(
    label: &str,
    rounds: u32,
    modes: &[&str],
    module: &Path,
    instances: u32,
    options: &[String],
    guest_args: &[String],
) -> Result<Vec<Vec<Value>>> {
    let mut results: Vec<Vec<Value>> = vec![Vec::new(); modes.len()];
    // Drawn on a terminal only.
    let progress = indicatif::ProgressBar::new(u64::from(rounds) * modes.len() as u64);
    progress.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {elapsed}")
            .expect("static template")
            .progress_chars("=> "),
    );
    for round in 0..rounds as usize {
        for k in 0..modes.len() {
            let index = (round + k) % modes.len();
            progress.set_message(format!("{label}: round {} {}", round + 1, modes[index]));
            results[index].push(run_child(
                module,
                instances,
                modes[index],
                options,
                guest_args,
            )?);
            progress.inc(1);
        }
    }
    progress.finish_and_clear();
    Ok(results)
}

pub fn number(report: &Value, field: &str) -> f64 {
    report[field].as_f64().unwrap_or(f64::NAN)
}

pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

/// The median of `field` over a mode's rounds.
pub fn med(reports: &[Value], field: &str) -> f64 {
    median(reports.iter().map(|r| number(r, field)).collect())
}

pub fn saved(report: &Value) -> f64 {
    number(report, "pss_bytes_before") - number(report, "pss_bytes_after")
}
