//! Fault injection (feature `fault-injection`, see `samepage_dedup::faults`): every system
//! call through which the engine changes or reads memory is made to fail, at each position it
//! takes in a workload that merges, breaks copy-on-write, recovers sharers that left,
//! unmerges and resets to an image. After each failure: every region reads exactly its
//! shadow copy, the audit is clean, and once the faults stop the engine merges everything a
//! fault-free engine merges. Also: ENOMEM from `mmap`, a full map-count budget, an owner
//! dropped while the scanner is busy with its regions, and an owner panicking with its guard.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{TestRegion, page_content};
use rustix::io::Errno;
use samepage_dedup::faults::{Syscall, fail_nth, take_unfired};
use samepage_dedup::{Engine, EngineConfig, Knobs, Owner, PAGE_SIZE};

const PAGES: usize = 48;

fn engine_with(config: EngineConfig) -> Engine {
    Engine::new(EngineConfig {
        stable_capacity_bytes: 1 << 30,
        ..config
    })
    .expect("engine")
}

fn manual() -> Engine {
    engine_with(EngineConfig::manual(Knobs {
        // Pages that long matched nothing must still be looked at in every pass here.
        smart_scan: false,
        // Owners lent their gates just now: merge them at once.
        merge_running_after: Duration::ZERO,
        max_page_sharing: 3,
        ..Knobs::default()
    }))
}

/// Four regions, the same bytes in most pages (so that a chain forms past three sharers),
/// a unique page every fifth one (windows with private copies), and zeros at the end.
fn regions(engine: &Engine) -> Vec<TestRegion> {
    (0..4)
        .map(|n| {
            let mut region = TestRegion::with_owner(engine, Owner::new(0), PAGES);
            region.fill(7, 0..PAGES - 4);
            for page in (2..PAGES - 4).step_by(5) {
                region.write(page * PAGE_SIZE, &page_content(100 + n, page));
            }
            region
        })
        .collect()
}

/// Every region against its shadow, and the engine's records against the page tables.
fn assert_sound(engine: &Engine, regions: &[TestRegion], step: &str) {
    common::kernel::check_engine(engine, regions, 3, step);
}

/// What the workload does: every step that makes the calls under test. Errors are what the
/// fault makes; each step reports its own, and the workload goes on, as a host would.
fn workload(engine: &Engine, regions: &mut [TestRegion]) -> Vec<String> {
    let mut errors = Vec::new();
    let mut note = |step: &str, result: Result<(), samepage_dedup::Error>| {
        if let Err(error) = result {
            errors.push(format!("{step}: {error}"));
        }
    };
    // Merging by the scanner (stable writes, remaps, punches, zero pages).
    for _ in 0..2 {
        note("pass", engine.scan_pass());
    }
    // Writes into merged pages, then passes that find the sharers that left (page map reads,
    // restores) and merge the new content again.
    for (n, region) in regions.iter_mut().enumerate() {
        region.write(n * 3 * PAGE_SIZE + 17, &[0xa5; 40]);
        region.write((n * 3 + 1) * PAGE_SIZE, &page_content(7, 0));
    }
    for _ in 0..2 {
        note("pass after writes", engine.scan_pass());
    }
    // Merge-now of one region, advice that gives pages back, and unmerging of everything.
    {
        let region = &regions[0];
        let guard = region.owner.enter();
        note(
            "merge-now",
            engine
                .merge_now(&guard, region.handle().id(), 0..PAGES * PAGE_SIZE)
                .map(drop),
        );
    }
    note(
        "advise",
        regions[1].advise(engine, 0..8, samepage_dedup::Advice::Unmergeable),
    );
    note("unmerge-all", engine.unmerge_all().map(drop));
    note(
        "advise back",
        regions[1].advise(engine, 0..8, samepage_dedup::Advice::Mergeable),
    );
    // A module image (stable writes) and a reset to it (remaps, punches).
    let image_bytes: Vec<u8> = (0..8).flat_map(|page| page_content(7, page)).collect();
    match engine.image(0, &image_bytes) {
        Ok(image) => {
            let region = &mut regions[2];
            let guard = region.owner.enter();
            let reset = || engine.reset_region(&guard, region.handle().id(), Some(&image));
            // A reset that failed half-way leaves the region part reset; the host discards
            // it or resets it again, which finishes the job.
            if let Err(error) = reset() {
                note("reset", Err(error));
                reset().expect("a reset again, without the fault");
            }
            drop(guard);
            // The region now reads the image and zeros beyond it.
            region.shadow.fill(0);
            region.shadow[..image_bytes.len()].copy_from_slice(&image_bytes);
        }
        Err(error) => note("image", Err(error)),
    }
    note("last pass", engine.scan_pass());
    errors
}

/// After the faults: the engine still merges. Two new regions of the same new bytes merge
/// all their pages with each other within a few passes, and no pass fails.
fn assert_merging_goes_on(engine: &Engine, regions: &mut Vec<TestRegion>, step: &str) {
    let pair: Vec<TestRegion> = (0..2)
        .map(|_| {
            let mut region = TestRegion::new(engine, 16);
            region.fill(999, 0..16);
            region
        })
        .collect();
    for _ in 0..4 {
        engine.scan_pass().expect("a pass without faults");
    }
    for region in &pair {
        assert_eq!(
            engine.owner_stats(region.owner.id()).pages_merged,
            16,
            "{step}: new regions merge: {:?}",
            engine.stats()
        );
    }
    regions.extend(pair);
}

fn sweep(call: Syscall, errno: Errno) {
    {
        let engine = manual();
        let mut regions = regions(&engine);
        let errors = workload(&engine, &mut regions);
        assert!(errors.is_empty(), "without faults: {errors:?}");
        assert_sound(&engine, &regions, "without faults");
        assert_merging_goes_on(&engine, &mut regions, "without faults");
    }
    let mut fired = 0;
    for nth in 1.. {
        let engine = manual();
        let mut regions = regions(&engine);
        fail_nth(call, nth, errno);
        let errors = workload(&engine, &mut regions);
        if take_unfired(call) {
            assert!(errors.is_empty(), "no fault, yet {errors:?}");
            break;
        }
        fired += 1;
        let step = format!("{call:?} call {nth} failing with {errno}");
        assert!(
            !errors.is_empty() || engine.stats().punch_failures > 0,
            "{step}: the failure went unreported"
        );
        assert_sound(&engine, &regions, &format!("{step} (after {errors:?})"));
        assert_merging_goes_on(&engine, &mut regions, &step);
        assert_sound(&engine, &regions, &format!("{step}, then merging again"));
    }
    assert!(fired > 0, "the workload makes {call:?} calls");
    eprintln!("{call:?}: {fired} positions failed and recovered");
}

#[test]
fn every_failing_mmap_leaves_memory_intact_and_merging_going() {
    sweep(Syscall::Mmap, Errno::IO);
}

#[test]
fn mmap_out_of_memory_likewise() {
    sweep(Syscall::Mmap, Errno::NOMEM);
}

#[test]
fn every_failing_punch_likewise() {
    sweep(Syscall::Fallocate, Errno::IO);
}

#[test]
fn every_failing_memfd_write_likewise() {
    sweep(Syscall::Pwrite, Errno::NOSPC);
}

#[test]
fn every_failing_page_map_read_likewise() {
    sweep(Syscall::PagemapRead, Errno::IO);
}

/// A map-count budget of a few mappings: isolated pages are skipped and counted, nothing is
/// lost, and merging resumes once mappings are freed.
#[test]
fn a_full_map_count_budget_skips_merges_and_loses_nothing() {
    let engine = engine_with(EngineConfig {
        max_map_count: Some(200),
        ..EngineConfig::manual(Knobs {
            smart_scan: false,
            ..Knobs::default()
        })
    });
    // One page in ten shared: too far apart for a window to bridge, each merge is an
    // isolated page costing two mappings.
    let mut regions: Vec<TestRegion> = (0..4)
        .map(|n| {
            let mut region = TestRegion::new(&engine, 512);
            for page in 0..512 {
                let seed = if page % 10 == 0 { 7 } else { 200 + n };
                region.write(page * PAGE_SIZE, &page_content(seed, page));
            }
            region
        })
        .collect();
    for _ in 0..4 {
        engine.scan_pass().expect("pass");
    }
    let stats = engine.stats();
    assert!(stats.vmas <= stats.map_budget, "{stats:?}");
    assert!(stats.pages_skipped_map_budget > 0, "{stats:?}");
    assert!(stats.pages_sharing > 0, "{stats:?}");
    assert_eq!(stats.errors, 0);
    for region in &regions {
        region.assert_matches_shadow();
    }
    // The pages between take the shared bytes too: one run a region, fewer mappings, and
    // everything merges.
    for region in &mut regions {
        for page in (0..512).filter(|page| page % 10 != 0) {
            region.write(page * PAGE_SIZE, &page_content(7, page));
        }
    }
    for _ in 0..6 {
        engine.scan_pass().expect("pass");
    }
    let after = engine.stats();
    assert!(after.pages_sharing > stats.pages_sharing, "{after:?}");
    assert!(after.vmas <= after.map_budget, "{after:?}");
    for region in &regions {
        region.assert_matches_shadow();
    }
    // Unmerged, each region is one run of the same bytes: one mapping each, and all of it
    // merges within the budget.
    engine.unmerge_all().expect("unmerge");
    for _ in 0..4 {
        engine.scan_pass().expect("pass");
    }
    let after = engine.stats();
    assert_eq!(after.pages_sharing, 3 * 512, "{after:?}");
    assert_eq!(after.errors, 0);
    for region in &regions {
        region.assert_matches_shadow();
    }
    assert!(engine.audit().mismatched_slots.is_empty());
}

/// Regions dropped (their owner gone) from other threads while the background scanner runs
/// at full rate over them: the scanner neither faults on unmapped memory nor stops merging.
#[test]
fn owners_dropped_while_the_scanner_works_on_their_regions() {
    let engine = engine_with(EngineConfig {
        scanner: true,
        knobs: Knobs {
            pages_to_scan: 100_000,
            sleep: Duration::ZERO,
            smart_scan: false,
            ..Knobs::default()
        },
        ..EngineConfig::default()
    });
    let keeper = {
        let mut region = TestRegion::new(&engine, 256);
        region.fill(9, 0..256);
        region
    };
    let stop = AtomicBool::new(false);
    let churned = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..2)
            .map(|n| {
                let (engine, stop) = (&engine, &stop);
                scope.spawn(move || {
                    let mut churned = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let mut region = TestRegion::new(engine, 256);
                        region.fill(9, 0..256);
                        std::thread::sleep(Duration::from_micros(300 * (n + 1)));
                        region.assert_matches_shadow();
                        drop(region);
                        churned += 1;
                    }
                    churned
                })
            })
            .collect();
        std::thread::sleep(Duration::from_secs(2));
        stop.store(true, Ordering::Relaxed);
        workers
            .into_iter()
            .map(|w| w.join().expect("worker"))
            .sum::<u64>()
    });
    assert!(churned > 10, "regions churned: {churned}");
    // The engine still merges: a new region with the keeper's bytes joins it.
    let mut late = TestRegion::new(&engine, 256);
    late.fill(9, 0..256);
    let deadline = Instant::now() + Duration::from_secs(10);
    while engine.owner_stats(late.owner.id()).pages_merged < 256 {
        assert!(Instant::now() < deadline, "{:?}", engine.stats());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(engine.stats().errors, 0, "{:?}", engine.last_error());
    keeper.assert_matches_shadow();
    late.assert_matches_shadow();
    assert!(engine.audit().mismatched_slots.is_empty());
}

/// An owner whose thread panics while holding its guard: the guard is released as the
/// panic unwinds, the scanner merges its pages afterwards, and its memory is intact.
#[test]
fn an_owner_panicking_with_its_guard_held_is_merged_afterwards() {
    let engine = manual();
    let mut a = TestRegion::new(&engine, 64);
    let mut b = TestRegion::new(&engine, 64);
    a.fill(5, 0..64);
    b.fill(5, 0..64);
    let owner = a.owner.clone();
    let panicked = std::thread::spawn(move || {
        let _guard = owner.enter();
        panic!("the owner's code panics while it runs");
    })
    .join();
    assert!(panicked.is_err());
    for _ in 0..3 {
        engine.scan_pass().expect("pass");
    }
    assert_eq!(engine.owner_stats(a.owner.id()).pages_merged, 64);
    a.write(3 * PAGE_SIZE, &[1; 9]);
    b.assert_matches_shadow();
    a.assert_matches_shadow();
    assert!(engine.audit().mismatched_slots.is_empty());
}

/// Owners whose gates are lent (their guest code runs): a `userfaultfd` the engine cannot
/// open leaves it merging parked owners only, and saying so; every failing registration of a
/// region with it is reported, leaves memory intact and merging going.
#[test]
fn every_failing_userfaultfd_call_leaves_running_owners_intact() {
    let lend_all = |running: &[TestRegion]| -> Vec<samepage_dedup::LentGate> {
        running.iter().map(|r| r.owner.enter().lend()).collect()
    };
    let intact_while_running = |running: &[TestRegion], step: &str| {
        for (n, region) in running.iter().enumerate() {
            for page in 0..region.pages() {
                assert!(
                    region.page_matches_shadow_running(page),
                    "{step}: region {n} page {page}"
                );
            }
        }
    };

    fail_nth(Syscall::Userfaultfd, 1, Errno::PERM);
    let engine = manual();
    assert!(
        matches!(
            engine.running_merges(),
            Err(samepage_dedup::RunningMergesOff::Kernel(_))
        ),
        "{:?}",
        engine.running_merges()
    );
    let mut running = regions(&engine);
    let lent = lend_all(&running);
    for _ in 0..3 {
        engine.scan_pass().expect("pass");
    }
    assert_eq!(
        engine.stats().pages_sharing,
        0,
        "nothing merged while running"
    );
    assert!(engine.stats().regions_busy_skips > 0);
    drop(lent.into_iter().map(|l| l.reclaim()).collect::<Vec<_>>());
    assert_merging_goes_on(&engine, &mut running, "without userfaultfd");
    assert_sound(&engine, &running, "without userfaultfd");

    let mut fired = 0;
    for nth in 1.. {
        let engine = manual();
        engine.running_merges().expect("userfaultfd on this kernel");
        let mut running = regions(&engine);
        let lent = lend_all(&running);
        fail_nth(Syscall::Userfaultfd, nth, Errno::NOMEM);
        let errors: Vec<_> = (0..3).filter_map(|_| engine.scan_pass().err()).collect();
        let unfired = take_unfired(Syscall::Userfaultfd);
        let step = format!("registration {nth} failing");
        intact_while_running(&running, &step);
        assert!(engine.stats().wp_windows > 0, "{step}: windows opened");
        drop(lent.into_iter().map(|l| l.reclaim()).collect::<Vec<_>>());
        assert_sound(&engine, &running, &step);
        assert_merging_goes_on(&engine, &mut running, &step);
        if unfired {
            assert!(errors.is_empty(), "no fault, yet {errors:?}");
            break;
        }
        assert!(!errors.is_empty(), "{step}: the failure went unreported");
        fired += 1;
    }
    assert!(fired > 0, "running merges register regions");
    eprintln!("Userfaultfd: {fired} registrations failed and recovered");
}
