//! Differential stress against the kernel's view. Owners in two domains write at random
//! under their guards (content shared across regions, unique content, zeros, small writes
//! into merged pages) while a scanner thread runs passes; between rounds the test
//! interleaves merge-now, advice, unmerge-all, knob changes, growth and region churn, under a
//! sharing limit of 3. At every checkpoint:
//!
//! - every page against its shadow copy;
//! - the engine's audit, and the owners' merged pages against `pages_sharing + pages_shared`;
//! - the kernel's view, from `/proc/self/maps` and `/proc/self/pagemap` (no privileges
//!   needed): every mapping inside a region maps its own memfd or the stable memfd; a page
//!   whose mapping is the stable memfd's and whose page is not an anonymous copy shares
//!   that stable page; no stable page has more sharers than the limit, nor sharers of two
//!   domains; and the real mapping count equals the engine's `vmas`.
//!
//! `SAMEPAGE_STRESS_ROUNDS` runs longer (the default is CI's short form); a failure names the
//! round and the seed (`SAMEPAGE_STRESS_SEED`) replays the run's choices.

mod common;

use std::fs::File;

use common::{Random, TestRegion, manual_engine, page_content};
use samepage_dedup::{Advice, Engine, Knobs, Owner, PAGE_SIZE};

const MAX_SHARING: u32 = 3;
const PAGES: usize = 96;

fn checkpoint(engine: &Engine, regions: &[TestRegion], pagemap: &File, step: &str) -> u64 {
    common::kernel::checkpoint(engine, regions, pagemap, MAX_SHARING, step).1
}

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn new_region(engine: &Engine, domain: u32) -> TestRegion {
    let mut region = TestRegion::with_owner(engine, Owner::new(domain), PAGES);
    region.fill(u64::from(domain) * 1000 + 3, 0..PAGES);
    region
}

#[test]
fn owners_writing_under_merging_agree_with_their_shadows_and_the_kernel() {
    let rounds = env_or("SAMEPAGE_STRESS_ROUNDS", 300);
    let seed = env_or("SAMEPAGE_STRESS_SEED", 0x5eed);
    let engine = manual_engine(Knobs {
        max_page_sharing: MAX_SHARING,
        ..Knobs::default()
    });
    let pagemap = File::open("/proc/self/pagemap").expect("pagemap");
    let mut random = Random(seed);
    let mut regions: Vec<TestRegion> = (0..8).map(|n| new_region(&engine, n % 2)).collect();
    let (mut writes, mut pages_checked, mut peak_sharing) = (0u64, 0u64, 0u64);
    for round in 0..rounds {
        let step = format!("seed {seed:#x}, round {round}");
        // Owners write in their own threads while a scanner thread runs passes.
        let seeds: Vec<u64> = regions.iter().map(|_| random.next()).collect();
        std::thread::scope(|scope| {
            let scanner = scope.spawn(|| {
                for _ in 0..3 {
                    engine.scan_pass().expect("pass");
                }
            });
            let writers: Vec<_> = regions
                .iter_mut()
                .zip(seeds)
                .map(|(region, seed)| {
                    scope.spawn(move || {
                        let mut random = Random(seed);
                        let domain_seed = u64::from(region.owner.domain()) * 1000 + 3;
                        let pages = region.pages();
                        for _ in 0..48 {
                            let page = random.below(pages);
                            let content = match random.below(4) {
                                0 => page_content(domain_seed, page),
                                1 => page_content(random.next(), page),
                                2 => vec![0; PAGE_SIZE],
                                _ => {
                                    let offset = page * PAGE_SIZE + random.below(PAGE_SIZE - 8);
                                    region.write(offset, &random.next().to_le_bytes());
                                    continue;
                                }
                            };
                            region.write(page * PAGE_SIZE, &content);
                        }
                        std::thread::yield_now();
                    })
                })
                .collect();
            for writer in writers {
                writer.join().expect("writer");
            }
            scanner.join().expect("scanner");
        });
        writes += 48 * regions.len() as u64;
        engine.scan_pass().expect("pass");
        peak_sharing = peak_sharing.max(engine.stats().pages_sharing);
        pages_checked += checkpoint(&engine, &regions, &pagemap, &step);
        // Between rounds, with every owner quiescent: one of the engine's other paths.
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
                let first = random.below(PAGES - 8);
                regions[at]
                    .advise(&engine, first..first + 8, Advice::Unmergeable)
                    .expect("advise");
                checkpoint(&engine, &regions, &pagemap, &format!("{step}, advised"));
                regions[at]
                    .advise(&engine, first..first + 8, Advice::Mergeable)
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
                let domain_seed = u64::from(regions[at].owner.domain()) * 1000 + 3;
                regions[at].fill(domain_seed, pages - 16..pages);
            }
            5 => {
                let domain = regions[at].owner.domain();
                regions[at] = new_region(&engine, domain);
            }
            _ => {}
        }
        pages_checked += checkpoint(
            &engine,
            &regions,
            &pagemap,
            &format!("{step}, after operation {operation}"),
        );
    }
    assert!(peak_sharing > 0, "merging happened");
    eprintln!(
        "stress: {rounds} rounds, {writes} writes, {pages_checked} pages checked, \
         peak pages_sharing {peak_sharing}"
    );
}
