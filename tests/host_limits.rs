//! A run meets the host's limits and survives them, through the binary: killed runs leave no
//! cgroup (or KSM setting) behind, merging works under a small map-count budget, a low
//! descriptor limit is refused with the figures, and a memory limit that fits the merged but
//! not the unmerged total is met by merging while the instances start.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

mod common;

/// Every run sweeps the cgroups of dead runs and repairs KSM after a killed one: the tests
/// here kill runs and look at what they left, so they run one at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn samepage() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_samepage"));
    command.current_dir(env!("CARGO_MANIFEST_DIR"));
    command
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn report(output: &Output) -> serde_json::Value {
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", text(&output.stderr)))
}

/// The process's memory cgroup directory and whether it is v1, if it has one this test may
/// create children in.
fn memory_cgroup() -> Option<(PathBuf, bool)> {
    let membership = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    for line in membership.lines() {
        let mut fields = line.splitn(3, ':');
        let (_, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
        let path = path.trim_start_matches('/');
        let (dir, v1) = if controllers.split(',').any(|c| c == "memory") {
            (Path::new("/sys/fs/cgroup/memory").join(path), true)
        } else if controllers.is_empty() {
            (Path::new("/sys/fs/cgroup").join(path), false)
        } else {
            continue;
        };
        let probe = dir.join(format!("samepage-probe-{}", std::process::id()));
        if std::fs::create_dir(&probe).is_ok() {
            std::fs::remove_dir(&probe).ok();
            return Some((dir, v1));
        }
    }
    None
}

/// [`memory_cgroup`], for a test that cannot run without one.
fn delegable_memory_cgroup() -> (PathBuf, bool) {
    memory_cgroup().expect(
        "needs a delegable memory cgroup: this process may create no child of its memory cgroup \
         (run as root, or in a cgroup delegated to this user)",
    )
}

/// Waits until `path` exists (or does not, with `exists` false), up to 20 s, looking every
/// millisecond so that a signal can follow the moment it appears.
fn wait_for(path: &Path, exists: bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if path.exists() == exists {
            return true;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    false
}

fn looping_run() -> Child {
    samepage()
        .args(["run", "-W", "timeout=60s", "examples/guests/loop.wat"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn samepage")
}

#[test]
#[ignore = "needs a delegable memory cgroup"]
fn killed_runs_leave_no_cgroup_behind() {
    let _one = one_at_a_time();
    let (parent, _) = delegable_memory_cgroup();
    // SIGTERM: the run removes its own cgroup and dies of the signal, even when the signal
    // comes the moment the cgroup appears, while the run is still moving into it. That
    // window was hit in about one run in fifteen; fifty runs take about four seconds.
    for _ in 0..50 {
        let mut child = looping_run();
        let dir = parent.join(format!("samepage-{}", child.id()));
        assert!(wait_for(&dir, true), "the run made {}", dir.display());
        rustix::process::kill_process(
            rustix::process::Pid::from_child(&child),
            rustix::process::Signal::TERM,
        )
        .expect("SIGTERM");
        let status = child.wait().expect("wait");
        assert_eq!(status.signal(), Some(15), "{status:?}");
        let left = dir.exists();
        // Removed here so that a failure leaves nothing for later tests to trip on.
        let _ = std::fs::remove_dir(&dir);
        assert!(!left, "{} was left behind", dir.display());
    }

    // SIGKILL: nothing runs in the dying process; the next run sweeps the cgroup.
    let mut child = looping_run();
    let dir = parent.join(format!("samepage-{}", child.id()));
    assert!(wait_for(&dir, true));
    child.kill().expect("SIGKILL");
    child.wait().expect("wait");
    assert!(
        wait_for(&dir, true),
        "a killed run cannot remove its cgroup"
    );
    let next = samepage()
        .args(["run", "--stdio", "drop", "examples/guests/exit.wat"])
        .output()
        .expect("next run");
    assert!(next.status.success());
    assert!(!dir.exists(), "the next run swept {}", dir.display());
}

#[test]
#[ignore = "needs root and kernel KSM"]
fn the_next_run_restores_ksm_after_a_killed_ksm_run() {
    let _one = one_at_a_time();
    let ksm = common::ksm_settings();
    let read = |name: &str| std::fs::read_to_string(ksm.join(name)).expect("ksm setting");
    let before = (read("run"), read("pages_to_scan"), read("sleep_millisecs"));
    // A run that idles after merging, killed while ksmd runs at its speed.
    let mut child = samepage()
        .args([
            "run",
            "--dedup",
            "ksm",
            "--idle-secs",
            "60",
            "--stdio",
            "drop",
            "examples/guests/fill.wat",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let state = Path::new("/run/samepage-ksm.state");
    assert!(wait_for(state, true), "the run recorded what it changed");
    std::thread::sleep(Duration::from_millis(200));
    child.kill().expect("SIGKILL");
    child.wait().expect("wait");
    assert_eq!(read("run").trim(), "1", "a killed run cannot restore KSM");
    let next = samepage()
        .args(["run", "--stdio", "drop", "examples/guests/exit.wat"])
        .output()
        .expect("next run");
    assert!(next.status.success());
    // This run restored them, or another test's run that started first did.
    assert_eq!(
        (read("run"), read("pages_to_scan"), read("sleep_millisecs")),
        before
    );
    assert!(!state.exists());
}

#[test]
fn merging_works_under_a_small_map_count_budget() {
    let _one = one_at_a_time();
    let run = |limit: &str| {
        let out = samepage()
            .args([
                "run",
                "--json",
                "--instances",
                "8",
                "--stdio",
                "drop",
                "--max-map-count",
                limit,
                "examples/guests/fill.wat",
            ])
            .output()
            .expect("run");
        assert!(out.status.success(), "{}", text(&out.stderr));
        report(&out)
    };
    let full = run("65530");
    // A fixed margin of 2,048 mappings used to exceed a limit of 2,000 and stop merging.
    let small = run("2000");
    assert_eq!(small["map_budget"], 1000);
    assert_eq!(small["pages_skipped_map_budget"], 0);
    assert_eq!(small["pages_sharing"], full["pages_sharing"]);
    assert!(small["pages_sharing"].as_u64() >= Some(7 * 4096));
}

#[test]
fn a_low_descriptor_limit_is_refused_with_what_the_run_needs() {
    let _one = one_at_a_time();
    // Each linear memory keeps its memfd open: 300 instances need more than 256.
    let run = |instances: &str| {
        Command::new("sh")
            .args([
                "-c",
                "ulimit -n 256 && exec \"$0\" run --stdio drop --instances \"$1\" \
                 examples/guests/fill.wat",
                env!("CARGO_BIN_EXE_samepage"),
                instances,
            ])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .expect("sh")
    };
    let refused = run("300");
    assert_eq!(refused.status.code(), Some(1));
    let stderr = text(&refused.stderr);
    assert!(
        stderr.contains("RLIMIT_NOFILE) is 256") && stderr.contains("ulimit -n"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked") && !stderr.contains("smaps_rollup"));
    let fits = run("150");
    assert!(fits.status.success(), "{}", text(&fits.stderr));
}

#[test]
#[ignore = "needs a delegable memory cgroup"]
fn a_memory_limit_that_fits_the_merged_total_is_met_by_merging_while_starting() {
    let _one = one_at_a_time();
    let (parent, v1) = delegable_memory_cgroup();
    let limited = parent.join(format!("samepage-test-limit-{}", std::process::id()));
    std::fs::create_dir(&limited).expect("test cgroup");
    let (limit_file, peak_file) = if v1 {
        ("memory.limit_in_bytes", "memory.max_usage_in_bytes")
    } else {
        ("memory.max", "memory.peak")
    };
    let limit: u64 = 256 << 20;
    std::fs::write(limited.join(limit_file), limit.to_string()).expect("limit");
    // 32 instances of 16 MiB of the same pages: 512 MiB unmerged, 16 MiB merged.
    let run = |mode: &str| {
        Command::new("sh")
            .args([
                "-c",
                "echo $$ > \"$1/cgroup.procs\" && exec \"$0\" run --json --stdio drop \
                 --instances 32 --dedup \"$2\" examples/guests/fill.wat",
                env!("CARGO_BIN_EXE_samepage"),
                limited.to_str().expect("path"),
                mode,
            ])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .expect("sh")
    };
    let merged = run("on");
    let unmerged = run("off");
    let peak: Option<u64> = std::fs::read_to_string(limited.join(peak_file))
        .ok()
        .and_then(|t| t.trim().parse().ok());
    std::fs::remove_dir(&limited).ok();

    assert!(merged.status.success(), "{}", text(&merged.stderr));
    let stderr = text(&merged.stderr);
    assert!(
        stderr.contains("need about") && stderr.contains("available"),
        "{stderr}"
    );
    let on = report(&merged);
    assert_eq!(on["instances_started"], 32);
    assert!(on["pages_sharing"].as_u64() >= Some(31 * 4096 * 9 / 10));

    // Without merging the run stops short of the limit, with a report, instead of being
    // killed by the OOM killer.
    assert_eq!(unmerged.status.code(), Some(1));
    let stderr = text(&unmerged.stderr);
    assert!(stderr.contains("stopped after"), "{stderr}");
    let off = report(&unmerged);
    let started = off["instances_started"].as_u64().expect("started");
    assert!((8..32).contains(&started), "{started}");
    if let Some(peak) = peak {
        assert!(peak < limit, "peak {peak}");
    }
}
