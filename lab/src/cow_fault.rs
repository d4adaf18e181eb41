//! The cow-fault suite: the cost of the first write to a merged page (the kernel's
//! copy-on-write), samepage against KSM.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rustix::mm::{Advice, MapFlags, ProtFlags, madvise, mmap_anonymous, munmap};
use samepage_dedup::{Engine, EngineConfig, Knobs, MemfdMapping, Owner, PAGE_SIZE};

use super::fill_pages;
use crate::ksm::KsmSysfs;

/// Pages per region in these measurements: 64 MiB.
const PAGES: usize = 16_384;

/// Microseconds per first write, writing one byte into each of `pages` pages at `base`.
///
/// # Safety
/// `base` points to `pages` writable pages nobody else touches meanwhile.
unsafe fn time_first_writes(base: *mut u8, pages: usize) -> f64 {
    let start = Instant::now();
    for page in 0..pages {
        // SAFETY: the caller's contract; volatile so the write is not elided.
        unsafe { base.add(page * PAGE_SIZE + 17).write_volatile(0xAB) };
    }
    start.elapsed().as_secs_f64() * 1e6 / pages as f64
}

fn samepage_cow_us() -> Result<(f64, f64)> {
    let engine = Engine::new(EngineConfig::manual(Knobs::default()))?;
    let len = PAGES * PAGE_SIZE;
    let owners = [Owner::new(0), Owner::new(0)];
    let mut mappings = Vec::new();
    for owner in &owners {
        let mapping = MemfdMapping::new(Some(&engine), owner, "cow-bench", len, len, 0)?;
        let _guard = owner.enter();
        // SAFETY: a fresh mapping of `len` bytes, its owner's guard held.
        unsafe { fill_pages(mapping.as_ptr(), PAGES, 0) };
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
            fill_pages(base.cast(), PAGES, 0);
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
pub fn suite() -> Result<String> {
    let (samepage, private) = samepage_cow_us().context("samepage's copy-on-write")?;
    let ksm = match ksm_cow_us() {
        Ok(us) => format!("{us:.2} µs"),
        Err(error) => format!("not measured: {error:#}"),
    };
    Ok(format!(
        "{ABOUT}{}",
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

/// What the cow-fault report says before its table.
const ABOUT: &str = "# The first write to a merged page\n\n\
    Two regions of 16,384 pages with identical content are merged; then one byte is \
    written into each page of one region, and the loop is timed. For samepage the page \
    is a `MAP_PRIVATE` mapping of a stable memfd page; for KSM an anonymous page KSM \
    merged. The write after that (to the now private page) is shown for reference.\n\n";
