//! The compare suite: samepage against the baselines, each run in a child `samepage run
//! --json` process so that no mode inherits another's memory, with the modes' order rotating
//! from round to round so that drift of the machine hits them all alike. The report's prose
//! is at the end of the file.

use std::path::{Path, PathBuf};

use anyhow::Result;
use serde_json::Value;

use super::child::{med, median, rotating_rounds, saved, strings};
use super::{mib, repo_path, table};
use crate::ksm::KsmSysfs;

/// A program run as many instances.
pub(super) struct Workload {
    pub(super) name: &'static str,
    /// File-name-safe name, for the plot.
    pub(super) slug: &'static str,
    pub(super) module: PathBuf,
    pub(super) instances: u32,
    /// `samepage run` options, before the program; then the guest's arguments, after it.
    pub(super) options: Vec<String>,
    pub(super) guest_args: Vec<String>,
}

impl Workload {
    /// A report's section saying the workload was not measured, when its program is missing.
    pub(super) fn missing(&self) -> Option<String> {
        (!self.module.exists()).then(|| {
            format!(
                "## {}\n\nNot measured: {} is missing (run `scripts/fetch-real-programs`).\n\n",
                self.name,
                self.module.display()
            )
        })
    }
}

/// The compare suite's workloads; those named `a` and `b` are synthetic, the others real
/// WASI programs. `scratch` is a directory the programs may write into.
pub(super) fn workloads(scratch: &Path) -> Vec<Workload> {
    let out = format!("{}::/out", scratch.display());
    vec![
        Workload {
            name: "A: 8 × 16,384 pages, page i identical",
            slug: "a",
            module: repo_path("examples/guests/fill.wat"),
            instances: 8,
            options: strings(&["--env", "FILL_PAGES=16384"]),
            guest_args: Vec::new(),
        },
        Workload {
            name: "B: as A, every other page unique",
            slug: "b",
            module: repo_path("examples/guests/fill.wat"),
            instances: 8,
            options: strings(&["--env", "FILL_PAGES=16384", "--env", "FILL_UNIQUE_ODD=1"]),
            guest_args: Vec::new(),
        },
        Workload {
            name: "Flite (speech synthesis, C), 16 instances",
            slug: "flite",
            module: repo_path("examples/real/flite.wasm"),
            instances: 16,
            options: vec!["--dir".into(), out.clone()],
            guest_args: strings(&[
                "-t",
                "Many tenants, one copy of every page.",
                "-o",
                "/out/speech.wav",
            ]),
        },
        Workload {
            name: "CPython 3.12 (interpreter, C), 8 instances",
            slug: "python",
            module: repo_path("examples/real/python.wasm"),
            instances: 8,
            options: vec![
                "--dir".into(),
                format!("{}::/in", repo_path("examples/real-inputs").display()),
                "--env".into(),
                "PYTHONHASHSEED=0".into(),
            ],
            guest_args: strings(&["/in/python-heap.py"]),
        },
        Workload {
            name: "Yosys 0.50 (Verilog synthesis, C++), 8 instances",
            slug: "yosys",
            module: repo_path("examples/real/yosys.wasm"),
            instances: 8,
            options: vec![
                "--dir".into(),
                format!(
                    "{}::/share",
                    repo_path("examples/real/yosys-share").display()
                ),
                "--dir".into(),
                format!("{}::/in", repo_path("examples/real-inputs").display()),
                "--dir".into(),
                format!("{}::/tmp", scratch.display()),
            ],
            guest_args: strings(&[
                "-p",
                "read_verilog /in/yosys-counter.v; synth -top counter; stat",
            ]),
        },
    ]
}

const MODES: [&str; 4] = ["on", "off", "cow", "ksm"];

/// Every workload under every mode, `rounds` times, rotating the modes' order.
pub fn suite(rounds: u32, out: &Path) -> Result<String> {
    let scratch = std::env::temp_dir().join(format!("samepage-bench-{}", std::process::id()));
    std::fs::create_dir_all(&scratch)?;
    let ksm = KsmSysfs::system().check_usable();
    let modes: Vec<&str> = MODES
        .iter()
        .copied()
        .filter(|&m| m != "ksm" || ksm.is_ok())
        .collect();
    let mut report = String::from(INTRO);
    if let Err(error) = &ksm {
        report.push_str(&format!("**Linux KSM not measured**: {error:#}.\n\n"));
    }
    let mut target_rows = Vec::new();
    for workload in workloads(&scratch) {
        if let Some(missing) = workload.missing() {
            report.push_str(&missing);
            continue;
        }
        let results: Vec<(&str, Vec<Value>)> = modes
            .iter()
            .copied()
            .zip(rotating_rounds(
                workload.slug,
                rounds,
                &modes,
                &workload.module,
                workload.instances,
                &workload.options,
                &workload.guest_args,
            )?)
            .collect();
        let ksm_results = results
            .iter()
            .find(|(m, _)| *m == "ksm")
            .map(|(_, r)| r.as_slice());
        let ratio = |value: f64, field: &dyn Fn(&[Value]) -> f64| match ksm_results {
            Some(k) => format!("{:.2}×", value / field(k)),
            None => "-".into(),
        };
        let saved_of = |r: &[Value]| median(r.iter().map(saved).collect());
        let rows: Vec<Vec<String>> = results
            .iter()
            .map(|(mode, r)| {
                let saved = saved_of(r);
                let converge = med(r, "converge_seconds");
                let cpu = med(r, "scanner_cpu_seconds");
                let cgroup_after = med(r, "cgroup_memory_bytes_after");
                vec![
                    (*mode).to_owned(),
                    format!(
                        "{} / {}",
                        mib(med(r, "cgroup_memory_bytes_before")),
                        mib(med(r, "pss_bytes_after_instantiate"))
                    ),
                    format!(
                        "**{}** ({}) / {}",
                        mib(cgroup_after),
                        ratio(cgroup_after, &|k| med(k, "cgroup_memory_bytes_after")),
                        mib(med(r, "pss_bytes_after"))
                    ),
                    format!("{} ({})", mib(saved), ratio(saved, &saved_of)),
                    format!(
                        "{converge:.2} s ({})",
                        ratio(converge, &|k| med(k, "converge_seconds"))
                    ),
                    format!(
                        "{cpu:.3} s ({})",
                        ratio(cpu, &|k| med(k, "scanner_cpu_seconds"))
                    ),
                    format!(
                        "{:.0} / {:.0}",
                        med(r, "pages_shared"),
                        med(r, "pages_sharing")
                    ),
                    format!("{:.0}", med(r, "vmas")),
                    format!("{:.2} s", med(r, "instantiate_and_run_seconds")),
                ]
            })
            .collect();
        report.push_str(&format!(
            "## {}\n\n{} instances of `{}`.\n\n{}\n![PSS over time]({}-{}.svg)\n\n",
            workload.name,
            workload.instances,
            workload
                .module
                .file_name()
                .map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
            table(
                &[
                    "mode",
                    "memory after instantiation: cgroup / PSS",
                    "memory after convergence: cgroup (÷ KSM) / PSS",
                    "PSS saved by merging (÷ KSM)",
                    "time to converge (÷ KSM)",
                    "merger CPU (÷ KSM)",
                    "pages shared / sharing",
                    "mappings",
                    "instantiate + run",
                ],
                &rows,
            ),
            "compare",
            workload.slug
        ));
        super::plot::pss_over_time(
            &out.join(format!("compare-{}.svg", workload.slug)),
            workload.name,
            &results
                .iter()
                .map(|(mode, r)| (*mode, trace(&r[0])))
                .collect::<Vec<_>>(),
        )?;
        if let Some(k) = ksm_results {
            let on = &results[0].1;
            if workload.slug == "a" {
                let (t, c, s) = (
                    med(on, "converge_seconds") / med(k, "converge_seconds"),
                    med(on, "scanner_cpu_seconds") / med(k, "scanner_cpu_seconds"),
                    saved_of(on) / saved_of(k),
                );
                target_rows.push(verdict(
                    "A: time to 99% of the saving ≤ 0.5× KSM's",
                    t,
                    t <= 0.5,
                ));
                target_rows.push(verdict("A: merger CPU ≤ 0.5× KSM's", c, c <= 0.5));
                target_rows.push(verdict("A: saving ≥ 0.95× KSM's", s, s >= 0.95));
            } else if workload.slug != "b" {
                // What counts is where the modes end.
                let m = med(on, "cgroup_memory_bytes_after") / med(k, "cgroup_memory_bytes_after");
                target_rows.push(verdict(
                    &format!(
                        "{}: memory after convergence (cgroup) ≤ KSM's",
                        workload.slug
                    ),
                    m,
                    m <= 1.0,
                ));
            }
        }
    }
    if !target_rows.is_empty() {
        report.push_str(&format!(
            "## Targets\n\n{}\n",
            table(&["target", "samepage ÷ KSM", "met"], &target_rows)
        ));
    }
    std::fs::remove_dir_all(&scratch).ok();
    Ok(report)
}

fn verdict(target: &str, ratio: f64, met: bool) -> Vec<String> {
    vec![
        target.to_owned(),
        format!("{ratio:.2}"),
        if met { "yes" } else { "**no**" }.into(),
    ]
}

/// A report's PSS trace, as (seconds, MiB).
fn trace(report: &Value) -> Vec<(f64, f64)> {
    report["pss_trace"]
        .as_array()
        .map(|points| {
            points
                .iter()
                .filter_map(|p| Some((p[0].as_f64()?, p[1].as_f64()? / 1048576.0)))
                .collect()
        })
        .unwrap_or_default()
}

/// What the compare report says first: what the modes are and how they are measured.
const INTRO: &str = "# samepage, wasmtime and Linux KSM side by side\n\n\
    Each workload runs as N instances in a child `samepage run --json` process per mode:\n\n\
    - `on`: samepage (memfd memories, samepage's scanner at its defaults: 4,096 pages \
    per batch, 20 ms between batches, scan on park);\n\
    - `off`: the same memfd memories, no merging;\n\
    - `cow`: wasmtime's own memories with its copy-on-write instantiation, no merging \
    (a plain wasmtime host);\n\
    - `ksm`: wasmtime's own memories, `MADV_MERGEABLE`, ksmd at full speed \
    (`pages_to_scan` 100,000, `sleep_millisecs` 0).\n\n\
    The instances run to completion, memory is measured, then merging starts; a run ends \
    when its merger completed a pass (after two) that merged nothing. Memory is given two \
    ways: the memory cgroup each run makes for itself (everything the run allocated, \
    mapped or not: the fairer figure, and the one in bold) and PSS. PSS cannot see memfd \
    pages nobody maps, such as the parts of wasmtime's module image that no instance \
    touched, while samepage's stable pages are mapped by the engine that compared them, \
    so PSS flatters `cow` and `ksm` against `on`. samepage maps each module's image (its \
    data segments, lifted at load) into every instance as merged pages, so `on` starts out \
    shared as `cow` does; `off` gets the segments copied. Time to converge is \
    the time until PSS had fallen by 99% of its final fall; CPU is samepage's scanner \
    thread or ksmd, over the same span. Each cell is the median of the rounds. samepage \
    scans on one thread; the instances ran before merging began, so the other core was \
    idle for both mergers.\n\n";
