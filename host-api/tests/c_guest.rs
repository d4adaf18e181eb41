//! The C guest (`examples/guests/advice-c`, bindings from `wit-bindgen c`) run three times
//! as a core module and three times as a component, through the same host: the imports
//! match what wit-bindgen generates, every call gives what the WIT says, merge-now counts
//! exactly, the guest's bytes survive merging (its own check), and every instance's memories
//! match shadow copies while the scanner merges, after unmerging and after merging again. `scripts/build-c-guests` builds both (`scripts/test`
//! runs it first).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

mod common;

use common::host;
use samepage_runtime::{RunOutcome, WasiOptions};

/// The buffer `merge-now` covers: 4 MiB.
const BUFFER_PAGES: u64 = 1024;

fn artifact(name: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../target/c-guests")
        .join(name);
    assert!(
        path.exists(),
        "{} is missing: run scripts/build-c-guests (scripts/test does)",
        path.display()
    );
    path
}

/// Runs `instances` instances of the guest at `path`, one after the other, and returns each
/// one's `key=value` output.
fn run(path: &Path, instances: usize) -> Vec<HashMap<String, String>> {
    let host = host(true);
    let program = host.load(path).expect("the guest loads");
    let mut outputs = Vec::new();
    let mut kept = Vec::new();
    for _ in 0..instances {
        let mut instance = host
            .instantiate(&program, &WasiOptions::default())
            .expect("instance");
        let outcome = instance.run_start().expect("a command");
        let stdout = String::from_utf8(instance.stdout().expect("captured")).expect("utf-8");
        assert_eq!(outcome, RunOutcome::Exited(0), "{stdout}");
        outputs.push(
            stdout
                .lines()
                .filter_map(|line| line.split_once('='))
                .map(|(key, value)| (key.to_owned(), value.to_owned()))
                .collect(),
        );
        // Kept alive: the next instance merges with it.
        kept.push(instance);
    }
    // Every instance's memories against shadow copies taken now, while the scanner merges
    // the rest, after unmerging everything, and after merging again.
    let engine = host.dedup().expect("merging");
    let shadows: Vec<Vec<Vec<u8>>> = kept.iter().map(|i| i.store_owner().snapshot()).collect();
    let check_shadows = |when: &str| {
        for (n, (instance, shadow)) in kept.iter().zip(&shadows).enumerate() {
            assert!(
                instance.store_owner().snapshot() == *shadow,
                "instance {n}'s memory changed {when}"
            );
        }
    };
    for _ in 0..3 {
        engine.scan_pass().expect("pass");
    }
    check_shadows("while the scanner merged");
    assert!(engine.stats().pages_sharing >= (instances as u64 - 1) * BUFFER_PAGES);
    assert_eq!(engine.unmerge_all().expect("unmerge"), 0);
    assert_eq!(engine.stats().pages_sharing, 0);
    check_shadows("after unmerging");
    for _ in 0..2 {
        engine.scan_pass().expect("pass");
    }
    check_shadows("after merging again");
    assert!(engine.audit().mismatched_slots.is_empty());
    outputs
}

fn check(outputs: &[HashMap<String, String>]) {
    for (n, output) in outputs.iter().enumerate() {
        let field = |key: &str| {
            output
                .get(key)
                .unwrap_or_else(|| panic!("instance {n} printed no {key}: {output:?}"))
                .as_str()
        };
        assert_eq!(field("advise_secret"), "ok");
        assert_eq!(field("merge_now"), "ok");
        assert_eq!(field("advise_unaligned"), "unaligned");
        assert_eq!(field("advise_out_of_bounds"), "out-of-bounds");
        assert_eq!(field("advise_empty"), "ok");
        assert_eq!(field("buffer_checksum"), field("expected_buffer_checksum"));
        assert_eq!(field("secret_checksum"), field("expected_secret_checksum"));
        assert_eq!(field("bytes_intact"), "yes");
        let number = |key: &str| field(key).parse::<u64>().expect("a number");
        // The first instance has nobody to merge with; each later one matches its buffer
        // page for page.
        let expected = if n == 0 { 0 } else { BUFFER_PAGES };
        assert_eq!(number("pages_merged"), expected, "instance {n}");
        assert_eq!(number("zero_pages"), 0);
        assert!(number("stats_pages_merged") >= expected);
    }
}

#[test]
fn the_c_guest_as_a_core_module() {
    check(&run(&artifact("advice-c.wasm"), 3));
}

#[test]
fn the_c_guest_as_a_component() {
    check(&run(&artifact("advice-c.component.wasm"), 3));
}
