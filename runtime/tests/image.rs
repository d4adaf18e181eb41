//! Module images through the embedding: data segments lifted at load, mapped into every
//! instance's memory, merged, unmerged and reset, each step compared with the same module
//! instantiated by plain wasmtime (its own memories, its own copy-on-write images), which
//! serves as the independent shadow copy.

use samepage_dedup::{EngineConfig, Knobs, PAGE_SIZE};
use samepage_runtime::{Component, Module, Samepage, SamepageConfig, StoreOwner};
use wasmtime::{Config, Engine, Instance, Linker, Store};

/// Two memories with data (a zero gap between segments, overlapping segments, a passive
/// segment), functions that write, grow, and copy the passive segment in.
const GUEST: &str = r#"
(module
  (memory (export "memory") 4 64)
  (memory (export "second") 1)
  (data (i32.const 0) "the first page")
  (data (i32.const 8) "OVERLAP")
  (data (i32.const 12288) "a page after a gap of zeros")
  (data (i32.const 200000) "last wasm page of the image")
  (data (memory 1) (i32.const 4) "second memory")
  (data $passive "copied in by memory.init")
  (func (export "write") (param $at i32) (param $value i32)
    (i32.store (local.get $at) (local.get $value)))
  (func (export "grow") (param $pages i32) (result i32)
    (memory.grow (local.get $pages)))
  (func (export "init") (param $at i32)
    (memory.init $passive (local.get $at) (i32.const 0) (i32.const 24)))
  (func (export "init_lifted") (param $len i32)
    ;; Segment 0 was active: after instantiation it counts as dropped, so any length but 0
    ;; traps, under wasmtime and under samepage alike.
    (memory.init 0 (i32.const 0) (i32.const 0) (local.get $len)))
  (func (export "drop_passive") (data.drop $passive)))
"#;

/// A samepage instance and a plain wasmtime one of the same module, run side by side.
struct Pair {
    samepage: (Store<StoreOwner>, Instance),
    plain: (Store<()>, Instance),
}

struct Hosts {
    samepage: Samepage,
    engine: Engine,
    plain: Engine,
    module: Module,
    plain_module: wasmtime::Module,
}

fn hosts(text: &str) -> Hosts {
    hosts_with(text, |_| {})
}

fn hosts_with(text: &str, configure: fn(&mut Config)) -> Hosts {
    let mut config = Config::new();
    configure(&mut config);
    let samepage = Samepage::configure(
        &mut config,
        SamepageConfig {
            engine_config: EngineConfig::manual(Knobs::default()),
            ..SamepageConfig::default()
        },
    )
    .expect("samepage");
    let engine = Engine::new(&config).expect("engine");
    let plain = Engine::default();
    let module = Module::new(&engine, text.as_bytes()).expect("lifted module");
    let plain_module = wasmtime::Module::new(&plain, text).expect("plain module");
    Hosts {
        samepage,
        engine,
        plain,
        module,
        plain_module,
    }
}

impl Hosts {
    fn pair(&self) -> Pair {
        self.pair_in(0)
    }

    fn pair_in(&self, domain: u32) -> Pair {
        let owner = self.samepage.owner(domain);
        let mut store = Store::new(&self.engine, owner.clone());
        let instance = owner
            .instantiate(&mut store, &Linker::new(&self.engine), &self.module)
            .expect("samepage instance");
        let mut plain_store = Store::new(&self.plain, ());
        let plain = Instance::new(&mut plain_store, &self.plain_module, &[]).expect("plain");
        Pair {
            samepage: (store, instance),
            plain: (plain_store, plain),
        }
    }

    fn pass(&self) {
        let dedup = self.samepage.dedup().expect("merging");
        dedup.scan_pass().expect("pass");
        dedup.scan_pass().expect("pass");
    }
}

impl Pair {
    fn call(&mut self, name: &str, args: &[wasmtime::Val]) -> Result<Vec<wasmtime::Val>, String> {
        let mut results =
            vec![wasmtime::Val::I32(0); usize::from(matches!(name, "grow" | "catch"))];
        let mine = {
            let (store, instance) = &mut self.samepage;
            let func = instance.get_func(&mut *store, name).expect("export");
            func.call(&mut *store, args, &mut results)
                .map(|()| results.clone())
                .map_err(|e| e.root_cause().to_string())
        };
        let theirs = {
            let (store, instance) = &mut self.plain;
            let func = instance.get_func(&mut *store, name).expect("export");
            func.call(&mut *store, args, &mut results)
                .map(|()| results.clone())
                .map_err(|e| e.root_cause().to_string())
        };
        assert_eq!(
            format!("{mine:?}"),
            format!("{theirs:?}"),
            "{name} behaves as under wasmtime"
        );
        mine
    }

    /// Every memory of the samepage instance equals the plain one's.
    fn assert_same_memories(&mut self) {
        self.assert_same_memories_of(&["memory", "second"]);
    }

    fn assert_same_memories_of(&mut self, names: &[&str]) {
        for &name in names {
            let mine = {
                let (store, instance) = &mut self.samepage;
                let memory = instance.get_memory(&mut *store, name).expect("memory");
                let owner = store.data().clone();
                owner.access(|| memory.data(&*store).to_vec())
            };
            let (store, instance) = &mut self.plain;
            let theirs = instance
                .get_memory(&mut *store, name)
                .expect("memory")
                .data(&*store)
                .to_vec();
            assert_eq!(mine.len(), theirs.len(), "{name}: size");
            if let Some(page) = (0..mine.len() / PAGE_SIZE).find(|&p| {
                mine[p * PAGE_SIZE..][..PAGE_SIZE] != theirs[p * PAGE_SIZE..][..PAGE_SIZE]
            }) {
                panic!("{name}: page {page} differs from plain wasmtime's");
            }
        }
    }

    fn owner(&self) -> &StoreOwner {
        self.samepage.0.data()
    }
}

fn i32s(values: &[i32]) -> Vec<wasmtime::Val> {
    values.iter().map(|&v| wasmtime::Val::I32(v)).collect()
}

#[test]
fn image_memories_match_wasmtime_through_writes_merges_unmerges_resets_and_growth() {
    let hosts = hosts(GUEST);
    assert!(hosts.module.images().has_content());
    let mut pairs: Vec<Pair> = (0..3).map(|_| hosts.pair()).collect();
    let dedup = hosts.samepage.dedup().expect("merging");
    let stats = dedup.stats();
    assert!(stats.image_pages >= 4, "{stats:?}");
    assert_eq!(
        stats.pages_sharing,
        2 * stats.pages_shared,
        "three sharers a page"
    );
    for pair in &mut pairs {
        pair.assert_same_memories();
    }
    // Writes into image pages, zero pages of the image, and past it.
    pairs[0].call("write", &i32s(&[4, 7])).expect("write");
    pairs[1].call("write", &i32s(&[12300, 9])).expect("write");
    pairs[2].call("write", &i32s(&[8192, 5])).expect("write");
    hosts.pass();
    for pair in &mut pairs {
        pair.assert_same_memories();
    }
    // Growth past the image, passive segments, data.drop, a lifted segment's memory.init.
    pairs[0].call("grow", &i32s(&[2])).expect("grow");
    pairs[0]
        .call("write", &i32s(&[5 * 65536, 11]))
        .expect("write");
    pairs[0].call("init", &i32s(&[40000])).expect("memory.init");
    pairs[0]
        .call("init_lifted", &i32s(&[0]))
        .expect("a copy of nothing");
    assert!(
        pairs[0].call("init_lifted", &i32s(&[1])).is_err(),
        "traps in both"
    );
    pairs[0].call("drop_passive", &[]).expect("data.drop");
    assert!(
        pairs[0].call("init", &i32s(&[40000])).is_err(),
        "dropped: traps in both"
    );
    hosts.pass();
    for pair in &mut pairs {
        pair.assert_same_memories();
    }
    assert_eq!(dedup.unmerge_all().expect("unmerge"), 0);
    for pair in &mut pairs {
        pair.assert_same_memories();
    }
    let audit = dedup.audit();
    assert!(
        audit.mismatched_slots.is_empty() && audit.index_sound,
        "{audit:?}"
    );

    // A reset puts the memories back to the image, which a fresh plain instance holds.
    pairs[1].owner().reset_memories().expect("reset");
    pairs[1].plain = hosts.pair().plain;
    pairs[1].assert_same_memories();
    // And the reset instance goes on working, merging again with the others.
    pairs[1].call("write", &i32s(&[4, 7])).expect("write");
    hosts.pass();
    pairs[1].assert_same_memories();
    let audit = dedup.audit();
    assert!(
        audit.mismatched_slots.is_empty() && audit.index_sound,
        "{audit:?}"
    );
}

#[test]
fn segments_that_cannot_be_lifted_fail_or_work_exactly_as_under_wasmtime() {
    for text in [
        // Past the initial size: instantiation fails, with wasmtime's own error.
        r#"(module (memory 1) (data (i32.const 0) "fits") (data (i32.const 65533) "too long"))"#,
        // An offset from a global: wasmtime copies the segments, as before.
        r#"(module (global i32 (i32.const 100)) (memory (export "memory") 1)
             (data (global.get 0) "from a global") (data (i32.const 0) "and a constant"))"#,
    ] {
        let hosts = hosts(text);
        assert!(!hosts.module.images().has_content(), "{text}");
        let owner = hosts.samepage.owner(0);
        let mut store = Store::new(&hosts.engine, owner.clone());
        let mine = owner
            .instantiate(&mut store, &Linker::new(&hosts.engine), &hosts.module)
            .map(|instance| {
                let memory = instance.get_memory(&mut store, "memory").expect("memory");
                owner.access(|| memory.data(&store)[..200].to_vec())
            })
            .map_err(|e| e.to_string());
        let mut plain_store = Store::new(&hosts.plain, ());
        let theirs = Instance::new(&mut plain_store, &hosts.plain_module, &[])
            .map(|instance| {
                let memory = instance
                    .get_memory(&mut plain_store, "memory")
                    .expect("memory");
                memory.data(&plain_store)[..200].to_vec()
            })
            .map_err(|e| e.root_cause().to_string());
        match (mine, theirs) {
            (Ok(mine), Ok(theirs)) => assert_eq!(mine, theirs, "{text}"),
            (Err(mine), Err(theirs)) => assert!(mine.contains(&theirs), "{mine} / {theirs}"),
            (mine, theirs) => panic!("{text}: samepage {mine:?}, wasmtime {theirs:?}"),
        }
    }
}

#[test]
fn a_components_core_modules_get_images_too() {
    let text = r#"(component
        (core module $m
          (memory (export "memory") 1)
          (data (i32.const 0) "data of a component's core module"))
        (core instance $a (instantiate $m))
        (core instance $b (instantiate $m)))"#;
    let hosts = hosts(r#"(module)"#);
    let component = Component::new(&hosts.engine, text.as_bytes()).expect("component");
    assert!(component.images().has_content());
    let linker = wasmtime::component::Linker::new(&hosts.engine);
    let owners: Vec<StoreOwner> = (0..2).map(|_| hosts.samepage.owner(0)).collect();
    let mut stores = Vec::new();
    for owner in &owners {
        let mut store = Store::new(&hosts.engine, owner.clone());
        owner
            .instantiate_component(&mut store, &linker, &component)
            .expect("component instance");
        stores.push(store);
    }
    let stats = hosts.samepage.dedup().expect("merging").stats();
    assert_eq!(
        stats.image_pages, 1,
        "one page, for both core instances of both"
    );
    assert_eq!(stats.pages_sharing, 3);
    for owner in &owners {
        let memories = owner.snapshot();
        assert_eq!(memories.len(), 2);
        for memory in memories {
            assert!(memory.starts_with(b"data of a component's core module"));
        }
    }
}

#[test]
fn a_module_using_exceptions_gets_its_image_though_wasmtime_makes_a_gc_heap_first() {
    let text = r#"(module
        (tag $e (param i32))
        (memory (export "memory") 2)
        (data (i32.const 0) "hello")
        (func $throw (param i32) (if (local.get 0) (then (throw $e (i32.const 1)))))
        (func (export "catch") (result i32)
          (block $caught (result i32)
            (try_table (catch $e $caught) (call $throw (i32.const 1)))
            (i32.const 0))))"#;
    let hosts = hosts(text);
    let mut pair = hosts.pair();
    pair.assert_same_memories_of(&["memory"]);
    let result = pair.call("catch", &[]).expect("caught");
    assert_eq!(format!("{result:?}"), format!("{:?}", i32s(&[1])));
    assert_eq!(
        pair.owner().regions().len(),
        1,
        "the GC heap is not a merged region"
    );
}

#[test]
fn each_domain_gets_its_own_image_read_back_from_the_first() {
    let hosts = hosts(GUEST);
    let mut first = hosts.pair_in(0);
    let image_pages = hosts.samepage.dedup().expect("merging").stats().image_pages;
    let mut other = hosts.pair_in(1);
    let stats = hosts.samepage.dedup().expect("merging").stats();
    assert_eq!(
        stats.image_pages,
        2 * image_pages,
        "no page shared across domains"
    );
    assert_eq!(stats.pages_sharing, 0);
    first.assert_same_memories();
    other.assert_same_memories();
}

/// The memories of one instance of `component` under samepage, in creation order (its
/// imports trap if called: instantiation calls none).
fn component_memories(hosts: &Hosts, component: &Component) -> Vec<Vec<u8>> {
    let mut linker = wasmtime::component::Linker::new(&hosts.engine);
    linker
        .define_unknown_imports_as_traps(component.wasmtime())
        .expect("trapping imports");
    let owner = hosts.samepage.owner(0);
    let mut store = Store::new(&hosts.engine, owner.clone());
    owner
        .instantiate_component(&mut store, &linker, component)
        .expect("component instance");
    owner.snapshot()
}

/// Compiles `bytes` lifted, and checks that an instance's memories are, in number, order and
/// every byte, those wasmtime makes when it copies the segments itself (the component
/// compiled as it is).
fn lifted_like_wasmtime(bytes: &[u8]) -> Component {
    // Only memories are compared: code compiled unoptimised keeps the real components' four
    // compilations short.
    let hosts = hosts_with("(module)", |config| {
        config.cranelift_opt_level(wasmtime::OptLevel::None);
    });
    let lifted = Component::new(&hosts.engine, bytes).expect("lifted component");
    let as_it_is = wasmtime::component::Component::new(&hosts.engine, bytes).expect("component");
    let mine = component_memories(&hosts, &lifted);
    let theirs = component_memories(&hosts, &Component::from(as_it_is));
    assert_eq!(mine.len(), theirs.len(), "memories");
    for (index, (mine, theirs)) in mine.iter().zip(&theirs).enumerate() {
        assert_eq!(mine.len(), theirs.len(), "memory {index}: size");
        if let Some(page) = (0..mine.len() / PAGE_SIZE)
            .find(|&p| mine[p * PAGE_SIZE..][..PAGE_SIZE] != theirs[p * PAGE_SIZE..][..PAGE_SIZE])
        {
            panic!("memory {index}: page {page} differs from wasmtime's copy");
        }
    }
    lifted
}

#[test]
fn nested_components_memories_are_mapped_as_wasmtime_would_copy_them() {
    let lifted = lifted_like_wasmtime(
        br#"(component $root
             (core module $a (memory 1) (data (i32.const 0) "module a"))
             (component $inner
               (import "m" (core module $given))
               (core module $b (memory 2) (data (i32.const 70000) "module b"))
               (component $innermost
                 (alias outer $root $a (core module $outer))
                 (core instance (instantiate $outer)))
               (core instance (instantiate $given))
               (instance (instantiate $innermost))
               (core instance (instantiate $b)))
             (core module $c (memory 3) (data (i32.const 4096) "module c"))
             (core instance (instantiate $a))
             (instance (instantiate $inner (with "m" (core module $c))))
             (core instance (instantiate $c))
             (instance (instantiate $inner (with "m" (core module $a)))))"#,
    );
    assert!(lifted.images().has_content());
    assert!(lifted.images().unlifted().is_empty());
}

/// componentize-py's and componentize-js's components (built by
/// `scripts/build-http-components`) nest components: their memories are mapped too.
#[test]
fn real_components_with_nested_components_are_lifted_like_wasmtime() {
    for name in ["python-app.wasm", "js-app.wasm"] {
        let path = format!(
            "{}/../target/http-components/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        let bytes = std::fs::read(&path)
            .unwrap_or_else(|e| panic!("{path}: {e}: run scripts/build-http-components"));
        let lifted = lifted_like_wasmtime(&bytes);
        assert!(lifted.images().has_content(), "{name}");
        assert_eq!(lifted.images().unlifted(), [], "{name}");
    }
}
