//! `samepage run`: instantiate one program (core module or component) many times, keep the instances, let the scanner
//! merge their memory, and report what it saved. This file owns the run itself: the host and
//! its memory cgroup, running the instances, and starting the merger (`malloc_trim` after
//! compiling, `madvise` for KSM); the command line, settling and the report have files of
//! their own.

mod report;
mod settings;
mod settle;

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::ValueEnum;
use indicatif::{ProgressBar, ProgressStyle};
use samepage_dedup::{EngineConfig, Knobs, RunMode};
use samepage_runtime::{
    Host, HostConfig, Instance, MemoryBacking, Program, RunOutcome, WasiOptions,
};
use serde::Serialize;

pub use report::{Counters, RunReport, print_human};
pub use settings::RunArgs;

use crate::ksm::KsmSysfs;
use crate::measure::{MemoryCgroup, pss_bytes};
use crate::merger::Merger;
use settle::settle;

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

pub fn run(args: RunArgs) -> Result<RunReport> {
    let knobs = args.knobs()?;
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
    let mut host = Host::new(HostConfig {
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
            merge_scope: args.merge_scope.into(),
            ..EngineConfig::default()
        },
        ..HostConfig::default()
    })
    .context("starting the host")?;
    let (core, component) = host.linkers();
    samepage_host_api::add_to_linker(core).context("adding the guest API")?;
    samepage_host_api::add_to_component_linker(component).context("adding the guest API")?;
    let module = host
        .load(&args.module)
        .with_context(|| format!("loading {}", args.module.display()))?;
    release_compiler_garbage();
    let started = Instant::now();
    let ran = run_instances(&host, &module, &args)?;
    let instantiate_and_run_seconds = started.elapsed().as_secs_f64();
    let mut instances = ran.instances;
    let linear_memory_bytes = instances
        .iter()
        .map(|i| {
            // A component exports no memory of its own: count its core instances' memories.
            i.memory_size()
                .map_or_else(|_| i.store_owner().memory_bytes(), |size| size as u64)
        })
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
    let pss_bytes_after = settled.pss_after();
    let cgroup_bytes_after = cgroup.as_ref().and_then(MemoryCgroup::usage_bytes);
    let idle_cpu_percent = if args.idle_secs > 0.0 {
        let before = merger.sample()?.cpu_seconds;
        std::thread::sleep(Duration::from_secs_f64(args.idle_secs));
        Some((merger.sample()?.cpu_seconds - before) * 100.0 / args.idle_secs)
    } else {
        None
    };
    let stats = host
        .dedup()
        .map(|engine| engine.stats())
        .unwrap_or_default();
    let per_instance = report::per_instance(&instances);
    let per_domain = report::per_domain(&per_instance);
    Ok(RunReport {
        mode: args.dedup,
        module: args.module.display().to_string(),
        instances: args.instances,
        instances_ok: ran.ok,
        instances_trapped: ran.trapped,
        instances_failed: ran.failed,
        linear_memory_bytes,
        instantiate_seconds: ran.instantiate_seconds,
        instantiate_and_run_seconds,
        pss_bytes_after_instantiate: pss_bytes_before,
        pss_bytes_before,
        pss_bytes_after,
        cgroup_memory_bytes_before: cgroup_bytes_before,
        cgroup_memory_bytes_after: cgroup_bytes_after,
        counters: Counters::of_run(stats, &settled.last),
        converge_seconds: settled.converge_seconds,
        settle_seconds: settled.settle_seconds,
        settle_timed_out: settled.timed_out,
        scanner_cpu_seconds: settled.last.cpu_seconds,
        idle_cpu_percent,
        pss_trace: settled.pss_trace,
        problems: ran.problems,
        per_instance,
        per_domain,
    })
}

/// The instances of a run and how their runs went.
struct Ran {
    instances: Vec<Instance>,
    ok: u32,
    trapped: u32,
    failed: u32,
    problems: Vec<String>,
    /// Wall time inside instantiation alone, over all instances.
    instantiate_seconds: f64,
}

/// Creates and runs `--instances` instances, with a progress bar on a terminal; fails when
/// none could run.
fn run_instances(host: &Host, program: &Program, args: &RunArgs) -> Result<Ran> {
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
        instantiate_seconds: 0.0,
    };
    for n in 0..args.instances {
        // Round-robin over the tenants, each its own merge domain.
        let domain = n % args.tenants;
        let started = Instant::now();
        let instantiated = host.instantiate_in(program, &wasi, domain);
        ran.instantiate_seconds += started.elapsed().as_secs_f64();
        match instantiated {
            Ok(mut instance) => {
                let command = instance.is_component() || instance.has_export("_start");
                match command.then(|| instance.run_start()) {
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
