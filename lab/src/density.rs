//! The density suite: what happens outside merging, side by side with wasmtime's
//! copy-on-write images and Linux KSM. Real WASI programs at 1 and 16 instances (time to
//! instantiate, memory after instantiation, memory after merging); a guest that grows to
//! 4 GiB and touches one page (the engine's metadata, its profit, time to settle); and the
//! cost of resetting an instance to its module image against the page faults that dirtied it.

use std::time::Instant;

use anyhow::{Context, Result};
use samepage_dedup::{EngineConfig, Knobs};
use samepage_runtime::{Module, Samepage, SamepageConfig, StoreOwner};
use serde_json::Value;

use super::child::{med, rotating_rounds, run_child};
use super::compare::workloads;
use super::{mib, repo_path, table};
use crate::ksm::KsmSysfs;

/// Instance counts the real programs run at.
const COUNTS: [u32; 2] = [1, 16];

pub fn suite(rounds: u32) -> Result<String> {
    let scratch = std::env::temp_dir().join(format!("samepage-density-{}", std::process::id()));
    std::fs::create_dir_all(&scratch)?;
    let ksm = KsmSysfs::system().check_usable();
    let modes: Vec<&str> = ["on", "cow", "ksm"]
        .into_iter()
        .filter(|&m| m != "ksm" || ksm.is_ok())
        .collect();
    let mut report = String::from(ABOUT);
    if let Err(error) = &ksm {
        report.push_str(&format!("**Linux KSM not measured**: {error:#}.\n\n"));
    }
    let mut targets: Vec<Vec<String>> = Vec::new();
    for workload in workloads(&scratch) {
        if matches!(workload.slug, "a" | "b") {
            continue;
        }
        if let Some(missing) = workload.missing() {
            report.push_str(&missing);
            continue;
        }
        let mut rows = Vec::new();
        for instances in COUNTS {
            let results = rotating_rounds(
                &format!("density {} × {instances}", workload.slug),
                rounds,
                &modes,
                &workload.module,
                instances,
                &workload.options,
                &workload.guest_args,
            )?;
            let of = |mode: &str| &results[modes.iter().position(|&m| m == mode).expect("mode")];
            for (mode, r) in modes.iter().zip(&results) {
                rows.push(vec![
                    instances.to_string(),
                    (*mode).to_owned(),
                    format!("{:.1} ms", med(r, "instantiate_seconds") * 1e3),
                    mib(med(r, "cgroup_memory_bytes_before")),
                    format!("**{}**", mib(med(r, "cgroup_memory_bytes_after"))),
                    format!("{:.0}", med(r, "image_pages")),
                    if *mode == "on" {
                        format!("{:.1} B", metadata_per_page(r))
                    } else {
                        "-".into()
                    },
                    format!("{:.2} s", med(r, "instantiate_and_run_seconds")),
                ]);
            }
            let (on, cow) = (of("on"), of("cow"));
            let ratio = |field: &str, base: &[Value]| med(on, field) / med(base, field);
            let instantiate = ratio("instantiate_seconds", cow);
            targets.push(verdict(
                &format!(
                    "{} × {instances}: instantiation ≤ copy-on-write's",
                    workload.slug
                ),
                instantiate,
                instantiate <= 1.0,
            ));
            let start = ratio("cgroup_memory_bytes_before", cow);
            targets.push(verdict(
                &format!(
                    "{} × {instances}: memory after instantiation ≤ copy-on-write's",
                    workload.slug
                ),
                start,
                start <= 1.0,
            ));
            let per_page = metadata_per_page(on);
            targets.push(verdict(
                &format!(
                    "{} × {instances}: metadata ≤ 16 bytes per tracked page",
                    workload.slug
                ),
                per_page,
                per_page <= 16.0,
            ));
            if instances > 1 && modes.contains(&"ksm") {
                let end = ratio("cgroup_memory_bytes_after", of("ksm"));
                targets.push(verdict(
                    &format!(
                        "{} × {instances}: memory after merging ≤ KSM's",
                        workload.slug
                    ),
                    end,
                    end <= 1.0,
                ));
            }
        }
        // The compare suite's names say how many instances it runs; here it is a column.
        let name = workload
            .name
            .rsplit_once(", ")
            .map_or(workload.name, |(name, _)| name);
        report.push_str(&format!(
            "## {name}\n\n{}\n",
            table(
                &[
                    "instances",
                    "mode",
                    "instantiation",
                    "memory after instantiation (cgroup)",
                    "memory after merging (cgroup)",
                    "image pages",
                    "metadata per tracked page",
                    "instantiate + run",
                ],
                &rows
            )
        ));
    }
    std::fs::remove_dir_all(&scratch).ok();

    let (section, rows) = huge_guest(rounds)?;
    report.push_str(&section);
    targets.extend(rows);
    let (section, row) = reset()?;
    report.push_str(&section);
    targets.push(row);
    report.push_str(&format!(
        "## Targets\n\n{}\n",
        table(&["target", "measured", "met"], &targets)
    ));
    Ok(report)
}

/// The engine's metadata (records, stable nodes, both indexes) over the pages it tracks.
fn metadata_per_page(runs: &[Value]) -> f64 {
    med(runs, "metadata_bytes") / med(runs, "pages_tracked")
}

fn verdict(target: &str, value: f64, met: bool) -> Vec<String> {
    vec![
        target.to_owned(),
        format!("{value:.2}"),
        if met { "yes" } else { "**no**" }.into(),
    ]
}

/// Two instances of a guest that grows to 4 GiB and writes one word into its last page.
fn huge_guest(rounds: u32) -> Result<(String, Vec<Vec<String>>)> {
    let guest = repo_path("examples/guests/grow-4g.wat");
    let runs: Vec<Value> = (0..rounds)
        .map(|_| run_child(&guest, 2, "on", &[], &[]))
        .collect::<Result<_>>()?;
    let metadata = med(&runs, "metadata_bytes");
    let profit = med(&runs, "general_profit");
    let settle = med(&runs, "settle_seconds");
    let section = format!(
        "## A guest that grows to 4 GiB and touches one page\n\n\
         Two instances of `examples/guests/grow-4g.wat` ({} GiB of linear memory in all), \
         medians of {rounds} runs:\n\n{}\n",
        med(&runs, "linear_memory_bytes") / f64::from(1 << 30),
        table(
            &[
                "metadata",
                "general_profit",
                "settled after",
                "pages scanned",
                "pages sharing"
            ],
            &[vec![
                format!("{metadata:.0} bytes"),
                format!("{profit:.0} bytes"),
                format!("{settle:.3} s"),
                format!("{:.0}", med(&runs, "pages_scanned")),
                format!("{:.0}", med(&runs, "pages_sharing")),
            ]]
        )
    );
    Ok((
        section,
        vec![
            verdict(
                "4 GiB guest: metadata < 64 KiB (bytes)",
                metadata,
                metadata < 65536.0,
            ),
            verdict(
                "4 GiB guest: general_profit ≥ 0 (bytes)",
                profit,
                profit >= 0.0,
            ),
            verdict("4 GiB guest: settles in ≤ 1 s (s)", settle, settle <= 1.0),
        ],
    ))
}

/// A 16 MiB guest with a 1 MiB image: `dirty` writes one word into each of `n` pages spread
/// over its memory, half of them image pages.
const RESET_GUEST: &str = r#"
(module
  (memory (export "memory") 256)
  (data (i32.const 0) "the image starts here")
  (data (i32.const 1048572) "ends")
  (func (export "dirty") (param $n i32) (param $value i32) (local $at i32)
    (loop $next
      (i32.store (local.get $at) (local.get $value))
      (local.set $at (i32.add (local.get $at) (i32.const 163840)))
      (local.set $n (i32.sub (local.get $n) (i32.const 1)))
      (br_if $next (i32.gt_s (local.get $n) (i32.const 0))))))
"#;

/// Dirtying 100 pages of a 16 MiB instance, then resetting it to its image, many times.
fn reset() -> Result<(String, Vec<String>)> {
    let mut config = wasmtime::Config::new();
    let samepage = Samepage::configure(
        &mut config,
        SamepageConfig {
            engine_config: EngineConfig::manual(Knobs::default()),
            ..SamepageConfig::default()
        },
    )?;
    let engine = wasmtime::Engine::new(&config).map_err(|e| anyhow::anyhow!("{e:#}"))?;
    let module =
        Module::new(&engine, RESET_GUEST.as_bytes()).map_err(|e| anyhow::anyhow!("{e:#}"))?;
    let owner: StoreOwner = samepage.owner(0);
    let mut store = wasmtime::Store::new(&engine, owner.clone());
    let instance = owner.instantiate(&mut store, &wasmtime::Linker::new(&engine), &module)?;
    let dirty = instance
        .get_typed_func::<(i32, i32), ()>(&mut store, "dirty")
        .map_err(|e| anyhow::anyhow!("{e:#}"))?;
    let pages = 100;
    let (mut faults, mut resets) = (Vec::new(), Vec::new());
    for round in 0..200 {
        let start = Instant::now();
        dirty
            .call(&mut store, (pages, round + 1))
            .map_err(|e| anyhow::anyhow!("{e:#}"))?;
        faults.push(start.elapsed().as_secs_f64());
        let start = Instant::now();
        owner.reset_memories().context("reset")?;
        resets.push(start.elapsed().as_secs_f64());
    }
    // The reset really went back to the image.
    let memory = instance
        .get_memory(&mut store, "memory")
        .context("memory")?;
    let intact = owner.access(|| {
        let bytes = memory.data(&store);
        bytes.starts_with(b"the image starts here")
            && bytes[163840..163844] == [0; 4]
            && bytes[1048572..1048576] == *b"ends"
    });
    anyhow::ensure!(intact, "a reset did not restore the image");
    let median = |mut values: Vec<f64>| {
        values.sort_by(f64::total_cmp);
        values[values.len() / 2]
    };
    let (fault, reset) = (median(faults), median(resets));
    let ratio = reset / fault;
    let section = format!(
        "## Reset to the image\n\n\
         A 16 MiB instance (a 1 MiB image) writes one word into each of {pages} pages spread \
         over its memory ({} of them image pages, which take a copy-on-write fault; the rest \
         zero pages, which take a fault that allocates), then `StoreOwner::reset_memories` \
         puts it back; medians of 200 rounds. The writes' time is the cost of the {pages} \
         page faults.\n\n{}\n",
        (0..pages).filter(|n| n * 163840 < 1 << 20).count(),
        table(
            &[
                "100 page faults",
                "reset",
                "reset ÷ faults",
                "per dirtied page"
            ],
            &[vec![
                format!("{:.1} µs", fault * 1e6),
                format!("{:.1} µs", reset * 1e6),
                format!("{ratio:.2}"),
                format!("{:.2} µs", reset * 1e6 / f64::from(pages)),
            ]]
        )
    );
    Ok((
        section,
        verdict(
            "reset ≤ 10× the cost of its 100 page faults (ratio)",
            ratio,
            ratio <= 10.0,
        ),
    ))
}

const ABOUT: &str = "# Density: images, metadata, reset\n\n\
    What samepage costs outside merging, against wasmtime's copy-on-write images (`cow`: \
    wasmtime's own memories, no merging) and Linux KSM (`ksm`: wasmtime's memories, \
    `MADV_MERGEABLE`, ksmd at full speed). Each figure is the median of the rounds, each \
    run a child `samepage run --json` process with its own memory cgroup; modes rotate from \
    round to round. *Instantiation* is the time spent inside instantiation alone, over all \
    instances (the first instantiation of a module in a process builds its image, for \
    samepage as for wasmtime); *memory after instantiation* is the cgroup once every \
    instance ran; *memory after merging* once the merger converged (for `cow`, nothing \
    merges).\n\n";
