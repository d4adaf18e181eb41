//! The guest API from a core module (`examples/guests/advice.wat`), through the core imports
//! `wit-bindgen c` declares: every error case, unmergeable ranges never read, exact merge-now
//! counts, and the guests' memories against shadow copies throughout.

use std::path::Path;

mod common;

use common::host;
use samepage_dedup::PAGE_SIZE;
use samepage_runtime::{Host, Instance, Program, Val, WasiOptions};

/// The return values of the guest's `advise` wrapper for the WIT `error` cases.
const OUT_OF_BOUNDS: i32 = 0;
const UNALIGNED: i32 = 1;
const DISABLED: i32 = 2;
const LIMIT: i32 = 3;
const MERGEABLE: i32 = 0;
const UNMERGEABLE: i32 = 1;

/// Pages the tests fill, from page `FIRST` on (page 0 is the guest's return area).
const FIRST: usize = 16;
const PAGES: usize = 1024;

fn guest(host: &Host) -> Program {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/guests/advice.wat");
    host.load(&path).expect("advice.wat")
}

/// A guest instance and a shadow copy of its memory.
struct Guest {
    instance: Instance,
    shadow: Vec<u8>,
}

impl Guest {
    fn new(host: &Host, program: &Program) -> Self {
        let mut instance = host
            .instantiate(program, &WasiOptions::default())
            .expect("instance");
        let shadow = instance
            .with_memory(|memory| memory.to_vec())
            .expect("memory");
        Self { instance, shadow }
    }

    /// Fills pages `first..first + pages` in the guest and, independently, in the shadow.
    fn fill(&mut self, seed: u64, first: usize, pages: usize) {
        self.instance
            .call(
                "fill",
                &[
                    Val::I64(seed as i64),
                    Val::I32(first as i32),
                    Val::I32(pages as i32),
                ],
            )
            .expect("fill");
        for page in first..first + pages {
            for word in 0..PAGE_SIZE / 8 {
                let value = (((page as u64) << 32) | word as u64) ^ seed;
                let at = page * PAGE_SIZE + word * 8;
                self.shadow[at..at + 8].copy_from_slice(&value.to_le_bytes());
            }
        }
    }

    /// `advise` as the guest calls it: `Ok` or the WIT error's number.
    fn advise(&mut self, offset: u64, length: u64, kind: i32) -> Result<(), i32> {
        let results = self
            .instance
            .call(
                "advise",
                &[
                    Val::I64(offset as i64),
                    Val::I64(length as i64),
                    Val::I32(kind),
                ],
            )
            .expect("advise never traps on a bad range");
        match (results[0].unwrap_i32(), results[1].unwrap_i32()) {
            (0, _) => Ok(()),
            (_, error) => Err(error),
        }
    }

    fn advise_pages(&mut self, pages: std::ops::Range<usize>, kind: i32) -> Result<(), i32> {
        self.advise(
            (pages.start * PAGE_SIZE) as u64,
            (pages.len() * PAGE_SIZE) as u64,
            kind,
        )
    }

    /// `merge-now`: (pages merged, zero pages) or the error's number.
    fn merge_now(&mut self, pages: std::ops::Range<usize>) -> Result<(u64, u64), i32> {
        let results = self
            .instance
            .call(
                "merge_now",
                &[
                    Val::I64((pages.start * PAGE_SIZE) as i64),
                    Val::I64((pages.len() * PAGE_SIZE) as i64),
                ],
            )
            .expect("merge-now never traps on a bad range");
        match results[0].unwrap_i32() {
            0 => Ok((
                results[1].unwrap_i64() as u64,
                results[2].unwrap_i64() as u64,
            )),
            _ => Err(results[1].unwrap_i64() as i32),
        }
    }

    /// `stats`: (pages merged, zero pages, profit bytes).
    fn stats(&mut self) -> (u64, u64, i64) {
        let results = self.instance.call("stats", &[]).expect("stats");
        (
            results[0].unwrap_i64() as u64,
            results[1].unwrap_i64() as u64,
            results[2].unwrap_i64(),
        )
    }

    /// Every page but page 0, the return area the host writes results into, matches.
    fn assert_matches_shadow(&mut self) {
        let memory = self
            .instance
            .with_memory(|memory| memory.to_vec())
            .expect("memory");
        assert_eq!(memory.len(), self.shadow.len(), "memory size");
        if let Some(page) = (1..memory.len() / PAGE_SIZE).find(|&p| {
            memory[p * PAGE_SIZE..(p + 1) * PAGE_SIZE]
                != self.shadow[p * PAGE_SIZE..(p + 1) * PAGE_SIZE]
        }) {
            panic!("page {page} differs from the shadow copy");
        }
    }
}

#[test]
fn bad_ranges_are_error_values() {
    let host = host(true);
    let program = guest(&host);
    let mut guest = Guest::new(&host, &program);
    let size = guest.instance.memory_size().expect("size") as u64;
    assert_eq!(guest.advise(100, 4096, MERGEABLE), Err(UNALIGNED));
    assert_eq!(
        guest.advise(4096, u64::MAX, MERGEABLE),
        Err(OUT_OF_BOUNDS),
        "overflow"
    );
    assert_eq!(
        guest.advise(u64::MAX - 4095, 1, MERGEABLE),
        Err(OUT_OF_BOUNDS),
        "overflow"
    );
    assert_eq!(guest.advise(size, 4096, MERGEABLE), Err(OUT_OF_BOUNDS));
    assert_eq!(
        guest.advise(size - 4096, 4097, MERGEABLE),
        Err(OUT_OF_BOUNDS),
        "rounded up"
    );
    assert_eq!(
        guest.advise(size - 4096, 1, UNMERGEABLE),
        Ok(()),
        "rounded up, inside"
    );
    assert_eq!(
        guest.advise(size, 0, MERGEABLE),
        Ok(()),
        "length 0 does nothing"
    );
    assert_eq!(guest.merge_now(0..0), Ok((0, 0)));
    assert_eq!(
        guest.merge_now((size as usize) / PAGE_SIZE..(size as usize) / PAGE_SIZE + 1),
        Err(OUT_OF_BOUNDS)
    );
    // After growth the new pages are in range.
    let grown = guest.instance.call("grow", &[Val::I32(1)]).expect("grow");
    assert_eq!(grown[0].unwrap_i32(), (size / 65536) as i32);
    assert_eq!(guest.advise(size, 65536, UNMERGEABLE), Ok(()));
    guest.shadow.resize(size as usize + 65536, 0);
    guest.assert_matches_shadow();
}

#[test]
fn an_advice_kind_or_a_return_pointer_out_of_range_traps_as_the_abi_says() {
    let host = host(true);
    let program = guest(&host);
    let mut guest = Guest::new(&host, &program);
    let error = guest
        .instance
        .call("advise", &[Val::I64(0), Val::I64(4096), Val::I32(7)])
        .expect_err("kind 7");
    assert!(format!("{error:?}").contains("advice-kind 7"), "{error:?}");
    let error = guest
        .instance
        .call("advise_ret", &[Val::I32(-1)])
        .expect_err("outside memory");
    assert!(format!("{error:?}").contains("outside memory"), "{error:?}");
    // The instance is fine afterwards.
    assert_eq!(guest.advise(0, 4096, MERGEABLE), Ok(()));
}

#[test]
fn a_host_without_merging_says_disabled() {
    let host = host(false);
    let program = guest(&host);
    let mut guest = Guest::new(&host, &program);
    assert_eq!(guest.advise(0, 4096, MERGEABLE), Err(DISABLED));
    assert_eq!(guest.merge_now(0..1), Err(DISABLED));
    assert_eq!(guest.stats(), (0, 0, 0));
}

#[test]
fn the_advised_range_bound_is_limit() {
    let host = host(true);
    let program = guest(&host);
    let mut guest = Guest::new(&host, &program);
    let bound = samepage_dedup::advice::MAX_ADVISED_RANGES;
    for n in 0..bound {
        assert_eq!(guest.advise_pages(2 * n..2 * n + 1, UNMERGEABLE), Ok(()));
    }
    assert_eq!(
        guest.advise_pages(2 * bound..2 * bound + 1, UNMERGEABLE),
        Err(LIMIT)
    );
}

#[test]
fn merge_now_counts_exactly_and_unmergeable_pages_are_never_read() {
    let host = host(true);
    let program = guest(&host);
    let mut a = Guest::new(&host, &program);
    let mut b = Guest::new(&host, &program);
    let secret = FIRST + PAGES..FIRST + PAGES + 64;
    for guest in [&mut a, &mut b] {
        guest.fill(0x5EED, FIRST, PAGES);
        // The same bytes in the secret range: they would certainly merge.
        guest.fill(0x5EED, secret.start, secret.len());
        assert_eq!(guest.advise_pages(secret.clone(), UNMERGEABLE), Ok(()));
    }
    let whole = FIRST..secret.end;
    // a's pages have no partner yet; then b matches every one of them.
    assert_eq!(a.merge_now(whole.clone()), Ok((0, 0)));
    assert_eq!(b.merge_now(whole.clone()), Ok((PAGES as u64, 0)));
    assert_eq!(a.stats().0, PAGES as u64);
    assert_eq!(b.stats().0, PAGES as u64);
    let engine = host.dedup().expect("merging");
    let stats = engine.stats();
    assert_eq!(
        (stats.pages_shared, stats.pages_sharing),
        (PAGES as u64, PAGES as u64)
    );
    // Scanning on does not touch the secrets either: never hashed, never indexed.
    for _ in 0..3 {
        engine.scan_pass().expect("pass");
    }
    let stats = engine.stats();
    // Page 0 merges too: the return area holds the same results in both.
    assert_eq!(stats.pages_sharing, PAGES as u64 + 1);
    assert_eq!((stats.pages_unshared, stats.pages_volatile), (0, 0));
    a.assert_matches_shadow();
    b.assert_matches_shadow();
}

#[test]
fn memories_match_their_shadows_across_advise_merge_now_and_unmerge() {
    let host = host(true);
    let program = guest(&host);
    let mut guests: Vec<Guest> = (0..3).map(|_| Guest::new(&host, &program)).collect();
    for guest in &mut guests {
        guest.fill(0xC0DE, FIRST, PAGES);
    }
    for guest in &mut guests {
        guest.merge_now(FIRST..FIRST + PAGES).expect("merge now");
    }
    assert_eq!(
        host.dedup().expect("merging").stats().pages_sharing,
        2 * PAGES as u64
    );
    // Writes into merged pages are each guest's own.
    guests[0].fill(1, FIRST + 10, 5);
    guests[1].fill(2, FIRST + 12, 100);
    for guest in &mut guests {
        guest.assert_matches_shadow();
    }
    // Unmergeable gives the pages back; mergeable again lets them merge again.
    guests[2]
        .advise_pages(FIRST..FIRST + 512, UNMERGEABLE)
        .expect("advise");
    guests[2].assert_matches_shadow();
    assert_eq!(guests[2].stats().0, (PAGES - 512) as u64);
    guests[2].fill(3, FIRST + 500, 2);
    guests[2]
        .advise_pages(FIRST..FIRST + 512, MERGEABLE)
        .expect("advise");
    let (merged, _) = guests[2]
        .merge_now(FIRST..FIRST + PAGES)
        .expect("merge now");
    assert_eq!(merged, (PAGES - 2) as u64, "all but the two pages written");
    host.dedup()
        .expect("merging")
        .unmerge_all()
        .expect("unmerge all");
    for guest in &mut guests {
        guest.assert_matches_shadow();
        assert_eq!(guest.stats().0, 0);
    }
    assert!(
        host.dedup()
            .expect("merging")
            .audit()
            .mismatched_slots
            .is_empty()
    );
}
