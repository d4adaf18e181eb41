//! The serve suite's density: how many warm instances `samepage serve` holds within a memory
//! budget, merging on and off (wasmtime's copy-on-write images, never merged).

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::Result;

use super::server::Host;
use super::{Component, Params, spread, yes_no};
use crate::child::median;
use crate::{mib, table};

/// The memory budget of the density runs above the host alone (the larger of its PSS with
/// merging on and off, as `samepage serve` counts it), so that each component gets the same
/// room for its instances.
pub(super) const DENSITY_ROOM_MIB: u64 = 320;
/// What the pre-warming column says when the budget stopped it.
const AT_BUDGET: &str = "at the memory budget";
/// Instances each density run asks for: more than fit, so that the budget decides.
const DENSITY_INSTANCES: u32 = 1000;

/// What one density run found.
struct DensityRun {
    instances: f64,
    pss: f64,
    ready_seconds: f64,
    vmas: f64,
    map_budget: f64,
    skipped_map_budget: f64,
    stopped: String,
}

pub(super) fn density(
    rounds: u32,
    params: &Params,
    component: &Component,
) -> Result<(String, Vec<Vec<String>>, ())> {
    // The host alone, each way: what the instances are counted above, and its start time.
    let mut base = Vec::new();
    for mode in ["on", "off"] {
        eprintln!(
            "bench: serve: {}: density: the host alone, merging {mode}",
            component.key
        );
        let mut host = Host::samepage(&["--dedup", mode, "--reuse", "warm", component.arg()?])?;
        std::thread::sleep(Duration::from_secs(1));
        let metrics = host.metrics()?;
        base.push((
            metrics.sum("samepage_host_pss_bytes"),
            host.ready.as_secs_f64(),
        ));
        host.stop()?;
    }
    let budget_mib = (base[0].0.max(base[1].0) / 1048576.0).ceil() as u64 + params.density_room_mib;
    let budget = format!("{budget_mib}MiB");
    let mut runs: [Vec<DensityRun>; 2] = [Vec::new(), Vec::new()];
    for round in 0..rounds as usize {
        for k in 0..2 {
            let index = (round + k) % 2;
            let mode = ["on", "off"][index];
            eprintln!(
                "bench: serve: {}: density: round {} merging {mode} (pre-warming up to \
                 {DENSITY_INSTANCES} in {budget})",
                component.key,
                round + 1
            );
            runs[index].push(density_run(component, mode, &budget)?);
        }
    }
    let med = |runs: &[DensityRun], field: fn(&DensityRun) -> f64| {
        median(runs.iter().map(field).collect())
    };
    let mut rows = Vec::new();
    for (index, mode) in ["on", "off"].into_iter().enumerate() {
        let r = &runs[index];
        let (base_pss, base_ready) = base[index];
        let instances = med(r, |d| d.instances);
        let pss = med(r, |d| d.pss);
        let vmas = med(r, |d| d.vmas);
        let map_budget = med(r, |d| d.map_budget);
        let mut stopped: Vec<&str> = r.iter().map(|d| d.stopped.as_str()).collect();
        stopped.sort_unstable();
        stopped.dedup();
        let counts: Vec<f64> = r.iter().map(|d| d.instances).collect();
        rows.push(vec![
            mode.to_owned(),
            format!("**{}**", spread(&counts, |v| format!("{v:.0}"))),
            mib(pss),
            mib(base_pss),
            mib((pss - base_pss) / instances.max(1.0)),
            format!("{:.1} s", med(r, |d| d.ready_seconds) - base_ready),
            if map_budget > 0.0 {
                format!(
                    "{vmas:.0} / {map_budget:.0} ({:.0}%)",
                    100.0 * vmas / map_budget
                )
            } else {
                "-".into()
            },
            if mode == "on" {
                format!("{:.0}", med(r, |d| d.skipped_map_budget))
            } else {
                "-".into()
            },
            stopped.join("; "),
        ]);
    }
    let on = med(&runs[0], |d| d.instances);
    let off = med(&runs[1], |d| d.instances);
    let ratio = on / off.max(1.0);
    // A mode whose pre-warming stopped before the budget (a limit of wasmtime's, an error)
    // did not show what the budget holds: its instances at its PSS per instance say what
    // the budget would, and the target is judged against that where it is more.
    let budget_bytes = budget_mib as f64 * 1048576.0;
    let fill = |index: usize| -> Option<(f64, String)> {
        let r = &runs[index];
        let short = r.iter().find(|d| d.stopped != AT_BUDGET)?;
        let per = (med(r, |d| d.pss) - base[index].0) / med(r, |d| d.instances).max(1.0);
        (per > 0.0).then(|| ((budget_bytes - base[index].0) / per, short.stopped.clone()))
    };
    let off_fill = fill(1).filter(|(n, _)| *n > off);
    let judged = off_fill.as_ref().map_or(ratio, |(n, _)| on / n.max(1.0));
    let met = judged >= 3.0;
    let figures = match &off_fill {
        Some((n, _)) => format!(
            "{on:.0} against {off:.0} held by off before it stopped short of the budget, and \
             against {n:.0} that off's PSS per instance fills the budget with (`--reuse warm`, \
             `--dedup on` against `--dedup off`, {budget_mib} MiB): {ratio:.1}× measured, \
             {judged:.1}× against the budget's worth"
        ),
        None => format!(
            "{on:.0} against {off:.0} (`--reuse warm`, `--dedup on` against `--dedup off`, \
             {budget_mib} MiB): {ratio:.1}×"
        ),
    };
    let targets = vec![vec![
        "density: warm instances in one budget, merging on ≥ 3× off's".into(),
        figures,
        yes_no(met),
    ]];
    let mut text = format!(
        "### Density\n\nWarm instances held within a memory budget of {budget_mib} MiB (the \
         host alone, the larger of merging on's and off's, plus {} MiB), asking for \
         {DENSITY_INSTANCES} (`samepage serve --reuse warm --memory-budget {budget_mib}MiB \
         --min-instances {DENSITY_INSTANCES} --max-instances {DENSITY_INSTANCES} --warmup / \
         --dedup on|off`: each instance is sent one `GET /` before it parks); counted once \
         the count holds still for a second (at most 10 s after serving). {rounds} round(s), \
         alternating which of on and off runs first; the host alone is one start each way \
         with no instance.\n\n{}\n",
        params.density_room_mib,
        table(
            &[
                "merging",
                "instances",
                "host PSS",
                "host alone",
                "PSS per instance",
                "pre-warm",
                "engine mappings / map budget",
                "page visits skipped for the map budget",
                "pre-warming stopped",
            ],
            &rows
        )
    );
    let _ = writeln!(
        text,
        "Merging on holds **{ratio:.1}×** as many warm instances as merging off, wasmtime's \
         copy-on-write images never merged, in the same budget (target ≥ 3×: {}).\n",
        if met { "met" } else { "**missed**" }
    );
    for (index, mode) in ["on", "off"].into_iter().enumerate() {
        if let Some((n, why)) = fill(index) {
            let _ = writeln!(
                text,
                "Merging {mode} stopped pre-warming before the budget ({why}): at its PSS per \
                 instance the budget would hold about {n:.0}{}.\n",
                if index == 1 && off_fill.is_some() {
                    format!(
                        ", and merging on holds **{judged:.1}×** that (the figure the target \
                         is judged by)"
                    )
                } else {
                    String::new()
                }
            );
        }
    }
    let (vmas, map_budget, skipped) = (
        med(&runs[0], |d| d.vmas),
        med(&runs[0], |d| d.map_budget),
        med(&runs[0], |d| d.skipped_map_budget),
    );
    if map_budget > 0.0 && (skipped > 0.0 || vmas >= 0.95 * map_budget) {
        let _ = writeln!(
            text,
            "With merging on the engine's mappings reached {:.0}% of its map-count budget \
             ({vmas:.0} of {map_budget:.0}, `map_budget_percent` of `vm.max_map_count`), and \
             {skipped:.0} page visits left pages unmerged for want of mappings \
             (`samepage_pages_skipped_map_budget`, counted at every visit): the map-count \
             budget, not the pages themselves, is what limits merging here, so each instance \
             keeps more private memory than it would with more mappings allowed.\n",
            100.0 * vmas / map_budget
        );
    } else if map_budget > 0.0 {
        let _ = writeln!(
            text,
            "The map-count budget did not bind: the engine's mappings stayed at {:.0}% of it \
             ({vmas:.0} of {map_budget:.0}) and no page was skipped for it.\n",
            100.0 * vmas / map_budget
        );
    }
    Ok((text, targets, ()))
}

fn density_run(component: &Component, mode: &str, budget: &str) -> Result<DensityRun> {
    let instances = DENSITY_INSTANCES.to_string();
    let mut host = Host::samepage(&[
        "--dedup",
        mode,
        "--reuse",
        "warm",
        "--memory-budget",
        budget,
        "--min-instances",
        &instances,
        "--max-instances",
        &instances,
        "--warmup",
        "/",
        component.arg()?,
    ])?;
    // The pool keeper tops the pool up four times a second while memory allows: wait until
    // the count holds still (at most 10 s).
    std::thread::sleep(Duration::from_secs(2));
    let mut metrics = host.metrics()?;
    for _ in 0..8 {
        std::thread::sleep(Duration::from_secs(1));
        let next = host.metrics()?;
        let same =
            next.sum("samepage_function_instances") == metrics.sum("samepage_function_instances");
        metrics = next;
        if same {
            break;
        }
    }
    let stopped = host
        .log_lines()
        .into_iter()
        .find(|line| line.contains("instances pre-warmed"))
        .map_or_else(
            || "asked-for count reached".to_owned(),
            |line| {
                if line.contains("memory budget") {
                    AT_BUDGET.to_owned()
                } else {
                    line.rsplit_once("pre-warmed: ")
                        .map_or(line.clone(), |(_, why)| why.to_owned())
                }
            },
        );
    let run = DensityRun {
        instances: metrics.sum("samepage_function_instances"),
        pss: metrics.sum("samepage_host_pss_bytes"),
        ready_seconds: host.ready.as_secs_f64(),
        vmas: metrics.sum("samepage_vmas"),
        map_budget: metrics.sum("samepage_map_budget"),
        skipped_map_budget: metrics.sum("samepage_pages_skipped_map_budget"),
        stopped,
    };
    host.stop()?;
    Ok(run)
}
