//! The background scanner merges while owners write: every owner must always see exactly
//! what it wrote (its shadow copy), and never another owner's writes.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{Random, TestRegion, page_content};
use samepage_dedup::{Engine, EngineConfig, Knobs, PAGE_SIZE};

#[test]
fn owners_see_their_own_writes_while_merging_runs() {
    let engine = Engine::new(EngineConfig {
        scanner: true,
        knobs: Knobs {
            pages_to_scan: 256,
            sleep: Duration::ZERO,
            ..Knobs::default()
        },
        stable_capacity_bytes: 1 << 30,
        ..samepage_dedup::EngineConfig::default()
    })
    .expect("engine");
    let pages = 512;
    // Every third page unique to its region: merging makes windows with private copies as
    // well as plain runs.
    let regions: Vec<TestRegion> = (0..4)
        .map(|n| {
            let mut region = TestRegion::new(&engine, pages);
            region.fill(1, 0..pages);
            for page in (0..pages).step_by(3) {
                region.write(page * PAGE_SIZE, &page_content(10 + n, page));
            }
            region
        })
        .collect();
    let stop = AtomicBool::new(false);
    let deadline = Instant::now() + Duration::from_secs(3);
    std::thread::scope(|scope| {
        let stop = &stop;
        let workers: Vec<_> = regions
            .into_iter()
            .enumerate()
            .map(|(n, mut region)| {
                scope.spawn(move || {
                    let mut rng = Random(0x5EED + n as u64);
                    let mut rounds = 0;
                    while !stop.load(Ordering::Relaxed) {
                        let page = rng.below(pages);
                        match rng.below(4) {
                            // A small write inside a page, maybe a merged one.
                            0 => {
                                let offset = page * PAGE_SIZE + rng.below(PAGE_SIZE - 8);
                                region.write(offset, &rng.next_u64().to_le_bytes());
                            }
                            // Content other owners hold too: it should merge again.
                            1 => region.write(page * PAGE_SIZE, &page_content(1, page)),
                            // Content shared with a neighbour page of the same owner.
                            2 => region.write(page * PAGE_SIZE, &page_content(2, 0)),
                            _ => {
                                let bytes = region.bytes();
                                assert!(bytes == region.shadow, "owner {n} sees other bytes");
                            }
                        }
                        rounds += 1;
                        std::thread::sleep(Duration::from_micros(200));
                    }
                    region.assert_matches_shadow();
                    (region, rounds)
                })
            })
            .collect();
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        stop.store(true, Ordering::Relaxed);
        let regions: Vec<TestRegion> = workers
            .into_iter()
            .map(|w| w.join().expect("worker").0)
            .collect();
        let stats = engine.stats();
        assert!(stats.pages_sharing > 0, "merging ran: {stats:?}");
        assert_eq!(stats.errors, 0, "{:?}", engine.last_error());
        assert!(engine.audit().mismatched_slots.is_empty());
        for region in &regions {
            region.assert_matches_shadow();
        }
    });
}
