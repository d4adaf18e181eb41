//! The merge-now suite: `Engine::merge_now` on 64 instances of 16 MiB holding the same pages.

use std::time::Instant;

use anyhow::{Context, Result};
use samepage_dedup::{Engine, EngineConfig, Knobs, MemfdMapping, Owner, PAGE_SIZE};

use super::fill_pages;
use crate::measure::thread_cpu_seconds;

/// The merge-now API on 64 regions of 16 MiB holding the same pages.
pub fn suite() -> Result<String> {
    let instances = 64;
    let pages = 4096;
    let engine = Engine::new(EngineConfig::manual(Knobs::default()))?;
    let len = pages * PAGE_SIZE;
    let mut regions = Vec::new();
    for _ in 0..instances {
        let owner = Owner::new(0);
        let mapping = MemfdMapping::new(Some(&engine), &owner, "merge-now-bench", len, len, 0)?;
        let _guard = owner.enter();
        // SAFETY: a fresh mapping of `len` bytes, its owner's guard held.
        unsafe { fill_pages(mapping.as_ptr(), pages, 0) };
        drop(_guard);
        regions.push((owner, mapping));
    }
    let mut per_instance = Vec::new();
    let (wall, cpu) = (Instant::now(), thread_cpu_seconds());
    for (owner, mapping) in &regions {
        let start = Instant::now();
        let guard = owner.enter();
        engine.merge_now(&guard, mapping.region().context("registered")?, 0..len)?;
        per_instance.push(start.elapsed().as_secs_f64() * 1e3);
    }
    let (wall, cpu) = (wall.elapsed().as_secs_f64(), thread_cpu_seconds() - cpu);
    let stats = engine.stats();
    per_instance.sort_by(f64::total_cmp);
    Ok(format!(
        "{ABOUT}{}",
        super::table(
            &[
                "instances",
                "pages merged",
                "all merged after",
                "CPU",
                "CPU per merged page",
                "per call (median)",
                "per call (max)"
            ],
            &[vec![
                instances.to_string(),
                stats.pages_sharing.to_string(),
                format!("{:.1} ms", wall * 1e3),
                format!("{:.1} ms", cpu * 1e3),
                format!("{:.2} µs", cpu * 1e6 / stats.pages_sharing.max(1) as f64),
                format!("{:.2} ms", per_instance[per_instance.len() / 2]),
                format!("{:.2} ms", per_instance[per_instance.len() - 1]),
            ]],
        )
    ))
}

/// What the merge-now report says before its table.
const ABOUT: &str = "# Merge now\n\n\
    64 regions of 16 MiB (4,096 pages) hold the same pages. Each owner in turn calls \
    `Engine::merge_now` over its whole region with its guard held, as the `merge-now` \
    guest hint does: no waiting for a pass, no volatility check.\n\n";
