//! Guest advice on plain memfd regions: unmergeable ranges are given back and never read,
//! mergeable ones opt in or undo it, merge scopes, the range bound, and bad ranges, each
//! checked against shadow copies.

mod common;

use common::{TestRegion, advised_only_engine, manual_engine};
use samepage_dedup::advice::MAX_ADVISED_RANGES;
use samepage_dedup::{Advice, Engine, Error, Knobs, Owner, PAGE_SIZE};

/// Two passes: the first records checksums, the second merges what stayed the same.
fn settle(engine: &Engine) {
    engine.scan_pass().expect("pass");
    engine.scan_pass().expect("pass");
}

/// Two regions of `pages` identical pages.
fn twins(engine: &Engine, pages: usize) -> [TestRegion; 2] {
    let mut twins = [
        TestRegion::new(engine, pages),
        TestRegion::new(engine, pages),
    ];
    for region in &mut twins {
        region.fill(21, 0..pages);
    }
    twins
}

#[test]
fn unmergeable_pages_are_never_read_while_identical_mergeable_ones_merge() {
    let engine = manual_engine(Knobs::default());
    let mut twins = twins(&engine, 32);
    for region in &mut twins {
        region
            .advise(&engine, 8..16, Advice::Unmergeable)
            .expect("advice");
        // Zeros too: an unmergeable page of zeros is not even punched.
        region.write(20 * PAGE_SIZE, &[0; PAGE_SIZE]);
        region
            .advise(&engine, 20..21, Advice::Unmergeable)
            .expect("advice");
    }
    for _ in 0..4 {
        engine.scan_pass().expect("pass");
    }
    let stats = engine.stats();
    assert_eq!(stats.pages_sharing, 32 - 9, "every mergeable page merged");
    assert_eq!(
        stats.zero_pages, 0,
        "the unmergeable zeros were not looked at"
    );
    // Never hashed: an unmergeable page is neither in the unstable index nor volatile.
    assert_eq!((stats.pages_unshared, stats.pages_volatile), (0, 0));
    for region in &twins {
        region.assert_matches_shadow();
        assert_eq!(
            region.own_resident_pages(),
            9,
            "the unmergeable pages stay their own"
        );
    }
    // Merge-now does not read them either.
    let guard = twins[0].owner.enter();
    let report = engine
        .merge_now(&guard, twins[0].handle(), 0..32 * PAGE_SIZE)
        .expect("merge now");
    assert_eq!(report.pages_merged, 32 - 9);
    drop(guard);
    assert!(engine.audit().mismatched_slots.is_empty());
}

#[test]
fn unmergeable_gives_merged_pages_back_before_it_returns() {
    let engine = manual_engine(Knobs::default());
    let mut twins = twins(&engine, 16);
    settle(&engine);
    assert_eq!(engine.stats().pages_sharing, 16);
    twins[0]
        .advise(&engine, 4..12, Advice::Unmergeable)
        .expect("advice");
    let stats = engine.stats();
    assert_eq!(
        stats.pages_sharing + stats.pages_shared,
        16 + 8,
        "8 sharers left"
    );
    assert_eq!(twins[0].own_resident_pages(), 8);
    assert_eq!(
        twins[0].mappings(),
        3,
        "own pages in the middle of a merged region"
    );
    // Writes to the given-back pages are the owner's alone.
    twins[0].write(5 * PAGE_SIZE, b"a secret");
    for region in &twins {
        region.assert_matches_shadow();
    }
    settle(&engine);
    assert_eq!(
        engine.stats().pages_volatile,
        0,
        "the written page was not looked at"
    );
    assert!(engine.audit().mismatched_slots.is_empty());
}

#[test]
fn mergeable_undoes_unmergeable_in_scope_all() {
    let engine = manual_engine(Knobs::default());
    let twins = twins(&engine, 16);
    for region in &twins {
        region
            .advise(&engine, 0..16, Advice::Unmergeable)
            .expect("advice");
    }
    settle(&engine);
    assert_eq!(engine.stats().pages_sharing, 0);
    for region in &twins {
        region
            .advise(&engine, 0..16, Advice::Mergeable)
            .expect("advice");
    }
    settle(&engine);
    assert_eq!(engine.stats().pages_sharing, 16);
    for region in &twins {
        region.assert_matches_shadow();
    }
}

#[test]
fn in_scope_advised_only_advised_pages_merge() {
    let engine = advised_only_engine();
    let twins = twins(&engine, 16);
    settle(&engine);
    let stats = engine.stats();
    assert_eq!((stats.pages_sharing, stats.pages_unshared), (0, 0));
    for region in &twins {
        region
            .advise(&engine, 2..10, Advice::Mergeable)
            .expect("advice");
    }
    settle(&engine);
    assert_eq!(engine.stats().pages_sharing, 8);
    // Unmergeable takes the advice back.
    twins[1]
        .advise(&engine, 2..4, Advice::Unmergeable)
        .expect("advice");
    assert_eq!(engine.stats().pages_sharing, 6);
    for region in &twins {
        region.assert_matches_shadow();
    }
    assert!(engine.audit().mismatched_slots.is_empty());
}

#[test]
fn advice_past_the_range_bound_is_refused_and_changes_nothing() {
    let engine = manual_engine(Knobs::default());
    let pages = 2 * MAX_ADVISED_RANGES + 4;
    let twins = twins(&engine, pages);
    // Every other page unmergeable: exactly the bound.
    for n in 0..MAX_ADVISED_RANGES {
        twins[0]
            .advise(&engine, 2 * n..2 * n + 1, Advice::Unmergeable)
            .expect("within the bound");
    }
    let error = twins[0]
        .advise(&engine, pages - 2..pages - 1, Advice::Unmergeable)
        .expect_err("one range too many");
    assert!(
        matches!(error, Error::TooManyAdvisedRanges { .. }),
        "{error}"
    );
    // Joining ranges is still fine: it lowers the count.
    twins[0]
        .advise(&engine, 0..3, Advice::Unmergeable)
        .expect("joins two");
    settle(&engine);
    // The refused page merged; the unmergeable ones (every other page below the bound, and
    // page 1 joined in) did not.
    let unmergeable = MAX_ADVISED_RANGES + 1;
    assert_eq!(engine.stats().pages_sharing, (pages - unmergeable) as u64);
    twins[0].assert_matches_shadow();
}

#[test]
fn bad_ranges_and_other_owners_guards_are_refused() {
    let engine = manual_engine(Knobs::default());
    let region = TestRegion::new(&engine, 4);
    let guard = region.owner.enter();
    let advise = |range| engine.advise(&guard, region.handle(), range, Advice::Unmergeable);
    assert!(matches!(
        advise(0..5 * PAGE_SIZE),
        Err(Error::OutOfRange { .. })
    ));
    assert!(matches!(
        advise(1..PAGE_SIZE),
        Err(Error::OutOfRange { .. })
    ));
    assert!(matches!(advise(0..100), Err(Error::OutOfRange { .. })));
    advise(PAGE_SIZE..PAGE_SIZE).expect("an empty range does nothing");
    drop(guard);
    let stranger = Owner::new(0).enter();
    let error = engine
        .advise(
            &stranger,
            region.handle(),
            0..PAGE_SIZE,
            Advice::Unmergeable,
        )
        .expect_err("another owner's guard");
    assert!(matches!(error, Error::WrongOwner(_)), "{error}");
}

#[test]
fn advice_covers_pages_a_region_grew_since_the_last_visit() {
    let engine = manual_engine(Knobs::default());
    let mut twins = twins(&engine, 4);
    for region in &mut twins {
        region.grow(8);
        region.fill(21, 4..8);
        region
            .advise(&engine, 4..8, Advice::Unmergeable)
            .expect("advice");
    }
    settle(&engine);
    assert_eq!(engine.stats().pages_sharing, 4);
    for region in &twins {
        region.assert_matches_shadow();
    }
}
