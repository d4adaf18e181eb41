//! Embedding samepage: run eight instances of a guest that fills 16 MiB of its memory with
//! the same pages, and watch the merge engine share them.
//!
//! `cargo run --example embed`

use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use samepage_dedup::PAGE_SIZE;
use samepage_runtime::{Host, HostConfig, RunOutcome, WasiOptions};

const INSTANCES: usize = 8;

fn main() -> anyhow::Result<()> {
    let host = Host::new(HostConfig::default())?;
    let guest = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/guests/fill.wat");
    let module = host.load(&guest)?;

    // Instances must stay alive for their pages to be shared.
    let mut instances = Vec::with_capacity(INSTANCES);
    for _ in 0..INSTANCES {
        let mut instance = host.instantiate(&module, &WasiOptions::default())?;
        match instance.run_start()? {
            RunOutcome::Exited(0) => {}
            outcome => bail!("the guest did not finish: {outcome:?}"),
        }
        instances.push(instance);
    }
    let output = instances[0].stdout().context("stdout is captured")?;
    print!("each instance: {}", String::from_utf8_lossy(&output));

    // The scanner merges in the background; wait until a look finds nothing new.
    let engine = host.dedup().context("merging is on by default")?;
    let started = Instant::now();
    let mut sharing = 0;
    while started.elapsed() < Duration::from_secs(10) {
        thread::sleep(Duration::from_millis(500));
        let now = engine.stats().pages_sharing;
        if now > 0 && now == sharing {
            break;
        }
        sharing = now;
    }

    let stats = engine.stats();
    println!(
        "after {:.1} s: {} pages shared, {} pages sharing them ({} MiB saved)",
        started.elapsed().as_secs_f64(),
        stats.pages_shared,
        stats.pages_sharing,
        (stats.pages_sharing * PAGE_SIZE as u64) >> 20,
    );
    println!("{stats:#?}");
    Ok(())
}
