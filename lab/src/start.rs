//! The start suite: what merging while instances start does to a run's peak memory, which is
//! what a memory limit must allow. Each workload runs in a child `samepage run --json`
//! process three ways (merging while the instances start, merging only once all ran, no
//! merging), the order rotating from round to round; the figures are the run's own memory
//! cgroup: its peak, and its usage once merging settled.

use anyhow::Result;
use serde_json::Value;

use super::child::{med, run_child, strings};
use super::compare::workloads;
use super::{mib, table};

/// (label, `--dedup`, `--merge-while-starting`).
const VARIANTS: [(&str, &str, &str); 3] = [
    ("merging while starting", "on", "on"),
    ("merging once all ran", "on", "off"),
    ("no merging", "off", "off"),
];

pub fn suite(rounds: u32) -> Result<String> {
    let scratch = std::env::temp_dir().join(format!("samepage-start-{}", std::process::id()));
    std::fs::create_dir_all(&scratch)?;
    let mut report = String::from(ABOUT);
    let mut rows = Vec::new();
    for workload in workloads(&scratch) {
        if workload.slug == "b" {
            continue;
        }
        if let Some(missing) = workload.missing() {
            report.push_str(&missing);
            continue;
        }
        let mut results: Vec<Vec<Value>> = vec![Vec::new(); VARIANTS.len()];
        for round in 0..rounds as usize {
            for k in 0..VARIANTS.len() {
                let index = (round + k) % VARIANTS.len();
                let (_, mode, while_starting) = VARIANTS[index];
                let mut options = workload.options.clone();
                options.extend(strings(&["--merge-while-starting", while_starting]));
                results[index].push(run_child(
                    &workload.module,
                    workload.instances,
                    mode,
                    &options,
                    &workload.guest_args,
                )?);
            }
        }
        for ((label, _, _), runs) in VARIANTS.iter().zip(&results) {
            rows.push(vec![
                workload.name.to_owned(),
                (*label).to_owned(),
                format!("**{}**", mib(med(runs, "cgroup_memory_bytes_peak"))),
                mib(med(runs, "cgroup_memory_bytes_before")),
                mib(med(runs, "cgroup_memory_bytes_after")),
                format!("{:.2}", med(runs, "instantiate_and_run_seconds")),
                format!("{:.2}", med(runs, "settle_seconds")),
            ]);
        }
    }
    std::fs::remove_dir_all(&scratch).ok();
    report.push_str(&table(
        &[
            "workload",
            "run",
            "peak memory",
            "memory once all ran",
            "memory after merging",
            "start and run (s)",
            "settle (s)",
        ],
        &rows,
    ));
    Ok(report)
}

const ABOUT: &str = "\
What merging while the instances start (`samepage run`'s default since issue 10) does to the \
peak memory of a run, against merging only once every instance ran (`--merge-while-starting \
off`, the protocol of the other suites, which need memory before merging) and no merging at \
all. Memory is the run's own cgroup: its peak from after compiling to the end \
(`memory.max_usage_in_bytes` or `memory.peak`, reset once the module is compiled), its usage \
once every instance ran, and once merging settled. Each figure is the median of the \
rounds, each run a child `samepage run --json` process; the three runs rotate from round to \
round. While starting, the scanner looks at each instance as it parks (scan on park); once \
the run has used half of the memory available to it, each instance is also merged as soon as \
it ran.\n\n";
