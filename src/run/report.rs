//! The report of a run: its types, the counters it carries (the engine's [`Stats`], walked
//! by name, so no counter is listed here by hand), what each instance saved, and the
//! report's reading for a person.

use samepage_dedup::{OwnerStats, Stats, Value};
use samepage_runtime::Instance;
use serde::{Serialize, Serializer};

use super::DedupMode;
use crate::merger::{SAMPLED, Sample};

/// The report `run` prints.
#[derive(Debug, Serialize)]
pub struct RunReport {
    pub mode: DedupMode,
    pub module: String,
    pub instances: u32,
    /// Instances that ran to completion (or are reactors ready for calls).
    pub instances_ok: u32,
    pub instances_trapped: u32,
    pub instances_failed: u32,
    /// Sum of the instances' linear memory sizes.
    pub linear_memory_bytes: u64,
    /// Wall time spent instantiating, over all instances (not running them).
    pub instantiate_seconds: f64,
    /// Wall time to create and run every instance.
    pub instantiate_and_run_seconds: f64,
    /// PSS once every instance ran; merging starts from here, so it is also
    /// `pss_bytes_before`.
    pub pss_bytes_after_instantiate: u64,
    pub pss_bytes_before: u64,
    pub pss_bytes_after: u64,
    /// Memory charged to a cgroup of the run's own (when it could make one): unlike PSS it
    /// also counts memfd pages nobody maps, such as untouched parts of a module image.
    pub cgroup_memory_bytes_before: Option<u64>,
    pub cgroup_memory_bytes_after: Option<u64>,
    /// Every counter of the engine's [`Stats`], under its own name (`pages_sharing`,
    /// `general_profit_bytes`, ...).
    #[serde(flatten)]
    pub counters: Counters,
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
    /// One line per instance that trapped or failed.
    pub problems: Vec<String>,
    /// What merging saves each instance (as Linux's /proc/PID/ksm_stat).
    pub per_instance: Vec<InstanceReport>,
    /// The same, added up per tenant (merge domain).
    pub per_domain: Vec<DomainReport>,
}

#[derive(Debug, Serialize)]
pub struct InstanceReport {
    pub instance: usize,
    /// The tenant (merge domain) the instance belongs to.
    pub domain: u32,
    pub pages_merged: u64,
    pub zero_pages: u64,
    pub profit_bytes: i64,
}

#[derive(Debug, Default, Serialize)]
pub struct DomainReport {
    pub domain: u32,
    pub instances: u32,
    pub pages_merged: u64,
    pub zero_pages: u64,
    pub profit_bytes: i64,
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
                .map(|(counter, value)| (counter.name, Figure(value))),
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

/// What merging saved each instance, from samepage's engine (zeros without it).
pub fn per_instance(instances: &[Instance]) -> Vec<InstanceReport> {
    instances
        .iter()
        .enumerate()
        .map(|(instance, i)| {
            let OwnerStats {
                pages_merged,
                zero_pages,
                profit_bytes,
            } = i.store_owner().stats();
            InstanceReport {
                instance,
                domain: i.owner().domain(),
                pages_merged,
                zero_pages,
                profit_bytes,
            }
        })
        .collect()
}

/// The instances' figures added up per domain, in domain order.
pub fn per_domain(instances: &[InstanceReport]) -> Vec<DomainReport> {
    let mut domains: std::collections::BTreeMap<u32, DomainReport> = Default::default();
    for instance in instances {
        let domain = domains.entry(instance.domain).or_insert(DomainReport {
            domain: instance.domain,
            ..DomainReport::default()
        });
        domain.instances += 1;
        domain.pages_merged += instance.pages_merged;
        domain.zero_pages += instance.zero_pages;
        domain.profit_bytes += instance.profit_bytes;
    }
    domains.into_values().collect()
}

/// The report for a reader.
pub fn print_human(report: &RunReport) {
    let mib = |bytes: u64| bytes as f64 / (1 << 20) as f64;
    println!(
        "module            {} (dedup {:?})",
        report.module, report.mode
    );
    println!(
        "instances         {} ({} ok, {} trapped, {} failed)",
        report.instances, report.instances_ok, report.instances_trapped, report.instances_failed
    );
    println!(
        "linear memory     {:.1} MiB",
        mib(report.linear_memory_bytes)
    );
    println!(
        "PSS               {:.1} MiB before, {:.1} MiB after merging ({:.1} MiB saved)",
        mib(report.pss_bytes_before),
        mib(report.pss_bytes_after),
        mib(report
            .pss_bytes_before
            .saturating_sub(report.pss_bytes_after))
    );
    if let (Some(before), Some(after)) = (
        report.cgroup_memory_bytes_before,
        report.cgroup_memory_bytes_after,
    ) {
        println!(
            "cgroup memory     {:.1} MiB before, {:.1} MiB after merging",
            mib(before),
            mib(after)
        );
    }
    let counters = &report.counters.0;
    println!(
        "pages             {} shared, {} sharing, {} unshared, {} volatile, {} zero",
        counters.pages_shared,
        counters.pages_sharing,
        counters.pages_unshared,
        counters.pages_volatile,
        counters.zero_pages
    );
    println!(
        "chains            {} chains of {} dups; general profit {:.1} MiB",
        counters.stable_node_chains,
        counters.stable_node_dups,
        counters.general_profit_bytes as f64 / (1 << 20) as f64
    );
    println!(
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
    );
    if report.per_domain.len() > 1 {
        for domain in &report.per_domain {
            println!(
                "tenant {:<10} {} instances, {} pages merged, {} zero, profit {:.1} MiB",
                domain.domain,
                domain.instances,
                domain.pages_merged,
                domain.zero_pages,
                domain.profit_bytes as f64 / (1 << 20) as f64
            );
        }
    }
    for problem in &report.problems {
        println!("problem           {problem}");
    }
}
