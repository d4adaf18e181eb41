//! The defaults suite: samepage and KSM at their default settings on the README's workload,
//! for convergence, CPU and idle CPU.

use anyhow::Result;
use serde_json::Value;

use super::child::{number, run_child, saved, strings};
use super::{mib, repo_path, table};
use crate::ksm::KsmSysfs;

/// samepage and KSM at their default settings, on the README's workload.
pub fn suite() -> Result<String> {
    let module = repo_path("examples/guests/fill.wat");
    let common = strings(&["--settle-secs", "300", "--idle-secs", "10"]);
    let mut runs: Vec<(&str, Value)> = vec![
        (
            "samepage, defaults",
            run_child(&module, 32, "on", &common, &[])?,
        ),
        ("samepage, defaults, scan on park off", {
            let mut options = common.clone();
            options.extend(strings(&["--scan-on-park", "off"]));
            run_child(&module, 32, "on", &options, &[])?
        }),
    ];
    let ksm = KsmSysfs::system().check_usable();
    if ksm.is_ok() {
        let mut options = common.clone();
        options.extend(strings(&[
            "--ksm-pages-to-scan",
            "100",
            "--ksm-sleep-millisecs",
            "20",
        ]));
        runs.push((
            "Linux KSM, defaults",
            run_child(&module, 32, "ksm", &options, &[])?,
        ));
    }
    let rows: Vec<Vec<String>> = runs
        .iter()
        .map(|(name, r)| {
            vec![
                (*name).to_owned(),
                mib(saved(r)),
                format!("{:.2} s", number(r, "converge_seconds")),
                format!("{:.3} s", number(r, "scanner_cpu_seconds")),
                format!("{:.2}%", number(r, "idle_cpu_percent")),
                format!("{:.0}", number(r, "pages_sharing")),
            ]
        })
        .collect();
    let mut report = format!(
        "{ABOUT}{}\n",
        table(
            &[
                "merger",
                "saved",
                "time to converge",
                "CPU to converge",
                "CPU while idle (of one core)",
                "pages_sharing"
            ],
            &rows,
        )
    );
    match ksm {
        Ok(()) => {
            let (on, k) = (&runs[0].1, &runs[2].1);
            let sooner = number(k, "converge_seconds") / number(on, "converge_seconds");
            let cpu = number(on, "scanner_cpu_seconds") / number(k, "scanner_cpu_seconds");
            report.push_str(&format!(
                "samepage converged {sooner:.0}× sooner than KSM (target ≥ 20×: {}), with {cpu:.2}× \
                 its CPU (target ≤ 1×: {}).\n",
                if sooner >= 20.0 { "met" } else { "**missed**" },
                if cpu <= 1.0 { "met" } else { "**missed**" }
            ));
        }
        Err(error) => report.push_str(&format!("Linux KSM not measured: {error:#}.\n")),
    }
    Ok(report)
}

/// What the defaults report says before its table.
const ABOUT: &str = "# Default settings\n\n\
    32 instances of `examples/guests/fill.wat` (16 MiB each, page i identical), each \
    merger at its default settings: samepage 4,096 pages per batch and 20 ms between \
    batches, with and without scan on park; KSM `pages_to_scan` 100 and \
    `sleep_millisecs` 20. Time to converge counts from the moment the instances had all \
    run (they park), until PSS had fallen by 99% of its final fall. Idle CPU is the \
    merger's CPU over the 10 s after convergence, with nothing changing.\n\n";
