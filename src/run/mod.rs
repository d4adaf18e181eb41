//! `samepage run`: instantiate one program (core module or component) many times, keep the
//! instances, let the scanner merge their memory, and report what it saved. This file owns
//! the run itself: the host and its memory cgroup, the host's limits (descriptors, memory),
//! and starting the merger (`malloc_trim` after compiling, `madvise` for KSM); starting the
//! instances, the command line, settling and the report have files of their own.

mod report;
pub mod settings;
mod settle;
mod start;

use std::time::Duration;

use anyhow::{Context, Result};
use clap::ValueEnum;
use samepage_dedup::{EngineConfig, Knobs, RunMode};
use samepage_runtime::{Host, HostConfig, MemoryBacking};
use serde::Serialize;

pub use report::{Counters, RunReport, print_human};
pub use settings::RunArgs;

use crate::cgroup::MemoryCgroup;
use crate::merger::Merger;
#[cfg(feature = "bench")]
use samepage_lab::ksm::KsmSysfs;
use samepage_runtime::measure::pss_bytes;
use settle::{Settled, settle};

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
    /// wasmtime's own memories, opted into Linux KSM (needs root and a KSM kernel): the
    /// lab's baseline, in a build with `--features bench`.
    #[cfg(feature = "bench")]
    Ksm,
}

/// A finished run: its report, and the status the process exits with.
pub struct Finished {
    pub report: RunReport,
    pub exit_code: i32,
}

pub fn run(args: RunArgs) -> Result<Finished> {
    let knobs = args.knobs()?;
    #[cfg(feature = "bench")]
    let ksm = KsmSysfs::system();
    #[cfg(feature = "bench")]
    repair_ksm(&ksm);
    crate::resources::raise_descriptor_limit();
    // Opened now, while descriptors are plenty.
    pss_bytes()?;
    // Page cache is charged to the cgroup that first reads a file: read the module first, so
    // that whether another process read it lately does not change this run's figures. (Into
    // a small buffer: a large short-lived allocation would raise glibc's mmap threshold and
    // leave later ones of that size in the heap.)
    if let Ok(mut module) = std::fs::File::open(&args.module) {
        let _ = std::io::copy(&mut module, &mut std::io::sink());
    }
    // Before anything else is allocated, so that the cgroup is charged with all of it.
    let mut cgroup = MemoryCgroup::enter_new();
    #[cfg(feature = "bench")]
    if args.dedup == DedupMode::Ksm {
        ksm.check_usable()?;
    }
    let merging_while_starting =
        args.merge_while_starting == crate::cli::Switch::On && knobs.run != RunMode::Stop;
    let mut host = Host::new(HostConfig {
        memory: match args.dedup {
            DedupMode::On | DedupMode::Off => MemoryBacking::Memfd,
            DedupMode::Cow => MemoryBacking::WasmtimeDefault,
            #[cfg(feature = "bench")]
            DedupMode::Ksm => MemoryBacking::WasmtimeDefault,
        },
        dedup: args.dedup == DedupMode::On,
        engine_config: EngineConfig {
            knobs: Knobs {
                // Merging while the instances start, or not until they all ran (so that the
                // report compares memory before and after merging).
                run: if merging_while_starting {
                    RunMode::Merge
                } else {
                    RunMode::Stop
                },
                ..knobs.clone()
            },
            merge_scope: args.merge_scope.into(),
            max_map_count: args.max_map_count,
            ..EngineConfig::default()
        },
        limits: args.limits(),
        compilation_cache: args.compilation_cache(),
        ..HostConfig::default()
    })
    .context("starting the host")?;
    let (core, component) = host.linkers();
    samepage_host_api::add_to_linker(core).context("adding the guest API")?;
    samepage_host_api::add_to_component_linker(component).context("adding the guest API")?;
    let module = host
        .load(&args.module)
        .with_context(|| format!("loading {}", args.module.display()))?;
    // Data copied into every instance rather than mapped from an image costs each instance
    // its pages until merged: the report says which and why.
    let unlifted: Vec<String> = module
        .images()
        .unlifted()
        .iter()
        .map(|unlifted| {
            format!(
                "{}: copied into every instance, not mapped: {unlifted}",
                args.module.display()
            )
        })
        .collect();
    crate::resources::return_free_heap();
    // The peak the report gives is that of running the instances, not of compiling.
    if let Some(cgroup) = &mut cgroup {
        cgroup.reset_peak();
    }
    let mut started = start::start_instances(
        &host,
        &module,
        &args,
        cgroup.as_ref(),
        merging_while_starting,
    )?;
    let linear_memory_bytes = started
        .instances()
        .map(|i| {
            // A component exports no memory of its own: count its core instances' memories.
            i.memory_size()
                .map_or_else(|_| i.store_owner().memory_bytes(), |size| size as u64)
        })
        .sum();

    let pss_bytes_before = pss_bytes()?;
    let cgroup_bytes_before = cgroup.as_ref().and_then(MemoryCgroup::usage_bytes);
    let mut merger = match (args.dedup, host.dedup()) {
        // Nothing is reported, and the memory is freed whole at exit: no merging to start.
        (DedupMode::On, Some(_)) if !args.wants_report() => Merger::Nothing,
        (DedupMode::On, Some(engine)) => Merger::samepage(engine, knobs.run)?,
        #[cfg(feature = "bench")]
        (DedupMode::Ksm, _) => {
            for instance in started.instances_mut() {
                samepage_lab::ksm::mark_mergeable(instance)?;
            }
            Merger::ksm(&ksm, args.ksm_pages_to_scan, args.ksm_sleep_millisecs)?
        }
        _ => Merger::Nothing,
    };
    let settled = if args.wants_report() {
        settle(
            &mut merger,
            pss_bytes_before,
            Duration::from_secs_f64(args.settle_secs),
            Duration::from_millis(args.pss_trace_ms),
        )?
    } else {
        Settled::skipped(pss_bytes_before, merger.sample()?)
    };
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
    // samepage's engine's figures, zeros without merging; none under KSM.
    let engine_figures = matches!(args.dedup, DedupMode::On | DedupMode::Off | DedupMode::Cow);
    let per_instance = report::per_instance(&started.records, engine_figures);
    let per_domain = report::per_domain(&per_instance);
    let exit_code = started.exit_code();
    let report = RunReport {
        mode: args.dedup,
        module: args.module.display().to_string(),
        instances: args.instances,
        instances_started: started.records.len() as u32,
        instances_ok: started.count(start::Ending::is_ok),
        instances_trapped: started.count(start::Ending::is_trap),
        instances_failed: started.count(start::Ending::is_failure),
        exit_code,
        linear_memory_bytes,
        instantiate_seconds: started.instantiate_seconds,
        instantiate_and_run_seconds: started.instantiate_and_run_seconds,
        merging: match host.dedup().map(|engine| engine.running_merges()) {
            None => "none".into(),
            Some(Ok(())) => "running".into(),
            Some(Err(why)) => format!("parked only: {why}"),
        },
        last_started_seconds: started.last_started_seconds,
        sharing_while_running: std::mem::take(&mut started.sharing_while_running),
        merged_while_starting: merging_while_starting && args.dedup == DedupMode::On,
        pss_bytes_after_instantiate: pss_bytes_before,
        pss_bytes_before,
        pss_bytes_after,
        cgroup_memory_bytes_before: cgroup_bytes_before,
        cgroup_memory_bytes_after: cgroup_bytes_after,
        cgroup_memory_bytes_peak: cgroup.as_ref().and_then(MemoryCgroup::peak_bytes),
        counters: Counters::of_run(stats, &settled.last),
        #[cfg(feature = "bench")]
        process_ksm_stat: (args.dedup == DedupMode::Ksm).then(samepage_lab::ksm::process_ksm_stat),
        #[cfg(not(feature = "bench"))]
        process_ksm_stat: None,
        converge_seconds: settled.converge_seconds,
        settle_seconds: settled.settle_seconds,
        settle_timed_out: settled.timed_out,
        scanner_cpu_seconds: settled.last.cpu_seconds,
        idle_cpu_percent,
        pss_trace: settled.pss_trace,
        problems: unlifted
            .into_iter()
            .chain(std::mem::take(&mut started.problems))
            .collect(),
        per_instance,
        per_domain,
    };
    #[cfg(feature = "bench")]
    if let Some(path) = &args.plot {
        report::plot(&report, path)?;
    }
    Ok(Finished { report, exit_code })
}

/// Restores KSM's settings that a killed `--dedup ksm` run left changed, saying so.
#[cfg(feature = "bench")]
fn repair_ksm(ksm: &KsmSysfs) {
    match ksm.repair_stale() {
        Ok(Some(pid)) => eprintln!(
            "samepage: restored Linux KSM's settings that run {pid} changed and could not \
             restore (it was killed), as {} recorded them",
            ksm.state_file().display()
        ),
        Ok(None) => {}
        Err(error) => eprintln!("warning: {error:#}"),
    }
}
