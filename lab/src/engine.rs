//! The engine suite: the merge path alone, on plain memfd regions (no wasm): workload A (every page identical
//! across regions) and workload B (every other page unique).

use std::time::Instant;

use anyhow::{Context, Result};
use samepage_dedup::{Engine, EngineConfig, Knobs, MemfdMapping, Owner, PAGE_SIZE, pattern};
use serde::Serialize;

use samepage_runtime::measure::{pss_bytes, thread_cpu_seconds};

/// The shape of a synthetic workload.
#[derive(Clone, Copy, Debug)]
pub struct Synthetic {
    pub name: &'static str,
    pub regions: usize,
    pub pages: usize,
    /// Whether odd pages hold content unique to their region.
    pub odd_pages_unique: bool,
}

pub const WORKLOAD_A: Synthetic = Synthetic {
    name: "A",
    regions: 8,
    pages: 16_384,
    odd_pages_unique: false,
};

pub const WORKLOAD_B: Synthetic = Synthetic {
    name: "B",
    odd_pages_unique: true,
    ..WORKLOAD_A
};

/// 64 instances' worth of regions, for the sharing-limit figures.
pub const WORKLOAD_64: Synthetic = Synthetic {
    name: "64 × 2,048 pages",
    regions: 64,
    pages: 2048,
    odd_pages_unique: false,
};

/// Knobs for measuring the merge path flat out: big batches, no sleep.
fn flat_out(max_page_sharing: u32) -> Knobs {
    Knobs {
        pages_to_scan: 1 << 16,
        sleep: std::time::Duration::ZERO,
        max_page_sharing,
        ..Knobs::default()
    }
}

/// Workloads A and B, and merging 64 regions with sharing limits of 2 and 256.
pub fn suite() -> Result<String> {
    let mut rows = Vec::new();
    // The first merge in a fresh process runs slower (the kernel warming its allocators);
    // one run of A first, not counted.
    run(&WORKLOAD_A, flat_out(256))?;
    for (workload, limit) in [
        (WORKLOAD_A, 256),
        (WORKLOAD_B, 256),
        (WORKLOAD_64, 256),
        (WORKLOAD_64, 16),
        (WORKLOAD_64, 2),
    ] {
        // The run with the median CPU of three.
        let mut runs = Vec::new();
        for _ in 0..3 {
            let f = run(&workload, flat_out(limit))?;
            eprintln!("bench: {}", serde_json::to_string(&f)?);
            runs.push(f);
        }
        runs.sort_by(|a, b| a.cpu_seconds.total_cmp(&b.cpu_seconds));
        let spread = format!(
            "{:.2}–{:.2} µs",
            runs[0].cpu_us_per_merged_page, runs[2].cpu_us_per_merged_page
        );
        let f = runs.swap_remove(1);
        rows.push(vec![
            workload.name.to_owned(),
            limit.to_string(),
            f.pages_sharing.to_string(),
            format!("{} / {}", f.stable_node_chains, f.stable_node_dups),
            format!("{:.3} s", f.converge_seconds),
            format!("{:.3} s", f.cpu_seconds),
            format!("{:.2} µs ({spread})", f.cpu_us_per_merged_page),
            format!("{:.0}", f.merged_pages_per_second),
            format!("{} (budget {})", f.vmas, f.map_budget),
            f.pages_skipped_map_budget.to_string(),
            format!(
                "{} → {}",
                super::mib(f.pss_bytes_before as f64),
                super::mib(f.pss_bytes_after as f64)
            ),
        ]);
    }
    Ok(format!(
        "{ABOUT}{}",
        super::table(
            &[
                "workload",
                "max_page_sharing",
                "pages merged",
                "chains / dups",
                "time to converge",
                "CPU",
                "CPU per merged page (range)",
                "merged pages/s",
                "mappings",
                "skipped (map budget)",
                "PSS before → after",
            ],
            &rows,
        )
    ))
}

/// Figures of one run of the engine over a synthetic workload.
#[derive(Debug, Serialize)]
pub struct EngineFigures {
    pub workload: &'static str,
    pub regions: usize,
    pub pages_per_region: usize,
    pub pages_sharing: u64,
    pub pages_shared: u64,
    pub stable_node_chains: u64,
    pub stable_node_dups: u64,
    /// Wall time from the first pass to the end of the pass that merged the last page.
    pub converge_seconds: f64,
    /// CPU time of the scanning thread over the same span.
    pub cpu_seconds: f64,
    pub merged_pages_per_second: f64,
    pub cpu_us_per_merged_page: f64,
    /// Mappings the engine created (including the stable store's view).
    pub vmas: u64,
    pub map_budget: u64,
    pub pages_skipped_map_budget: u64,
    pub pss_bytes_before: u64,
    pub pss_bytes_after: u64,
    pub passes: u64,
}

/// Fills region `region`: page *i* is page *i* of the shared pattern (seed 0), or, for odd
/// pages of a workload whose odd pages are unique, of the region's own pattern.
fn fill(workload: &Synthetic, mapping: &MemfdMapping, region: usize) {
    // SAFETY: the mapping is ours, fresh and unshared; nobody merges it before registration
    // completes scanning, and the caller holds the owner's guard.
    let memory = unsafe { std::slice::from_raw_parts_mut(mapping.as_ptr(), mapping.len()) };
    for (page, bytes) in memory.chunks_exact_mut(PAGE_SIZE).enumerate() {
        let unique = workload.odd_pages_unique && page % 2 == 1;
        let seed = if unique { region as u64 + 1 } else { 0 };
        pattern::fill_page(bytes, seed, page);
    }
}

/// Builds the workload, then scans pass after pass in this thread until a pass merges nothing.
pub fn run(workload: &Synthetic, knobs: Knobs) -> Result<EngineFigures> {
    let engine = Engine::new(EngineConfig::manual(knobs)).context("starting the engine")?;
    let len = workload.pages * PAGE_SIZE;
    let mut regions = Vec::new();
    for region in 0..workload.regions {
        let owner = Owner::new(0);
        let mapping = MemfdMapping::new(Some(&engine), &owner, "bench-region", len, len, 0)
            .context("creating a region")?;
        let guard = owner.enter();
        fill(workload, &mapping, region);
        drop(guard);
        regions.push((owner, mapping));
    }
    let pss_bytes_before = pss_bytes()?;
    let wall = Instant::now();
    let cpu = thread_cpu_seconds();
    let mut converged = (0.0, 0.0);
    let mut passes = 0;
    loop {
        engine.scan_pass()?;
        passes += 1;
        let stats = engine.stats();
        if stats.merges_last_pass > 0 {
            converged = (wall.elapsed().as_secs_f64(), thread_cpu_seconds() - cpu);
        } else if passes >= 2 {
            break;
        }
    }
    let stats = engine.stats();
    let pss_bytes_after = pss_bytes()?;
    let merged = stats.pages_sharing.max(1) as f64;
    Ok(EngineFigures {
        workload: workload.name,
        regions: workload.regions,
        pages_per_region: workload.pages,
        pages_sharing: stats.pages_sharing,
        pages_shared: stats.pages_shared,
        stable_node_chains: stats.stable_node_chains,
        stable_node_dups: stats.stable_node_dups,
        converge_seconds: converged.0,
        cpu_seconds: converged.1,
        merged_pages_per_second: merged / converged.0.max(1e-9),
        cpu_us_per_merged_page: converged.1 * 1e6 / merged,
        vmas: stats.vmas,
        map_budget: stats.map_budget,
        pages_skipped_map_budget: stats.pages_skipped_map_budget,
        pss_bytes_before,
        pss_bytes_after,
        passes,
    })
}

/// What the engine report says before its table.
const ABOUT: &str = "# The merge path on synthetic regions\n\n\
    The engine alone (no wasm), over memfd regions, scanning in the calling thread pass \
    after pass until a pass merges nothing (`pages_to_scan` = 65,536, no sleep). CPU is \
    that thread's (user + system) from the first pass to the end of the pass that merged \
    the last page; per merged page divides it by `pages_sharing`. Memory is the \
    process's PSS. Each row is the run with the median CPU of three (the range in \
    brackets), after one uncounted run of A.\n\n\
    - A: 8 regions × 16,384 pages, page *i* identical across regions.\n\
    - B: the same with every odd page unique to its region.\n\
    - 64 × 2,048 pages: 64 regions, page *i* identical across them, with \
    `max_page_sharing` 256, 16 and 2.\n\n";
