//! Metadata only for pages that exist: a region of gigabytes that a guest barely touched costs
//! the engine next to nothing, is visited only where it holds data, and never makes merging
//! a loss.

mod common;

use common::{manual_engine, page_content};
use samepage_dedup::{Knobs, MemfdMapping, Owner, PAGE_SIZE};

const GIB: usize = 1 << 30;

/// A mapping of `len` bytes whose pages `pages` hold `page_content(seed, page)`.
fn touched(
    engine: &samepage_dedup::Engine,
    owner: &Owner,
    len: usize,
    pages: impl Iterator<Item = usize>,
    seed: u64,
) -> MemfdMapping {
    let mapping = MemfdMapping::new(Some(engine), owner, "sparse", len, len, 0).expect("mapping");
    let _guard = owner.enter();
    for page in pages {
        // SAFETY: the page is inside the accessible mapping, written under the owner's guard.
        unsafe {
            std::ptr::copy_nonoverlapping(
                page_content(seed, page).as_ptr(),
                mapping.as_ptr().add(page * PAGE_SIZE),
                PAGE_SIZE,
            );
        }
    }
    drop(_guard);
    mapping
}

fn bytes_of(mapping: &MemfdMapping, page: usize) -> Vec<u8> {
    // SAFETY: inside the accessible mapping; nobody writes it while the test reads.
    unsafe { std::slice::from_raw_parts(mapping.as_ptr().add(page * PAGE_SIZE), PAGE_SIZE) }
        .to_vec()
}

#[test]
fn two_4_gib_regions_touching_one_page_each_cost_kilobytes_and_profit() {
    let engine = manual_engine(Knobs::default());
    let (a_owner, b_owner) = (Owner::new(0), Owner::new(0));
    let last = 4 * GIB / PAGE_SIZE - 1;
    let a = touched(&engine, &a_owner, 4 * GIB, [last].into_iter(), 3);
    let b = touched(&engine, &b_owner, 4 * GIB, [last].into_iter(), 3);
    engine.scan_pass().expect("pass");
    engine.scan_pass().expect("pass");
    let stats = engine.stats();
    assert_eq!((stats.pages_shared, stats.pages_sharing), (1, 1));
    assert!(
        stats.metadata_bytes < 64 * 1024,
        "metadata {} bytes",
        stats.metadata_bytes
    );
    assert!(stats.general_profit_bytes >= 0, "{stats:?}");
    // Two passes over two regions visit their one page each, not their million.
    assert_eq!(stats.pages_scanned, 4);
    for owner in [&a_owner, &b_owner] {
        assert!(engine.owner_stats(owner.id()).profit_bytes >= 0);
    }
    assert_eq!(bytes_of(&a, last), page_content(3, last));
    assert_eq!(bytes_of(&b, last), page_content(3, last));
    assert_eq!(bytes_of(&a, 0), vec![0; PAGE_SIZE]);
}

/// The engine's metadata after merging four regions of `len` bytes whose first `pages`
/// pages are equal across them.
fn metadata_after_merging(len: usize, pages: usize) -> u64 {
    let engine = manual_engine(Knobs::default());
    let owners: Vec<Owner> = (0..4).map(|_| Owner::new(0)).collect();
    let regions: Vec<MemfdMapping> = owners
        .iter()
        .map(|owner| touched(&engine, owner, len, 0..pages, 5))
        .collect();
    engine.scan_pass().expect("pass");
    engine.scan_pass().expect("pass");
    let stats = engine.stats();
    assert_eq!(stats.pages_sharing, 3 * pages as u64);
    assert_eq!(stats.pages_scanned, 2 * 4 * pages as u64);
    assert_eq!(stats.pages_tracked, 4 * pages as u64);
    assert_eq!(bytes_of(&regions[3], pages - 1), page_content(5, pages - 1));
    stats.metadata_bytes
}

#[test]
fn metadata_is_proportional_to_touched_pages_not_to_length() {
    let small = metadata_after_merging(GIB / 16, 2048);
    assert_eq!(metadata_after_merging(4 * GIB, 2048), small);
    let double = metadata_after_merging(4 * GIB, 4096);
    // Twice the pages, about twice the metadata (hash tables and vectors grow by doubling).
    assert!(
        double > small * 3 / 2 && double <= small * 3,
        "{small} then {double} bytes"
    );

    // Sparse: one page in every 1 MiB costs a chunk of records each, and nothing for the
    // pages in between.
    let engine = manual_engine(Knobs::default());
    let owner = Owner::new(0);
    let spread = touched(&engine, &owner, GIB, (0..1024).map(|n| n * 256), 9);
    engine.scan_pass().expect("pass");
    let stats = engine.stats();
    assert_eq!(stats.pages_scanned, 1024);
    assert!(stats.metadata_bytes <= 1024 * 512, "{stats:?}");
    assert_eq!(bytes_of(&spread, 256), page_content(9, 256));
}
