//! The `samepage` binary as a user runs it: the main job on the bundled guest, and bad input.

use std::process::Command;

// Only the KSM test uses it, and it is in the build with the lab.
#[cfg(feature = "bench")]
mod common;

fn samepage(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_samepage"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run samepage")
}

/// Runs `samepage run OPTIONS --json PROGRAM`, which must succeed, and returns its report.
fn run_report(program: &str, options: &[&str]) -> serde_json::Value {
    let mut all = vec!["run"];
    all.extend_from_slice(options);
    all.extend(["--json", program]);
    let output = samepage(&all);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("one JSON object")
}

#[test]
fn thirty_two_instances_of_4096_identical_pages_merge() {
    // Merging once every instance ran, so that PSS before merging is the unmerged total.
    let report = run_report(
        "examples/guests/fill.wat",
        &["--instances", "32", "--merge-while-starting", "off"],
    );
    let field = |name: &str| report[name].as_f64().unwrap_or_else(|| panic!("no {name}"));
    let ideal = 31.0 * 4096.0;
    let sharing = field("pages_sharing");
    assert!(
        (sharing - ideal).abs() <= ideal * 0.1,
        "pages_sharing {sharing}"
    );
    let saved = field("pss_bytes_before") - field("pss_bytes_after");
    assert!(
        saved >= 0.85 * 31.0 * 16.0 * 1048576.0,
        "PSS fell by {saved} bytes only"
    );
    for name in [
        "instances",
        "linear_memory_bytes",
        "pages_shared",
        "pages_unshared",
        "pages_volatile",
        "full_scans",
        "vmas",
        "converge_seconds",
        "scanner_cpu_seconds",
    ] {
        field(name);
    }
}

#[test]
fn a_sharing_limit_of_four_gives_exact_chain_arithmetic() {
    // Merging once every instance ran: the image's copies are all made before any pass
    // could prune one, so the chain count below is exact.
    let report = run_report(
        "examples/guests/fill.wat",
        &[
            "--instances",
            "16",
            "--max-page-sharing",
            "4",
            "--merge-while-starting",
            "off",
        ],
    );
    // One chain is the module image's scratch page: every instance wrote that page, so of
    // the image's four copies only its own is left, pinned and shared by nobody.
    assert_eq!(report["image_pages"].as_u64(), Some(1));
    let p = report["stable_node_chains"].as_u64().expect("chains") - 1;
    assert!(p >= 4096, "every filled page hit the limit: {p}");
    assert_eq!(report["pages_shared"].as_u64(), Some(4 * p));
    assert_eq!(report["pages_sharing"].as_u64(), Some(12 * p));
    assert_eq!(report["stable_node_dups"].as_u64(), Some(4 * p + 1));
    let per_instance = report["per_instance"].as_array().expect("per instance");
    assert_eq!(per_instance.len(), 16);
    assert!(
        per_instance
            .iter()
            .all(|i| i["ksm_merging_pages"].as_u64() == Some(p))
    );
    assert!(report["general_profit"].as_i64().expect("profit") > 0);
}

#[test]
fn bad_input_gets_a_clear_error_and_no_panic() {
    let missing = samepage(&["run", "examples/guests/missing.wasm"]);
    assert!(!missing.status.success());
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(
        stderr.contains("missing.wasm") && !stderr.contains("panicked"),
        "{stderr}"
    );

    let invalid = samepage(&["run", "Cargo.toml"]);
    assert!(!invalid.status.success());
    let stderr = String::from_utf8_lossy(&invalid.stderr);
    assert!(
        stderr.contains("Cargo.toml") && !stderr.contains("panicked"),
        "{stderr}"
    );

    let trapping = samepage(&["run", "--instances", "3", "examples/guests/trap.wat"]);
    assert_eq!(
        trapping.status.code(),
        Some(134),
        "a trap exits as wasmtime's does"
    );
    let stderr = String::from_utf8_lossy(&trapping.stderr);
    assert!(
        stderr.contains("trapped") && !stderr.contains("panicked"),
        "{stderr}"
    );

    let zero = samepage(&["run", "--instances", "0", "examples/guests/fill.wat"]);
    assert!(!zero.status.success());
    let limit = samepage(&["run", "--max-page-sharing", "1", "examples/guests/fill.wat"]);
    let stderr = String::from_utf8_lossy(&limit.stderr);
    assert!(
        !limit.status.success() && stderr.contains("accepted 2 to 4294967295"),
        "{stderr}"
    );
}

/// `samepage bench` and run's lab-only modes (`--dedup ksm`, `--plot`) are in a build with
/// `--features bench`; a build without them neither advertises them nor fails obscurely.
#[test]
fn the_lab_is_in_the_build_with_its_feature_and_only_then() {
    let text = |output: std::process::Output| {
        String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr)
    };
    let top = text(samepage(&["--help"]));
    let run = text(samepage(&["run", "--help"]));
    let bench = samepage(&["bench", "--suite", "no-such-suite"]);
    assert!(!bench.status.success());
    let bench = text(bench);
    if cfg!(feature = "bench") {
        assert!(top.contains("bench"), "{top}");
        for flag in ["--plot", "--ksm-pages-to-scan", "Linux KSM"] {
            assert!(run.contains(flag), "no {flag}: {run}");
        }
        assert!(bench.contains("compare"), "not bench's own error: {bench}");
    } else {
        assert!(!top.contains("bench"), "{top}");
        for flag in ["--plot", "--ksm-pages-to-scan", "Linux KSM"] {
            assert!(!run.contains(flag), "{flag} advertised: {run}");
        }
        assert!(bench.contains("--features bench"), "{bench}");
    }
}

#[cfg(feature = "bench")]
#[test]
fn the_lab_plots_a_runs_pss() {
    let plot = std::env::temp_dir().join(format!("samepage-plot-{}.svg", std::process::id()));
    run_report(
        "examples/guests/fill.wat",
        &["--instances", "4", "--plot", plot.to_str().expect("path")],
    );
    let svg = std::fs::read_to_string(&plot).expect("the PSS plot");
    std::fs::remove_file(&plot).ok();
    assert!(
        svg.starts_with("<svg") && svg.contains("PSS"),
        "not the plot"
    );
}

#[cfg(feature = "bench")]
#[test]
#[ignore = "needs root and kernel KSM"]
fn the_ksm_baseline_merges_and_puts_the_system_settings_back() {
    let ksm = common::ksm_settings();
    let read = |name: &str| std::fs::read_to_string(ksm.join(name)).expect("ksm setting");
    let before = (read("run"), read("pages_to_scan"), read("sleep_millisecs"));
    let report = run_report(
        "examples/guests/fill.wat",
        &["--instances", "4", "--dedup", "ksm"],
    );
    assert_eq!(report["mode"], "ksm");
    assert!(report["pages_sharing"].as_u64().expect("sharing") >= 3 * 4096);
    // The run's own figures: its passes, and its process's merged pages.
    let merging = report["process_ksm_stat"]["ksm_merging_pages"].as_u64();
    assert!(merging.expect("ksm_stat") >= 4 * 4096, "{merging:?}");
    let passes = report["full_scans"].as_u64().expect("passes");
    assert!((2..1000).contains(&passes), "{passes} passes");
    assert!(report["per_instance"][0]["ksm_merging_pages"].is_null());
    assert_eq!(
        (read("run"), read("pages_to_scan"), read("sleep_millisecs")),
        before
    );
}

#[test]
fn tenants_are_merge_domains_and_nothing_is_shared_between_them() {
    // Four instances with byte-for-byte the same pages, as one tenant and as two.
    let one = run_report("examples/guests/fill.wat", &["--instances", "4"]);
    let two = run_report(
        "examples/guests/fill.wat",
        &["--instances", "4", "--tenants", "2"],
    );
    let pages = one["pages_shared"].as_u64().expect("shared");
    assert!(pages >= 4096, "{pages}");
    assert_eq!(one["pages_sharing"].as_u64(), Some(3 * pages));
    // Two tenants of two instances: each merges its own pair, and nothing across.
    assert_eq!(two["pages_shared"].as_u64(), Some(2 * pages));
    assert_eq!(two["pages_sharing"].as_u64(), Some(2 * pages));
    let domains = two["per_domain"].as_array().expect("per domain");
    assert_eq!(domains.len(), 2);
    for (n, domain) in domains.iter().enumerate() {
        assert_eq!(domain["domain"].as_u64(), Some(n as u64));
        assert_eq!(domain["instances"].as_u64(), Some(2));
        assert_eq!(domain["ksm_merging_pages"].as_u64(), Some(2 * pages));
    }
    let instances = two["per_instance"].as_array().expect("per instance");
    let domains_of: Vec<u64> = instances
        .iter()
        .map(|i| i["domain"].as_u64().expect("domain"))
        .collect();
    assert_eq!(domains_of, [0, 1, 0, 1], "round-robin");
}

#[test]
fn a_component_command_runs_as_a_preview_1_command_does() {
    // Built by scripts/build-c-guests (scripts/test runs it first).
    let guest = |name: &str| {
        let path = format!("target/c-guests/{name}");
        let full = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(&path);
        assert!(
            full.exists(),
            "{path} is missing: run scripts/build-c-guests"
        );
        path
    };
    for program in [guest("advice-c.wasm"), guest("advice-c.component.wasm")] {
        let report = run_report(&program, &["--instances", "3"]);
        assert_eq!(report["instances_ok"].as_u64(), Some(3), "{program}");
        assert_eq!(
            report["problems"].as_array().map(Vec::len),
            Some(0),
            "{program}"
        );
        // The guest merged its 4 MiB buffer with merge-now in the second and third instance,
        // and the scanner merged the rest.
        let sharing = report["pages_sharing"].as_u64().expect("sharing");
        assert!(sharing >= 2 * 1024, "{program}: pages_sharing {sharing}");
        assert!(report["linear_memory_bytes"].as_u64().expect("memory") >= 3 * (4 << 20));
    }
}
