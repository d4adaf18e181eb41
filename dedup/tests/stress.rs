//! Differential stress against the kernel's view, in CI's short form: see
//! `samepage_stress::run` for what it does and checks. `samepage bench --suite soak` runs the
//! same for as long as asked.
//!
//! `SAMEPAGE_STRESS_ROUNDS` runs longer; a failure names the round and the seed
//! (`SAMEPAGE_STRESS_SEED`), which replays the run's choices.

use samepage_stress::run::{Config, Until, run};

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn stress(
    (pages, max_map_count): (usize, Option<u64>),
    running: bool,
) -> samepage_stress::run::Report {
    let report = run(
        &Config {
            until: Until::Rounds(env_or("SAMEPAGE_STRESS_ROUNDS", 300)),
            seed: env_or("SAMEPAGE_STRESS_SEED", 0x5eed),
            writes_per_owner: 48,
            pages,
            max_map_count,
            running,
            keep_writing: 64,
        },
        |_| {},
    );
    assert!(report.peak_sharing > 0, "merging happened");
    eprintln!("stress: {report:?}");
    report
}

/// Every run in one test: the kernel's view is the process's, which a run beside it would
/// disturb. Owners parked between their writes, then owners writing with their gates lent
/// while the scanner merges them in write-protect windows.
#[test]
fn owners_writing_under_merging_and_compaction_agree_with_their_shadows_and_the_kernel() {
    stress(Config::SMALL_REGIONS, false);
    let crowded = stress(Config::CROWDED_MAPPINGS, false);
    assert!(crowded.stretches_compacted > 0, "compaction happened");
    for shape in [Config::SMALL_REGIONS, Config::CROWDED_MAPPINGS] {
        let running = stress(shape, true);
        assert!(running.running_visits > 0, "running owners were visited");
        assert!(running.windows.1 > 0, "writes met windows: {running:?}");
    }
}
