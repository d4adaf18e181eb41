//! `samepage run`: instantiate one module many times, keep the instances, let the scanner
//! merge their memory, and report what it saved.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use samepage_dedup::{Advisor, EngineConfig, Knobs, OwnerStats, RunMode};
use samepage_runtime::{Host, HostConfig, Instance, MemoryBacking, RunOutcome, WasiOptions};
use serde::Serialize;

use crate::ksm::KsmSysfs;
use crate::measure::{MemoryCgroup, pss_bytes};
use crate::merger::{Merger, Sample};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DedupMode {
    /// memfd memories merged by samepage's scanner.
    On,
    /// memfd memories, no merging.
    Off,
    /// wasmtime's own memories with its copy-on-write instantiation, no merging: what a
    /// plain wasmtime host does today.
    Cow,
    /// wasmtime's own memories, opted into Linux KSM (needs root and a KSM kernel).
    Ksm,
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
    #[arg(long, default_value_t = 30.0, value_parser = parse_seconds)]
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
    /// ksmd's pages_to_scan for --dedup ksm (default: full speed).
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub ksm_pages_to_scan: u64,
    /// ksmd's sleep_millisecs for --dedup ksm.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=60_000))]
    pub ksm_sleep_ms: u64,
    /// Sample PSS this often while merging, into the report's pss_trace.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(5..=10_000))]
    pub pss_trace_ms: u64,
    /// After converging, measure the merger's CPU over this many idle seconds.
    #[arg(long, default_value_t = 0.0, value_parser = parse_seconds)]
    pub idle_secs: f64,
    /// Arguments passed to the guest after its name.
    #[arg(last = true)]
    pub args: Vec<String>,
}

/// Seconds from 0 to a day.
fn parse_seconds(text: &str) -> Result<f64, String> {
    let seconds: f64 = text.parse().map_err(|e| format!("{text:?}: {e}"))?;
    if (0.0..=86_400.0).contains(&seconds) {
        Ok(seconds)
    } else {
        Err(format!("{seconds} is not in 0..=86400 seconds"))
    }
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
    pub mode: DedupMode,
    pub module: String,
    pub instances: u32,
    /// Instances that ran to completion (or are reactors ready for calls).
    pub instances_ok: u32,
    pub instances_trapped: u32,
    pub instances_failed: u32,
    /// Sum of the instances' linear memory sizes.
    pub linear_memory_bytes: u64,
    /// Wall time to create and run every instance.
    pub instantiate_seconds: f64,
    /// PSS once every instance ran; merging starts from here, so it is also
    /// `pss_bytes_before`.
    pub pss_bytes_after_instantiate: u64,
    pub pss_bytes_before: u64,
    pub pss_bytes_after: u64,
    /// Memory charged to a cgroup of the run's own (when it could make one): unlike PSS it
    /// also counts memfd pages nobody maps, such as untouched parts of a module image.
    pub cgroup_memory_bytes_before: Option<u64>,
    pub cgroup_memory_bytes_after: Option<u64>,
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
    /// Seconds from the start of merging until PSS had fallen by 99% of its final fall.
    pub converge_seconds: f64,
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
}

#[derive(Debug, Serialize)]
pub struct InstanceReport {
    pub instance: usize,
    pub pages_merged: u64,
    pub zero_pages: u64,
    pub profit_bytes: i64,
}

pub fn run(args: RunArgs) -> Result<RunReport> {
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
    // Page cache is charged to the cgroup that first reads a file: read the module first, so
    // that whether another process read it lately does not change this run's figures. (Into
    // a small buffer: a large short-lived allocation would raise glibc's mmap threshold and
    // leave later ones of that size in the heap.)
    if let Ok(mut module) = std::fs::File::open(&args.module) {
        let _ = std::io::copy(&mut module, &mut std::io::sink());
    }
    // Before anything else is allocated, so that the cgroup is charged with all of it.
    let cgroup = MemoryCgroup::enter_new();
    let ksm = KsmSysfs::system();
    if args.dedup == DedupMode::Ksm {
        ksm.check_usable()?;
    }
    let host = Host::new(HostConfig {
        memory: match args.dedup {
            DedupMode::On | DedupMode::Off => MemoryBacking::Memfd,
            DedupMode::Cow | DedupMode::Ksm => MemoryBacking::WasmtimeDefault,
        },
        dedup: args.dedup == DedupMode::On,
        // The scanner waits until the instances ran and memory was measured: the report
        // compares memory before and after merging.
        engine_config: EngineConfig {
            knobs: Knobs {
                run: RunMode::Stop,
                ..knobs.clone()
            },
            ..EngineConfig::default()
        },
        ..HostConfig::default()
    })
    .context("starting the host")?;
    let module = host
        .load(&args.module)
        .with_context(|| format!("loading {}", args.module.display()))?;
    release_compiler_garbage();
    let started = Instant::now();
    let ran = run_instances(&host, &module, &args)?;
    let instantiate_seconds = started.elapsed().as_secs_f64();
    let mut instances = ran.instances;
    let linear_memory_bytes = instances
        .iter()
        .map(|i| i.memory_size().unwrap_or(0) as u64)
        .sum();

    let pss_bytes_before = pss_bytes()?;
    let cgroup_bytes_before = cgroup.as_ref().and_then(MemoryCgroup::usage_bytes);
    let mut merger = match (args.dedup, host.dedup()) {
        (DedupMode::On, Some(engine)) => Merger::samepage(engine, knobs)?,
        (DedupMode::Ksm, _) => {
            for instance in &mut instances {
                mark_mergeable(instance)?;
            }
            Merger::ksm(&ksm, args.ksm_pages_to_scan, args.ksm_sleep_ms)?
        }
        _ => Merger::Nothing,
    };
    let settled = settle(
        &mut merger,
        pss_bytes_before,
        Duration::from_secs_f64(args.settle_secs),
        Duration::from_millis(args.pss_trace_ms),
    )?;
    // The trace's last point was read as the merger converged.
    let pss_bytes_after = settled
        .pss_trace
        .last()
        .map_or(pss_bytes_before, |&(_, pss)| pss);
    let cgroup_bytes_after = cgroup.as_ref().and_then(MemoryCgroup::usage_bytes);
    let idle_cpu_percent = if args.idle_secs > 0.0 {
        let before = merger.sample()?.cpu_seconds;
        std::thread::sleep(Duration::from_secs_f64(args.idle_secs));
        Some((merger.sample()?.cpu_seconds - before) * 100.0 / args.idle_secs)
    } else {
        None
    };
    let sample = settled.last;
    let stats = host
        .dedup()
        .map(|engine| engine.stats())
        .unwrap_or_default();
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
        mode: args.dedup,
        module: args.module.display().to_string(),
        instances: args.instances,
        instances_ok: ran.ok,
        instances_trapped: ran.trapped,
        instances_failed: ran.failed,
        linear_memory_bytes,
        instantiate_seconds,
        pss_bytes_after_instantiate: pss_bytes_before,
        pss_bytes_before,
        pss_bytes_after,
        cgroup_memory_bytes_before: cgroup_bytes_before,
        cgroup_memory_bytes_after: cgroup_bytes_after,
        pages_shared: sample.pages_shared,
        pages_sharing: sample.pages_sharing,
        pages_unshared: sample.pages_unshared,
        pages_volatile: sample.pages_volatile,
        zero_pages: stats.zero_pages,
        pages_skipped: stats.pages_skipped,
        stable_node_chains: stats.stable_node_chains,
        stable_node_dups: stats.stable_node_dups,
        general_profit_bytes: stats.general_profit_bytes,
        full_scans: sample.full_scans,
        vmas: merger.vmas(),
        pages_skipped_map_budget: stats.pages_skipped_map_budget,
        metadata_bytes: stats.metadata_bytes,
        converge_seconds: settled.converge_seconds,
        settle_timed_out: settled.timed_out,
        scanner_cpu_seconds: sample.cpu_seconds,
        idle_cpu_percent,
        pss_trace: settled.pss_trace,
        problems: ran.problems,
        per_instance,
    })
}

/// The instances of a run and how their runs went.
struct Ran {
    instances: Vec<Instance>,
    ok: u32,
    trapped: u32,
    failed: u32,
    problems: Vec<String>,
}

/// Creates and runs `--instances` instances, with a progress bar on a terminal; fails when
/// none could run.
fn run_instances(host: &Host, module: &samepage_runtime::Module, args: &RunArgs) -> Result<Ran> {
    let name = args
        .module
        .file_name()
        .map_or_else(|| "module".into(), |n| n.to_string_lossy().into_owned());
    let wasi = WasiOptions {
        args: std::iter::once(name)
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
    let mut ran = Ran {
        instances: Vec::new(),
        ok: 0,
        trapped: 0,
        failed: 0,
        problems: Vec::new(),
    };
    for n in 0..args.instances {
        match host.instantiate(module, &wasi) {
            Ok(mut instance) => {
                match instance.has_export("_start").then(|| instance.run_start()) {
                    None | Some(Ok(RunOutcome::Exited(0))) => ran.ok += 1,
                    Some(Ok(RunOutcome::Exited(code))) => {
                        ran.ok += 1;
                        ran.problems
                            .push(format!("instance {n} exited with status {code}"));
                    }
                    Some(Ok(RunOutcome::Trapped(message))) => {
                        ran.trapped += 1;
                        ran.problems
                            .push(format!("instance {n} trapped: {message}"));
                    }
                    Some(Err(error)) => {
                        ran.failed += 1;
                        ran.problems.push(format!("instance {n} failed: {error}"));
                    }
                }
                ran.instances.push(instance);
            }
            Err(error) => {
                ran.failed += 1;
                ran.problems
                    .push(format!("instance {n} could not be created: {error}"));
            }
        }
        progress.inc(1);
    }
    progress.finish_and_clear();
    if ran.ok == 0 {
        bail!(
            "no instance of {} could run:\n  {}",
            args.module.display(),
            ran.problems.join("\n  ")
        );
    }
    Ok(ran)
}

/// Gives the memory that compiling the module freed back to the system. Cranelift compiles
/// on several threads, and glibc keeps what each thread freed in that thread's arena: tens
/// of MiB for a large module, which would otherwise sit in the host for its whole life (and
/// in every mode's figures, by chance more in one run than in another).
fn release_compiler_garbage() {
    // SAFETY: malloc_trim only returns free heap memory to the kernel; it has no
    // preconditions and touches no memory in use.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Opts an instance's memory into Linux KSM.
fn mark_mergeable(instance: &mut Instance) -> Result<()> {
    instance
        .with_memory(|memory| {
            // SAFETY: the range is the instance's own linear memory, a mapping wasmtime made
            // and keeps; MADV_MERGEABLE changes nothing anyone can observe in it.
            unsafe {
                rustix::mm::madvise(
                    memory.as_mut_ptr().cast(),
                    memory.len(),
                    rustix::mm::Advice::LinuxMergeable,
                )
            }
        })?
        .context("madvise(MADV_MERGEABLE) on a linear memory")
}

/// How merging went, once `settle` returned.
struct Settled {
    last: Sample,
    converge_seconds: f64,
    timed_out: bool,
    pss_trace: Vec<(f64, u64)>,
}

/// Samples PSS and the merger every `every` until the merger converged or `limit` passed.
/// Convergence time is read off the PSS trace, the same way for every mode.
fn settle(
    merger: &mut Merger,
    pss_before: u64,
    limit: Duration,
    every: Duration,
) -> Result<Settled> {
    let start = Instant::now();
    let mut pss_trace = vec![(0.0, pss_before)];
    let (last, timed_out) = loop {
        std::thread::sleep(every);
        let sample = merger.sample()?;
        pss_trace.push((start.elapsed().as_secs_f64(), pss_bytes()?));
        if sample.converged {
            break (sample, false);
        }
        if start.elapsed() >= limit {
            break (sample, true);
        }
    };
    let final_pss = pss_trace.last().map_or(pss_before, |&(_, pss)| pss);
    let saving = pss_before.saturating_sub(final_pss) as f64;
    let converge_seconds = pss_trace
        .iter()
        .find(|&&(_, pss)| pss_before.saturating_sub(pss) as f64 >= 0.99 * saving)
        .map_or(0.0, |&(t, _)| t);
    Ok(Settled {
        last,
        converge_seconds,
        timed_out,
        pss_trace,
    })
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
        "merging           {} full scans, converged in {:.2} s{}, {:.3} s CPU, {} mappings",
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
