//! `samepage run`: instantiate one module many times, keep the instances, let the scanner
//! merge their memory, and report what it saved.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use samepage_dedup::{Advisor, EngineConfig, Knobs, OwnerStats, RunMode, Stats};
use samepage_runtime::{Host, HostConfig, Instance, MemoryBacking, RunOutcome, WasiOptions};
use serde::Serialize;

use crate::measure::pss_bytes;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DedupMode {
    /// memfd memories merged by samepage's scanner.
    On,
    /// memfd memories, no merging.
    Off,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Switch {
    On,
    Off,
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// The module to run: a WASI preview1 command or reactor, as .wasm or .wat.
    pub module: PathBuf,
    /// How many instances to create and keep.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub instances: u32,
    #[arg(long, value_enum, default_value_t = DedupMode::On)]
    pub dedup: DedupMode,
    /// Longest wait for the scanner to converge after the instances ran.
    #[arg(long, default_value_t = 30.0)]
    pub settle_secs: f64,
    /// Print the report as one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
    /// Preopen a host directory for the guests, as HOST::GUEST.
    #[arg(long = "dir", value_parser = parse_dir)]
    pub dirs: Vec<(PathBuf, String)>,
    /// Set an environment variable for the guests, as K=V.
    #[arg(long = "env", value_parser = parse_env)]
    pub envs: Vec<(String, String)>,
    /// Most instances that may share one stable page (KSM max_page_sharing).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(2..))]
    pub max_page_sharing: u32,
    /// Pages the scanner looks at per batch (KSM pages_to_scan).
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..=16_777_216))]
    pub pages_to_scan: u32,
    /// Pause between batches, in milliseconds (KSM sleep_millisecs).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(0..=60_000))]
    pub sleep_ms: u32,
    /// Free pages of zeros instead of merging them (KSM use_zero_pages).
    #[arg(long, value_enum, default_value_t = Switch::On)]
    pub zero_pages: Switch,
    /// Tune pages_to_scan so that a full pass takes this long (KSM advisor_mode=scan-time).
    #[arg(long, value_parser = clap::value_parser!(u32).range(10..=3_600_000))]
    pub advisor_target_ms: Option<u32>,
    /// Look at an instance's memory as soon as it stops running.
    #[arg(long, value_enum, default_value_t = Switch::On)]
    pub scan_on_park: Switch,
    /// Arguments passed to the guest after its name.
    #[arg(last = true)]
    pub args: Vec<String>,
}

fn parse_dir(text: &str) -> Result<(PathBuf, String), String> {
    let (host, guest) = text
        .split_once("::")
        .ok_or_else(|| format!("expected HOST::GUEST, got {text:?}"))?;
    Ok((PathBuf::from(host), guest.to_owned()))
}

fn parse_env(text: &str) -> Result<(String, String), String> {
    let (key, value) = text
        .split_once('=')
        .ok_or_else(|| format!("expected K=V, got {text:?}"))?;
    Ok((key.to_owned(), value.to_owned()))
}

/// The report `run` prints.
#[derive(Debug, Serialize)]
pub struct RunReport {
    pub module: String,
    pub instances: u32,
    /// Instances that ran to completion (or are reactors ready for calls).
    pub instances_ok: u32,
    pub instances_trapped: u32,
    pub instances_failed: u32,
    /// Sum of the instances' linear memory sizes.
    pub linear_memory_bytes: u64,
    pub pss_bytes_before: u64,
    pub pss_bytes_after: u64,
    pub pages_shared: u64,
    pub pages_sharing: u64,
    pub pages_unshared: u64,
    pub pages_volatile: u64,
    pub zero_pages: u64,
    pub pages_skipped: u64,
    pub stable_node_chains: u64,
    pub stable_node_dups: u64,
    /// Bytes saved minus the metadata kept for it (KSM general_profit).
    pub general_profit_bytes: i64,
    pub full_scans: u64,
    pub vmas: u64,
    pub pages_skipped_map_budget: u64,
    pub metadata_bytes: u64,
    /// Seconds from the end of the runs until 99% of the final saving was reached.
    pub converge_seconds: f64,
    /// Whether the scanner was still finding merges when `--settle-secs` ran out.
    pub settle_timed_out: bool,
    pub scanner_cpu_seconds: f64,
    /// One line per instance that trapped or failed.
    pub problems: Vec<String>,
    /// What merging saves each instance (as Linux's /proc/PID/ksm_stat).
    pub per_instance: Vec<InstanceReport>,
}

#[derive(Debug, Serialize)]
pub struct InstanceReport {
    pub instance: usize,
    pub pages_merged: u64,
    pub zero_pages: u64,
    pub profit_bytes: i64,
}

pub fn run(args: RunArgs) -> Result<RunReport> {
    let dedup = args.dedup == DedupMode::On;
    let knobs = Knobs {
        max_page_sharing: args.max_page_sharing,
        pages_to_scan: args.pages_to_scan as usize,
        sleep: Duration::from_millis(u64::from(args.sleep_ms)),
        use_zero_pages: args.zero_pages == Switch::On,
        advisor: args.advisor_target_ms.map(|ms| Advisor {
            target_scan_time: Duration::from_millis(u64::from(ms)),
            ..Advisor::default()
        }),
        scan_on_park: args.scan_on_park == Switch::On,
        ..Knobs::default()
    };
    knobs.validate()?;
    let host = Host::new(HostConfig {
        memory: MemoryBacking::Memfd,
        dedup,
        // The scanner waits until the instances ran and memory was measured: the report
        // compares memory before and after merging.
        engine_config: EngineConfig {
            knobs: Knobs {
                run: RunMode::Stop,
                ..knobs.clone()
            },
            ..EngineConfig::default()
        },
        domain: 0,
    })
    .context("starting the host")?;
    let module = host
        .load(&args.module)
        .with_context(|| format!("loading {}", args.module.display()))?;
    let name = args
        .module
        .file_name()
        .map_or_else(|| "module".into(), |n| n.to_string_lossy().into_owned());
    let wasi = WasiOptions {
        args: std::iter::once(name.clone())
            .chain(args.args.iter().cloned())
            .collect(),
        env: args.envs.clone(),
        preopens: args.dirs.clone(),
        inherit_stdout: false,
        inherit_stderr: false,
    };

    let progress = ProgressBar::new(u64::from(args.instances));
    progress.set_style(
        ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} {elapsed}")
            .expect("static template")
            .progress_chars("=> "),
    );
    progress.set_message("running instances");
    let mut instances: Vec<Instance> = Vec::new();
    let (mut ok, mut trapped, mut failed) = (0, 0, 0);
    let mut problems = Vec::new();
    for n in 0..args.instances {
        match host.instantiate(&module, &wasi) {
            Ok(mut instance) => {
                match instance.has_export("_start").then(|| instance.run_start()) {
                    None | Some(Ok(RunOutcome::Exited(0))) => ok += 1,
                    Some(Ok(RunOutcome::Exited(code))) => {
                        ok += 1;
                        problems.push(format!("instance {n} exited with status {code}"));
                    }
                    Some(Ok(RunOutcome::Trapped(message))) => {
                        trapped += 1;
                        problems.push(format!("instance {n} trapped: {message}"));
                    }
                    Some(Err(error)) => {
                        failed += 1;
                        problems.push(format!("instance {n} failed: {error}"));
                    }
                }
                instances.push(instance);
            }
            Err(error) => {
                failed += 1;
                problems.push(format!("instance {n} could not be created: {error}"));
            }
        }
        progress.inc(1);
    }
    progress.finish_and_clear();
    if ok == 0 {
        bail!(
            "no instance of {} could run:\n  {}",
            args.module.display(),
            problems.join("\n  ")
        );
    }
    let mut linear_memory_bytes = 0;
    for instance in &instances {
        linear_memory_bytes += instance.memory_size().unwrap_or(0) as u64;
    }

    let pss_bytes_before = pss_bytes()?;
    let settled = match host.dedup() {
        Some(engine) => {
            engine.set_knobs(knobs).context("starting the scanner")?;
            settle(
                || engine.stats(),
                Duration::from_secs_f64(args.settle_secs.max(0.0)),
            )
        }
        None => Settled::default(),
    };
    let pss_bytes_after = pss_bytes()?;
    let stats = settled.stats;
    let per_instance = instances
        .iter()
        .enumerate()
        .map(|(instance, i)| {
            let OwnerStats {
                pages_merged,
                zero_pages,
                profit_bytes,
            } = host
                .dedup()
                .map(|engine| engine.owner_stats(i.owner().id()))
                .unwrap_or_default();
            InstanceReport {
                instance,
                pages_merged,
                zero_pages,
                profit_bytes,
            }
        })
        .collect();
    Ok(RunReport {
        module: args.module.display().to_string(),
        instances: args.instances,
        instances_ok: ok,
        instances_trapped: trapped,
        instances_failed: failed,
        linear_memory_bytes,
        pss_bytes_before,
        pss_bytes_after,
        pages_shared: stats.pages_shared,
        pages_sharing: stats.pages_sharing,
        pages_unshared: stats.pages_unshared,
        pages_volatile: stats.pages_volatile,
        zero_pages: stats.zero_pages,
        pages_skipped: stats.pages_skipped,
        stable_node_chains: stats.stable_node_chains,
        stable_node_dups: stats.stable_node_dups,
        general_profit_bytes: stats.general_profit_bytes,
        full_scans: stats.full_scans,
        vmas: stats.vmas,
        pages_skipped_map_budget: stats.pages_skipped_map_budget,
        metadata_bytes: stats.metadata_bytes,
        converge_seconds: settled.converge_seconds,
        settle_timed_out: settled.timed_out,
        scanner_cpu_seconds: stats.scanner_cpu_ns as f64 * 1e-9,
        problems,
        per_instance,
    })
}

/// Where the scanner stood when `settle` returned.
#[derive(Default)]
struct Settled {
    stats: Stats,
    converge_seconds: f64,
    timed_out: bool,
}

/// Waits until the scanner has completed a pass that merged nothing, begun after at least one
/// other whole pass (a page needs two visits to merge), or until `limit`.
fn settle(stats: impl Fn() -> Stats, limit: Duration) -> Settled {
    let start = Instant::now();
    let first = stats();
    let mut samples = vec![(0.0, first.pages_sharing)];
    let timed_out = loop {
        std::thread::sleep(Duration::from_millis(10));
        let now = stats();
        samples.push((start.elapsed().as_secs_f64(), now.pages_sharing));
        if now.full_scans >= first.full_scans + 3 && now.merges_last_pass == 0 {
            break false;
        }
        if start.elapsed() >= limit {
            break true;
        }
    };
    let last = stats();
    let target = last.pages_sharing as f64 * 0.99;
    let converge_seconds = samples
        .iter()
        .find(|&&(_, sharing)| sharing as f64 >= target)
        .map_or(0.0, |&(t, _)| t);
    Settled {
        stats: last,
        converge_seconds,
        timed_out,
    }
}

/// The report for a reader.
pub fn print_human(report: &RunReport) {
    let mib = |bytes: u64| bytes as f64 / (1 << 20) as f64;
    println!("module            {}", report.module);
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
    println!(
        "pages             {} shared, {} sharing, {} unshared, {} volatile, {} zero",
        report.pages_shared,
        report.pages_sharing,
        report.pages_unshared,
        report.pages_volatile,
        report.zero_pages
    );
    println!(
        "chains            {} chains of {} dups; general profit {:.1} MiB",
        report.stable_node_chains,
        report.stable_node_dups,
        report.general_profit_bytes as f64 / (1 << 20) as f64
    );
    println!(
        "scanner           {} full scans, converged in {:.2} s{}, {:.3} s CPU, {} mappings",
        report.full_scans,
        report.converge_seconds,
        if report.settle_timed_out {
            " (still merging at the time limit)"
        } else {
            ""
        },
        report.scanner_cpu_seconds,
        report.vmas
    );
    for problem in &report.problems {
        println!("problem           {problem}");
    }
}
