//! Knowing when merging has settled: once a pass changed nothing and `full_scans` has passed
//! the engine's `smart_scan_horizon`, nothing more can merge. A host that waits for merging
//! (`samepage run`'s report) stops there; these tests check that stopping there misses no
//! merge smart scan was holding back, and that it stops soon when nothing is held back.

mod common;

use common::{TestRegion, manual_engine, page_content};
use samepage_dedup::{Engine, Knobs};

/// Runs passes until the settle rule holds, as a host applies it, and returns how many ran.
fn passes_until_settled(engine: &Engine) -> u64 {
    let mut last_change = (engine.stats().full_scans, engine.stats().pages_sharing);
    for ran in 1..=1000 {
        engine.scan_pass().expect("pass");
        let stats = engine.stats();
        if stats.merges_last_pass > 0 || stats.pages_sharing != last_change.1 {
            last_change = (stats.full_scans, stats.pages_sharing);
        } else if stats.full_scans > last_change.0 && stats.full_scans >= stats.smart_scan_horizon {
            return ran;
        }
    }
    panic!("never settled: {:?}", engine.stats());
}

#[test]
fn pages_smart_scan_skips_still_merge_before_the_rule_says_settled() {
    let engine = manual_engine(Knobs::default());
    let mut a = TestRegion::new(&engine, 64);
    a.fill(14, 0..64);
    for _ in 0..6 {
        engine.scan_pass().expect("pass");
    }
    assert!(engine.stats().pages_skipped > 0, "a's pages are held back");
    let mut b = TestRegion::new(&engine, 64);
    b.fill(14, 0..64);
    passes_until_settled(&engine);
    assert_eq!(engine.stats().pages_sharing, 64);
    a.assert_matches_shadow();
    b.assert_matches_shadow();
}

#[test]
fn an_idle_region_held_back_still_meets_a_new_partner_before_the_rule_says_settled() {
    let engine = manual_engine(Knobs::default());
    let mut a = TestRegion::new(&engine, 8);
    a.fill(60, 0..8);
    // Smart scan backs every page of a off to every 32nd pass, and then a is idle.
    for _ in 0..100 {
        engine.scan_pass().expect("pass");
    }
    let mut b = TestRegion::new(&engine, 1);
    b.write(0, &page_content(60, 3));
    passes_until_settled(&engine);
    assert_eq!(engine.owner_stats(a.owner.id()).pages_merged, 1);
    assert_eq!(engine.owner_stats(b.owner.id()).pages_merged, 1);
    a.assert_matches_shadow();
    b.assert_matches_shadow();
}

#[test]
fn with_nothing_held_back_merging_settles_in_a_few_passes() {
    let engine = manual_engine(Knobs::default());
    let mut regions: Vec<TestRegion> = (0..4).map(|_| TestRegion::new(&engine, 256)).collect();
    for region in &mut regions {
        region.fill(7, 0..256);
    }
    let passes = passes_until_settled(&engine);
    assert_eq!(engine.stats().pages_sharing, 3 * 256);
    // Two passes merge (one records checksums, one merges), one changes nothing: not the 32
    // quiet passes smart scan could hold a page back for.
    assert!(passes <= 4, "settled after {passes} passes");
    for region in &regions {
        region.assert_matches_shadow();
    }
}

#[test]
fn unique_pages_held_back_do_not_hold_settling_to_smart_scans_longest_period() {
    let engine = manual_engine(Knobs::default());
    let mut regions: Vec<TestRegion> = (0..4).map(|_| TestRegion::new(&engine, 64)).collect();
    for (n, region) in regions.iter_mut().enumerate() {
        region.fill(100 + n as u64, 32..64);
    }
    // The unique pages match nothing: smart scan backs them off.
    for _ in 0..6 {
        engine.scan_pass().expect("pass");
    }
    // Then pages the same in every region appear, and merge while the unique pages' periods
    // keep doubling.
    for region in &mut regions {
        region.fill(8, 0..32);
    }
    let passes = passes_until_settled(&engine);
    assert_eq!(engine.stats().pages_sharing, 3 * 32);
    // Every unique page was looked at after the last merge well before the 32nd pass; a rule
    // that bounds a page's last look by its current period waits until then.
    assert!(passes <= 20, "settled after {passes} passes");
    for region in &regions {
        region.assert_matches_shadow();
    }
}
