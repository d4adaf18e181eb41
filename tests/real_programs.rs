//! A real WASI program nobody here wrote, Flite (speech synthesis), run as several instances:
//! the engine must merge (nearly) every page they hold in common, and change nothing any
//! instance sees. `scripts/fetch-real-programs` fetches it from the npm registry.

use std::path::PathBuf;

use samepage_dedup::{EngineConfig, Knobs, PAGE_SIZE};
use samepage_runtime::{Host, HostConfig, Instance, RunOutcome, WasiOptions};

fn page(memory: &[u8], p: usize) -> &[u8] {
    &memory[p * PAGE_SIZE..(p + 1) * PAGE_SIZE]
}

fn flite() -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/real/flite.wasm");
    assert!(
        path.exists(),
        "{} is missing: run scripts/fetch-real-programs (the README's test command does)",
        path.display()
    );
    path
}

#[test]
fn flite_instances_merge_the_pages_they_hold_in_common() {
    let host = Host::new(HostConfig {
        engine_config: EngineConfig::manual(Knobs::default()),
        ..HostConfig::default()
    })
    .expect("host");
    let module = host.load(&flite()).expect("flite.wasm");
    let out = std::env::temp_dir().join(format!("samepage-flite-{}", std::process::id()));
    std::fs::create_dir_all(&out).expect("output dir");
    let wasi = WasiOptions {
        args: [
            "flite",
            "-t",
            "Pages in common are merged.",
            "-o",
            "/out/speech.wav",
        ]
        .map(String::from)
        .to_vec(),
        preopens: vec![(out.clone(), "/out".into())],
        ..WasiOptions::default()
    };
    let count = 4;
    let mut instances: Vec<Instance> = (0..count)
        .map(|_| {
            let mut instance = host.instantiate(&module, &wasi).expect("instance");
            assert_eq!(instance.run_start().expect("run"), RunOutcome::Exited(0));
            instance
        })
        .collect();
    assert!(
        std::fs::metadata(out.join("speech.wav"))
            .expect("wav")
            .len()
            > 1000
    );
    let shadows: Vec<Vec<u8>> = instances
        .iter_mut()
        .map(|i| i.with_memory(|m| m.to_vec()).expect("memory"))
        .collect();

    // Pages that hold the same non-zero bytes at the same offset in every instance: the
    // engine must merge these at least.
    let pages = shadows.iter().map(Vec::len).min().expect("instances") / PAGE_SIZE;
    let common = (0..pages)
        .filter(|&p| {
            page(&shadows[0], p).iter().any(|&b| b != 0)
                && shadows.iter().all(|m| page(m, p) == page(&shadows[0], p))
        })
        .count() as u64;
    assert!(
        common > 1000,
        "flite's instances hold {common} pages in common"
    );

    let engine = host.dedup().expect("dedup");
    engine.scan_pass().expect("pass");
    engine.scan_pass().expect("pass");
    let stats = engine.stats();
    let expected = (count as u64 - 1) * common;
    assert!(
        stats.pages_sharing * 100 >= expected * 99,
        "merged {} of the {expected} pages held in common",
        stats.pages_sharing
    );
    for (instance, shadow) in instances.iter_mut().zip(&shadows) {
        assert!(instance.with_memory(|m| m == &shadow[..]).expect("memory"));
    }
    std::fs::remove_dir_all(&out).ok();
}
