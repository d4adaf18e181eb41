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

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;

use common::{Random, TestRegion, manual_engine, page_content};
use samepage_dedup::{Advice, Engine, Knobs, Owner, PAGE_SIZE};

const MAX_SHARING: u32 = 3;
const PAGES: usize = 96;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One line of `/proc/self/maps`: its range, and the file it maps (inode and offset), if
/// any, or its name.
struct Mapping {
    range: std::ops::Range<usize>,
    inode: u64,
    offset: u64,
    name: String,
}

fn mappings() -> Vec<Mapping> {
    std::fs::read_to_string("/proc/self/maps")
        .expect("maps")
        .lines()
        .map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (a, b) = fields[0].split_once('-').expect("range");
            Mapping {
                range: usize::from_str_radix(a, 16).expect("hex")
                    ..usize::from_str_radix(b, 16).expect("hex"),
                offset: u64::from_str_radix(fields[2], 16).expect("offset"),
                inode: fields[4].parse().expect("inode"),
                name: fields
                    .get(5..)
                    .map(|rest| rest.join(" "))
                    .unwrap_or_default(),
            }
        })
        .collect()
}

/// The kernel's view of the regions, checked against the engine's.
fn check_kernel_view(engine: &Engine, regions: &[TestRegion], pagemap: &File, step: &str) {
    const PRESENT: u64 = 1 << 63;
    const FILE_OR_SHARED: u64 = 1 << 61;
    let maps = mappings();
    let stable_inodes: Vec<u64> = maps
        .iter()
        .filter(|m| m.name.starts_with("/memfd:samepage-stable"))
        .map(|m| m.inode)
        .collect();
    assert!(!stable_inodes.is_empty(), "{step}: the stable store's view");
    let stable_inode = stable_inodes[0];
    // Stable page -> (sharers, domain of the first).
    let mut sharers: HashMap<u64, (u32, u32)> = HashMap::new();
    let (mut region_mappings, mut own_mappings) = (0, 0);
    for (n, region) in regions.iter().enumerate() {
        let range = region.addresses();
        let own = region.memfd_inode();
        let mut entries = vec![0u8; region.pages() * 8];
        pagemap
            .read_exact_at(&mut entries, (range.start / PAGE_SIZE * 8) as u64)
            .expect("pagemap");
        for mapping in maps
            .iter()
            .filter(|m| m.range.start < range.end && m.range.end > range.start)
        {
            region_mappings += 1;
            assert!(
                mapping.range.start >= range.start && mapping.range.end <= range.end,
                "{step}: a mapping crosses region {n}'s bounds"
            );
            if mapping.inode == own {
                own_mappings += 1;
                continue;
            }
            assert_eq!(
                mapping.inode, stable_inode,
                "{step}: region {n} maps {} at {:#x}, neither its memfd nor the stable one",
                mapping.name, mapping.range.start
            );
            for addr in mapping.range.clone().step_by(PAGE_SIZE) {
                let page = (addr - range.start) / PAGE_SIZE;
                let entry = u64::from_le_bytes(entries[page * 8..page * 8 + 8].try_into().unwrap());
                let private = entry & PRESENT != 0 && entry & FILE_OR_SHARED == 0;
                if private {
                    continue;
                }
                let slot =
                    (mapping.offset + (addr - mapping.range.start) as u64) / PAGE_SIZE as u64;
                let domain = region.owner.domain();
                let entry = sharers.entry(slot).or_insert((0, domain));
                entry.0 += 1;
                assert_eq!(
                    entry.1, domain,
                    "{step}: stable page {slot} is shared by domains {} and {domain}",
                    entry.1
                );
            }
        }
    }
    if let Some((slot, (count, _))) = sharers.iter().max_by_key(|(_, (count, _))| *count) {
        assert!(
            *count <= MAX_SHARING,
            "{step}: stable page {slot} has {count} sharers"
        );
    }
    // Each region is one mapping before the engine touches it; the engine counts the rest,
    // plus the stable store's view.
    let view = stable_inodes.len() - (region_mappings - own_mappings);
    let engine_mappings = region_mappings - regions.len() + view;
    assert_eq!(
        engine.stats().vmas as usize,
        engine_mappings,
        "{step}: the engine's vmas against the kernel's mappings"
    );
}

fn checkpoint(engine: &Engine, regions: &[TestRegion], pagemap: &File, step: &str) -> u64 {
    let mut checked = 0;
    for (n, region) in regions.iter().enumerate() {
        let bytes = region.bytes();
        if let Some(page) = (0..region.pages()).find(|&p| {
            bytes[p * PAGE_SIZE..(p + 1) * PAGE_SIZE]
                != region.shadow[p * PAGE_SIZE..(p + 1) * PAGE_SIZE]
        }) {
            panic!("{step}: region {n} page {page} differs from its shadow copy");
        }
        checked += region.pages() as u64;
    }
    let audit = engine.audit();
    assert!(
        audit.mismatched_slots.is_empty() && audit.index_sound && audit.max_sharers <= MAX_SHARING,
        "{step}: {audit:?}"
    );
    let stats = engine.stats();
    assert_eq!(stats.errors, 0, "{step}: {:?}", engine.last_error());
    let merged: u64 = regions
        .iter()
        .map(|region| engine.owner_stats(region.owner.id()).pages_merged)
        .sum();
    assert_eq!(
        merged,
        stats.pages_sharing + stats.pages_shared,
        "{step}: the owners' merged pages against the engine's"
    );
    check_kernel_view(engine, regions, pagemap, step);
    checked
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
