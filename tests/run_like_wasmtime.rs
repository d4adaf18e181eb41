//! `samepage run` as `wasmtime run` users know it, through the binary: guest output and exit
//! status, arguments after the program, `--dir` and `--env`, `--invoke`, `-W` limits, and
//! KSM's names on the command line and in the report.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn samepage(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_samepage"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run samepage")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn one_instance_prints_what_wasmtime_run_prints_and_exits_with_its_status() {
    let hello = samepage(&["run", "examples/guests/hello.wat"]);
    assert_eq!(hello.status.code(), Some(0), "{}", text(&hello.stderr));
    assert_eq!(text(&hello.stdout), "Hello, world!\n");
    assert_eq!(text(&hello.stderr), "", "no report of samepage's own");
    for status in [0, 1, 10] {
        let out = samepage(&["run", "examples/guests/exit.wat", &status.to_string()]);
        assert_eq!(out.status.code(), Some(status), "{}", text(&out.stderr));
        assert_eq!(text(&out.stdout), "to stdout\n");
        assert_eq!(text(&out.stderr), "to stderr\n");
        // Asked for, the report follows on stderr: stdout stays the guest's alone.
        let reported = samepage(&[
            "run",
            "--report",
            "examples/guests/exit.wat",
            &status.to_string(),
        ]);
        assert_eq!(reported.status.code(), Some(status));
        assert_eq!(text(&reported.stdout), "to stdout\n");
        let stderr = text(&reported.stderr);
        assert!(stderr.starts_with("to stderr\n"), "{stderr}");
        assert!(
            stderr.contains(&format!("exit status       {status}")),
            "{stderr}"
        );
    }
    let trap = samepage(&["run", "examples/guests/trap.wat"]);
    assert_eq!(
        trap.status.code(),
        Some(134),
        "a trap exits as under wasmtime"
    );
    let stderr = text(&trap.stderr);
    assert!(
        stderr.contains("instance 0 trapped") && stderr.contains("unreachable"),
        "{stderr}"
    );
}

#[test]
fn many_instances_prefix_their_lines_or_capture_or_drop_them() {
    let out = samepage(&["run", "--instances", "3", "examples/guests/exit.wat", "10"]);
    assert_eq!(out.status.code(), Some(10), "all three agree on 10");
    let mut lines: Vec<String> = text(&out.stdout).lines().map(str::to_owned).collect();
    lines.sort();
    assert_eq!(lines, ["[0] to stdout", "[1] to stdout", "[2] to stdout"]);
    let stderr = text(&out.stderr);
    for n in 0..3 {
        assert!(stderr.contains(&format!("[{n}] to stderr\n")), "{stderr}");
    }

    let captured = samepage(&[
        "run",
        "--instances",
        "2",
        "--stdio",
        "capture",
        "--json",
        "examples/guests/exit.wat",
        "1",
    ]);
    assert_eq!(captured.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_slice(&captured.stdout).expect("report");
    for instance in report["per_instance"].as_array().expect("per instance") {
        assert_eq!(instance["stdout"], "to stdout\n");
        assert_eq!(instance["stderr"], "to stderr\n");
        assert_eq!(instance["exit_code"], 1);
        assert_eq!(instance["outcome"], "exited");
    }
    assert_eq!(report["exit_code"], 1);

    let dropped = samepage(&["run", "--stdio", "drop", "examples/guests/exit.wat"]);
    assert!(dropped.status.success());
    assert!(!text(&dropped.stdout).contains("to stdout"));
    assert!(!text(&dropped.stderr).contains("to stderr"));

    // Under --json, stdout is the report's: the guests' stdout goes to stderr.
    let json = samepage(&["run", "--json", "examples/guests/exit.wat"]);
    let report: serde_json::Value = serde_json::from_slice(&json.stdout).expect("only the report");
    assert_eq!(report["exit_code"], 0);
    assert!(text(&json.stderr).contains("to stdout"));
}

#[test]
fn a_real_program_gets_trailing_arguments_and_both_forms_of_dir() {
    let python = "examples/real/python.wasm";
    assert!(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join(python)
            .exists(),
        "{python} is missing: run scripts/fetch-real-programs"
    );
    let script = "import os, sys; print(sys.argv[1:], sorted(os.listdir(sys.argv[1])), \
                  os.environ.get('GREETING'), os.environ.get('FROM_HOST'))";
    // Bare --dir HOST: the guest sees the directory at the same path. Arguments follow the
    // program, options for the guest among them, with no `--`.
    let bare = Command::new(env!("CARGO_BIN_EXE_samepage"))
        .args([
            "run",
            "--dir",
            "examples/real-inputs",
            "--env",
            "GREETING=hello",
            "--env",
            "FROM_HOST",
            python,
            "-c",
            script,
            "examples/real-inputs",
            "--not-samepages",
        ])
        .env("FROM_HOST", "inherited")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run");
    assert!(bare.status.success(), "{}", text(&bare.stderr));
    assert_eq!(
        text(&bare.stdout),
        "['examples/real-inputs', '--not-samepages'] ['python-heap.py', 'yosys-counter.v'] \
         hello inherited\n"
    );
    // HOST::GUEST, and a `--` before the guest's arguments, which the guest does not see.
    let mapped = samepage(&[
        "run",
        "--dir",
        "examples/real-inputs::/in",
        python,
        "--",
        "-c",
        script,
        "/in",
    ]);
    assert!(mapped.status.success(), "{}", text(&mapped.stderr));
    assert_eq!(
        text(&mapped.stdout),
        "['/in'] ['python-heap.py', 'yosys-counter.v'] None None\n"
    );
}

#[test]
fn everything_after_the_program_is_the_guests() {
    // samepage's own options after the program are the guest's arguments: `--json` does not
    // make a report, and the status comes from the argument after it.
    let out = samepage(&["run", "examples/guests/exit.wat", "7", "--json", "--help"]);
    assert_eq!(out.status.code(), Some(7), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "to stdout\n");
    let dashed = samepage(&["run", "examples/guests/exit.wat", "--", "5"]);
    assert_eq!(
        dashed.status.code(),
        Some(5),
        "a `--` after the program is not the guest's"
    );
}

#[test]
fn invoke_calls_an_export_with_typed_arguments() {
    let out = samepage(&[
        "run",
        "--invoke",
        "add",
        "examples/guests/exit.wat",
        "2",
        "40",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "42\n",
        "the result, and no _start output"
    );
    let wrong = samepage(&["run", "--invoke", "add", "examples/guests/exit.wat", "2"]);
    assert_eq!(wrong.status.code(), Some(1));
    let stderr = text(&wrong.stderr);
    assert!(stderr.contains("takes 2 arguments, 1 given"), "{stderr}");
    let missing = samepage(&["run", "--invoke", "nope", "examples/guests/exit.wat"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(text(&missing.stderr).contains("no export named \"nope\""));
}

#[test]
fn instances_run_side_by_side_each_on_a_thread_of_its_own() {
    // Four guests that never end, each stopped by a timeout of 2 s: one after another they
    // would take at least 8 s; side by side, about 2 s. (The bound is far from both: this
    // checks that they overlap, it is not a benchmark.)
    let started = Instant::now();
    let run = samepage(&[
        "run",
        "--instances",
        "4",
        "-W",
        "timeout=2s",
        "examples/guests/loop.wat",
    ]);
    let elapsed = started.elapsed();
    assert!(elapsed < Duration::from_secs(6), "{elapsed:?}");
    assert_eq!(run.status.code(), Some(134));
    let stderr = text(&run.stderr);
    for n in 0..4 {
        assert!(
            stderr.contains(&format!("instance {n} timed out: still running after 2s")),
            "{stderr}"
        );
    }
}

#[test]
fn a_looping_guest_is_stopped_by_a_timeout_and_by_fuel() {
    let started = Instant::now();
    let timed = samepage(&["run", "-W", "timeout=200ms", "examples/guests/loop.wat"]);
    // As `wasmtime run`, the run ends when its guest does: at the timeout, not after a wait
    // for merging. (A generous bound: this is a check that nothing waits, not a benchmark.)
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(timed.status.code(), Some(134));
    let stderr = text(&timed.stderr);
    assert!(
        stderr.contains("instance 0 timed out: still running after 200ms"),
        "{stderr}"
    );

    let fuel = samepage(&[
        "run",
        "--json",
        "-W",
        "fuel=100000",
        "examples/guests/loop.wat",
    ]);
    assert_eq!(fuel.status.code(), Some(134));
    assert!(text(&fuel.stderr).contains("ran out of fuel: it used all 100000 units"));
    let report: serde_json::Value = serde_json::from_slice(&fuel.stdout).expect("report");
    assert_eq!(report["per_instance"][0]["outcome"], "out_of_fuel");
    assert_eq!(report["instances_trapped"], 1);

    // A memory limit below the module's minimum refuses the instance.
    let small = samepage(&[
        "run",
        "-W",
        "max-memory-size=1024",
        "examples/guests/exit.wat",
    ]);
    assert_eq!(small.status.code(), Some(1));
    assert!(
        text(&small.stderr).contains("memory"),
        "{}",
        text(&small.stderr)
    );
    let unknown = samepage(&["run", "-W", "fule=1", "examples/guests/loop.wat"]);
    assert!(text(&unknown.stderr).contains("unknown -W option \"fule\""));
}

#[test]
fn knobs_and_counters_carry_ksm_names() {
    let help = text(&samepage(&["run", "--help"]).stdout);
    for flag in [
        "--run",
        "--pages-to-scan",
        "--sleep-millisecs",
        "--max-page-sharing",
        "--use-zero-pages",
        "--smart-scan",
        "--advisor-mode",
        "--advisor-target-scan-time",
        "--advisor-max-cpu",
        "--advisor-min-pages-to-scan",
        "--advisor-max-pages-to-scan",
        "--merge-while-starting",
        "--max-map-count",
    ] {
        assert!(help.contains(flag), "{flag} missing from --help");
    }
    // Sysfs spellings and the old ones are accepted too.
    let out = samepage(&[
        "run",
        "--json",
        "--instances",
        "2",
        "--sleep_millisecs",
        "5",
        "--zero-pages",
        "off",
        "--advisor-mode",
        "scan-time",
        "--advisor-target-scan-time",
        "0.5",
        "--stdio=drop",
        "-Ccache=n",
        "examples/guests/fill.wat",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("report");
    for name in [
        "pages_shared",
        "pages_sharing",
        "pages_unshared",
        "pages_volatile",
        "pages_scanned",
        "pages_skipped",
        "full_scans",
        "stable_node_chains",
        "stable_node_dups",
        "ksm_zero_pages",
        "general_profit",
    ] {
        assert!(report[name].is_number(), "{name} missing from the report");
    }
    assert!(report.get("general_profit_bytes").is_none());
    assert!(report["pages_scanned"].as_u64() >= Some(2 * 4096));
    for name in ["ksm_merging_pages", "ksm_zero_pages", "ksm_process_profit"] {
        assert!(report["per_instance"][1][name].is_number(), "{name}");
    }
    assert!(report["per_instance"][1]["ksm_merging_pages"].as_u64() >= Some(4096));
}

#[test]
fn input_that_is_not_wasm_is_named_and_each_cause_said_once() {
    let binary = samepage(&["run", env!("CARGO_BIN_EXE_samepage")]);
    assert_eq!(binary.status.code(), Some(1));
    let stderr = text(&binary.stderr);
    assert!(stderr.contains("neither a WebAssembly binary"), "{stderr}");
    assert!(!stderr.contains("utf-8"), "{stderr}");
    assert_eq!(
        stderr.matches("is not a valid WebAssembly module").count(),
        1,
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"));
}
