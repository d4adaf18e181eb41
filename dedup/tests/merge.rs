//! The merge engine on plain memfd regions: merging, sharers leaving, the map-count budget,
//! unmerging and the quiescence contract, each checked against shadow copies.

mod common;

use common::{TestRegion, manual_engine, page_content};
use samepage_dedup::{Knobs, PAGE_SIZE, RunMode};

/// Two passes: the first records checksums, the second merges what stayed the same.
fn settle(engine: &samepage_dedup::Engine) {
    passes(engine, 2);
}

fn passes(engine: &samepage_dedup::Engine, count: usize) {
    for _ in 0..count {
        engine.scan_pass().expect("pass");
    }
}

#[test]
fn identical_runs_merge_into_one_mapping_each() {
    let engine = manual_engine(Knobs::default());
    let mut regions: Vec<TestRegion> = (0..4).map(|_| TestRegion::new(&engine, 64)).collect();
    for region in &mut regions {
        region.fill(7, 0..64);
    }
    settle(&engine);
    let stats = engine.stats();
    assert_eq!(stats.pages_shared, 64);
    assert_eq!(stats.pages_sharing, 3 * 64);
    for region in &regions {
        region.assert_matches_shadow();
        assert_eq!(region.mappings(), 1, "a merged run is one mapping");
        assert_eq!(region.own_resident_pages(), 0, "own copies are freed");
    }
    assert_eq!(engine.audit().mismatched_slots, Vec::<u32>::new());
}

#[test]
fn single_pages_merge_among_unique_ones() {
    let engine = manual_engine(Knobs::default());
    let mut a = TestRegion::new(&engine, 16);
    let mut b = TestRegion::new(&engine, 16);
    a.fill(1, 0..16);
    b.fill(2, 0..16);
    let shared = page_content(99, 5);
    a.write(5 * PAGE_SIZE, &shared);
    b.write(9 * PAGE_SIZE, &shared);
    settle(&engine);
    let stats = engine.stats();
    assert_eq!((stats.pages_shared, stats.pages_sharing), (1, 1));
    a.assert_matches_shadow();
    b.assert_matches_shadow();
    assert_eq!(
        a.mappings(),
        3,
        "an isolated merged page splits its region in three"
    );
    assert_eq!(stats.vmas, 1 + 2 + 2);
}

#[test]
fn a_write_leaves_the_stable_page_and_the_last_sharer_frees_it() {
    let engine = manual_engine(Knobs::default());
    let mut a = TestRegion::new(&engine, 8);
    let mut b = TestRegion::new(&engine, 8);
    a.fill(3, 0..8);
    b.fill(3, 0..8);
    settle(&engine);
    assert_eq!(engine.stats().pages_sharing, 8);

    // A write in one instance is never visible in the other.
    a.write(2 * PAGE_SIZE + 100, b"written by a");
    a.assert_matches_shadow();
    b.assert_matches_shadow();

    engine.scan_pass().expect("pass");
    let stats = engine.stats();
    assert_eq!((stats.pages_shared, stats.pages_sharing), (8, 7));
    assert_eq!(
        a.own_resident_pages(),
        1,
        "the written page is back in a's memfd"
    );
    a.assert_matches_shadow();
    b.assert_matches_shadow();

    b.write(2 * PAGE_SIZE, b"and b too");
    engine.scan_pass().expect("pass");
    let stats = engine.stats();
    assert_eq!(stats.pages_shared, 7, "no one maps the old page 2 any more");
    a.assert_matches_shadow();
    b.assert_matches_shadow();
    assert!(engine.audit().mismatched_slots.is_empty());
}

#[test]
fn unregistering_releases_all_sharing() {
    let engine = manual_engine(Knobs::default());
    let mut a = TestRegion::new(&engine, 8);
    let mut b = TestRegion::new(&engine, 8);
    let mut c = TestRegion::new(&engine, 8);
    for r in [&mut a, &mut b, &mut c] {
        r.fill(4, 0..8);
    }
    settle(&engine);
    assert_eq!(engine.stats().pages_sharing, 16);
    drop(a);
    assert_eq!(engine.stats().pages_sharing, 8);
    drop(b);
    let stats = engine.stats();
    assert_eq!((stats.pages_shared, stats.pages_sharing), (8, 0));
    c.assert_matches_shadow();
    drop(c);
    let stats = engine.stats();
    assert_eq!((stats.pages_shared, stats.vmas, stats.regions), (0, 1, 0));
}

#[test]
fn unmerge_all_restores_every_byte_and_the_mapping_count() {
    let engine = manual_engine(Knobs::default());
    let mut regions: Vec<TestRegion> = (0..3).map(|_| TestRegion::new(&engine, 32)).collect();
    for (i, region) in regions.iter_mut().enumerate() {
        region.fill(5, 0..32);
        // Unique pages, more than a window bridges, split the runs.
        region.fill(100 + i as u64, 10..20);
    }
    settle(&engine);
    assert!(engine.stats().pages_sharing > 0);
    assert!(regions[0].mappings() > 1);
    regions[1].write(20 * PAGE_SIZE, b"a write before unmerging");

    engine
        .set_knobs(Knobs {
            run: RunMode::UnmergeAll,
            ..Knobs::default()
        })
        .expect("knobs");
    let unmerge = manual_engine_unmerge(&engine);
    assert_eq!(unmerge, 0);
    let stats = engine.stats();
    assert_eq!(
        (stats.pages_shared, stats.pages_sharing, stats.vmas),
        (0, 0, 1)
    );
    for region in &regions {
        region.assert_matches_shadow();
        assert_eq!(region.mappings(), 1);
        assert_eq!(region.own_resident_pages(), 32);
    }
}

/// Unmerges everything through the public API (the background scanner does the same when
/// its run mode is `UnmergeAll`), returning how many regions were busy.
fn manual_engine_unmerge(engine: &samepage_dedup::Engine) -> usize {
    engine.unmerge_all().expect("unmerge")
}

#[test]
fn busy_owners_are_skipped_and_counted() {
    let engine = manual_engine(Knobs::default());
    let mut a = TestRegion::new(&engine, 8);
    let mut b = TestRegion::new(&engine, 8);
    a.fill(6, 0..8);
    b.fill(6, 0..8);
    let guard_a = a.owner.enter();
    let guard_b = b.owner.enter();
    settle(&engine);
    let stats = engine.stats();
    assert_eq!(stats.pages_sharing, 0);
    assert!(stats.regions_busy_skips >= 4);
    drop((guard_a, guard_b));
    settle(&engine);
    assert_eq!(engine.stats().pages_sharing, 8);
    a.assert_matches_shadow();
}

#[test]
fn merge_now_skips_the_waiting_pass() {
    let engine = manual_engine(Knobs::default());
    let mut a = TestRegion::new(&engine, 16);
    let mut b = TestRegion::new(&engine, 16);
    a.fill(8, 0..16);
    b.fill(8, 0..16);
    {
        let guard = a.owner.enter();
        let report = engine
            .merge_now(&guard, a.handle(), 0..16 * PAGE_SIZE)
            .expect("merge a");
        assert_eq!(report.pages_merged, 0, "nothing to match yet");
    }
    let guard = b.owner.enter();
    let report = engine
        .merge_now(&guard, b.handle(), 0..16 * PAGE_SIZE)
        .expect("merge b");
    assert_eq!(report.pages_merged, 16);
    drop(guard);
    assert_eq!(engine.stats().pages_sharing, 16);
    a.assert_matches_shadow();
    b.assert_matches_shadow();

    let guard = b.owner.enter();
    let error = engine
        .merge_now(&guard, b.handle(), 0..17 * PAGE_SIZE)
        .unwrap_err();
    assert!(error.to_string().contains("outside region"), "{error}");
    let error = engine
        .merge_now(&guard, a.handle(), 0..PAGE_SIZE)
        .unwrap_err();
    assert!(error.to_string().contains("another owner"), "{error}");
}

#[test]
fn the_map_count_budget_is_never_exceeded() {
    // 1% of vm.max_map_count (about 655 mappings) cannot hold 400 merged pages each too far
    // from the next for a window to bridge.
    let engine = manual_engine(Knobs {
        map_budget_percent: 1,
        ..Knobs::default()
    });
    let a = sparse_region(&engine, 4000, 1, 50);
    let b = sparse_region(&engine, 4000, 2, 50);
    settle(&engine);
    let stats = engine.stats();
    assert!(stats.vmas <= stats.map_budget, "{stats:?}");
    assert!(stats.pages_skipped_map_budget > 0, "{stats:?}");
    assert!(stats.pages_sharing > 0 && stats.pages_sharing < 400);
    a.assert_matches_shadow();
    b.assert_matches_shadow();
    assert_eq!(a.mappings() + b.mappings() - 2 + 1, stats.vmas as usize);
}

#[test]
fn zero_pages_are_punched_not_merged() {
    let engine = manual_engine(Knobs::default());
    let mut a = TestRegion::new(&engine, 8);
    a.fill(9, 0..8);
    a.write(3 * PAGE_SIZE, &[0; PAGE_SIZE]);
    a.write(4 * PAGE_SIZE, &[0; PAGE_SIZE]);
    settle(&engine);
    let stats = engine.stats();
    assert_eq!((stats.zero_pages, stats.pages_shared), (2, 0));
    assert_eq!(a.own_resident_pages(), 6);
    assert_eq!(a.mappings(), 1);
    a.assert_matches_shadow();
}

#[test]
fn growth_is_scanned_and_merged() {
    let engine = manual_engine(Knobs::default());
    let mut a = TestRegion::new(&engine, 4);
    let mut b = TestRegion::new(&engine, 4);
    a.grow(12);
    b.grow(12);
    a.fill(11, 0..12);
    b.fill(11, 0..12);
    settle(&engine);
    assert_eq!(engine.stats().pages_sharing, 12);
    a.assert_matches_shadow();
    b.assert_matches_shadow();
}

#[test]
fn unmerge_after_part_of_the_range_was_discarded() {
    // KSM selftest `test_unmerge_discarded`: merge, let the owner discard half of the range
    // (MADV_DONTNEED drops its page-table entries), then unmerge.
    let engine = manual_engine(Knobs::default());
    let mut a = TestRegion::new(&engine, 64);
    let mut b = TestRegion::new(&engine, 64);
    a.fill(12, 0..64);
    b.fill(12, 0..64);
    settle(&engine);
    assert_eq!(engine.stats().pages_sharing, 64);
    a.discard(32..64);
    engine
        .unmerge_region(&a.owner.enter(), a.handle())
        .expect("unmerge");
    assert_eq!(engine.owner_stats(a.owner.id()).pages_merged, 0);
    assert_eq!(a.mappings(), 1);
    assert_eq!(a.own_resident_pages(), 64);
    a.assert_matches_shadow();
    b.assert_matches_shadow();
    let stats = engine.stats();
    assert_eq!((stats.pages_shared, stats.pages_sharing), (64, 0));
}

#[test]
fn unmerge_one_region_keeps_the_others_merged_and_loses_no_write() {
    let engine = manual_engine(Knobs::default());
    let mut regions: Vec<TestRegion> = (0..3).map(|_| TestRegion::new(&engine, 32)).collect();
    for region in &mut regions {
        region.fill(13, 0..32);
    }
    settle(&engine);
    // Writes made just before the unmerge, some into merged pages.
    regions[0].write(3 * PAGE_SIZE, b"secret");
    regions[0].write(31 * PAGE_SIZE + 4000, b"tail");
    let guard = regions[0].owner.enter();
    engine
        .unmerge_region(&guard, regions[0].handle())
        .expect("unmerge");
    drop(guard);
    assert_eq!(regions[0].mappings(), 1);
    let stats = engine.stats();
    assert_eq!((stats.pages_shared, stats.pages_sharing), (32, 32));
    for region in &regions {
        region.assert_matches_shadow();
    }
}

#[test]
fn smart_scan_skips_pages_that_keep_failing_and_still_merges_them_when_they_match() {
    let engine = manual_engine(Knobs::default());
    let mut a = TestRegion::new(&engine, 64);
    a.fill(14, 0..64);
    passes(&engine, 6);
    let skipped = engine.stats().pages_skipped;
    assert!(
        skipped >= 64,
        "unique unchanged pages are skipped: {skipped}"
    );
    // A second region with the same content: the skipped pages merge once visited again.
    let mut b = TestRegion::new(&engine, 64);
    b.fill(14, 0..64);
    passes(&engine, 40);
    assert_eq!(engine.stats().pages_sharing, 64);
    a.assert_matches_shadow();
    b.assert_matches_shadow();
}

#[test]
fn a_parked_owner_is_merged_without_waiting_for_the_cursor() {
    // The cursor's batches come once a minute here; only park visits can merge in time.
    let engine = samepage_dedup::Engine::new(samepage_dedup::EngineConfig {
        scanner: true,
        knobs: Knobs {
            pages_to_scan: 1,
            sleep: std::time::Duration::from_secs(60),
            park_recheck: std::time::Duration::from_millis(50),
            ..Knobs::default()
        },
        stable_capacity_bytes: 1 << 30,
        ..samepage_dedup::EngineConfig::default()
    })
    .expect("engine");
    let mut regions: Vec<TestRegion> = (0..4).map(|_| TestRegion::new(&engine, 256)).collect();
    let start = std::time::Instant::now();
    for region in &mut regions {
        region.fill(15, 0..256);
        engine.parked(&region.owner);
    }
    while engine.stats().pages_sharing < 3 * 256 {
        assert!(start.elapsed().as_secs() < 5, "{:?}", engine.stats());
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert!(
        start.elapsed().as_millis() < 1000,
        "merged {:?} after parking",
        start.elapsed()
    );
    for region in &regions {
        region.assert_matches_shadow();
    }
}

/// `count` regions whose even pages are the same in all and whose odd pages are each
/// region's own: merged, each is a window that bridges every other page.
/// A region of `pages` pages of its own bytes (`seed`) but for every tenth, which holds
/// content `shared`: in two such regions the equal pages are too far apart for a window, so
/// each merge is an isolated page costing two mappings.
fn sparse_region(
    engine: &samepage_dedup::Engine,
    pages: usize,
    seed: u64,
    shared: u64,
) -> TestRegion {
    let mut region = TestRegion::new(engine, pages);
    region.fill(seed, 0..pages);
    for page in (0..pages).step_by(10) {
        region.write(page * PAGE_SIZE, &page_content(shared, page));
    }
    region
}

/// A manual engine under a limit of 20,000 mappings, whatever the system's: a
/// `map_budget_percent` of 1 is a budget of exactly 200 mappings.
fn engine_under_20_000_mappings(knobs: Knobs) -> samepage_dedup::Engine {
    samepage_dedup::Engine::new(samepage_dedup::EngineConfig {
        stable_capacity_bytes: 1 << 30,
        max_map_count: Some(20_000),
        ..samepage_dedup::EngineConfig::manual(knobs)
    })
    .expect("engine")
}

fn alternating_regions(
    engine: &samepage_dedup::Engine,
    count: u64,
    pages: usize,
) -> Vec<TestRegion> {
    (0..count)
        .map(|n| {
            let mut region = TestRegion::new(engine, pages);
            region.fill(30, 0..pages);
            for page in (1..pages).step_by(2) {
                region.write(page * PAGE_SIZE, &page_content(40 + n, page));
            }
            region
        })
        .collect()
}

#[test]
fn a_window_merges_every_other_page_with_one_mapping_and_copies_the_rest() {
    let engine = manual_engine(Knobs::default());
    let pages = 256;
    let mut regions = alternating_regions(&engine, 4, pages);
    settle(&engine);
    let stats = engine.stats();
    assert_eq!(stats.pages_sharing, 3 * pages as u64 / 2);
    assert_eq!(stats.pages_shared, pages as u64 / 2);
    // Private copies are not merged pages.
    assert_eq!(
        engine.owner_stats(regions[0].owner.id()).pages_merged,
        pages as u64 / 2
    );
    for region in &regions {
        region.assert_matches_shadow();
        // One window, which ends on the last shared page: the last page, unique, stays out.
        assert_eq!(region.mappings(), 2);
        assert_eq!(region.own_resident_pages(), 1);
    }
    assert!(engine.audit().mismatched_slots.is_empty());

    // Writes into a copy and into a shared page stay with their writer.
    regions[0].write(PAGE_SIZE + 5, b"copy");
    regions[1].write(2 * PAGE_SIZE + 5, b"shared");
    engine.scan_pass().expect("pass");
    for region in &regions {
        region.assert_matches_shadow();
    }
    assert_eq!(engine.stats().pages_sharing, 3 * pages as u64 / 2 - 1);
    assert!(engine.audit().mismatched_slots.is_empty());

    // Unmerging gives every page, shared or copied, back to its region.
    engine.unmerge_all().expect("unmerge");
    for region in &regions {
        region.assert_matches_shadow();
        assert_eq!(region.mappings(), 1);
        assert_eq!(region.own_resident_pages(), pages as u64);
    }
    let stats = engine.stats();
    assert_eq!((stats.pages_shared, stats.pages_sharing), (0, 0));
    assert_eq!(engine.audit().stable_pages, 0);
}

#[test]
fn a_bridged_page_merges_once_its_bytes_match_another_page() {
    // Windows that bridge every other page, as above: the bridged pages keep private copies
    // of bytes no other page held when the windows were made.
    let engine = manual_engine(Knobs {
        smart_scan: false,
        ..Knobs::default()
    });
    let pages = 16;
    let regions = alternating_regions(&engine, 3, pages);
    settle(&engine);
    let merged = |region: &TestRegion| engine.owner_stats(region.owner.id()).pages_merged;
    assert_eq!(merged(&regions[0]), pages as u64 / 2);

    // A new page holds what region 0's bridged page 1 holds: the two pair up, whichever the
    // scanner meets first.
    let mut pair = TestRegion::new(&engine, 1);
    pair.write(0, &page_content(40, 1));
    // Two new pages hold what region 1's bridged page 3 holds: they merge with each other
    // first, and the bridged page joins their stable page.
    let mut two: Vec<TestRegion> = (0..2).map(|_| TestRegion::new(&engine, 1)).collect();
    for region in &mut two {
        region.write(0, &page_content(41, 3));
    }
    passes(&engine, 4);
    assert_eq!(
        merged(&regions[0]),
        pages as u64 / 2 + 1,
        "the bridged page that paired"
    );
    assert_eq!(merged(&pair), 1);
    assert_eq!(
        merged(&regions[1]),
        pages as u64 / 2 + 1,
        "the bridged page that joined"
    );
    assert_eq!(merged(&regions[2]), pages as u64 / 2);
    for region in regions.iter().chain([&pair]).chain(&two) {
        region.assert_matches_shadow();
    }
    let stats = engine.stats();
    let all: u64 = regions.iter().chain([&pair]).chain(&two).map(merged).sum();
    assert_eq!(all, stats.pages_shared + stats.pages_sharing);
    assert!(engine.audit().mismatched_slots.is_empty());
}

#[test]
fn a_bridged_page_the_map_budget_refuses_stays_bridged_and_merges_once_there_is_room() {
    // A limit of 20,000 mappings, whatever the system's, so that 1% is a budget of 200 and
    // isolated merges stop at three quarters of it, 150.
    let engine = engine_under_20_000_mappings(Knobs {
        smart_scan: false,
        ..Knobs::default()
    });
    let pages = 16;
    let mut regions = alternating_regions(&engine, 3, pages);
    settle(&engine);
    let merged = |region: &TestRegion| engine.owner_stats(region.owner.id()).pages_merged;
    assert_eq!(merged(&regions[0]), pages as u64 / 2);

    // Isolated merges, each two mappings, fill the budget until no page fits.
    engine
        .set_knobs(Knobs {
            smart_scan: false,
            map_budget_percent: 1,
            ..Knobs::default()
        })
        .expect("knobs");
    let filler = [
        sparse_region(&engine, 2000, 60, 70),
        sparse_region(&engine, 2000, 61, 70),
    ];
    settle(&engine);
    let full = engine.stats();
    assert!(
        (full.vmas + 2) * 4 > full.map_budget * 3,
        "the filler left room for the unbridge this test needs refused: {full:?}"
    );

    // A page matches region 0's bridged page 1. Giving that page back to its memfd would
    // split the window for two more mappings: refused, and the page stays a private copy.
    let mut pair = TestRegion::new(&engine, 1);
    pair.write(0, &page_content(40, 1));
    passes(&engine, 4);
    let refused = engine.stats();
    assert_eq!(
        merged(&regions[0]),
        pages as u64 / 2,
        "the page stayed bridged"
    );
    assert_eq!(merged(&pair), 0);
    assert!(refused.vmas <= refused.map_budget, "{refused:?}");
    assert!(engine.audit().mismatched_slots.is_empty());
    // The page the budget kept bridged is still its owner's own to write.
    regions[0].write(PAGE_SIZE + 8, b"still mine");
    for region in regions.iter().chain([&pair]).chain(&filler) {
        region.assert_matches_shadow();
    }

    // With room again, the page is given back and merges with its new twin.
    regions[0].write(PAGE_SIZE, &page_content(40, 1));
    engine
        .set_knobs(Knobs {
            smart_scan: false,
            ..Knobs::default()
        })
        .expect("knobs");
    passes(&engine, 4);
    assert_eq!(merged(&regions[0]), pages as u64 / 2 + 1);
    assert_eq!(merged(&pair), 1);
    for region in regions.iter().chain([&pair]).chain(&filler) {
        region.assert_matches_shadow();
    }
    let stats = engine.stats();
    let all: u64 = regions
        .iter()
        .chain([&pair])
        .chain(&filler)
        .map(merged)
        .sum();
    assert_eq!(all, stats.pages_shared + stats.pages_sharing);
    assert!(engine.audit().mismatched_slots.is_empty());
}

#[test]
fn pages_a_full_map_budget_refuses_back_off_until_there_is_room() {
    // Two regions whose equal pages are each too far from the next for a window: every merge
    // is an isolated page, two mappings.
    let knobs = Knobs::default();
    let engine = engine_under_20_000_mappings(knobs.clone());
    let sparse = |n: u64| sparse_region(&engine, 2000, 80 + n, 90);
    let mut regions = vec![sparse(0), sparse(1)];
    settle(&engine);
    assert_eq!(engine.stats().pages_sharing, 200);

    // A budget of 1% of 20,000, 200 mappings, is spent already: a third region's pages find
    // their stable pages, and every merge onto them is refused.
    let tight = Knobs {
        map_budget_percent: 1,
        ..knobs.clone()
    };
    engine.set_knobs(tight).expect("knobs");
    regions.push(sparse(2));
    settle(&engine);
    assert!(engine.stats().pages_skipped_map_budget >= 200);

    // Refused again and again, the pages back off to every 32nd pass; then the region counts
    // as idle and, with nothing else awake, the host stops visiting it.
    let longest = Knobs::SMART_SCAN_LONGEST_SKIP as usize;
    passes(&engine, 4 * longest);
    let backed_off = engine.stats();
    passes(&engine, 2 * longest);
    let later = engine.stats();
    assert_eq!(
        later.pages_skipped_map_budget, backed_off.pages_skipped_map_budget,
        "no refused merge is tried again while nothing changes: {later:?}"
    );
    assert_eq!(later.pages_scanned, backed_off.pages_scanned, "{later:?}");
    assert!(later.regions_idle_skips > backed_off.regions_idle_skips);
    assert_eq!(engine.owner_stats(regions[2].owner.id()).pages_merged, 0);
    for region in &regions {
        region.assert_matches_shadow();
    }

    // Room again: the knob change wakes the host, and the backed-off pages merge on the next
    // pass that looks at every page.
    engine.set_knobs(knobs).expect("knobs");
    passes(&engine, 2 * longest + 2);
    let stats = engine.stats();
    assert_eq!(
        (stats.pages_shared, stats.pages_sharing),
        (200, 400),
        "{stats:?}"
    );
    for region in &regions {
        assert_eq!(engine.owner_stats(region.owner.id()).pages_merged, 200);
        region.assert_matches_shadow();
    }
    assert!(engine.audit().mismatched_slots.is_empty());
}

#[test]
fn idle_owners_are_skipped_until_they_run_again() {
    let engine = manual_engine(Knobs::default());
    let mut a = TestRegion::new(&engine, 32);
    let mut b = TestRegion::new(&engine, 32);
    a.fill(16, 0..32);
    b.fill(16, 0..32);
    settle(&engine);
    engine.scan_pass().expect("pass");
    let skips = engine.stats().regions_idle_skips;
    engine.scan_pass().expect("pass");
    assert_eq!(
        engine.stats().regions_idle_skips,
        skips + 2,
        "both regions idle"
    );

    // The owner runs and writes: its region is visited again and the write noticed.
    a.write(5 * PAGE_SIZE, b"ran");
    engine.scan_pass().expect("pass");
    let stats = engine.stats();
    assert_eq!(stats.regions_idle_skips, skips + 3, "only b is idle");
    assert_eq!(stats.pages_sharing, 31);
    a.assert_matches_shadow();
    b.assert_matches_shadow();
}

#[test]
fn idle_regions_sleep_once_smart_scan_backs_off_and_still_meet_new_partners() {
    let engine = manual_engine(Knobs::default());
    let pages = 8;
    let mut a = TestRegion::new(&engine, pages);
    a.fill(60, 0..pages);
    // Every page of a matches nothing: smart scan backs off to every 32nd pass, and then a
    // is idle (its owner does not run).
    passes(&engine, 100);
    let scanned = engine.stats().pages_scanned;
    passes(&engine, 64);
    assert_eq!(
        engine.stats().pages_scanned,
        scanned,
        "a host whose regions are all idle visits nothing, not even on every 32nd pass"
    );

    // A new region holds what a's page 3 holds: it wakes the host, and on the next pass that
    // looks at every page, a is visited too and its page merges.
    let mut b = TestRegion::new(&engine, 1);
    b.write(0, &page_content(60, 3));
    passes(&engine, 34);
    assert_eq!(engine.owner_stats(a.owner.id()).pages_merged, 1);
    assert_eq!(engine.owner_stats(b.owner.id()).pages_merged, 1);
    a.assert_matches_shadow();
    b.assert_matches_shadow();
}

#[test]
fn a_page_written_once_in_an_idle_region_merges_with_its_twin() {
    let engine = manual_engine(Knobs::default());
    let mut a = TestRegion::new(&engine, 2);
    a.fill(61, 0..2);
    passes(&engine, 100);
    // The owner runs once: page 0 now holds page 1's bytes. Smart scan had backed page 0
    // off to every 32nd pass; on its turn it is seen changed, and the region, idle again
    // since, must still be visited for it to be compared.
    a.write(0, &page_content(61, 1));
    passes(&engine, 70);
    assert_eq!(engine.owner_stats(a.owner.id()).pages_merged, 2);
    a.assert_matches_shadow();
}

#[test]
fn the_advisor_raises_pages_to_scan_to_meet_its_target_pass_time() {
    let engine = samepage_dedup::Engine::new(samepage_dedup::EngineConfig {
        scanner: true,
        knobs: Knobs {
            pages_to_scan: 16,
            sleep: std::time::Duration::from_millis(10),
            advisor_mode: samepage_dedup::AdvisorMode::ScanTime,
            advisor: samepage_dedup::Advisor {
                target_scan_time: std::time::Duration::from_millis(50),
                min_pages_to_scan: 16,
                max_pages_to_scan: 1 << 16,
                max_cpu_percent: 100,
            },
            ..Knobs::default()
        },
        stable_capacity_bytes: 1 << 30,
        ..samepage_dedup::EngineConfig::default()
    })
    .expect("engine");
    // 2,048 pages at 16 a batch and 10 ms between batches: passes of over a second, far
    // slower than the 50 ms asked for.
    let mut regions: Vec<TestRegion> = (0..4).map(|_| TestRegion::new(&engine, 512)).collect();
    for region in &mut regions {
        region.fill(17, 0..512);
    }
    let start = std::time::Instant::now();
    while engine.knobs().pages_to_scan < 256 {
        assert!(start.elapsed().as_secs() < 20, "{:?}", engine.knobs());
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    while engine.stats().pages_sharing < 3 * 512 {
        assert!(start.elapsed().as_secs() < 20, "{:?}", engine.stats());
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    for region in &regions {
        region.assert_matches_shadow();
    }
}

#[test]
fn a_slot_keeps_its_place_while_private_copies_lie_over_it() {
    // A and B share pages 0..4; C matches 0, 2 and 3 but not 1, so C's window holds a
    // private copy over the slot of page 1. Then A and B both write page 1: its stable page
    // loses its last sharer while C's copy still lies over the slot.
    let engine = manual_engine(Knobs::default());
    let mut regions: Vec<TestRegion> = (0..3).map(|_| TestRegion::new(&engine, 4)).collect();
    for region in &mut regions {
        region.fill(18, 0..4);
    }
    regions[2].write(PAGE_SIZE, &page_content(19, 1));
    settle(&engine);
    assert_eq!(engine.stats().pages_sharing, 4 + 3);
    assert_eq!(
        regions[2].mappings(),
        1,
        "C's window covers page 1 with a copy"
    );
    for (n, region) in regions[..2].iter_mut().enumerate() {
        region.write(PAGE_SIZE + n, b"!");
    }
    engine.scan_pass().expect("pass");
    assert!(
        engine.audit().mismatched_slots.is_empty(),
        "{:?}",
        engine.audit()
    );
    // New content merging now must not reuse the slot under C's copy.
    let mut d = TestRegion::new(&engine, 4);
    let mut e = TestRegion::new(&engine, 4);
    d.fill(20, 0..4);
    e.fill(20, 0..4);
    settle(&engine);
    for region in regions.iter().chain([&d, &e]) {
        region.assert_matches_shadow();
    }
    assert!(engine.audit().mismatched_slots.is_empty());
    engine.unmerge_all().expect("unmerge");
    drop(regions);
    for region in [&d, &e] {
        region.assert_matches_shadow();
    }
    assert_eq!(engine.stats().pages_shared, 0);
}

#[test]
fn pages_a_merge_now_replaced_are_freed_after_the_call_and_never_once_given_back() {
    // With a scanner thread (stopped, so that only merge-now merges), merge-now leaves
    // freeing the replaced pages to it.
    let engine = samepage_dedup::Engine::new(samepage_dedup::EngineConfig {
        knobs: Knobs {
            run: RunMode::Stop,
            ..Knobs::default()
        },
        stable_capacity_bytes: 1 << 30,
        ..samepage_dedup::EngineConfig::default()
    })
    .expect("engine");
    let pages = 64;
    let mut a = TestRegion::new(&engine, pages);
    let mut b = TestRegion::new(&engine, pages);
    let wait_until = |what: &str, done: &dyn Fn() -> bool| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !done() {
            assert!(std::time::Instant::now() < deadline, "{what}");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    };
    for round in 0..20u64 {
        a.fill(100 + round, 0..pages);
        b.fill(100 + round, 0..pages);
        for region in [&a, &b] {
            let guard = region.owner.enter();
            engine
                .merge_now(&guard, region.handle(), 0..pages * PAGE_SIZE)
                .expect("merge now");
        }
        assert_eq!(engine.stats().pages_sharing, pages as u64);
        // Given back at once, before the scanner may have freed anything: whichever comes
        // first, the pages a holds again must keep their bytes.
        {
            let guard = a.owner.enter();
            engine.unmerge_region(&guard, a.handle()).expect("unmerge");
        }
        wait_until("b's own copies are freed", &|| b.own_resident_pages() == 0);
        a.assert_matches_shadow();
        b.assert_matches_shadow();
        assert_eq!(
            a.own_resident_pages(),
            pages as u64,
            "a's pages are its own again"
        );
        {
            let guard = b.owner.enter();
            engine.unmerge_region(&guard, b.handle()).expect("unmerge");
        }
    }
    assert!(engine.audit().mismatched_slots.is_empty());
    assert_eq!(engine.stats().punch_failures, 0);
}
