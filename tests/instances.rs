//! Many wasm instances on memfd memories, merged by the engine: exact page arithmetic, and
//! every instance's memory checked against an independent shadow copy after merging, after
//! guest writes and after unmerging.

use samepage_dedup::{EngineConfig, Knobs, PAGE_SIZE};
use samepage_runtime::{Host, HostConfig, Instance, Val, WasiOptions};

const REACTOR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/guests/reactor.wat");

/// A host whose engine scans only when a test asks, so every step is exact.
fn manual_host() -> Host {
    Host::new(HostConfig {
        engine_config: EngineConfig::manual(Knobs::default()),
        ..HostConfig::default()
    })
    .expect("host")
}

fn settle(host: &Host) {
    let engine = host.dedup().expect("dedup on");
    engine.scan_pass().expect("pass");
    engine.scan_pass().expect("pass");
}

fn call(instance: &mut Instance, name: &str, args: &[i32]) {
    let args: Vec<Val> = args.iter().map(|&a| Val::I32(a)).collect();
    instance.call(name, &args).expect(name);
}

fn memory(instance: &mut Instance) -> Vec<u8> {
    instance.with_memory(|m| m.to_vec()).expect("memory")
}

/// The reactor's fill pattern, computed independently of the guest: word at address a holds
/// (seed * 0x9E3779B1) ^ (a / 4).
fn expected_fill(shadow: &mut [u8], pages: std::ops::Range<usize>, seed: u32) {
    let key = seed.wrapping_mul(0x9E37_79B1);
    for addr in (pages.start * PAGE_SIZE..pages.end * PAGE_SIZE).step_by(4) {
        let word = key ^ (addr as u32 / 4);
        shadow[addr..addr + 4].copy_from_slice(&word.to_le_bytes());
    }
}

#[test]
fn instances_merge_with_exact_arithmetic_and_keep_their_own_bytes() {
    let host = manual_host();
    let module = host.load(REACTOR.as_ref()).expect("module");
    let count = 6;
    let mut instances: Vec<Instance> = (0..count)
        .map(|_| {
            host.instantiate(&module, &WasiOptions::default())
                .expect("instance")
        })
        .collect();
    let mut shadows = Vec::new();
    for (n, instance) in instances.iter_mut().enumerate() {
        // 256 pages identical across instances, then 16 pages unique to each.
        call(instance, "fill", &[0, 256, 1]);
        call(instance, "fill", &[256, 16, 100 + n as i32]);
        let mut shadow = vec![0; instance.memory_size().expect("size")];
        expected_fill(&mut shadow, 0..256, 1);
        expected_fill(&mut shadow, 256..272, 100 + n as u32);
        assert!(
            memory(instance) == shadow,
            "the guest wrote what the shadow says"
        );
        shadows.push(shadow);
    }
    settle(&host);
    let engine = host.dedup().expect("dedup");
    let stats = engine.stats();
    assert_eq!(stats.pages_shared, 256);
    assert_eq!(stats.pages_sharing, (count as u64 - 1) * 256);
    assert!(engine.audit().mismatched_slots.is_empty());
    for (instance, shadow) in instances.iter_mut().zip(&shadows) {
        assert!(
            memory(instance) == *shadow,
            "merging changed nothing the instance sees"
        );
    }

    // Guest writes into merged pages stay in the writer.
    for (n, (instance, shadow)) in instances.iter_mut().zip(&mut shadows).enumerate() {
        let addr = (10 + n) * PAGE_SIZE + 7;
        call(instance, "write_byte", &[addr as i32, 0xEE]);
        shadow[addr] = 0xEE;
    }
    for (instance, shadow) in instances.iter_mut().zip(&shadows) {
        assert!(
            memory(instance) == *shadow,
            "no instance sees another's write"
        );
    }
    engine.scan_pass().expect("pass");
    let stats = engine.stats();
    assert_eq!(
        stats.pages_sharing + stats.pages_shared,
        count as u64 * 256 - count as u64
    );
    for (instance, shadow) in instances.iter_mut().zip(&shadows) {
        assert!(memory(instance) == *shadow);
    }

    // Unmerging gives every byte back.
    assert_eq!(engine.unmerge_all().expect("unmerge"), 0);
    assert_eq!(
        (engine.stats().pages_shared, engine.stats().pages_sharing),
        (0, 0)
    );
    for (instance, shadow) in instances.iter_mut().zip(&shadows) {
        assert!(memory(instance) == *shadow);
    }
}

#[test]
fn grown_memory_merges_too() {
    let host = manual_host();
    let module = host.load(REACTOR.as_ref()).expect("module");
    let mut instances: Vec<Instance> = (0..3)
        .map(|_| {
            host.instantiate(&module, &WasiOptions::default())
                .expect("instance")
        })
        .collect();
    for instance in &mut instances {
        let old = instance
            .call("grow", &[Val::I32(4)])
            .expect("grow")
            .first()
            .and_then(Val::i32)
            .expect("result");
        assert_eq!(old, 64);
        // The grown range: wasm pages 64..68 are OS pages 1024..1088.
        call(instance, "fill", &[1024, 64, 9]);
    }
    settle(&host);
    assert_eq!(host.dedup().expect("dedup").stats().pages_sharing, 2 * 64);
    let mut expected = vec![0; 68 * 65536];
    expected_fill(&mut expected, 1024..1088, 9);
    for instance in &mut instances {
        assert!(memory(instance) == expected);
    }
}

#[test]
fn bad_modules_and_traps_give_clear_errors() {
    let host = manual_host();
    let error = host.load("no/such/module.wasm".as_ref()).unwrap_err();
    assert!(error.to_string().contains("no/such/module.wasm"), "{error}");
    let error = host.load_bytes(b"\0asm\x01\0\0\0garbage").unwrap_err();
    assert!(!error.to_string().is_empty());
    let trap = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/guests/trap.wat");
    let module = host.load(trap.as_ref()).expect("module");
    let mut instance = host
        .instantiate(&module, &WasiOptions::default())
        .expect("instance");
    let outcome = instance.run_start().expect("outcome");
    assert!(
        matches!(outcome, samepage_runtime::RunOutcome::Trapped(_)),
        "{outcome:?}"
    );
}

/// Whether the pages of `memory` are in this process's page tables (`/proc/self/pagemap`,
/// bit 63), read without touching them.
fn present_pages(memory: std::ops::Range<usize>) -> Vec<bool> {
    use std::os::unix::fs::FileExt;
    let pagemap = std::fs::File::open("/proc/self/pagemap").expect("pagemap");
    let pages = memory.len() / PAGE_SIZE;
    let mut entries = vec![0u8; pages * 8];
    pagemap
        .read_exact_at(&mut entries, (memory.start / PAGE_SIZE * 8) as u64)
        .expect("read pagemap");
    entries
        .chunks_exact(8)
        .map(|e| u64::from_le_bytes(e.try_into().expect("8 bytes")) >> 63 == 1)
        .collect()
}

#[test]
fn pages_written_then_zeroed_are_neither_resident_nor_merged() {
    let host = manual_host();
    let module = host.load(REACTOR.as_ref()).expect("module");
    let mut instance = host
        .instantiate(&module, &WasiOptions::default())
        .expect("instance");
    call(&mut instance, "fill", &[0, 64, 3]);
    call(&mut instance, "zero", &[16, 32]);
    settle(&host);
    let engine = host.dedup().expect("dedup");
    let stats = engine.stats();
    assert_eq!((stats.zero_pages, stats.pages_shared), (32, 0));
    assert_eq!(engine.owner_stats(instance.owner().id()).zero_pages, 32);
    let base = instance
        .with_memory(|m| m.as_ptr() as usize)
        .expect("memory");
    let present = present_pages(base..base + 64 * PAGE_SIZE);
    assert!(present[..16].iter().all(|&p| p), "written pages stay");
    assert!(present[16..48].iter().all(|&p| !p), "zeroed pages are gone");
    let mut shadow = vec![0; instance.memory_size().expect("size")];
    expected_fill(&mut shadow, 0..16, 3);
    expected_fill(&mut shadow, 48..64, 3);
    assert!(memory(&mut instance) == shadow);
}
