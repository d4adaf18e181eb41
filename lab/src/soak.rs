//! The soak: `samepage-stress`'s differential stress run, as CI runs it in short form
//! (`dedup/tests/stress.rs`), until a given number of checked page writes. Owners write in
//! bigger rounds than in CI (1,024 writes each between checkpoints), so that the run's time
//! goes to writes racing the scanner rather than to checkpoints.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use samepage_stress::run::{Config, MAX_SHARING, REGIONS, Report, Until, run};

const WRITES_PER_OWNER: u32 = 1024;
/// A running owner writes at most this many times `WRITES_PER_OWNER` in a round while the
/// scanner's passes go on: enough to overlap them, few enough that the run is many rounds.
const KEEP_WRITING: u32 = 8;

pub fn suite(writes: u64, seed: u64) -> Result<String> {
    // Regions long enough to hold stretches, under a map-count limit that merges crowd: the
    // run covers compaction as well as merges.
    let (pages, max_map_count) = Config::CROWDED_MAPPINGS;
    let config = Config {
        until: Until::Writes(writes),
        seed,
        writes_per_owner: WRITES_PER_OWNER,
        pages,
        max_map_count,
        running: true,
        keep_writing: KEEP_WRITING,
    };
    let mut printed = Instant::now();
    // Unwind safety: nothing the closure touches outlives a failed run but the progress clock.
    let soak = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        run(&config, |report| {
            if printed.elapsed() >= Duration::from_secs(30) {
                printed = Instant::now();
                eprintln!(
                    "bench: soak: {} of {writes} writes checked, round {}, {:.0} s",
                    report.writes,
                    report.rounds,
                    report.elapsed.as_secs_f64()
                );
            }
        })
    }));
    let Ok(report) = soak else {
        bail!(
            "soak: a check failed (what and where is printed above); seed {seed:#x} replays \
             the run's choices"
        );
    };
    Ok(markdown(&report, seed))
}

fn markdown(report: &Report, seed: u64) -> String {
    let seconds = report.elapsed.as_secs_f64();
    let (pages, limit) = Config::CROWDED_MAPPINGS;
    let limit = limit.map_or_else(|| "the system's".into(), |limit| limit.to_string());
    format!(
        "# Soak: the merge engine under differential stress\n\n\
         {REGIONS} regions of {pages} pages in two domains, `max_page_sharing` {MAX_SHARING}, \
         under a map-count limit of {limit} mappings, which merges crowd, so that the engine \
         compacts the regions they leave in pieces onto layout copies all along. In each \
         round every \
         owner makes at least {WRITES_PER_OWNER} writes in its own thread (content shared \
         across regions, unique content, zeros, eight-byte writes into merged pages) with its \
         gate lent, as guest code runs, and goes on writing until the scanner thread's passes \
         end (at most {KEEP_WRITING} times as many): the scanner merges the owners while they write, in \
         write-protect windows. Each write is read back at once, and so is a page chosen at \
         random; then, with every owner parked, one of merge-now, \
         advice, unmerge-all, a knob change, growth or region churn. After every round and \
         every operation, every page is compared with its shadow copy, the engine's audit \
         and accounting are checked, and so is the kernel's view (`/proc/self/maps`, \
         `/proc/self/pagemap`): sharers per stable page within the limit, no page shared \
         across domains, no mapping the engine does not know, the mapping count equal to \
         `vmas`.\n\nA wait is bounded by how long the window it met was open (the engine cannot see \
         when a write began, only that one waited): the figures are those bounds, over the \
         windows that some write waited on, to within a fifth.\n\n{}\nA divergence stops \
         the run with what diverged; this run ended with none.\n",
        super::table(
            &[
                "checked writes",
                "rounds",
                "pages compared at checkpoints",
                "peak pages_sharing",
                "stretches compacted",
                "running visits",
                "windows",
                "writes that waited",
                "wait p50 / p99 / max",
                "divergences",
                "time",
                "writes/s",
                "seed",
            ],
            &[vec![
                report.writes.to_string(),
                report.rounds.to_string(),
                report.pages_checked.to_string(),
                report.peak_sharing.to_string(),
                report.stretches_compacted.to_string(),
                report.running_visits.to_string(),
                report.windows.0.to_string(),
                report.windows.1.to_string(),
                format!(
                    "{:.0} µs / {:.1} ms / {:.1} ms",
                    report.waits_ns[0] as f64 / 1e3,
                    report.waits_ns[1] as f64 / 1e6,
                    report.waits_ns[2] as f64 / 1e6
                ),
                "0".into(),
                format!("{seconds:.0} s"),
                format!("{:.0}", report.writes as f64 / seconds),
                format!("{seed:#x}"),
            ]],
        )
    )
}
