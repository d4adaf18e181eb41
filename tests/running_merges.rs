//! Merging instances while they run (`samepage_dedup::quiesce`, rule 7): eight guests that
//! write half of their memory for three seconds, side by side, while the other half holds the
//! same bytes in each (`examples/guests/busy-half.wat`). Each guest checks every word of its
//! memory itself and exits with 0 only if all are right.

use std::process::Command;

/// Pages of the guest's half that every instance holds alike.
const SHARED_HALF_PAGES: u64 = 512;
const INSTANCES: u64 = 8;

/// Runs the guest 8 times side by side with `options`; returns the report.
fn run_busy_half(options: &[&str]) -> serde_json::Value {
    let output = Command::new(env!("CARGO_BIN_EXE_samepage"))
        .args(["run", "--instances", "8", "--json"])
        .args(options)
        .arg("examples/guests/busy-half.wat")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run samepage");
    assert!(
        output.status.success(),
        "a guest found its memory wrong, or the run failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).expect("report");
    assert_eq!(report["instances_ok"], INSTANCES, "{report}");
    report
}

/// `pages_sharing` while the guests ran, one second after the last one started.
fn sharing_a_second_after_the_last_start(report: &serde_json::Value) -> u64 {
    let last_started = report["last_started_seconds"].as_f64().expect("seconds");
    report["sharing_while_running"]
        .as_array()
        .expect("samples")
        .iter()
        .map(|sample| {
            (
                sample[0].as_f64().expect("t"),
                sample[1].as_u64().expect("n"),
            )
        })
        .take_while(|&(at, _)| at <= last_started + 1.0)
        .map(|(_, sharing)| sharing)
        .max()
        .unwrap_or(0)
}

/// Both modes in one test, one after the other: sixteen busy guests at once would make the
/// one-second bound a measure of the machine's load.
#[test]
fn running_guests_are_merged_within_a_second_and_see_their_own_bytes_throughout() {
    let shared = (INSTANCES - 1) * SHARED_HALF_PAGES;

    let running = run_busy_half(&[]);
    assert_eq!(running["merging"], "running", "{running}");
    assert!(
        sharing_a_second_after_the_last_start(&running) >= shared,
        "the shared half was not merged within 1 s while the guests ran: {}",
        running["sharing_while_running"]
    );
    assert!(running["wp_windows"].as_u64() > Some(0), "{running}");

    // The fallback: parked owners only, which these guests are not until they exit.
    let parked = run_busy_half(&["--merge-running", "0"]);
    let merging = parked["merging"].as_str().expect("mode");
    assert!(merging.starts_with("parked only"), "{merging}");
    assert!(
        sharing_a_second_after_the_last_start(&parked) < SHARED_HALF_PAGES,
        "{}",
        parked["sharing_while_running"]
    );
    assert_eq!(parked["wp_windows"], 0);
    assert_eq!(
        parked["pages_sharing"].as_u64(),
        Some(shared),
        "merged once parked: {parked}"
    );
}
