//! The differential stress run. Owners in two domains write at random under their guards
//! (content shared across regions, unique content, zeros, small writes into merged pages),
//! each write read back at once, while a scanner thread runs passes; between rounds the run
//! interleaves merge-now, advice, unmerge-all, knob changes, growth and region churn, under
//! a sharing limit of [`MAX_SHARING`]. After every round and every operation, a
//! [`checkpoint`]: every page against its shadow copy, the engine's audit and accounting,
//! and the kernel's view.
//!
//! A divergence panics, naming the round and the seed: the same seed replays the run's
//! choices (the threads' interleaving aside).

use std::fs::File;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use samepage_dedup::{Advice, Engine, EngineConfig, Knobs, Owner, PAGE_SIZE};

use crate::kernel::checkpoint;
use crate::{Random, TestRegion, page_content};

/// The sharing limit the run holds the engine to: small, so that chains of dups form.
pub const MAX_SHARING: u32 = 3;
/// Regions the run writes in, half in each of two domains.
pub const REGIONS: usize = 8;

/// How long a run goes on.
#[derive(Clone, Copy, Debug)]
pub enum Until {
    Rounds(u64),
    /// At least this many checked writes.
    Writes(u64),
}

#[derive(Clone, Copy, Debug)]
pub struct Config {
    pub until: Until,
    pub seed: u64,
    /// Writes each owner makes in a round, while the scanner runs.
    pub writes_per_owner: u32,
    /// Pages of each region when it is made.
    pub pages: usize,
    /// The engine's `vm.max_map_count` (`None`: the system's). A small one crowds the map
    /// budget, so that the engine compacts the regions merges leave in pieces.
    pub max_map_count: Option<u64>,
    /// Owners lend their gates while they write (rule 7 of `quiesce`), so the scanner merges
    /// their pages in write-protect windows while they write; they go on writing until the
    /// scanner's passes end, up to `keep_writing` times `writes_per_owner`.
    pub running: bool,
    pub keep_writing: u32,
}

impl Config {
    /// Regions of 96 pages under the system's map-count limit: merges, never compaction.
    pub const SMALL_REGIONS: (usize, Option<u64>) = (96, None);
    /// Regions of 384 pages (three stretches each) under a limit of 3,000 mappings, which
    /// merges crowd: the engine compacts regions all along.
    pub const CROWDED_MAPPINGS: (usize, Option<u64>) = (384, Some(3_000));
}

/// What a run did, so far or in all.
#[derive(Clone, Copy, Debug, Default)]
pub struct Report {
    pub rounds: u64,
    /// Writes made, each read back by its owner at once and checked again at the
    /// checkpoints that follow.
    pub writes: u64,
    /// Pages compared with their shadow copies at checkpoints.
    pub pages_checked: u64,
    /// Highest `pages_sharing` seen at a checkpoint.
    pub peak_sharing: u64,
    /// Stretches the engine compacted onto layout copies.
    pub stretches_compacted: u64,
    /// Visits of running owners' regions, in write-protect windows.
    pub running_visits: u64,
    /// Write-protect windows opened, and writes that waited on one.
    pub windows: (u64, u64),
    /// How long windows that a write waited on were open (bounds on the waits), in
    /// nanoseconds: p50, p99, longest.
    pub waits_ns: [u64; 3],
    pub elapsed: Duration,
}

fn new_region(engine: &Engine, domain: u32, pages: usize) -> TestRegion {
    let mut region = TestRegion::with_owner(engine, Owner::new(domain), pages);
    region.fill(domain_seed(domain), 0..pages);
    region
}

/// The content every region of a domain starts from and keeps writing back.
fn domain_seed(domain: u32) -> u64 {
    u64::from(domain) * 1000 + 3
}

/// Runs the stress until `config.until`, calling `progress` after every round.
pub fn run(config: &Config, mut progress: impl FnMut(&Report)) -> Report {
    let started = Instant::now();
    let seed = config.seed;
    let engine = Engine::new(EngineConfig {
        stable_capacity_bytes: 4 << 30,
        max_map_count: config.max_map_count,
        ..EngineConfig::manual(Knobs {
            max_page_sharing: MAX_SHARING,
            merge_running: config.running,
            // The owners' writes are short: merge them from their first moment.
            merge_running_after: Duration::ZERO,
            ..Knobs::default()
        })
    })
    .expect("engine");
    if config.running {
        engine
            .running_merges()
            .expect("running merges on this kernel");
    }
    let pagemap = File::open("/proc/self/pagemap").expect("pagemap");
    let check = |regions: &[TestRegion], step: &str| {
        checkpoint(&engine, regions, &pagemap, MAX_SHARING, step).1
    };
    let mut random = Random(seed);
    let mut regions: Vec<TestRegion> = (0..REGIONS)
        .map(|n| new_region(&engine, n as u32 % 2, config.pages))
        .collect();
    let mut report = Report::default();
    let done = |report: &Report| match config.until {
        Until::Rounds(rounds) => report.rounds >= rounds,
        Until::Writes(writes) => report.writes >= writes,
    };
    while !done(&report) {
        let round = report.rounds;
        let step = format!("seed {seed:#x}, round {round}");
        report.writes += write_while_scanning(
            &engine,
            &mut regions,
            &mut random,
            (
                config.writes_per_owner,
                config.running.then_some(config.keep_writing),
            ),
            &step,
        );
        engine.scan_pass().expect("pass");
        let stats = engine.stats();
        report.peak_sharing = report.peak_sharing.max(stats.pages_sharing);
        report.stretches_compacted = stats.stretches_compacted;
        report.running_visits = stats.regions_running_visits;
        report.windows = (stats.wp_windows, stats.wp_waiters);
        report.waits_ns = [
            stats.wp_wait_p50_ns,
            stats.wp_wait_p99_ns,
            stats.wp_wait_max_ns,
        ];
        report.pages_checked += check(&regions, &step);
        let operation = between_rounds(&engine, &mut regions, &mut random, &check, &step);
        report.pages_checked += check(&regions, &format!("{step}, after operation {operation}"));
        report.rounds += 1;
        report.elapsed = started.elapsed();
        progress(&report);
    }
    report
}

/// Owners write in their own threads, each write read back at once, while a scanner thread
/// runs passes. Running owners (`keep_writing` given) write with their gates lent, at least
/// `writes` times and until the passes end (at most `keep_writing` times as many), and check
/// a page chosen at random after every write too; returns the writes made.
fn write_while_scanning(
    engine: &Engine,
    regions: &mut [TestRegion],
    random: &mut Random,
    (writes, keep_writing): (u32, Option<u32>),
    step: &str,
) -> u64 {
    let seeds: Vec<u64> = regions.iter().map(|_| random.next_u64()).collect();
    let scanning = AtomicBool::new(true);
    let made = AtomicU64::new(0);
    let running = keep_writing.is_some();
    std::thread::scope(|scope| {
        let scanner = scope.spawn(|| {
            for _ in 0..3 {
                engine.scan_pass().expect("pass");
            }
            scanning.store(false, Ordering::Release);
        });
        let writers: Vec<_> = regions
            .iter_mut()
            .zip(seeds)
            .enumerate()
            .map(|(n, (region, seed))| {
                let (scanning, made) = (&scanning, &made);
                scope.spawn(move || {
                    let mut random = Random(seed);
                    let domain_seed = domain_seed(region.owner.domain());
                    let pages = region.pages();
                    let lent = running.then(|| region.owner.enter().lend());
                    let write = |region: &mut TestRegion, offset: usize, bytes: &[u8]| {
                        if running {
                            region.write_running(offset, bytes)
                        } else {
                            region.write(offset, bytes)
                        }
                    };
                    let matches = |region: &TestRegion, page: usize| {
                        if running {
                            region.page_matches_shadow_running(page)
                        } else {
                            region.page_matches_shadow(page)
                        }
                    };
                    let mut count = 0;
                    while count < writes
                        || (running
                            && count < writes * keep_writing.unwrap_or(1)
                            && scanning.load(Ordering::Acquire))
                    {
                        count += 1;
                        let page = random.below(pages);
                        match random.below(4) {
                            0 => write(region, page * PAGE_SIZE, &page_content(domain_seed, page)),
                            1 => write(
                                region,
                                page * PAGE_SIZE,
                                &page_content(random.next_u64(), page),
                            ),
                            2 => write(region, page * PAGE_SIZE, &[0; PAGE_SIZE]),
                            _ => {
                                let offset = page * PAGE_SIZE + random.below(PAGE_SIZE - 8);
                                write(region, offset, &random.next_u64().to_le_bytes());
                            }
                        }
                        assert!(
                            matches(region, page),
                            "{step}: region {n} page {page} differs from its shadow right after \
                             a write"
                        );
                        let other = random.below(pages);
                        assert!(
                            !running || matches(region, other),
                            "{step}: region {n} page {other} differs from its shadow while its \
                             owner runs"
                        );
                    }
                    made.fetch_add(u64::from(count), Ordering::Relaxed);
                    drop(lent.map(|lent| lent.reclaim()));
                    std::thread::yield_now();
                })
            })
            .collect();
        for writer in writers {
            writer.join().expect("writer");
        }
        scanner.join().expect("scanner");
    });
    made.into_inner()
}

/// With every owner quiescent: one of the engine's other paths, chosen at random (or none).
/// Returns which, for the checkpoint's name.
fn between_rounds(
    engine: &Engine,
    regions: &mut [TestRegion],
    random: &mut Random,
    check: &impl Fn(&[TestRegion], &str) -> u64,
    step: &str,
) -> usize {
    let at = random.below(regions.len());
    let operation = random.below(7);
    match operation {
        0 => {
            let region = &regions[at];
            let guard = region.owner.enter();
            let len = region.pages() * PAGE_SIZE;
            engine
                .merge_now(&guard, region.handle().id(), 0..len)
                .expect("merge-now");
        }
        1 => {
            let first = random.below(regions[at].pages() - 8);
            regions[at]
                .advise(engine, first..first + 8, Advice::Unmergeable)
                .expect("advise");
            check(regions, &format!("{step}, advised"));
            regions[at]
                .advise(engine, first..first + 8, Advice::Mergeable)
                .expect("advise back");
        }
        2 => {
            engine.unmerge_all().expect("unmerge-all");
        }
        3 => {
            let knobs = engine.knobs();
            engine
                .set_knobs(Knobs {
                    use_zero_pages: !knobs.use_zero_pages,
                    smart_scan: !knobs.smart_scan,
                    pages_to_scan: 64 + random.below(4096),
                    ..knobs
                })
                .expect("knobs");
        }
        4 => {
            let pages = regions[at].pages() + 16;
            regions[at].grow(pages);
            let seed = domain_seed(regions[at].owner.domain());
            regions[at].fill(seed, pages - 16..pages);
        }
        5 => {
            let domain = regions[at].owner.domain();
            regions[at] = new_region(engine, domain, regions[at].pages());
        }
        _ => {}
    }
    operation
}
