//! The report of a run: its types, the counters it carries (the engine's [`Stats`], walked
//! by name, so no counter is listed here by hand), what each instance saved, and the
//! report's reading for a person.

use std::collections::BTreeMap;
use std::io::Write;

use anyhow::Result;
use samepage_dedup::{OwnerStats, Stats, Value};
use serde::{Serialize, Serializer};

use super::DedupMode;
use super::start::{Ending, Record};
use crate::merger::{SAMPLED, Sample};

/// The report `run` prints.
#[derive(Debug, Serialize)]
pub struct RunReport {
    pub mode: DedupMode,
    pub module: String,
    pub instances: u32,
    /// Instances the run started: fewer than asked when memory ran short (see `problems`).
    pub instances_started: u32,
    /// Instances that exited (with any status), are reactors ready for calls, or returned
    /// from the invoked function.
    pub instances_ok: u32,
    /// Instances that trapped, ran out of fuel or timed out.
    pub instances_trapped: u32,
    /// Instances that could not be created or run.
    pub instances_failed: u32,
    /// The status samepage exits with (see `samepage run --help`).
    pub exit_code: i32,
    /// Sum of the instances' linear memory sizes.
    pub linear_memory_bytes: u64,
    /// Wall time spent instantiating, over all instances (not running them).
    pub instantiate_seconds: f64,
    /// Wall time to create and run every instance.
    pub instantiate_and_run_seconds: f64,
    /// Which instances the engine merges: `running` (also while their code runs, in
    /// write-protect windows), or `parked only` and why (the `merge_running` knob, or a
    /// kernel that does not let it write-protect their memory).
    pub merging: String,
    /// When the last instance started, in seconds since the first began to be created.
    pub last_started_seconds: f64,
    /// (seconds since the first instance began to be created, `pages_sharing`) every 25 ms
    /// while instances ran: merging of running instances.
    pub sharing_while_running: Vec<(f64, u64)>,
    /// Whether the scanner merged while the instances started (`--merge-while-starting`):
    /// then `pss_bytes_before` already reflects some merging.
    pub merged_while_starting: bool,
    /// PSS once every instance ran; settling starts from here, so it is also
    /// `pss_bytes_before`.
    pub pss_bytes_after_instantiate: u64,
    pub pss_bytes_before: u64,
    pub pss_bytes_after: u64,
    /// Memory charged to a cgroup of the run's own (when it could make one): unlike PSS it
    /// also counts memfd pages nobody maps, such as untouched parts of a module image.
    pub cgroup_memory_bytes_before: Option<u64>,
    pub cgroup_memory_bytes_after: Option<u64>,
    /// The most memory the cgroup held while the instances started, ran and merged (after
    /// compiling): what a memory limit must allow them.
    pub cgroup_memory_bytes_peak: Option<u64>,
    /// Every counter of the engine's [`Stats`], under the name of KSM's sysfs file where KSM
    /// counts the same thing (`pages_sharing`, `general_profit`, `ksm_zero_pages`, ...), else
    /// its own. Under `--dedup ksm`, those KSM counts are this run's: each is ksmd's figure
    /// less what it was when merging began.
    #[serde(flatten)]
    pub counters: Counters,
    /// Under `--dedup ksm`: the process's own figures from `/proc/self/ksm_stat`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub process_ksm_stat: Option<BTreeMap<String, i64>>,
    /// Seconds from the start of merging until PSS had fallen by 99% of its final fall.
    pub converge_seconds: f64,
    /// Seconds from the start of merging until the merger found nothing more to do.
    pub settle_seconds: f64,
    /// Whether the merger was still finding merges when `--settle-secs` ran out.
    pub settle_timed_out: bool,
    /// CPU of the merger (samepage's scanner thread, or ksmd) from the start of merging to
    /// convergence.
    pub scanner_cpu_seconds: f64,
    /// The merger's CPU over `--idle-secs` after converging, in percent of one core.
    pub idle_cpu_percent: Option<f64>,
    /// (seconds since merging began, PSS bytes), every `--pss-trace-ms`.
    pub pss_trace: Vec<(f64, u64)>,
    /// One line per instance that did not exit with 0, and per limit the run met.
    pub problems: Vec<String>,
    /// How each instance ended, and what merging saves it (under the names of Linux's
    /// /proc/PID/ksm_stat).
    pub per_instance: Vec<InstanceReport>,
    /// The same, added up per tenant (merge domain).
    pub per_domain: Vec<DomainReport>,
}

#[derive(Debug, Serialize)]
pub struct InstanceReport {
    pub instance: u32,
    /// The tenant (merge domain) the instance belongs to.
    pub domain: u32,
    /// `exited`, `trapped`, `out_of_fuel`, `timed_out`, `ready` (a reactor), `invoked` or
    /// `failed`.
    pub outcome: &'static str,
    /// The guest's exit status (0 for a reactor or an invoked function that returned).
    pub exit_code: Option<i32>,
    /// The invoked function's results, as printed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub results: Option<Vec<String>>,
    /// Pages that map a stable page; `null` under `--dedup ksm`, where the kernel does not
    /// tell one instance's pages from another's (see `process_ksm_stat`).
    pub ksm_merging_pages: Option<u64>,
    /// Pages of zeros freed.
    pub ksm_zero_pages: Option<u64>,
    /// Bytes saved, less the metadata kept for the instance.
    pub ksm_process_profit: Option<i64>,
    /// Under `--stdio capture`, what the guest wrote.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stdout: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stderr: Option<String>,
}

#[derive(Debug, Default, Serialize)]
pub struct DomainReport {
    pub domain: u32,
    pub instances: u32,
    pub ksm_merging_pages: u64,
    pub ksm_zero_pages: u64,
    pub ksm_process_profit: i64,
}

/// A run's counters: serialized as one field per counter of [`Stats::COUNTERS`], in their
/// order.
#[derive(Debug, Default)]
pub struct Counters(pub Stats);

impl Counters {
    /// The counters of [`SAMPLED`] from the merger's last sample (ksmd's own under
    /// `--dedup ksm`), the others from samepage's engine (`engine`: zero when it did not run).
    pub fn of_run(engine: Stats, sample: &Sample) -> Self {
        let mut stats = engine;
        for (counter, value) in sample.stats.counters() {
            if SAMPLED.contains(&counter.name) {
                let set = stats.set(counter.name, value);
                debug_assert!(set, "{} is a counter of Stats", counter.name);
            }
        }
        Counters(stats)
    }
}

impl Serialize for Counters {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(
            self.0
                .counters()
                .map(|(counter, value)| (counter.ksm.unwrap_or(counter.name), Figure(value))),
        )
    }
}

/// A counter's value as a JSON number.
struct Figure(Value);

impl Serialize for Figure {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            Value::Count(count) => serializer.serialize_u64(count),
            Value::Signed(signed) => serializer.serialize_i64(signed),
        }
    }
}

/// How each instance ended and what merging saved it, from samepage's engine when
/// `engine_figures` (zeros without merging), else `null`.
pub fn per_instance(records: &[Record], engine_figures: bool) -> Vec<InstanceReport> {
    records
        .iter()
        .map(|record| {
            let stats = record
                .instance
                .as_ref()
                .filter(|_| engine_figures)
                .map(|i| i.store_owner().stats());
            let text =
                |bytes: Option<Vec<u8>>| bytes.map(|b| String::from_utf8_lossy(&b).into_owned());
            InstanceReport {
                instance: record.index,
                domain: record.domain,
                outcome: outcome_name(&record.ending),
                exit_code: record.ending.exit_code(),
                results: match &record.ending {
                    Ending::Invoked(results) => Some(results.clone()),
                    _ => None,
                },
                ksm_merging_pages: stats.map(|s: OwnerStats| s.pages_merged),
                ksm_zero_pages: stats.map(|s| s.zero_pages),
                ksm_process_profit: stats.map(|s| s.profit_bytes),
                stdout: text(record.instance.as_ref().and_then(|i| i.stdout())),
                stderr: text(record.instance.as_ref().and_then(|i| i.stderr())),
            }
        })
        .collect()
}

fn outcome_name(ending: &Ending) -> &'static str {
    use samepage_runtime::RunOutcome;
    match ending {
        Ending::Ran(RunOutcome::Exited(_)) => "exited",
        Ending::Ran(RunOutcome::Trapped(_)) => "trapped",
        Ending::Ran(RunOutcome::OutOfFuel { .. }) => "out_of_fuel",
        Ending::Ran(RunOutcome::TimedOut { .. }) => "timed_out",
        Ending::Ready => "ready",
        Ending::Invoked(_) => "invoked",
        Ending::Failed(_) => "failed",
    }
}

/// The instances' figures added up per domain, in domain order; empty when there are no
/// per-instance figures.
pub fn per_domain(instances: &[InstanceReport]) -> Vec<DomainReport> {
    let mut domains: BTreeMap<u32, DomainReport> = BTreeMap::new();
    for instance in instances {
        let (Some(merging), Some(zero), Some(profit)) = (
            instance.ksm_merging_pages,
            instance.ksm_zero_pages,
            instance.ksm_process_profit,
        ) else {
            continue;
        };
        let domain = domains.entry(instance.domain).or_insert(DomainReport {
            domain: instance.domain,
            ..DomainReport::default()
        });
        domain.instances += 1;
        domain.ksm_merging_pages += merging;
        domain.ksm_zero_pages += zero;
        domain.ksm_process_profit += profit;
    }
    domains.into_values().collect()
}

/// Draws the run's PSS trace into an SVG file.
#[cfg(feature = "bench")]
pub fn plot(report: &RunReport, path: &std::path::Path) -> Result<()> {
    let points = report
        .pss_trace
        .iter()
        .map(|&(t, pss)| (t, pss as f64 / (1 << 20) as f64))
        .collect();
    let title = format!(
        "{} × {} (dedup {:?})",
        report.instances_started, report.module, report.mode
    );
    samepage_lab::plot::pss_over_time(path, &title, &[("PSS", points)])
}

/// The report for a reader.
pub fn print_human(report: &RunReport, out: &mut dyn Write) -> std::io::Result<()> {
    let mib = |bytes: u64| bytes as f64 / (1 << 20) as f64;
    writeln!(
        out,
        "module            {} (dedup {:?})",
        report.module, report.mode
    )?;
    writeln!(
        out,
        "instances         {} of {} started ({} ok, {} trapped, {} failed)",
        report.instances_started,
        report.instances,
        report.instances_ok,
        report.instances_trapped,
        report.instances_failed
    )?;
    writeln!(
        out,
        "linear memory     {:.1} MiB",
        mib(report.linear_memory_bytes)
    )?;
    writeln!(
        out,
        "PSS               {:.1} MiB {}, {:.1} MiB after merging ({:.1} MiB less)",
        mib(report.pss_bytes_before),
        if report.merged_while_starting {
            "once started (merging as they started)"
        } else {
            "before merging"
        },
        mib(report.pss_bytes_after),
        mib(report
            .pss_bytes_before
            .saturating_sub(report.pss_bytes_after)),
    )?;
    if let (Some(before), Some(after)) = (
        report.cgroup_memory_bytes_before,
        report.cgroup_memory_bytes_after,
    ) {
        writeln!(
            out,
            "cgroup memory     {:.1} MiB before, {:.1} MiB after merging, {:.1} MiB at most",
            mib(before),
            mib(after),
            mib(report.cgroup_memory_bytes_peak.unwrap_or(0))
        )?;
    }
    let counters = &report.counters.0;
    writeln!(
        out,
        "pages             {} shared, {} sharing, {} unshared, {} volatile, {} zero",
        counters.pages_shared,
        counters.pages_sharing,
        counters.pages_unshared,
        counters.pages_volatile,
        counters.zero_pages
    )?;
    writeln!(
        out,
        "chains            {} chains of {} dups; general profit {:.1} MiB",
        counters.stable_node_chains,
        counters.stable_node_dups,
        counters.general_profit_bytes as f64 / (1 << 20) as f64
    )?;
    writeln!(
        out,
        "merging           {} full scans, converged in {:.2} s{}, {:.3} s CPU, {} mappings",
        counters.full_scans,
        report.converge_seconds,
        if report.settle_timed_out {
            " (still merging at the time limit)"
        } else {
            ""
        },
        report.scanner_cpu_seconds,
        counters.vmas
    )?;
    if report.per_domain.len() > 1 {
        for domain in &report.per_domain {
            writeln!(
                out,
                "tenant {:<10} {} instances, {} pages merged, {} zero, profit {:.1} MiB",
                domain.domain,
                domain.instances,
                domain.ksm_merging_pages,
                domain.ksm_zero_pages,
                domain.ksm_process_profit as f64 / (1 << 20) as f64
            )?;
        }
    }
    writeln!(out, "exit status       {}", report.exit_code)?;
    Ok(())
}
