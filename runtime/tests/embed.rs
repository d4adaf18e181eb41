//! The wasmtime-native embedding: a plain wasmtime program, with store data and a host
//! function of its own, put on samepage's memories with `Samepage::configure` and a
//! `StoreOwner`. Checks that memories merge, that a host function writing guest memory
//! (inside the call, guard held) and one that calls back into wasm (nesting) work, that the
//! guard is let go between calls, and that what cannot work is refused.

use samepage_dedup::{EngineConfig, Knobs, PAGE_SIZE};
use samepage_runtime::{HasStoreOwner, RuntimeError, Samepage, SamepageConfig, StoreOwner};
use wasmtime::{Caller, Config, Engine, Extern, Linker, Module, Store};

/// The embedder's own store data.
struct State {
    owner: StoreOwner,
    /// Host calls seen, and whether each saw the guard held.
    host_calls: u32,
    guard_held_in_host_calls: bool,
}

impl HasStoreOwner for State {
    fn store_owner(&self) -> &StoreOwner {
        &self.owner
    }
}

const GUEST: &str = r#"
(module
  (import "host" "poke" (func $poke (param i32 i32)))
  (import "host" "call_back" (func $call_back))
  (memory (export "memory") 64)
  ;; Fills pages [1, 33) with a pattern that depends only on the offset.
  (func (export "fill") (local $at i32)
    (local.set $at (i32.const 4096))
    (loop $next
      (i32.store (local.get $at) (i32.xor (local.get $at) (i32.const 0x5A5A5A5A)))
      (local.set $at (i32.add (local.get $at) (i32.const 4)))
      (br_if $next (i32.lt_u (local.get $at) (i32.const 135168)))))
  (func (export "poke") (param i32 i32) (call $poke (local.get 0) (local.get 1)))
  (func (export "nest") (call $call_back))
  (func (export "inner") (result i32) (i32.load (i32.const 8192))))
"#;

fn config() -> (Config, Samepage) {
    let mut config = Config::new();
    let samepage = Samepage::configure(
        &mut config,
        SamepageConfig {
            engine_config: EngineConfig::manual(Knobs::default()),
            ..SamepageConfig::default()
        },
    )
    .expect("samepage");
    (config, samepage)
}

fn linker(engine: &Engine) -> Linker<State> {
    let mut linker = Linker::new(engine);
    linker
        .func_wrap(
            "host",
            "poke",
            |mut caller: Caller<'_, State>, at: i32, value: i32| {
                let held = caller.data().owner.with_guard(|_| ()).is_some();
                let state = caller.data_mut();
                state.host_calls += 1;
                state.guard_held_in_host_calls &= held;
                let Some(Extern::Memory(memory)) = caller.get_export("memory") else {
                    wasmtime::bail!("no memory");
                };
                memory.write(&mut caller, at as usize, &value.to_le_bytes())?;
                Ok(())
            },
        )
        .expect("poke");
    linker
        .func_wrap("host", "call_back", |mut caller: Caller<'_, State>| {
            let Some(Extern::Func(inner)) = caller.get_export("inner") else {
                wasmtime::bail!("no inner");
            };
            let inner = inner.typed::<(), i32>(&caller)?;
            inner.call(&mut caller, ())?;
            Ok(())
        })
        .expect("call_back");
    linker
}

fn store(engine: &Engine, samepage: &Samepage) -> Store<State> {
    Store::new(
        engine,
        State {
            owner: samepage.owner(0),
            host_calls: 0,
            guard_held_in_host_calls: true,
        },
    )
}

fn memory_bytes(store: &mut Store<State>, instance: &wasmtime::Instance) -> Vec<u8> {
    let memory = instance.get_memory(&mut *store, "memory").expect("memory");
    let owner = store.data().owner.clone();
    owner.access(|| memory.data(&*store).to_vec())
}

#[test]
fn a_plain_wasmtime_program_merges_with_its_own_host_functions_and_data() {
    let (config, samepage) = config();
    let engine = Engine::new(&config).expect("engine");
    let module = Module::new(&engine, GUEST).expect("module");
    let linker = linker(&engine);
    let mut stores = Vec::new();
    for _ in 0..2 {
        let mut store = store(&engine, &samepage);
        let owner = store.data().owner.clone();
        let instance = owner
            .instantiate(&mut store, &linker, &module)
            .expect("instance");
        let fill = instance
            .get_typed_func::<(), ()>(&mut store, "fill")
            .expect("fill");
        fill.call(&mut store, ()).expect("fill");
        assert!(
            owner.with_guard(|_| ()).is_none(),
            "the guard goes with the call"
        );
        assert_eq!(owner.regions().len(), 1);
        stores.push((store, instance));
    }
    let dedup = samepage.dedup().expect("merging");
    dedup.scan_pass().expect("pass");
    dedup.scan_pass().expect("pass");
    assert_eq!(dedup.stats().pages_sharing, 32);
    let (store, instance) = &mut stores[1];
    let shadow = memory_bytes(store, instance);

    // A host function writes into a merged page inside the call: only its own instance sees it.
    let (store, instance) = &mut stores[0];
    let poke = instance
        .get_typed_func::<(i32, i32), ()>(&mut *store, "poke")
        .expect("poke");
    poke.call(&mut *store, (8192, 7)).expect("poke");
    assert_eq!(
        (
            store.data().host_calls,
            store.data().guard_held_in_host_calls
        ),
        (1, true)
    );
    let nest = instance
        .get_typed_func::<(), ()>(&mut *store, "nest")
        .expect("nest");
    nest.call(&mut *store, ())
        .expect("a host function calling back into wasm");
    let mine = memory_bytes(store, instance);
    assert_eq!(&mine[8192..8196], &7i32.to_le_bytes());
    let (store, instance) = &mut stores[1];
    assert_eq!(
        memory_bytes(store, instance),
        shadow,
        "the other instance is untouched"
    );

    dedup.scan_pass().expect("pass");
    assert_eq!(dedup.stats().pages_sharing, 31, "the written page left");
    assert_eq!(stores[0].0.data().owner.stats().pages_merged, 31);
    assert_eq!(stores[1].0.data().owner.stats().pages_merged, 32);
    assert_eq!(shadow[PAGE_SIZE..].len(), 63 * 65536 + 65536 - PAGE_SIZE);
}

/// Instantiating the guest on `engine` is refused: its memory is not samepage's.
fn assert_memories_refused(engine: &Engine, samepage: &Samepage) {
    let module = Module::new(engine, GUEST).expect("module");
    let mut store = store(engine, samepage);
    let owner = store.data().owner.clone();
    let error = owner
        .instantiate(&mut store, &linker(engine), &module)
        .expect_err("memories samepage cannot merge");
    assert!(
        matches!(
            error,
            RuntimeError::ForeignMemories {
                created: 0,
                expected: 1
            }
        ),
        "{error}"
    );
}

#[test]
fn memories_samepage_did_not_create_are_refused_with_a_clear_error() {
    // The engine is built from another Config than the one samepage configured, as an
    // embedder might by mistake.
    let (_config, samepage) = config();
    assert_memories_refused(&Engine::default(), &samepage);
}

#[test]
fn the_pooling_allocator_is_refused_with_a_clear_error() {
    // Pooling ignores memory creators: the memories would be wasmtime's own. wasmtime
    // refuses the engine itself: samepage gives GC heaps a guard of their own (how its memory
    // creator tells them apart), and pooling wants one guard for memories and GC heaps.
    let (mut config, _samepage) = config();
    config.allocation_strategy(wasmtime::InstanceAllocationStrategy::pooling());
    match Engine::new(&config) {
        Ok(_) => panic!("pooling on samepage's Config is refused"),
        Err(error) => assert!(
            format!("{error:#}").contains("gc_heap_guard_size"),
            "{error:#}"
        ),
    }
}

#[test]
fn shared_memories_are_refused_with_a_clear_error() {
    let (config, samepage) = config();
    let engine = Engine::new(&config).expect("engine");
    let module = Module::new(&engine, "(module (memory 1 1 shared))").expect("module");
    let mut store = store(&engine, &samepage);
    let owner = store.data().owner.clone();
    let error = owner
        .instantiate(&mut store, &Linker::new(&engine), &module)
        .expect_err("shared memory");
    assert!(error.to_string().contains("shared"), "{error}");
}

#[test]
fn a_component_s_core_memories_belong_to_its_owner() {
    let (config, samepage) = config();
    let engine = Engine::new(&config).expect("engine");
    let component = wasmtime::component::Component::new(
        &engine,
        r#"(component
             (core module $m (memory (export "memory") 2) (data (i32.const 0) "hello"))
             (core instance $a (instantiate $m))
             (core instance $b (instantiate $m)))"#,
    )
    .expect("component");
    let mut store = store(&engine, &samepage);
    let owner = store.data().owner.clone();
    owner
        .instantiate_component(
            &mut store,
            &wasmtime::component::Linker::new(&engine),
            &component,
        )
        .expect("instance");
    assert_eq!(owner.regions().len(), 2);
    // Merged on instantiation: the data segment's page is the same in both core instances.
    assert_eq!(owner.stats().pages_merged, 2);
}
