//! Module images: built once in the stable store, mapped into new regions as merged pages,
//! and the target of a reset; every step checked against shadow copies.

mod common;

use common::{TestRegion, manual_engine, page_content};
use samepage_dedup::{Engine, Error, Knobs, MemfdMapping, Owner, PAGE_SIZE};

/// An image of `pages` pages: page `i` holds `page_content(seed, i)`, except every fourth,
/// which holds zeros (as the gaps between data segments do).
fn image_bytes(seed: u64, pages: usize) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(pages * PAGE_SIZE);
    for page in 0..pages {
        if page % 4 == 3 {
            bytes.extend_from_slice(&[0; PAGE_SIZE]);
        } else {
            bytes.extend_from_slice(&page_content(seed, page));
        }
    }
    bytes
}

fn settle(engine: &Engine) {
    engine.scan_pass().expect("pass");
    engine.scan_pass().expect("pass");
}

#[test]
fn regions_made_from_an_image_start_merged_without_a_copy() {
    let engine = manual_engine(Knobs::default());
    let bytes = image_bytes(1, 64);
    let image = engine.image(0, &bytes).expect("image");
    let stats = engine.stats();
    // The non-zero pages and the zero pages between them (runs of one, bridged so that each
    // region maps the image with one mapping); the last page's zeros need nothing.
    assert_eq!(stats.image_pages, 63, "the image's pages, once");
    assert_eq!(stats.pages_shared, 0, "no sharer yet");
    let regions: Vec<TestRegion> = (0..4)
        .map(|_| TestRegion::with_image(&engine, Owner::new(0), 128, &image, &bytes))
        .collect();
    let stats = engine.stats();
    assert_eq!(stats.pages_shared, 63);
    assert_eq!(
        stats.pages_sharing,
        3 * 63,
        "four sharers of every image page"
    );
    for region in &regions {
        // Before anything reads the zero pages: a read of a memfd hole allocates a page.
        assert_eq!(region.own_resident_pages(), 0, "nothing was copied in");
        region.assert_matches_shadow();
    }
    assert!(engine.audit().mismatched_slots.is_empty());
    assert!(engine.audit().index_sound);
    // The image lives on without regions, and goes with its last holder.
    drop(regions);
    assert_eq!(engine.stats().image_pages, 63);
    assert_eq!(engine.audit().stable_pages, 63);
    drop(image);
    assert_eq!(engine.stats().image_pages, 0);
    assert_eq!(engine.audit().stable_pages, 0);
}

#[test]
fn short_zero_runs_join_an_images_segments_and_long_ones_split_them() {
    let engine = manual_engine(Knobs::default());
    // 8 pages of data, 32 of zeros, 8 of data, 4 of zeros, 8 of data.
    let mut bytes = Vec::new();
    for page in 0..60 {
        let zero = (8..40).contains(&page) || (48..52).contains(&page);
        bytes.extend(if zero {
            vec![0; PAGE_SIZE]
        } else {
            page_content(5, page)
        });
    }
    let image = engine.image(0, &bytes).expect("image");
    assert_eq!(
        engine.stats().image_pages,
        28,
        "the data and the 4 zero pages between two runs of it; not the 32"
    );
    let before = engine.stats().vmas;
    let region = TestRegion::with_image(&engine, Owner::new(0), 64, &image, &bytes);
    settle(&engine);
    // Two segments (8 pages; 20 with the 4 zero pages taken in) in the region's own
    // mapping: four mappings, as the kernel counts them, and the engine with it. A zero run
    // left out would add two more.
    assert_eq!(region.mappings(), 4);
    assert_eq!(
        engine.stats().vmas - before,
        3,
        "the engine counts what the kernel does"
    );
    assert_eq!(region.own_resident_pages(), 0, "nothing was copied in");
    region.assert_matches_shadow();
    assert!(engine.audit().mismatched_slots.is_empty());
}

#[test]
fn writes_to_image_pages_stay_private_and_leave_the_image_intact() {
    let engine = manual_engine(Knobs::default());
    let bytes = image_bytes(2, 32);
    let image = engine.image(0, &bytes).expect("image");
    let mut a = TestRegion::with_image(&engine, Owner::new(0), 64, &image, &bytes);
    let b = TestRegion::with_image(&engine, Owner::new(0), 64, &image, &bytes);
    a.write(5 * PAGE_SIZE + 17, b"written by a");
    a.write(3 * PAGE_SIZE, b"into a zero page of the image");
    a.write(40 * PAGE_SIZE, b"past the image");
    a.assert_matches_shadow();
    b.assert_matches_shadow();
    // The scanner gives the written page back to `a`; the image keeps its page.
    settle(&engine);
    a.assert_matches_shadow();
    b.assert_matches_shadow();
    assert!(engine.audit().mismatched_slots.is_empty());
    // A region made now still starts as the image said.
    let c = TestRegion::with_image(&engine, Owner::new(0), 64, &image, &bytes);
    c.assert_matches_shadow();
    // Unmerging gives every page back with the same bytes.
    assert_eq!(engine.unmerge_all().expect("unmerge"), 0);
    for region in [&a, &b, &c] {
        region.assert_matches_shadow();
    }
}

#[test]
fn reset_returns_to_the_image_whatever_the_owner_did() {
    let engine = manual_engine(Knobs::default());
    let bytes = image_bytes(3, 32);
    let image = engine.image(0, &bytes).expect("image");
    let mut a = TestRegion::with_image(&engine, Owner::new(0), 64, &image, &bytes);
    let mut b = TestRegion::with_image(&engine, Owner::new(0), 64, &image, &bytes);
    for region in [&mut a, &mut b] {
        region.fill(9, 20..48);
        region.write(2 * PAGE_SIZE, b"dirty");
    }
    settle(&engine);
    assert!(engine.stats().pages_sharing > 0);
    a.grow(96);
    a.write(90 * PAGE_SIZE, b"grown");
    a.reset(&engine, Some((&image, &bytes)));
    assert_eq!(a.own_resident_pages(), 0, "what the owner wrote is freed");
    a.assert_matches_shadow();
    b.assert_matches_shadow();
    assert!(engine.audit().mismatched_slots.is_empty());
    // Reset without an image: zeros.
    b.reset(&engine, None);
    b.assert_matches_shadow();
    assert_eq!(b.mappings(), 1);
    settle(&engine);
    a.assert_matches_shadow();
    assert!(engine.audit().mismatched_slots.is_empty());
}

#[test]
fn images_of_two_modules_share_the_pages_where_they_agree_within_a_domain_only() {
    let engine = manual_engine(Knobs::default());
    let first = image_bytes(4, 16);
    let mut second = first.clone();
    // The second module differs in its last four pages.
    second[12 * PAGE_SIZE..].copy_from_slice(&image_bytes(5, 16)[12 * PAGE_SIZE..]);
    let a = engine.image(0, &first).expect("image");
    let b = engine.image(0, &second).expect("image");
    // The first's 12 non-zero pages and the 3 zero pages between them (its last page, zeros,
    // needs nothing), plus the 3 non-zero of the second's last four.
    assert_eq!(engine.stats().image_pages, 15 + 3);
    let other_tenant = engine.image(1, &first).expect("image");
    assert_eq!(
        engine.stats().image_pages,
        15 + 3 + 15,
        "no sharing across domains"
    );
    let ra = TestRegion::with_image(&engine, Owner::new(0), 16, &a, &first);
    let rb = TestRegion::with_image(&engine, Owner::new(0), 16, &b, &second);
    let rc = TestRegion::with_image(&engine, Owner::new(1), 16, &other_tenant, &first);
    for region in [&ra, &rb, &rc] {
        region.assert_matches_shadow();
    }
    assert_eq!(
        engine.stats().pages_sharing,
        12,
        "the pages both modules hold: their first 12, zeros between them included"
    );
    let error = MemfdMapping::with_image(
        Some((&engine, Some(&a))),
        &Owner::new(1),
        "wrong-domain",
        16 * PAGE_SIZE,
        16 * PAGE_SIZE,
        0,
    )
    .err()
    .expect("an image of another domain is refused");
    assert!(error.to_string().contains("domain"), "{error}");
    let error = MemfdMapping::with_image(
        Some((&engine, Some(&a))),
        &Owner::new(0),
        "too-short",
        8 * PAGE_SIZE,
        8 * PAGE_SIZE,
        0,
    )
    .err()
    .expect("a region shorter than its image is refused");
    assert!(
        matches!(
            error,
            samepage_dedup::MappingError::Register(Error::ImageTooLong { .. })
        ),
        "{error}"
    );
}

#[test]
fn a_full_image_page_gets_a_copy_and_the_sharing_limit_holds() {
    let engine = manual_engine(Knobs {
        max_page_sharing: 2,
        ..Knobs::default()
    });
    let bytes = image_bytes(6, 8);
    let image = engine.image(0, &bytes).expect("image");
    let mut regions: Vec<TestRegion> = (0..5)
        .map(|_| TestRegion::with_image(&engine, Owner::new(0), 8, &image, &bytes))
        .collect();
    let audit = engine.audit();
    assert_eq!(audit.max_sharers, 2);
    assert!(audit.mismatched_slots.is_empty() && audit.index_sound);
    assert_eq!(
        engine.stats().pages_shared,
        3 * 7,
        "three copies of seven pages (six of data, the zeros between them)"
    );
    for (n, region) in regions.iter_mut().enumerate() {
        region.write(n * PAGE_SIZE, b"mine");
    }
    settle(&engine);
    for region in &regions {
        region.assert_matches_shadow();
    }
    let audit = engine.audit();
    assert!(
        audit.max_sharers <= 2 && audit.mismatched_slots.is_empty() && audit.index_sound,
        "{audit:?}"
    );
}

#[test]
fn an_image_that_is_not_whole_pages_is_refused() {
    let engine = manual_engine(Knobs::default());
    assert!(matches!(
        engine.image(0, &[1; 100]),
        Err(Error::ImageUnaligned(100))
    ));
}
