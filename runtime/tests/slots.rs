//! Memories reused from the slot pool (`runtime/src/slots.rs`): a memory dropped with its
//! store comes back to the next instance of the same module as exactly the module's image,
//! whatever the previous instance wrote and whatever merging did to its pages meanwhile, and
//! no other instance's memory changes. Each instance is checked against a plain wasmtime
//! instance of the same module given the same calls (its own memories: the shadow copy).

use samepage_dedup::{EngineConfig, Knobs, PAGE_SIZE};
use samepage_runtime::{Module, ModulePre, Samepage, SamepageConfig, StoreOwner};
use wasmtime::{Engine, Instance, Linker, Store};

/// A memory of 4 pages with an image (a zero gap between segments), growable to 64.
const GUEST: &str = r#"
(module
  (memory (export "memory") 4 64)
  (data (i32.const 0) "the first page")
  (data (i32.const 12288) "a page after a gap of zeros")
  (data (i32.const 200000) "last wasm page of the image")
  ;; Writes `value` into every 4-byte word of `pages` pages from page `first`.
  (func (export "fill") (param $first i32) (param $pages i32) (param $value i32)
    (local $at i32) (local $end i32)
    (local.set $at (i32.mul (local.get $first) (i32.const 4096)))
    (local.set $end (i32.add (local.get $at) (i32.mul (local.get $pages) (i32.const 4096))))
    (loop $next
      (i32.store (local.get $at) (local.get $value))
      (local.set $at (i32.add (local.get $at) (i32.const 4)))
      (br_if $next (i32.lt_u (local.get $at) (local.get $end)))))
  (func (export "grow") (param $pages i32) (result i32)
    (memory.grow (local.get $pages))))
"#;

struct Hosts {
    samepage: Samepage,
    engine: Engine,
    pre: ModulePre<StoreOwner>,
    plain: Engine,
    plain_module: wasmtime::Module,
}

fn hosts() -> Hosts {
    let mut config = wasmtime::Config::new();
    let samepage = Samepage::configure(
        &mut config,
        SamepageConfig {
            engine_config: EngineConfig::manual(Knobs::default()),
            ..SamepageConfig::default()
        },
    )
    .expect("samepage");
    let engine = Engine::new(&config).expect("engine");
    let module = Module::new(&engine, GUEST.as_bytes()).expect("lifted module");
    let pre = ModulePre::new(&Linker::new(&engine), &module).expect("pre-linked");
    let plain = Engine::default();
    let plain_module = wasmtime::Module::new(&plain, GUEST).expect("plain module");
    Hosts {
        samepage,
        engine,
        pre,
        plain,
        plain_module,
    }
}

/// A samepage instance and its shadow, given the same calls.
struct Pair {
    owner: StoreOwner,
    store: Store<StoreOwner>,
    instance: Instance,
    shadow: (Store<()>, Instance),
}

impl Hosts {
    fn pair(&self) -> Pair {
        let owner = self.samepage.owner(0);
        let mut store = Store::new(&self.engine, owner.clone());
        let instance = owner
            .instantiate_pre(&mut store, &self.pre)
            .expect("instance");
        let mut shadow_store = Store::new(&self.plain, ());
        let shadow = Instance::new(&mut shadow_store, &self.plain_module, &[]).expect("shadow");
        Pair {
            owner,
            store,
            instance,
            shadow: (shadow_store, shadow),
        }
    }

    fn merge(&self) {
        let dedup = self.samepage.dedup().expect("merging");
        for _ in 0..3 {
            dedup.scan_pass().expect("pass");
        }
        let audit = dedup.audit();
        assert!(
            audit.mismatched_slots.is_empty() && audit.index_sound,
            "{audit:?}"
        );
    }
}

impl Pair {
    fn fill(&mut self, first: i32, pages: i32, value: i32) {
        let args = (first, pages, value);
        let fill = self
            .instance
            .get_typed_func::<(i32, i32, i32), ()>(&mut self.store, "fill")
            .expect("fill");
        fill.call(&mut self.store, args).expect("fill");
        let (store, shadow) = &mut self.shadow;
        let fill = shadow
            .get_typed_func::<(i32, i32, i32), ()>(&mut *store, "fill")
            .expect("fill");
        fill.call(&mut *store, args).expect("fill");
    }

    fn grow(&mut self, pages: i32) {
        let grow = self
            .instance
            .get_typed_func::<i32, i32>(&mut self.store, "grow")
            .expect("grow");
        let old = grow.call(&mut self.store, pages).expect("grow");
        let (store, shadow) = &mut self.shadow;
        let grow = shadow
            .get_typed_func::<i32, i32>(&mut *store, "grow")
            .expect("grow");
        assert_eq!(grow.call(&mut *store, pages).expect("grow"), old);
    }

    fn base(&self) -> usize {
        self.owner.first_region().expect("a region").base
    }

    /// The instance's memory equals its shadow's, byte for byte.
    fn check(&mut self) {
        let memory = self.owner.snapshot();
        let (store, shadow) = &mut self.shadow;
        let expected = shadow
            .get_memory(&mut *store, "memory")
            .expect("memory")
            .data(&*store)
            .to_vec();
        assert_eq!(memory.len(), 1);
        assert_eq!(memory[0].len(), expected.len(), "length");
        if let Some(page) = (0..expected.len() / PAGE_SIZE).find(|&p| {
            memory[0][p * PAGE_SIZE..][..PAGE_SIZE] != expected[p * PAGE_SIZE..][..PAGE_SIZE]
        }) {
            panic!("page {page} differs from the shadow's");
        }
    }
}

#[test]
fn a_reused_slot_is_exactly_the_image_after_merging_touched_it() {
    let hosts = hosts();
    // Two instances write the same bytes (image pages, zero pages, grown pages), so that
    // merging shares their pages; a third keeps its own bytes throughout.
    let mut first = hosts.pair();
    let mut second = hosts.pair();
    let mut bystander = hosts.pair();
    for pair in [&mut first, &mut second] {
        pair.grow(4);
        pair.fill(0, 2, 0x5a5a_5a5a);
        pair.fill(3, 5, 0x1234_5678);
    }
    bystander.fill(1, 6, 0x0bad_cafe);
    hosts.merge();
    let merged = first.owner.stats();
    // Beyond the image's 3 pages, the 7 pages both wrote alike.
    assert!(
        merged.pages_merged >= 7,
        "merging touched the pages: {merged:?}"
    );
    // A write after merging: the copy-on-write of a merged page.
    first.fill(4, 1, 0x7777_7777);
    hosts.merge();
    for pair in [&mut first, &mut second, &mut bystander] {
        pair.check();
    }

    let (base, old_owner) = (first.base(), first.owner.clone());
    drop(first);
    let mut reused = hosts.pair();
    assert_eq!(reused.base(), base, "the dropped memory's slot is reused");
    // Exactly the image, the minimum long: not a byte of the previous instance.
    reused.check();
    // Its old owner no longer reaches it.
    assert!(old_owner.snapshot().is_empty());
    assert_eq!(old_owner.memory_bytes(), 0);
    // Growth maps zeros where the previous instance had grown and written.
    reused.grow(4);
    reused.check();
    // And it merges, writes and resets as a fresh memory does, the others untouched.
    reused.fill(0, 8, 0x5a5a_5a5a);
    hosts.merge();
    for pair in [&mut reused, &mut second, &mut bystander] {
        pair.check();
    }
    drop(second);
    drop(reused);
    let mut again = hosts.pair();
    again.check();
    bystander.check();
}

#[test]
fn memories_of_other_domains_and_sizes_never_share_a_slot() {
    let hosts = hosts();
    let mut first = hosts.pair();
    first.fill(0, 4, 1);
    let base = first.base();
    drop(first);
    // Another domain: a memory of its own.
    let owner = hosts.samepage.owner(7);
    let mut store = Store::new(&hosts.engine, owner.clone());
    owner
        .instantiate_pre(&mut store, &hosts.pre)
        .expect("instance");
    let other = owner.first_region().expect("a region").base;
    assert_ne!(other, base);
    let memory = &owner.snapshot()[0];
    assert!(memory.starts_with(b"the first page"));
    assert!(memory[PAGE_SIZE..2 * PAGE_SIZE].iter().all(|&b| b == 0));
    // The same domain again takes the slot.
    let mut pair = hosts.pair();
    assert_eq!(pair.base(), base);
    pair.check();
}

#[test]
fn a_slot_that_nothing_merged_is_reset_in_place_to_exactly_the_image() {
    let hosts = hosts();
    let dedup = hosts.samepage.dedup().expect("merging");
    let in_place = || dedup.stats().regions_reset_in_place;
    let mut first = hosts.pair();
    // Image pages written (their copy-on-write copies), zero pages between and after them,
    // all within the memory's minimum: nothing merged, nothing grown.
    first.fill(0, 4, 0x5a5a_5a5a);
    first.fill(40, 12, 0x0bad_cafe);
    first.check();
    let base = first.base();
    let before = in_place();
    drop(first);
    assert_eq!(in_place(), before + 1, "nothing moved: reset in place");
    let mut reused = hosts.pair();
    assert_eq!(reused.base(), base, "the dropped memory's slot is reused");
    reused.check();
    hosts.merge();

    // Once merging moved its pages, the next reset maps the image again.
    let mut other = hosts.pair();
    for pair in [&mut reused, &mut other] {
        pair.fill(1, 2, 0x7777_7777);
        pair.fill(3, 1, 0x1234_5678);
    }
    hosts.merge();
    assert!(reused.owner.stats().pages_merged > 0, "merging moved pages");
    let before = in_place();
    drop(reused);
    assert_eq!(in_place(), before, "merged pages: remapped");
    let mut again = hosts.pair();
    assert_eq!(again.base(), base);
    again.check();
    other.check();
    // And the slot, reset in place or not, writes and merges as a new memory does.
    again.fill(0, 8, 0x5a5a_5a5a);
    hosts.merge();
    again.check();
    other.check();
}
