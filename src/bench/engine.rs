//! The merge path alone, on plain memfd regions (no wasm): workload A (every page identical
//! across regions) and workload B (every other page unique).

use std::time::Instant;

use anyhow::{Context, Result};
use samepage_dedup::{Engine, EngineConfig, Knobs, MemfdMapping, Owner, PAGE_SIZE};
use serde::Serialize;

use crate::measure::{pss_bytes, thread_cpu_seconds};

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

/// Figures of one run of the engine over a synthetic workload.
#[derive(Debug, Serialize)]
pub struct EngineFigures {
    pub workload: &'static str,
    pub regions: usize,
    pub pages_per_region: usize,
    pub pages_sharing: u64,
    pub pages_shared: u64,
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

/// Content of page `page` of region `region`.
fn fill(workload: &Synthetic, mapping: &MemfdMapping, region: usize) {
    // SAFETY: the mapping is ours, fresh and unshared; nobody merges it before registration
    // completes scanning, and the caller holds the owner's guard.
    let memory = unsafe { std::slice::from_raw_parts_mut(mapping.as_ptr(), mapping.len()) };
    for (page, bytes) in memory.chunks_exact_mut(PAGE_SIZE).enumerate() {
        let unique = workload.odd_pages_unique && page % 2 == 1;
        let tag = if unique { region as u64 + 1 } else { 0 };
        for (word, chunk) in bytes.chunks_exact_mut(8).enumerate() {
            let value = (tag << 56) ^ ((page as u64) << 20) ^ word as u64 ^ 0x5A5A_0000_0000_0000;
            chunk.copy_from_slice(&value.to_le_bytes());
        }
    }
}

/// Builds the workload, then scans pass after pass in this thread until a pass merges nothing.
pub fn run(workload: &Synthetic, knobs: Knobs) -> Result<EngineFigures> {
    let engine = Engine::new(EngineConfig {
        scanner: false,
        knobs,
        ..EngineConfig::default()
    })
    .context("starting the engine")?;
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
