//! Per-page sharing limits: chains of dups, as Linux KSM's `max_page_sharing`.

mod common;

use common::{TestRegion, manual_engine, page_content};
use samepage_dedup::{Knobs, PAGE_SIZE};

fn settle(engine: &samepage_dedup::Engine) {
    engine.scan_pass().expect("pass");
    engine.scan_pass().expect("pass");
}

#[test]
fn sixteen_sharers_with_a_limit_of_four_make_four_dups_per_page() {
    let engine = manual_engine(Knobs {
        max_page_sharing: 4,
        ..Knobs::default()
    });
    let pages = 48;
    let mut regions: Vec<TestRegion> = (0..16).map(|_| TestRegion::new(&engine, pages)).collect();
    for region in &mut regions {
        region.fill(21, 0..pages);
    }
    settle(&engine);
    let stats = engine.stats();
    let p = pages as u64;
    assert_eq!(stats.pages_shared, 4 * p);
    assert_eq!(stats.pages_sharing, 12 * p);
    assert_eq!(stats.stable_node_chains, p);
    assert_eq!(stats.stable_node_dups, 4 * p);
    let audit = engine.audit();
    assert_eq!(audit.max_sharers, 4, "no stable page above the limit");
    assert_eq!(
        (audit.stable_node_chains, audit.stable_node_dups),
        (p, 4 * p)
    );
    assert!(audit.index_sound && audit.mismatched_slots.is_empty());
    for region in &regions {
        region.assert_matches_shadow();
        assert_eq!(region.mappings(), 1, "each sharer's run maps one dup run");
    }
}

#[test]
fn a_dup_whose_sharers_all_leave_is_freed_and_its_chain_shrinks() {
    let engine = manual_engine(Knobs {
        max_page_sharing: 2,
        ..Knobs::default()
    });
    let mut regions: Vec<TestRegion> = (0..4).map(|_| TestRegion::new(&engine, 1)).collect();
    for region in &mut regions {
        region.fill(5, 0..1);
    }
    settle(&engine);
    let stats = engine.stats();
    assert_eq!((stats.pages_shared, stats.pages_sharing), (2, 2));
    assert_eq!((stats.stable_node_chains, stats.stable_node_dups), (1, 2));

    // Both sharers of one dup write: that dup goes, the chain keeps the other.
    let audit_before = engine.audit();
    assert_eq!(audit_before.max_sharers, 2);
    for (n, region) in regions[2..].iter_mut().enumerate() {
        region.write(0, &[n as u8 + 1]);
    }
    engine.scan_pass().expect("pass");
    let stats = engine.stats();
    assert_eq!(stats.pages_shared, 1);
    assert_eq!((stats.stable_node_chains, stats.stable_node_dups), (1, 1));
    // The last two sharers leave: the chain goes too.
    for (n, region) in regions[..2].iter_mut().enumerate() {
        region.write(PAGE_SIZE - 1, &[n as u8 + 1]);
    }
    engine.scan_pass().expect("pass");
    let stats = engine.stats();
    assert_eq!(
        (
            stats.pages_shared,
            stats.stable_node_chains,
            stats.stable_node_dups
        ),
        (0, 0, 0)
    );
    for region in &regions {
        region.assert_matches_shadow();
    }
}

#[test]
fn the_limit_cannot_change_while_pages_are_shared() {
    let engine = manual_engine(Knobs::default());
    let mut a = TestRegion::new(&engine, 2);
    let mut b = TestRegion::new(&engine, 2);
    a.fill(3, 0..2);
    b.fill(3, 0..2);
    settle(&engine);
    let error = engine
        .set_knobs(Knobs {
            max_page_sharing: 8,
            ..Knobs::default()
        })
        .unwrap_err();
    assert!(
        error.to_string().contains("unmerge everything first"),
        "{error}"
    );
    let error = engine
        .set_knobs(Knobs {
            max_page_sharing: 1,
            ..Knobs::default()
        })
        .unwrap_err();
    assert!(error.to_string().contains("2 to"), "{error}");

    engine.unmerge_all().expect("unmerge");
    engine
        .set_knobs(Knobs {
            max_page_sharing: 8,
            ..Knobs::default()
        })
        .expect("nothing shared any more");
}

#[test]
fn a_run_holding_the_same_bytes_twice_leaves_both_stable_pages_findable() {
    // Found by the property tests (`model.rs`): pages 6 and 7 pair with pages 0 and 1 as one
    // run of two pages of the same bytes, whose two stable pages must both be found by
    // lookups. The first fills up (page 8 joins it); the second still has room for page 0 of
    // the other region.
    let engine = manual_engine(Knobs {
        max_page_sharing: 3,
        smart_scan: false,
        ..Knobs::default()
    });
    let same = page_content(70, 0);
    let mut a = TestRegion::new(&engine, 12);
    let mut b = TestRegion::new(&engine, 12);
    for page in [7, 0, 6] {
        a.write(page * PAGE_SIZE, &same);
    }
    engine.scan_pass().expect("pass");
    for page in [1, 8] {
        a.write(page * PAGE_SIZE, &same);
    }
    b.write(0, &same);
    for _ in 0..4 {
        engine.scan_pass().expect("pass");
    }
    let merged = |region: &TestRegion| engine.owner_stats(region.owner.id()).pages_merged;
    assert_eq!((merged(&a), merged(&b)), (5, 1));
    let stats = engine.stats();
    assert_eq!(stats.pages_shared + stats.pages_sharing, 6);
    a.assert_matches_shadow();
    b.assert_matches_shadow();
    assert!(engine.audit().mismatched_slots.is_empty());
}
