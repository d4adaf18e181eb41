//! The merge-now suite: `Engine::merge_now` on 64 regions of 16 MiB holding the same pages,
//! and a guest's own `merge-now` call (the `samepage:dedup` API) on a 16 MiB range that
//! matches an instance merged before it, against the floor of comparing those bytes once.

use std::time::Instant;

use samepage_runtime::{Host, HostConfig, Instance, Val, WasiOptions};

use anyhow::{Context, Result};
use samepage_dedup::{Engine, EngineConfig, Knobs, MemfdMapping, Owner, PAGE_SIZE, RunMode};

use super::fill_pages;
use samepage_runtime::measure::thread_cpu_seconds;

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
    let guest = guest_merge_now().context("a guest's merge-now")?;
    Ok(format!(
        "{ABOUT}{}{GUEST_ABOUT}{guest}",
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

/// The guest's range: 4,096 pages (16 MiB) from page 16 of `examples/guests/advice.wat`.
const GUEST_FIRST: usize = 16;
const GUEST_PAGES: usize = 4096;
/// Instances timed, each matching the first two (merged before them).
const GUEST_ROUNDS: usize = 15;

/// Fills the guest range of `instance` with the pattern every instance shares.
fn fill_guest(instance: &mut Instance) -> Result<()> {
    instance.call(
        "fill",
        &[
            Val::I64(0x5EED),
            Val::I32(GUEST_FIRST as i32),
            Val::I32(GUEST_PAGES as i32),
        ],
    )?;
    Ok(())
}

/// Calls the guest's `merge-now` over its range; returns the pages it merged.
fn guest_merge(instance: &mut Instance) -> Result<u64> {
    let results = instance.call(
        "merge_now",
        &[
            Val::I64((GUEST_FIRST * PAGE_SIZE) as i64),
            Val::I64((GUEST_PAGES * PAGE_SIZE) as i64),
        ],
    )?;
    anyhow::ensure!(
        results[0].unwrap_i32() == 0,
        "merge-now failed: {results:?}"
    );
    Ok(results[1].unwrap_i64() as u64)
}

/// The guest's range of `instance`, copied out.
fn guest_range(instance: &mut Instance) -> Result<Vec<u8>> {
    let range = GUEST_FIRST * PAGE_SIZE..(GUEST_FIRST + GUEST_PAGES) * PAGE_SIZE;
    Ok(instance.with_memory(|memory| memory[range].to_vec())?)
}

/// A guest's `merge-now` on a range that matches merged pages, against `memcmp` of it.
fn guest_merge_now() -> Result<String> {
    // A scanner thread that does not scan: it only frees, after each call, the pages the
    // call's merge replaced (as in a host, where it also scans).
    let mut host = Host::new(HostConfig {
        engine_config: EngineConfig {
            knobs: Knobs {
                run: RunMode::Stop,
                ..Knobs::default()
            },
            ..EngineConfig::default()
        },
        ..HostConfig::default()
    })?;
    let (core, component) = host.linkers();
    samepage_host_api::add_to_linker(core)?;
    samepage_host_api::add_to_component_linker(component)?;
    let program = host.load(&super::repo_path("examples/guests/advice.wat"))?;
    let mut instances = Vec::new();
    for _ in 0..2 {
        let mut instance = host.instantiate(&program, &WasiOptions::default())?;
        fill_guest(&mut instance)?;
        guest_merge(&mut instance)?;
        instances.push(instance);
    }
    let reference = guest_range(&mut instances[0])?;
    let range = GUEST_FIRST * PAGE_SIZE..(GUEST_FIRST + GUEST_PAGES) * PAGE_SIZE;
    let (mut calls, mut floors, mut freeing, mut merged) = (Vec::new(), Vec::new(), Vec::new(), 0);
    for _ in 0..GUEST_ROUNDS {
        let mut instance = host.instantiate(&program, &WasiOptions::default())?;
        fill_guest(&mut instance)?;
        // The floor: comparing the same bytes once, in the same memory, in this run.
        let start = Instant::now();
        let equal = instance.with_memory(|memory| memory[range.clone()] == reference[..])?;
        floors.push(start.elapsed().as_secs_f64());
        anyhow::ensure!(equal, "the instances' ranges differ");
        let engine = host.dedup().context("merging")?;
        let scanner_before = engine.stats().scanner_cpu_ns;
        let start = Instant::now();
        merged = guest_merge(&mut instance)?;
        calls.push(start.elapsed().as_secs_f64());
        // Long enough for the scanner to free the replaced pages.
        std::thread::sleep(std::time::Duration::from_millis(100));
        freeing.push((engine.stats().scanner_cpu_ns - scanner_before) as f64 * 1e-9);
        eprintln!(
            "bench: guest merge-now {:.2} ms, memcmp {:.2} ms",
            calls[calls.len() - 1] * 1e3,
            floors[floors.len() - 1] * 1e3
        );
        instances.push(instance);
    }
    anyhow::ensure!(
        merged == GUEST_PAGES as u64,
        "merge-now merged {merged} pages"
    );
    let median = |mut values: Vec<f64>| {
        values.sort_by(f64::total_cmp);
        values[values.len() / 2]
    };
    // Each instance's call against its own floor, measured a moment apart: the machine's
    // drift cancels out of the ratio.
    let ratio = median(
        calls
            .iter()
            .zip(&floors)
            .map(|(call, floor)| call / floor)
            .collect(),
    );
    let (call, floor, freed) = (median(calls), median(floors), median(freeing));
    Ok(super::table(
        &[
            "pages merged by the call",
            "merge-now call (median)",
            "memcmp of the range (median)",
            "ratio (median of each call's own)",
            "target ≤ 1.5×",
            "freeing the replaced pages afterwards (scanner CPU)",
        ],
        &[vec![
            merged.to_string(),
            format!("{:.2} ms", call * 1e3),
            format!("{:.2} ms", floor * 1e3),
            format!("{ratio:.2}×"),
            if ratio <= 1.5 { "met" } else { "**missed**" }.into(),
            format!("{:.2} ms", freed * 1e3),
        ]],
    ))
}

/// What the merge-now report says before its table.
const ABOUT: &str = "# Merge now\n\n\
    64 regions of 16 MiB (4,096 pages) hold the same pages. Each owner in turn calls \
    `Engine::merge_now` over its whole region with its guard held, as the `merge-now` \
    guest hint does: no waiting for a pass, no volatility check.\n\n";

/// What the report says before the guest's table.
const GUEST_ABOUT: &str = "\n## From a guest\n\n\
    Two instances of `examples/guests/advice.wat` fill 4,096 pages (16 MiB) with the same \
    bytes and call the guest API's `merge-now` on them, so that they are merged. Then each of \
    fifteen more instances fills the same range and calls `merge-now` on it: the call, from \
    the guest's import to its return, against the floor of comparing those bytes once \
    (`memcmp` of the instance's range against a copy of the first instance's, in the same \
    run). Medians of the fifteen. The call leaves freeing the instance's own copies of the \
    merged pages (`fallocate(PUNCH_HOLE)` of its memfd) to the engine's scanner thread, which \
    does it right after; its CPU for that is the last column.\n\n";
