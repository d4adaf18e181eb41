//! The engine's `vmas` against the kernel's own count in `/proc/self/maps`, under churn:
//! merges, windows bridging differing pages with private copies, writes into merged pages
//! (copy-on-write), sharer-left recovery and re-merging. Each region is one mapping of its
//! own memfd before the engine touches it, so the engine's mappings are every region's
//! mappings beyond the first, plus the stable store's view.

mod common;

use common::{Random, TestRegion, manual_engine, page_content};
use samepage_dedup::{Knobs, PAGE_SIZE};

/// The engine's mappings as the kernel counts them: each region's beyond its first, plus
/// the stable store's view.
fn kernel_count<'a>(regions: impl IntoIterator<Item = &'a TestRegion>) -> usize {
    regions.into_iter().map(|r| r.mappings() - 1).sum::<usize>() + 1
}

/// Also, at every pass: every page against its shadow, the engine's audit, and the owners'
/// merged pages against `pages_sharing + pages_shared`.
#[test]
fn vmas_equals_the_kernels_count_under_churn() {
    let engine = manual_engine(Knobs {
        max_page_sharing: 3,
        ..Knobs::default()
    });
    let pages = 256;
    let mut regions: Vec<TestRegion> = (0..8).map(|_| TestRegion::new(&engine, pages)).collect();
    for region in &mut regions {
        region.fill(3, 0..pages);
    }
    let mut random = Random(0x5eed);
    let mut mismatches = Vec::new();
    for round in 0..400 {
        // Writes: some pages get content of their own, some get back the shared content
        // (so that windows bridge differing pages), a few small writes into merged pages.
        for _ in 0..64 {
            let region = random.below(regions.len());
            let page = random.below(pages);
            let content = match random.below(3) {
                0 => page_content(1000 + round as u64 * 16 + region as u64, page),
                1 => page_content(3, page),
                _ => {
                    let mut bytes = page_content(3, page);
                    bytes[random.below(PAGE_SIZE)] ^= 0x5a;
                    bytes
                }
            };
            regions[region].write(page * PAGE_SIZE, &content);
        }
        if round % 50 == 49 {
            // Region churn: one goes, a new one takes its place.
            let at = random.below(regions.len());
            regions[at] = TestRegion::new(&engine, pages);
            regions[at].fill(3, 0..pages);
        }
        engine.scan_pass().expect("pass");
        let stats = engine.stats();
        let kernel = kernel_count(&regions);
        if stats.vmas as usize != kernel {
            mismatches.push((round, stats.vmas, kernel));
        }
        common::kernel::check_engine(&engine, &regions, 3, &format!("round {round}"));
    }
    assert!(
        mismatches.is_empty(),
        "(round, engine's vmas, kernel's) where they differ: {mismatches:?}"
    );
}

/// The defect issue 12 reported: two windows of a region onto consecutive slots, each with a
/// private copy made after its own `mmap`, hold different anonymous-memory roots
/// (`anon_vma`), so when merging the pages between them makes the slots consecutive the
/// kernel cannot join them: a stays two mappings, which the engine counted as one. With
/// private copies in one window only, or in neither, the kernel joins them.
#[test]
fn windows_with_private_copies_joined_by_a_merge_are_counted_as_the_kernel_counts_them() {
    // Smart scan would skip a's pages that long matched nothing.
    let engine = manual_engine(Knobs {
        smart_scan: false,
        ..Knobs::default()
    });
    let pages = 64;
    // b and c share all 64 pages: one stable run of consecutive slots.
    let mut b = TestRegion::new(&engine, pages);
    let mut c = TestRegion::new(&engine, pages);
    b.fill(3, 0..pages);
    c.fill(3, 0..pages);
    let mut a = TestRegion::new(&engine, pages);
    a.fill(77, 0..pages);
    let passes = |n| {
        for _ in 0..n {
            engine.scan_pass().expect("pass");
        }
    };
    passes(2);
    let check = |step: &str, regions: [&TestRegion; 3]| {
        let stats = engine.stats();
        let counts: Vec<usize> = regions.iter().map(|r| r.mappings()).collect();
        assert_eq!(
            stats.vmas as usize,
            kernel_count(regions),
            "{step}: the regions have {counts:?} mappings; {stats:?}"
        );
        for region in regions {
            region.assert_matches_shadow();
        }
    };
    check("b and c merged", [&a, &b, &c]);
    // a takes the shared bytes in two stretches, one after the other, each but one page:
    // each stretch is a window onto the run's slots with a private copy of its own.
    for (stretch, odd) in [(0..17, 5), (27..64, 40)] {
        for page in stretch {
            if page != odd {
                a.write(page * PAGE_SIZE, &page_content(3, page));
            }
        }
        passes(8);
        check("a window", [&a, &b, &c]);
    }
    // Then the pages between: the two windows' slots and theirs are consecutive.
    for page in 17..27 {
        a.write(page * PAGE_SIZE, &page_content(3, page));
    }
    passes(8);
    check("the gap merged", [&a, &b, &c]);
}
