//! Small measurements of single mechanisms: the first write to a merged page, and merge-now.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rustix::mm::{Advice, MapFlags, ProtFlags, madvise, mmap_anonymous, munmap};
use samepage_dedup::{Engine, EngineConfig, Knobs, MemfdMapping, Owner, PAGE_SIZE};

use crate::ksm::KsmSysfs;
use crate::measure::thread_cpu_seconds;

/// Pages per region in these measurements: 64 MiB.
const PAGES: usize = 16_384;

/// Fills `pages` pages at `base` with content that depends only on the page index.
///
/// # Safety
/// `base` points to `pages` writable pages nobody else touches meanwhile.
unsafe fn fill(base: *mut u8, pages: usize) {
    // SAFETY: the caller's contract.
    let memory = unsafe { std::slice::from_raw_parts_mut(base, pages * PAGE_SIZE) };
    for (page, bytes) in memory.chunks_exact_mut(PAGE_SIZE).enumerate() {
        for (word, chunk) in bytes.chunks_exact_mut(8).enumerate() {
            chunk.copy_from_slice(&(((page as u64) << 20) ^ word as u64 ^ 0xC0FFEE).to_le_bytes());
        }
    }
}

/// Microseconds per first write, writing one byte into each of `pages` pages at `base`.
///
/// # Safety
/// As for [`fill`].
unsafe fn time_first_writes(base: *mut u8, pages: usize) -> f64 {
    let start = Instant::now();
    for page in 0..pages {
        // SAFETY: the caller's contract; volatile so the write is not elided.
        unsafe { base.add(page * PAGE_SIZE + 17).write_volatile(0xAB) };
    }
    start.elapsed().as_secs_f64() * 1e6 / pages as f64
}

fn samepage_cow_us() -> Result<(f64, f64)> {
    let engine = Engine::new(EngineConfig {
        scanner: false,
        ..EngineConfig::default()
    })?;
    let len = PAGES * PAGE_SIZE;
    let owners = [Owner::new(0), Owner::new(0)];
    let mut mappings = Vec::new();
    for owner in &owners {
        let mapping = MemfdMapping::new(Some(&engine), owner, "cow-bench", len, len, 0)?;
        let _guard = owner.enter();
        // SAFETY: a fresh mapping of `len` bytes, its owner's guard held.
        unsafe { fill(mapping.as_ptr(), PAGES) };
        mappings.push(mapping);
    }
    engine.scan_pass()?;
    engine.scan_pass()?;
    if engine.stats().pages_sharing < PAGES as u64 {
        bail!(
            "samepage merged only {} pages",
            engine.stats().pages_sharing
        );
    }
    let _guard = owners[1].enter();
    // SAFETY: the mapping's `len` bytes, its owner's guard held.
    let merged = unsafe { time_first_writes(mappings[1].as_ptr(), PAGES) };
    // The same pages again: now private, the write costs no fault.
    // SAFETY: as above.
    let private = unsafe { time_first_writes(mappings[1].as_ptr(), PAGES) };
    Ok((merged, private))
}

fn ksm_cow_us() -> Result<f64> {
    let sysfs = KsmSysfs::system();
    sysfs.check_usable()?;
    let len = PAGES * PAGE_SIZE;
    let mut regions = Vec::new();
    for _ in 0..2 {
        // SAFETY: a fresh private anonymous mapping, ours until the munmap below.
        let base = unsafe {
            mmap_anonymous(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::PRIVATE,
            )
        }?;
        // SAFETY: the mapping just made; neither advice changes what it holds. Huge pages
        // would make the first write after merging a split, not a copy-on-write.
        unsafe {
            madvise(base, len, Advice::LinuxNoHugepage)?;
            fill(base.cast(), PAGES);
            madvise(base, len, Advice::LinuxMergeable)?;
        }
        regions.push(base);
    }
    let session = sysfs.configure(&[
        ("pages_to_scan", 100_000),
        ("sleep_millisecs", 0),
        ("run", 1),
    ])?;
    let deadline = Instant::now() + Duration::from_secs(60);
    // This process's own count: the system-wide one also moves with other processes' pages.
    while merging_pages()? < 2 * PAGES as u64 {
        if Instant::now() > deadline {
            bail!("KSM did not merge the pages within 60 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: the second region's `len` bytes, ours.
    let us = unsafe { time_first_writes(regions[1].cast(), PAGES) };
    drop(session);
    for base in regions {
        // SAFETY: the mappings made above, no longer used.
        unsafe { munmap(base, len)? };
    }
    Ok(us)
}

/// Pages of this process that KSM merged (`/proc/self/ksm_merging_pages`).
fn merging_pages() -> Result<u64> {
    let text = std::fs::read_to_string("/proc/self/ksm_merging_pages")
        .context("reading /proc/self/ksm_merging_pages")?;
    Ok(text.trim().parse()?)
}

/// µs per first write to a merged page (the kernel's copy-on-write), samepage against KSM.
pub fn cow_fault() -> Result<String> {
    let (samepage, private) = samepage_cow_us().context("samepage's copy-on-write")?;
    let ksm = match ksm_cow_us() {
        Ok(us) => format!("{us:.2} µs"),
        Err(error) => format!("not measured: {error:#}"),
    };
    Ok(format!(
        "# The first write to a merged page\n\n\
         Two regions of 16,384 pages with identical content are merged; then one byte is \
         written into each page of one region, and the loop is timed. For samepage the page \
         is a `MAP_PRIVATE` mapping of a stable memfd page; for KSM an anonymous page KSM \
         merged. The write after that (to the now private page) is shown for reference.\n\n{}",
        super::table(
            &["merger", "first write to a merged page", "a later write"],
            &[
                vec![
                    "samepage".into(),
                    format!("{samepage:.2} µs"),
                    format!("{private:.3} µs")
                ],
                vec!["Linux KSM".into(), ksm, "-".into()],
            ],
        )
    ))
}

/// The merge-now API on 64 regions of 16 MiB holding the same pages.
pub fn merge_now() -> Result<String> {
    let instances = 64;
    let pages = 4096;
    let engine = Engine::new(EngineConfig {
        scanner: false,
        knobs: Knobs::default(),
        ..EngineConfig::default()
    })?;
    let len = pages * PAGE_SIZE;
    let mut regions = Vec::new();
    for _ in 0..instances {
        let owner = Owner::new(0);
        let mapping = MemfdMapping::new(Some(&engine), &owner, "merge-now-bench", len, len, 0)?;
        let _guard = owner.enter();
        // SAFETY: a fresh mapping of `len` bytes, its owner's guard held.
        unsafe { fill(mapping.as_ptr(), pages) };
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
        "# Merge now\n\n\
         64 regions of 16 MiB (4,096 pages) hold the same pages. Each owner in turn calls \
         `Engine::merge_now` over its whole region with its guard held, as the `merge-now` \
         guest hint does: no waiting for a pass, no volatility check.\n\n{}",
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
