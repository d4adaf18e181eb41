//! CI: the spec tests about linear memory pass on samepage's memories, merged and unmerged
//! between directives with the scanner flat out (inside calls too, in write-protect windows), exactly where they pass on wasmtime's own,
//! in both zero-page modes, with the merge engine's audit clean after every file.

use samepage_spec::{Memories, ZeroPages, suite};

#[test]
fn memory_files_pass_on_samepage_exactly_where_they_pass_on_wasmtime() {
    let files = suite::memory_related();
    let started = std::time::Instant::now();
    let report = samepage_spec::run(&files, |_, _| {}).expect("the harness runs");
    let wasmtime = report.side(Memories::Wasmtime).expect("wasmtime's side");
    println!(
        "{} memory-related files, {} passed on wasmtime's memories, in {:.1} s",
        files.len(),
        wasmtime.passed,
        started.elapsed().as_secs_f64()
    );
    for side in &report.sides {
        println!(
            "{}: {} passed in {:.1} s; {:?}",
            side.memories,
            side.passed,
            side.elapsed.as_secs_f64(),
            side.merging
        );
    }
    for (file, message) in report.failed_on_wasmtime() {
        println!("failed on wasmtime's memories too: {file}: {message}");
    }

    let divergences = report.divergences();
    assert!(
        divergences.is_empty(),
        "samepage's memories made a difference:\n{}",
        divergences
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    );
    // Not vacuous: most of the files pass, and the merge engine merged while they ran.
    assert!(
        wasmtime.passed >= files.len() * 3 / 4 && wasmtime.passed >= 40,
        "only {} of {} files passed on wasmtime's memories",
        wasmtime.passed,
        files.len()
    );
    for zero_pages in ZeroPages::BOTH {
        let side = report
            .side(Memories::Samepage(zero_pages))
            .expect("samepage's side");
        assert_eq!(side.passed, wasmtime.passed);
        let merging = side.merging.expect("samepage's sides merge");
        assert!(
            merging.pages_merged > 0 && merging.peak_pages_sharing > 0,
            "{}: nothing merged: {merging:?}",
            side.memories
        );
        assert!(merging.unmerge_all_calls > 0 && merging.unmerge_region_calls > 0);
        assert!(
            merging.full_scans > 0,
            "{}: the scanner never finished a pass",
            side.memories
        );
        assert!(
            merging.running_visits > 0,
            "{}: the scanner never merged inside a call",
            side.memories
        );
    }
    let punched = report
        .side(Memories::Samepage(ZeroPages::Punched))
        .and_then(|s| s.merging);
    assert!(
        punched.is_some_and(|m| m.zero_pages_freed > 0),
        "no zero pages punched: {punched:?}"
    );
}
