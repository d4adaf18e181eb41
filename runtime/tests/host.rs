//! The runtime seen from an embedder: loading, running commands and reactors, memory access.

use std::path::{Path, PathBuf};
use std::thread;

use samepage_dedup::{EngineConfig, Knobs};
use samepage_runtime::{
    Host, HostConfig, Instance, MemoryBacking, RunOutcome, RuntimeError, Val, WasiOptions,
};

const OS_PAGE: usize = 4096;
const WASM_PAGE: usize = 64 << 10;

fn guest(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/guests")
        .join(name)
}

/// A host whose merge engine scans only when a test asks.
fn merging_host() -> Host {
    Host::new(HostConfig {
        engine_config: EngineConfig::manual(Knobs::default()),
        ..HostConfig::default()
    })
    .expect("host")
}

fn host(memory: MemoryBacking) -> Host {
    Host::new(HostConfig {
        memory,
        dedup: false,
        ..HostConfig::default()
    })
    .expect("host")
}

fn fill_env(pages: usize) -> WasiOptions {
    WasiOptions {
        env: vec![("FILL_PAGES".to_owned(), pages.to_string())],
        ..WasiOptions::default()
    }
}

/// Word `w` of filled page `p`, as fill.wat writes it.
fn fill_word(p: u64, w: u64) -> u64 {
    (p << 32 | w) ^ 0x5a17_c0de_5a17_c0de
}

fn read_u64(memory: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(memory[at..at + 8].try_into().expect("8 bytes"))
}

fn run_fill(host: &Host, pages: usize) -> Instance {
    let module = host.load(&guest("fill.wat")).expect("fill.wat");
    let mut instance = host
        .instantiate(&module, &fill_env(pages))
        .expect("instance");
    assert_eq!(instance.run_start().expect("run"), RunOutcome::Exited(0));
    assert_eq!(
        instance.stdout().expect("captured"),
        format!("filled {pages} pages\n").into_bytes()
    );
    instance
}

fn assert_filled(instance: &mut Instance, pages: usize) {
    instance
        .with_memory(|memory| {
            assert!(memory.len() >= WASM_PAGE + pages * OS_PAGE);
            for p in [0, pages / 2, pages - 1] {
                for w in [0, 1, 511] {
                    let at = WASM_PAGE + p * OS_PAGE + w * 8;
                    assert_eq!(read_u64(memory, at), fill_word(p as u64, w as u64));
                }
            }
        })
        .expect("memory");
}

#[test]
fn fill_writes_its_pattern_with_either_backing() {
    for backing in [MemoryBacking::Memfd, MemoryBacking::WasmtimeDefault] {
        let mut instance = run_fill(&host(backing), 40);
        assert_filled(&mut instance, 40);
    }
}

#[test]
fn fill_defaults_to_16_mib() {
    let host = host(MemoryBacking::Memfd);
    let module = host.load(&guest("fill.wat")).expect("fill.wat");
    let mut instance = host
        .instantiate(&module, &WasiOptions::default())
        .expect("instance");
    assert_eq!(instance.run_start().expect("run"), RunOutcome::Exited(0));
    assert_eq!(instance.stdout().expect("captured"), b"filled 4096 pages\n");
    assert_eq!(
        instance.memory_size().expect("memory"),
        WASM_PAGE + 4096 * OS_PAGE
    );
    assert_filled(&mut instance, 4096);
}

#[test]
fn merged_pages_keep_their_contents_and_split_on_write() {
    let host = merging_host();
    let mut instances = [run_fill(&host, 64), run_fill(&host, 64)];
    let engine = host.dedup().expect("merging host");
    for _ in 0..4 {
        engine.scan_pass().expect("scan pass");
    }
    assert!(engine.stats().pages_sharing >= 64, "{:?}", engine.stats());
    for instance in &mut instances {
        assert_filled(instance, 64);
    }
    let [first, second] = &mut instances;
    first
        .with_memory(|memory| memory[WASM_PAGE] ^= 0xff)
        .expect("memory");
    let byte = |instance: &mut Instance| {
        instance
            .with_memory(|memory| memory[WASM_PAGE])
            .expect("memory")
    };
    assert_eq!(byte(first) ^ 0xff, byte(second));
}

#[test]
fn growth_keeps_the_base_and_zero_fills() {
    let host = merging_host();
    let module = host.load(&guest("reactor.wat")).expect("reactor.wat");
    let mut instance = host
        .instantiate(&module, &WasiOptions::default())
        .expect("instance");
    let base = instance
        .with_memory(|memory| memory.as_ptr())
        .expect("memory");

    let old_pages = instance.call("grow", &[Val::I32(16)]).expect("grow");

    assert_eq!(old_pages[0].unwrap_i32(), 64);
    assert_eq!(instance.memory_size().expect("memory"), 80 * WASM_PAGE);
    instance
        .with_memory(|memory| {
            assert_eq!(memory.as_ptr(), base);
            assert!(memory[64 * WASM_PAGE..].iter().all(|&b| b == 0));
        })
        .expect("memory");
    let last = (80 * WASM_PAGE / OS_PAGE - 1) as i32;
    instance
        .call("fill", &[Val::I32(last), Val::I32(1), Val::I32(3)])
        .expect("fill the new last page");
    let addr = 80 * WASM_PAGE - 4;
    let word = instance
        .with_memory(|memory| u32::from_le_bytes(memory[addr..].try_into().expect("4 bytes")))
        .expect("memory");
    assert_eq!(word, 3u32.wrapping_mul(0x9E37_79B1) ^ (addr as u32 / 4));
}

#[test]
fn growth_past_the_maximum_fails_without_changing_memory() {
    let host = merging_host();
    let module = host.load(&guest("reactor.wat")).expect("reactor.wat");
    let mut instance = host
        .instantiate(&module, &WasiOptions::default())
        .expect("instance");
    instance
        .call("write_byte", &[Val::I32(10), Val::I32(99)])
        .expect("write");

    let result = instance.call("grow", &[Val::I32(5000)]).expect("grow");

    assert_eq!(result[0].unwrap_i32(), -1);
    assert_eq!(instance.memory_size().expect("memory"), 64 * WASM_PAGE);
    let byte = instance.call("read_byte", &[Val::I32(10)]).expect("read");
    assert_eq!(byte[0].unwrap_i32(), 99);
}

#[test]
fn a_trap_is_an_outcome_and_the_memory_survives_it() {
    let host = merging_host();
    let module = host.load(&guest("trap.wat")).expect("trap.wat");
    let mut instance = host
        .instantiate(&module, &WasiOptions::default())
        .expect("instance");

    let outcome = instance.run_start().expect("run");

    let RunOutcome::Trapped(message) = outcome else {
        panic!("expected a trap, got {outcome:?}");
    };
    assert!(message.contains("unreachable"), "{message}");
    assert_eq!(
        instance.with_memory(|memory| memory[0]).expect("memory"),
        42
    );
}

#[test]
fn proc_exit_is_an_exit_with_its_code() {
    let host = merging_host();
    let module = host
        .load_bytes(
            br#"(module
                  (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
                  (memory (export "memory") 1)
                  (func (export "_start") (call $exit (i32.const 3))))"#,
        )
        .expect("module");
    let mut instance = host
        .instantiate(&module, &WasiOptions::default())
        .expect("instance");
    assert_eq!(instance.run_start().expect("run"), RunOutcome::Exited(3));
}

#[test]
fn bad_modules_are_typed_errors() {
    let host = merging_host();

    let missing = host.load(&guest("no-such-guest.wat")).expect_err("missing");
    assert!(
        matches!(missing, RuntimeError::ModuleNotFound { .. }),
        "{missing}"
    );

    let path = std::env::temp_dir().join(format!("samepage-invalid-{}.wasm", std::process::id()));
    std::fs::write(&path, b"\0asm garbage").expect("write the invalid module");
    let invalid = host.load(&path).expect_err("invalid");
    std::fs::remove_file(&path).expect("remove the invalid module");
    assert!(
        matches!(invalid, RuntimeError::InvalidModule { .. }),
        "{invalid}"
    );

    let bytes = host.load_bytes(b"(module (func").expect_err("invalid text");
    assert!(
        matches!(bytes, RuntimeError::InvalidModuleBytes(_)),
        "{bytes}"
    );
}

#[test]
fn missing_exports_and_imports_are_typed_errors() {
    let host = merging_host();
    let reactor = host.load(&guest("reactor.wat")).expect("reactor.wat");
    let mut instance = host
        .instantiate(&reactor, &WasiOptions::default())
        .expect("instance");
    assert!(matches!(
        instance.run_start(),
        Err(RuntimeError::MissingExport(name)) if name == "_start"
    ));
    assert!(matches!(
        instance.call("nope", &[]),
        Err(RuntimeError::MissingExport(name)) if name == "nope"
    ));

    let unknown = host
        .load_bytes(br#"(module (import "env" "missing" (func)))"#)
        .expect("module");
    let error = host
        .instantiate(&unknown, &WasiOptions::default())
        .expect_err("unknown import");
    assert!(matches!(error, RuntimeError::Instantiate(_)), "{error}");
}

#[test]
fn merging_needs_memfd_memories() {
    let error = Host::new(HostConfig {
        memory: MemoryBacking::WasmtimeDefault,
        dedup: true,
        ..HostConfig::default()
    })
    .expect_err("refused");
    assert!(matches!(error, RuntimeError::DedupNeedsMemfd), "{error}");
}

#[test]
fn instances_run_on_other_threads_than_the_host() {
    let host = merging_host();
    let module = host.load(&guest("fill.wat")).expect("fill.wat");
    thread::scope(|scope| {
        let workers: Vec<_> = (0..2)
            .map(|_| {
                scope.spawn(|| {
                    let mut instance = host.instantiate(&module, &fill_env(8)).expect("instance");
                    instance.run_start().expect("run")
                })
            })
            .collect();
        for worker in workers {
            assert_eq!(worker.join().expect("worker"), RunOutcome::Exited(0));
        }
    });
}
