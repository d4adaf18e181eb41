//! Property tests: random sequences of engine operations, each followed by every check the
//! engine owes its owners, and, at the end of each sequence, the state a converged scanner
//! must reach, predicted from a model of what the owners wrote and advised.
//!
//! The model is the owners' side only: each region's shadow copy (in [`TestRegion`]), its
//! domain, which of its pages its owner advised unmergeable, and the sharing limit. From it
//! the test predicts, without looking at how the engine got there:
//!
//! - after every operation: every page reads as its shadow; the audit is clean; the owners'
//!   merged pages add up to `pages_sharing + pages_shared`; no stable page has more sharers
//!   than the limit or sharers of two domains (the kernel's view); a page advised
//!   unmergeable is its region's own; after unmerge-all, nothing is merged; a change of
//!   `max_page_sharing` is refused exactly when stable pages exist;
//! - once the scanner has converged: no two unmerged, mergeable, non-zero pages of one domain
//!   hold the same bytes, and such a page's content has no stable page in its domain with
//!   room for another sharer.
//!
//! Some operations write while the scanner merges: the owner lends its gate (its guest code
//! runs, rule 7 of `quiesce`) and writes in a thread of its own during passes, which merge it
//! in write-protect windows; the same checks follow.
//!
//! Half the sequences run with smart scan, which also decides when idle regions are visited,
//! and converge over its longest skip.
//!
//! `PROPTEST_CASES` sets the number of sequences (CI runs the default below); a failure is
//! shrunk to a short sequence and printed with its operations.

mod common;

use std::collections::HashMap;
use std::fs::File;

use common::kernel::{Backing, KernelView, checkpoint};
use common::{TestRegion, manual_engine, page_content};
use proptest::prelude::*;
use samepage_dedup::{Advice, Engine, Knobs, Owner, PAGE_SIZE};

const REGIONS: usize = 4;
const FIRST_PAGES: usize = 12;
/// Contents written to many pages of many regions: the duplicates chains are made of.
const COMMON_CONTENTS: u64 = 3;

/// What an owner writes to a whole page.
#[derive(Clone, Debug)]
enum Content {
    /// One of [`COMMON_CONTENTS`] pages, the same in every region and at every offset.
    Common(u64),
    /// Bytes no other page holds.
    Unique(u64),
    Zero,
}

#[derive(Clone, Debug)]
enum Operation {
    /// Page numbers and offsets are taken modulo the region's current size.
    Write {
        region: usize,
        page: usize,
        content: Content,
    },
    /// Eight bytes written into a page (into a merged page, a copy-on-write break).
    Poke {
        region: usize,
        offset: usize,
        value: u64,
    },
    Passes(u8),
    /// The owner of `region` runs (its gate lent, rule 7 of `quiesce`) and writes `writes`
    /// in a thread of its own, each read back at once, while the scanner runs `passes`
    /// passes and merges it in write-protect windows, then (`unmerge`) unmerges everything,
    /// the running owner in windows too.
    WriteWhileMerging {
        region: usize,
        writes: Vec<(usize, Content)>,
        passes: u8,
        unmerge: bool,
    },
    MergeNow {
        region: usize,
    },
    Advise {
        region: usize,
        first: usize,
        count: usize,
        unmergeable: bool,
    },
    UnmergeRegion {
        region: usize,
    },
    UnmergeAll,
    Grow {
        region: usize,
        pages: usize,
    },
    Reset {
        region: usize,
    },
    /// The owner drops the region and makes a new one of the same domain.
    Replace {
        region: usize,
    },
    SetMaxSharing(u32),
    UseZeroPages(bool),
}

fn content() -> impl Strategy<Value = Content> {
    prop_oneof![
        4 => (0..COMMON_CONTENTS).prop_map(Content::Common),
        1 => any::<u64>().prop_map(Content::Unique),
        1 => Just(Content::Zero),
    ]
}

/// The bytes `content` stands for at page `page`.
fn bytes_of(content: &Content, page: usize) -> Vec<u8> {
    match *content {
        Content::Common(n) => page_content(n, 0),
        Content::Unique(seed) => page_content(seed | 1 << 63, page),
        Content::Zero => vec![0; PAGE_SIZE],
    }
}

fn operation() -> impl Strategy<Value = Operation> {
    let region = 0..REGIONS;
    prop_oneof![
        12 => (region.clone(), 0..64usize, content())
            .prop_map(|(region, page, content)| Operation::Write { region, page, content }),
        3 => (region.clone(), any::<usize>(), any::<u64>())
            .prop_map(|(region, offset, value)| Operation::Poke { region, offset, value }),
        4 => (1..4u8).prop_map(Operation::Passes),
        3 => (
            region.clone(),
            prop::collection::vec((0..64usize, content()), 1..24),
            1..4u8,
            prop::bool::weighted(0.25)
        )
            .prop_map(|(region, writes, passes, unmerge)| Operation::WriteWhileMerging {
                region,
                writes,
                passes,
                unmerge,
            }),
        // Long enough for smart scan to back off every page that matches nothing, and for
        // regions to go idle.
        1 => (33..80u8).prop_map(Operation::Passes),
        2 => region.clone().prop_map(|region| Operation::MergeNow { region }),
        2 => (region.clone(), 0..64usize, 1..6usize, any::<bool>()).prop_map(
            |(region, first, count, unmergeable)| Operation::Advise {
                region,
                first,
                count,
                unmergeable,
            }
        ),
        1 => region.clone().prop_map(|region| Operation::UnmergeRegion { region }),
        1 => Just(Operation::UnmergeAll),
        1 => (region.clone(), 1..6usize).prop_map(|(region, pages)| Operation::Grow { region, pages }),
        1 => region.clone().prop_map(|region| Operation::Reset { region }),
        1 => region.prop_map(|region| Operation::Replace { region }),
        1 => (2..5u32).prop_map(Operation::SetMaxSharing),
        1 => any::<bool>().prop_map(Operation::UseZeroPages),
    ]
}

struct Model {
    engine: Engine,
    regions: Vec<TestRegion>,
    /// Per region, per page: advised unmergeable.
    unmergeable: Vec<Vec<bool>>,
    max_sharing: u32,
    pagemap: File,
}

fn page(region: &TestRegion, page: usize) -> &[u8] {
    &region.shadow[page * PAGE_SIZE..(page + 1) * PAGE_SIZE]
}

impl Model {
    /// With `smart_scan` off every page is looked at in every pass, so that convergence
    /// takes few passes; with it on, pages that keep matching nothing are looked at only on
    /// every 32nd pass, and so are idle regions.
    fn new(smart_scan: bool) -> Self {
        let max_sharing = 3;
        let engine = manual_engine(Knobs {
            max_page_sharing: max_sharing,
            smart_scan,
            // Owners that lend their gates are merged from their first moment.
            merge_running_after: std::time::Duration::ZERO,
            ..Knobs::default()
        });
        let regions = (0..REGIONS)
            .map(|n| TestRegion::with_owner(&engine, Owner::new(n as u32 % 2), FIRST_PAGES))
            .collect();
        Self {
            engine,
            regions,
            unmergeable: vec![vec![false; FIRST_PAGES]; REGIONS],
            max_sharing,
            pagemap: File::open("/proc/self/pagemap").expect("pagemap"),
        }
    }

    fn apply(&mut self, operation: &Operation) {
        let engine = &self.engine;
        match *operation {
            Operation::Write {
                region,
                page,
                ref content,
            } => {
                let region = &mut self.regions[region];
                let page = page % region.pages();
                region.write(page * PAGE_SIZE, &bytes_of(content, page));
            }
            Operation::WriteWhileMerging {
                region,
                ref writes,
                passes,
                unmerge,
            } => {
                let target = &mut self.regions[region];
                let visits = engine.stats().regions_running_visits;
                let lent = target.owner.enter().lend();
                std::thread::scope(|scope| {
                    let writer = scope.spawn(|| {
                        for (page, content) in writes {
                            let page = page % target.pages();
                            target.write_running(page * PAGE_SIZE, &bytes_of(content, page));
                            assert!(
                                target.page_matches_shadow_running(page),
                                "page {page} of region {region} right after a write"
                            );
                        }
                    });
                    for _ in 0..passes {
                        engine.scan_pass().expect("pass");
                    }
                    if unmerge {
                        assert_eq!(engine.unmerge_all().expect("unmerge-all"), 0, "busy");
                    }
                    writer.join().expect("writer");
                });
                drop(lent.reclaim());
                assert!(
                    engine.stats().regions_running_visits > visits,
                    "the running owner was visited"
                );
            }
            Operation::Poke {
                region,
                offset,
                value,
            } => {
                let region = &mut self.regions[region];
                let offset = offset % (region.pages() * PAGE_SIZE - 8);
                region.write(offset, &value.to_le_bytes());
            }
            Operation::Passes(passes) => {
                for _ in 0..passes {
                    engine.scan_pass().expect("pass");
                }
            }
            Operation::MergeNow { region } => {
                let region = &self.regions[region];
                let guard = region.owner.enter();
                engine
                    .merge_now(&guard, region.handle().id(), 0..region.pages() * PAGE_SIZE)
                    .expect("merge-now");
            }
            Operation::Advise {
                region,
                first,
                count,
                unmergeable,
            } => {
                let pages = self.regions[region].pages();
                let first = first % pages;
                let end = (first + count).min(pages);
                let advice = if unmergeable {
                    Advice::Unmergeable
                } else {
                    Advice::Mergeable
                };
                self.regions[region]
                    .advise(engine, first..end, advice)
                    .expect("advise");
                self.unmergeable[region][first..end].fill(unmergeable);
            }
            Operation::UnmergeRegion { region } => {
                let region = &self.regions[region];
                let guard = region.owner.enter();
                engine
                    .unmerge_region(&guard, region.handle().id())
                    .expect("unmerge");
            }
            Operation::UnmergeAll => {
                assert_eq!(
                    engine.unmerge_all().expect("unmerge-all"),
                    0,
                    "busy regions"
                );
                let stats = engine.stats();
                assert_eq!(
                    (stats.pages_shared, stats.pages_sharing),
                    (0, 0),
                    "merged pages after unmerge-all"
                );
            }
            Operation::Grow { region, pages } => {
                let pages = self.regions[region].pages() + pages;
                self.regions[region].grow(pages);
                self.unmergeable[region].resize(pages, false);
            }
            Operation::Reset { region } => self.regions[region].reset(engine, None),
            Operation::Replace { region } => {
                let owner = Owner::new(self.regions[region].owner.domain());
                self.regions[region] = TestRegion::with_owner(engine, owner, FIRST_PAGES);
                self.unmergeable[region] = vec![false; FIRST_PAGES];
            }
            Operation::SetMaxSharing(limit) => {
                let shared = engine.stats().pages_shared;
                let result = engine.set_knobs(Knobs {
                    max_page_sharing: limit,
                    ..engine.knobs()
                });
                if limit == self.max_sharing {
                    result.expect("the same limit");
                } else if shared > 0 {
                    assert!(result.is_err(), "a new limit with {shared} stable pages");
                } else {
                    result.expect("a new limit with no stable page");
                    self.max_sharing = limit;
                }
            }
            Operation::UseZeroPages(on) => engine
                .set_knobs(Knobs {
                    use_zero_pages: on,
                    ..engine.knobs()
                })
                .expect("use_zero_pages"),
        }
    }

    /// Every check owed after any operation; returns the kernel's view.
    fn check(&self, step: &str) -> KernelView {
        let (view, _) = checkpoint(
            &self.engine,
            &self.regions,
            &self.pagemap,
            self.max_sharing,
            step,
        );
        for (n, (unmergeable, pages)) in self.unmergeable.iter().zip(&view.pages).enumerate() {
            for (page, backing) in pages.iter().enumerate() {
                assert!(
                    !unmergeable[page] || matches!(backing, Backing::Own),
                    "{step}: region {n} page {page}, advised unmergeable, is {backing:?}"
                );
            }
        }
        view
    }

    /// Scans until nothing changes for twice as many passes as it takes to look at every
    /// page (`Knobs::passes_to_see_every_page`) and two more, then checks what convergence
    /// promises. Twice: a page that smart scan had backed off and that then changed is seen
    /// changed on one of its turns and, by KSM's rule, compared only on the next.
    fn converge(&self) {
        let settled = 2 * self.engine.knobs().passes_to_see_every_page() + 2;
        let most = 16 * settled + 32;
        let mut last = None;
        let mut quiet = 0;
        for _ in 0..most {
            self.engine.scan_pass().expect("pass");
            let stats = self.engine.stats();
            let now = (stats.pages_shared, stats.pages_sharing, stats.zero_pages);
            quiet = if last == Some(now) { quiet + 1 } else { 0 };
            last = Some(now);
            if quiet == settled {
                break;
            }
        }
        assert_eq!(
            quiet, settled,
            "the scanner did not settle in {most} passes"
        );
        let view = self.check("converged");
        // (domain, bytes) -> (region, page) of each unmerged mergeable page holding them; and
        // stable slot -> (domain, bytes, sharers).
        type Unmerged<'a> = HashMap<(u32, &'a [u8]), Vec<(usize, usize)>>;
        let mut unmerged: Unmerged = HashMap::new();
        let mut stable: HashMap<u64, (u32, &[u8], u32)> = HashMap::new();
        for (n, (region, pages)) in self.regions.iter().zip(&view.pages).enumerate() {
            let domain = region.owner.domain();
            for (number, backing) in pages.iter().enumerate() {
                let bytes = page(region, number);
                if self.unmergeable[n][number] || bytes.iter().all(|&b| b == 0) {
                    continue;
                }
                match *backing {
                    Backing::Stable { slot } => {
                        stable.entry(slot).or_insert((domain, bytes, 0)).2 += 1
                    }
                    Backing::Own | Backing::PrivateCopy => unmerged
                        .entry((domain, bytes))
                        .or_default()
                        .push((n, number)),
                }
            }
        }
        for ((domain, bytes), pages) in &unmerged {
            assert!(
                pages.len() == 1,
                "converged: pages {pages:?} of domain {domain} hold the same bytes, unmerged"
            );
            for (slot, (_, _, sharers)) in stable
                .iter()
                .filter(|(_, (d, b, _))| d == domain && b == bytes)
            {
                assert_eq!(
                    *sharers, self.max_sharing,
                    "converged: page {:?} stays unmerged while stable page {slot} of its \
                     content has room",
                    pages[0]
                );
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 256,
        // Each case maps and remaps real memory: shrinking reruns are as costly, and cut at 512.
        max_shrink_iters: 512,
        .. ProptestConfig::default()
    })]

    #[test]
    fn any_sequence_keeps_every_owner_whole_and_converges_to_the_model(
        smart_scan in any::<bool>(),
        operations in proptest::collection::vec(operation(), 1..48)
    ) {
        let mut model = Model::new(smart_scan);
        for (n, operation) in operations.iter().enumerate() {
            model.apply(operation);
            model.check(&format!("after operation {n} ({operation:?})"));
        }
        model.converge();
    }
}
