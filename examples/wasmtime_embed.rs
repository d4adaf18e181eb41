//! A plain wasmtime program, with store data and a host function of its own, put on
//! samepage's memories. The lines marked `samepage:` are all it takes; the rest is what any
//! wasmtime embedder already writes.
//!
//! `cargo run --release --example wasmtime_embed`

use samepage_runtime::{HasStoreOwner, Samepage, SamepageConfig, StoreOwner};
use wasmtime::{Caller, Config, Engine, Linker, Module, Store};

/// The embedder's own store data.
struct MyState {
    requests: u64,
    owner: StoreOwner, // samepage: the store's owner, reachable from host functions
}

impl HasStoreOwner for MyState {
    // samepage: how host functions (such as the guest API's) find the owner
    fn store_owner(&self) -> &StoreOwner {
        &self.owner
    }
}

/// A guest that builds a 4 MiB table at start-up, the same in every instance.
const GUEST: &str = r#"
(module
  (import "host" "count" (func $count))
  (memory (export "memory") 65)
  (func $build (local $at i32)
    (local.set $at (i32.const 65536))
    (loop $next
      (i32.store (local.get $at) (i32.mul (local.get $at) (i32.const 2654435761)))
      (local.set $at (i32.add (local.get $at) (i32.const 4)))
      (br_if $next (i32.lt_u (local.get $at) (i32.const 4259840)))))
  (func (export "handle") (call $count))
  (start $build))
"#;

fn main() -> wasmtime::Result<()> {
    let mut config = Config::new();
    let samepage = Samepage::configure(&mut config, SamepageConfig::default())?; // samepage
    let engine = Engine::new(&config)?;
    let module = Module::new(&engine, GUEST)?;
    let mut linker = Linker::new(&engine);
    linker.func_wrap("host", "count", |mut caller: Caller<'_, MyState>| {
        caller.data_mut().requests += 1;
    })?;

    let mut stores = Vec::new();
    for _ in 0..16 {
        let owner = samepage.owner(0); // samepage: one owner per store, in tenant 0
        let mut store = Store::new(
            &engine,
            MyState {
                requests: 0,
                owner: owner.clone(),
            },
        );
        let instance = owner.instantiate(&mut store, &linker, &module)?; // samepage
        let handle = instance.get_typed_func::<(), ()>(&mut store, "handle")?;
        handle.call(&mut store, ())?;
        stores.push(store);
    }

    // The scanner merges in the background while the instances sit idle.
    let dedup = samepage
        .dedup()
        .ok_or_else(|| wasmtime::Error::msg("merging is on by default"))?;
    let started = std::time::Instant::now();
    while dedup.stats().pages_sharing < 15 * 1024 && started.elapsed().as_secs() < 10 {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let stats = dedup.stats();
    println!(
        "16 instances, {} requests; after {:.2} s {} pages are shared by {} more ({} MiB saved)",
        stores
            .iter()
            .map(|store| store.data().requests)
            .sum::<u64>(),
        started.elapsed().as_secs_f64(),
        stats.pages_shared,
        stats.pages_sharing,
        (stats.pages_sharing * 4096) >> 20,
    );
    Ok(())
}
