//! The kernel's view of test regions, read without privileges from `/proc/self/maps` and
//! `/proc/self/pagemap`, and checked against the engine's own account.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;

use samepage_dedup::{Engine, PAGE_SIZE};

use crate::TestRegion;

/// What backs one page of a region, as the kernel's page tables say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backing {
    /// The region's own memfd.
    Own,
    /// Shares slot `slot` of the stable store, copy-on-write.
    Stable { slot: u64 },
    /// A private anonymous copy over a stable slot: the owner's write to a stable page, or a
    /// page a merged window bridges.
    PrivateCopy,
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

/// Every page of every region, as the kernel backs it, plus the mappings it took.
pub struct KernelView {
    /// Per region, per page.
    pub pages: Vec<Vec<Backing>>,
    /// Mappings the engine made: inside regions beyond each region's first, plus the stable
    /// store's views.
    pub engine_mappings: usize,
}

impl KernelView {
    /// Reads the view; panics (naming `step`) on a mapping inside a region that is neither
    /// its memfd nor the stable store's, or one that crosses a region's bounds.
    pub fn read(regions: &[TestRegion], pagemap: &File, step: &str) -> Self {
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
        let (mut region_mappings, mut own_mappings) = (0, 0);
        let mut pages = Vec::with_capacity(regions.len());
        for (n, region) in regions.iter().enumerate() {
            let range = region.addresses();
            let own = region.memfd_inode();
            let mut entries = vec![0u8; region.pages() * 8];
            pagemap
                .read_exact_at(&mut entries, (range.start / PAGE_SIZE * 8) as u64)
                .expect("pagemap");
            let entry = |page: usize| {
                u64::from_le_bytes(entries[page * 8..page * 8 + 8].try_into().expect("entry"))
            };
            let mut backing = vec![Backing::Own; region.pages()];
            for mapping in maps
                .iter()
                .filter(|m| m.range.start < range.end && m.range.end > range.start)
            {
                region_mappings += 1;
                assert!(
                    mapping.range.start >= range.start && mapping.range.end <= range.end,
                    "{step}: a mapping crosses region {n}'s bounds"
                );
                let own_mapping = mapping.inode == own;
                own_mappings += usize::from(own_mapping);
                assert!(
                    own_mapping || mapping.inode == stable_inode,
                    "{step}: region {n} maps {} at {:#x}, neither its memfd nor the stable one",
                    mapping.name,
                    mapping.range.start
                );
                for addr in mapping.range.clone().step_by(PAGE_SIZE) {
                    let page = (addr - range.start) / PAGE_SIZE;
                    let entry = entry(page);
                    backing[page] = if own_mapping {
                        Backing::Own
                    } else if entry & PRESENT != 0 && entry & FILE_OR_SHARED == 0 {
                        Backing::PrivateCopy
                    } else {
                        Backing::Stable {
                            slot: (mapping.offset + (addr - mapping.range.start) as u64)
                                / PAGE_SIZE as u64,
                        }
                    };
                }
            }
            pages.push(backing);
        }
        // Each region is one mapping before the engine touches it; the engine counts the rest,
        // plus the stable store's view.
        let view = stable_inodes.len() - (region_mappings - own_mappings);
        Self {
            pages,
            engine_mappings: region_mappings - regions.len() + view,
        }
    }

    /// Checks the view against the engine: no stable page with more than `max_sharing`
    /// sharers or with sharers of two domains, and as many mappings as the engine's `vmas`.
    pub fn check(&self, engine: &Engine, regions: &[TestRegion], max_sharing: u32, step: &str) {
        // Stable page -> (sharers, domain of the first).
        let mut sharers: HashMap<u64, (u32, u32)> = HashMap::new();
        for (region, pages) in regions.iter().zip(&self.pages) {
            let domain = region.owner.domain();
            for backing in pages {
                if let Backing::Stable { slot } = backing {
                    let entry = sharers.entry(*slot).or_insert((0, domain));
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
                *count <= max_sharing,
                "{step}: stable page {slot} has {count} sharers"
            );
        }
        assert_eq!(
            engine.stats().vmas as usize,
            self.engine_mappings,
            "{step}: the engine's vmas against the kernel's mappings"
        );
    }
}

/// Every page against its shadow, the engine's audit, and the owners' merged pages against
/// `pages_sharing + pages_shared`, with every owner quiescent; returns the pages checked.
pub fn check_engine(engine: &Engine, regions: &[TestRegion], max_sharing: u32, step: &str) -> u64 {
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
        audit.mismatched_slots.is_empty() && audit.index_sound && audit.max_sharers <= max_sharing,
        "{step}: {audit:?}"
    );
    let stats = engine.stats();
    let merged: u64 = regions
        .iter()
        .map(|region| engine.owner_stats(region.owner.id()).pages_merged)
        .sum();
    assert_eq!(
        merged,
        stats.pages_sharing + stats.pages_shared,
        "{step}: the owners' merged pages against the engine's"
    );
    checked
}

/// Everything a checkpoint checks: [`check_engine`], no engine errors, and the kernel's
/// view. Returns the view and the pages checked.
pub fn checkpoint(
    engine: &Engine,
    regions: &[TestRegion],
    pagemap: &File,
    max_sharing: u32,
    step: &str,
) -> (KernelView, u64) {
    let checked = check_engine(engine, regions, max_sharing, step);
    assert_eq!(
        engine.stats().errors,
        0,
        "{step}: {:?}",
        engine.last_error()
    );
    let view = KernelView::read(regions, pagemap, step);
    view.check(engine, regions, max_sharing, step);
    (view, checked)
}
