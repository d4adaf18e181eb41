//! The instantiate suite: time per instantiation, samepage against wasmtime's pooling
//! allocator with copy-on-write images, on the same programs in one process.
//!
//! Each side gets an engine of its own and the same program compiled for it; imports are
//! linked once into an `InstancePre` (every import a function that traps: instantiation
//! calls none, and WASI's own set-up is the same on both sides). A *round* makes
//! [`LIVE`] instances, each in a store of its own, keeping them all alive, then drops them
//! all: what a host holding a set of ready instances does. Each instantiation is timed
//! from before `Store::new` to after the instance exists; each drop (the store and its
//! instance: samepage resets its memories' slots there, wasmtime's pooling allocator
//! decommits its slots) is timed apart. Sides alternate round by round; the first round of
//! each side is a warm-up (it builds module images and fills the pools) and is not counted.

use std::time::Instant;

use anyhow::{Context, Result, anyhow};
use samepage_runtime::{
    ComponentPre, Lifetime, ModulePre, Program, Samepage, SamepageConfig, StoreOwner,
};

use super::{repo_path, table};

/// Instances alive at once in a round.
const LIVE: usize = 32;
/// Rounds per side, after the warm-up round.
const ROUNDS: u32 = 10;

/// A program the suite instantiates.
struct Workload {
    name: &'static str,
    path: &'static str,
    /// How to get the file when it is missing.
    fetch: &'static str,
}

const WORKLOADS: [Workload; 4] = [
    Workload {
        name: "Flite",
        path: "examples/real/flite.wasm",
        fetch: "scripts/fetch-real-programs",
    },
    Workload {
        name: "CPython",
        path: "examples/real/python.wasm",
        fetch: "scripts/fetch-real-programs",
    },
    Workload {
        name: "Yosys",
        path: "examples/real/yosys.wasm",
        fetch: "scripts/fetch-real-programs",
    },
    Workload {
        name: "Python http component",
        path: "target/http-components/python-app.wasm",
        fetch: "scripts/build-http-components",
    },
];

/// One side: an engine and the program pre-linked for it.
trait Side {
    /// Makes one instance in a store of its own; the store is what `drop` takes down.
    fn instantiate(&self) -> Result<Box<dyn std::any::Any>>;
}

/// samepage, as `Samepage::configure` sets wasmtime up, with an owner per store as
/// `samepage serve` makes them (not merged at instantiation: images start merged).
struct SamepageSide {
    engine: wasmtime::Engine,
    samepage: Samepage,
    pre: Pre<StoreOwner>,
}

/// wasmtime's pooling allocator with copy-on-write images.
struct PoolingSide {
    engine: wasmtime::Engine,
    pre: Pre<()>,
}

enum Pre<T: 'static> {
    Module(ModulePre<T>),
    Component(ComponentPre<T>),
}

fn wasmtime_error(error: wasmtime::Error) -> anyhow::Error {
    anyhow!("{error:#}")
}

impl SamepageSide {
    fn new(bytes: &[u8]) -> Result<Self> {
        let mut config = wasmtime::Config::new();
        let samepage = Samepage::configure(&mut config, SamepageConfig::default())?;
        let engine = wasmtime::Engine::new(&config).map_err(wasmtime_error)?;
        let pre = match samepage.compile(&engine, bytes).map_err(wasmtime_error)? {
            Program::Module(module) => {
                let mut linker = wasmtime::Linker::new(&engine);
                linker
                    .define_unknown_imports_as_traps(module.wasmtime())
                    .map_err(wasmtime_error)?;
                Pre::Module(ModulePre::new(&linker, &module)?)
            }
            Program::Component(component) => {
                let mut linker = wasmtime::component::Linker::new(&engine);
                linker
                    .define_unknown_imports_as_traps(component.wasmtime())
                    .map_err(wasmtime_error)?;
                Pre::Component(ComponentPre::new(&linker, &component)?)
            }
        };
        Ok(Self {
            engine,
            samepage,
            pre,
        })
    }
}

impl Side for SamepageSide {
    fn instantiate(&self) -> Result<Box<dyn std::any::Any>> {
        let owner = self.samepage.owner_for(0, Lifetime::OneCall);
        let mut store = wasmtime::Store::new(&self.engine, owner.clone());
        match &self.pre {
            Pre::Module(pre) => {
                owner.instantiate_pre(&mut store, pre)?;
            }
            Pre::Component(pre) => {
                owner.instantiate_component_pre(&mut store, pre)?;
            }
        }
        Ok(Box::new(store))
    }
}

impl PoolingSide {
    fn new(bytes: &[u8]) -> Result<Self> {
        let mut pooling = wasmtime::PoolingAllocationConfig::new();
        pooling
            .total_memories(LIVE as u32 * 4)
            .total_tables(LIVE as u32 * 8)
            .total_core_instances(LIVE as u32 * 64)
            .total_component_instances(LIVE as u32)
            .max_memories_per_module(4)
            .max_tables_per_module(4)
            .max_memories_per_component(16)
            .max_tables_per_component(64)
            .max_core_instances_per_component(64)
            .table_elements(1 << 20)
            .max_core_instance_size(1 << 20)
            .max_component_instance_size(1 << 20)
            .max_memory_size(1 << 32);
        let mut config = wasmtime::Config::new();
        config
            .allocation_strategy(wasmtime::InstanceAllocationStrategy::Pooling(pooling))
            .memory_init_cow(true);
        let engine = wasmtime::Engine::new(&config).map_err(wasmtime_error)?;
        let pre = if samepage_runtime::is_component(bytes) {
            let component =
                wasmtime::component::Component::new(&engine, bytes).map_err(wasmtime_error)?;
            let mut linker = wasmtime::component::Linker::new(&engine);
            linker
                .define_unknown_imports_as_traps(&component)
                .map_err(wasmtime_error)?;
            Pre::Component(
                linker
                    .instantiate_pre(&component)
                    .map_err(wasmtime_error)?
                    .into(),
            )
        } else {
            let module = wasmtime::Module::new(&engine, bytes).map_err(wasmtime_error)?;
            let mut linker = wasmtime::Linker::new(&engine);
            linker
                .define_unknown_imports_as_traps(&module)
                .map_err(wasmtime_error)?;
            Pre::Module(
                linker
                    .instantiate_pre(&module)
                    .map_err(wasmtime_error)?
                    .into(),
            )
        };
        Ok(Self { engine, pre })
    }
}

impl Side for PoolingSide {
    fn instantiate(&self) -> Result<Box<dyn std::any::Any>> {
        let mut store = wasmtime::Store::new(&self.engine, ());
        match &self.pre {
            Pre::Module(pre) => {
                pre.wasmtime()
                    .instantiate(&mut store)
                    .map_err(wasmtime_error)?;
            }
            Pre::Component(pre) => {
                pre.wasmtime()
                    .instantiate(&mut store)
                    .map_err(wasmtime_error)?;
            }
        }
        Ok(Box::new(store))
    }
}

/// Per-instance times of one side: instantiations and drops, in seconds.
#[derive(Default)]
struct Times {
    instantiate: Vec<f64>,
    drop: Vec<f64>,
}

/// One round of `side`: [`LIVE`] instances made, then dropped; counted unless `warm_up`.
fn round(side: &dyn Side, times: &mut Times, warm_up: bool) -> Result<()> {
    let mut live = Vec::with_capacity(LIVE);
    for _ in 0..LIVE {
        let start = Instant::now();
        let instance = side.instantiate()?;
        let elapsed = start.elapsed().as_secs_f64();
        if !warm_up {
            times.instantiate.push(elapsed);
        }
        live.push(instance);
    }
    for instance in live {
        let start = Instant::now();
        drop(instance);
        if !warm_up {
            times.drop.push(start.elapsed().as_secs_f64());
        }
    }
    Ok(())
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN)
}

fn micros(seconds: f64) -> String {
    format!("{:.1} µs", seconds * 1e6)
}

/// Measures one program; `SAMEPAGE_INSTANTIATE_ONLY=samepage` (or `pooling`) runs one side
/// alone, `SAMEPAGE_INSTANTIATE_PROGRAM=CPython` (a name of the table) one program, and
/// `SAMEPAGE_INSTANTIATE_ROUNDS` sets the rounds, for a profiler.
fn measure(bytes: &[u8]) -> Result<(Times, Times)> {
    let only = std::env::var("SAMEPAGE_INSTANTIATE_ONLY").ok();
    let samepage = SamepageSide::new(bytes)?;
    let pooling = PoolingSide::new(bytes)?;
    let rounds = std::env::var("SAMEPAGE_INSTANTIATE_ROUNDS")
        .ok()
        .and_then(|rounds| rounds.parse().ok())
        .unwrap_or(ROUNDS);
    let (mut ours, mut theirs) = (Times::default(), Times::default());
    for n in 0..=rounds {
        if only.as_deref() != Some("pooling") {
            round(&samepage, &mut ours, n == 0)?;
        }
        if only.as_deref() != Some("samepage") {
            round(&pooling, &mut theirs, n == 0)?;
        }
    }
    Ok((ours, theirs))
}

pub fn suite() -> Result<String> {
    let mut report = String::from(ABOUT);
    let mut rows = Vec::new();
    let mut targets = Vec::new();
    let program = std::env::var("SAMEPAGE_INSTANTIATE_PROGRAM").ok();
    for workload in &WORKLOADS {
        if program.as_deref().is_some_and(|name| name != workload.name) {
            continue;
        }
        let path = repo_path(workload.path);
        let Ok(bytes) = std::fs::read(&path) else {
            report.push_str(&format!(
                "**{} not measured**: {} is missing (`{}` makes it).\n\n",
                workload.name, workload.path, workload.fetch
            ));
            continue;
        };
        eprintln!("bench: instantiate {}", workload.name);
        let (ours, theirs) =
            measure(&bytes).with_context(|| format!("instantiating {}", workload.name))?;
        let (ours_i, theirs_i) = (median(&ours.instantiate), median(&theirs.instantiate));
        let (ours_d, theirs_d) = (median(&ours.drop), median(&theirs.drop));
        let ratio = ours_i / theirs_i;
        rows.push(vec![
            workload.name.to_owned(),
            micros(ours_i),
            micros(theirs_i),
            format!("{ratio:.2}"),
            micros(ours_d),
            micros(theirs_d),
            format!("{:.2}", (ours_i + ours_d) / (theirs_i + theirs_d)),
        ]);
        targets.push(vec![
            format!("{}: instantiation ≤ 1.1× pooling + CoW", workload.name),
            format!("{ratio:.2}"),
            if ratio <= 1.1 { "yes" } else { "**no**" }.to_owned(),
        ]);
    }
    report.push_str(&table(
        &[
            "program",
            "samepage instantiate",
            "pooling + CoW instantiate",
            "ratio",
            "samepage drop",
            "pooling + CoW drop",
            "ratio, instantiate + drop",
        ],
        &rows,
    ));
    report.push_str("\n## Targets\n\n");
    report.push_str(&table(&["target", "measured", "met"], &targets));
    report.push_str(NOTES);
    Ok(report)
}

const NOTES: &str = "\n## Where the time goes\n\n\
    - **Memories.** A memory comes from a ready slot (`runtime/src/slots.rs`) when one of the \
    same module image, domain and size is idle: no `memfd_create`, seal, `ftruncate`, \
    reservation, mapping or registration, and no image run mapped; the slot is handed from \
    its idle owner to the instance's under the engine's lock. Without slots every \
    instantiation made its memories from nothing (37 µs for Flite, 57 µs for Yosys on this \
    machine, most of it the image's mappings and the engine's records of its pages).\n\
    - **Data segments.** samepage lifts a module's data segments into its image \
    (`runtime/src/image/`). Where code can name a segment (the module has a data count \
    section), each lifted one stays as an empty *passive* segment, and wasmtime fills an \
    entry (a base and a length) in each instance's `VMContext` for every passive segment at \
    every instantiation; where it cannot, as in CPython (24,171 segments) and the \
    componentize-py component's main module (2,177), the lifted segments are left out of \
    the compiled module. Before that, CPython took 68.5 µs per instance against 2.6 µs.\n\
    - **The on-demand allocator.** samepage's memories need wasmtime's on-demand instance \
    allocator (the pooling allocator never calls a memory creator), so every instance's \
    `VMContext` and tables are allocated and zeroed from the heap, where the pooling \
    allocator reuses slots made ahead. Yosys' function table has 9,813 entries, CPython's \
    5,903, Flite's 143. wasmtime's own on-demand allocator (with its copy-on-write images) \
    takes 12.9 µs per Yosys instance on this machine.\n\
    - **Drop.** A released slot is reset to its image before it goes idle, in the dropping \
    thread. A slot whose mappings nothing moved since its image was mapped (no merge, no \
    growth) is reset in place, as the pooling allocator resets its slots: \
    one `madvise(MADV_DONTNEED)` over the memory drops what the instance wrote over image \
    pages, and what it wrote into its memfd is punched (a `SEEK_DATA` walk finds it); the \
    engine's records of the image's pages stay. Otherwise the engine forgets every page's \
    record, maps the memfd back, punches what was written and maps the image's runs again. \
    The pooling allocator's drop is a `madvise` of what was touched.\n";

const ABOUT: &str = "# Instantiation: samepage against wasmtime's pooling allocator\n\n\
    Time per instantiation of real programs, samepage (`Samepage::configure`, memories from \
    its slot pool, module images mapped) against wasmtime's pooling allocator with \
    copy-on-write images (`InstanceAllocationStrategy::Pooling`, `memory_init_cow`), in one \
    process, the same bytes compiled for each. Both instantiate from an `InstancePre` \
    (imports resolved once; every import a trapping stub), each instance in a store of its \
    own. A round makes 32 instances, keeping them alive, then drops them; the sides \
    alternate round by round, 10 counted rounds each after a warm-up round (which builds \
    the images and fills the pools). *Instantiate* is the median over the 320 \
    instantiations, from `Store::new` to the instance; *drop* the median time to drop a \
    store with its instance (samepage resets the memories' slots there; the pooling \
    allocator decommits its slots).\n\n";
