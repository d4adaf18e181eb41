//! Differential execution of generated modules: every module `wasm-smith` makes from a seed
//! runs on two wasmtime engines with the same wasm features and fuel, one on wasmtime's own
//! linear memories (A) and one on samepage's (B), whose merge engine runs its background
//! scanner flat out with `max_page_sharing` 2. Each module gets several instances on each
//! side; on B their identical pages merge with each other (chains of dups included, with
//! three instances and a limit of two sharers), and between calls the test merges an
//! instance's memories at once or unmerges everything, so that calls run on merged pages and
//! their writes take copy-on-write faults. What it shows: instantiation fails or succeeds
//! the same way, every call of every exported function gives the same values (floats by their
//! bits) or the same trap, with the same fuel left, and after instantiation and after every call
//! every memory of the instance has the same size and the same bytes on both sides; B's
//! engine keeps each memory registered at its size, its audit is clean after every module,
//! its scanner met no error, and pages were merged (so the test cannot pass vacuously).
//!
//! It runs `DEFAULT_MODULES` modules from `DEFAULT_SEED`; for a soak set
//! `SAMEPAGE_DIFFERENTIAL_MODULES=N` and `SAMEPAGE_DIFFERENTIAL_SEED=S` (module `i` is made
//! from seed `S + i`):
//!
//! ```sh
//! SAMEPAGE_DIFFERENTIAL_MODULES=2000 cargo test --release --test differential -- --nocapture
//! ```
//!
//! **Replaying a failure.** The panic names the module's seed, the instance, the call and the
//! first differing memory offset, and writes the module to
//! `target/tmp/differential-seed-S.wasm`. `SAMEPAGE_DIFFERENTIAL_SEED=S
//! SAMEPAGE_DIFFERENTIAL_MODULES=1` runs that module alone with the same arguments and the
//! same schedule of merges and unmerges (the background scanner's timing is not repeatable);
//! adding `SAMEPAGE_DIFFERENTIAL_WASM=PATH` runs the file at `PATH` instead of the generated
//! module, with the seed's arguments and schedule: for a module shrunk by hand or by
//! `wasm-tools shrink`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use samepage_dedup::{EngineConfig, Knobs};
use samepage_runtime::{RuntimeError, Samepage, SamepageConfig, StoreOwner};
use wasmtime::{
    Config, Engine, ExternType, Func, FuncType, Linker, Memory, Store, Trap, Val, ValType,
};

/// Modules of the CI run: under a minute optimised on two cores.
const DEFAULT_MODULES: u64 = 400;
const DEFAULT_SEED: u64 = 0x5A3E_9A6E;
/// Instances of each module on each side: three, so that with `MAX_PAGE_SHARING` 2 a page
/// they all hold needs a chain of two stable pages.
const INSTANCES: usize = 3;
const MAX_PAGE_SHARING: u32 = 2;
/// Times each exported function is called in each instance.
const ROUNDS: usize = 2;
/// Fuel for every call and every instantiation, on both sides: bounds loops and recursion.
const FUEL: u64 = 10_000;
/// Largest memory (initial and maximum size), in bytes: 64 wasm pages, 4 MiB.
const MAX_MEMORY_BYTES: u64 = 64 << 16;
/// Bytes of entropy from which a module is generated.
const MODULE_ENTROPY: usize = 8 << 10;

/// SplitMix64: a small seeded generator, the same stream on every platform.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }

    /// An integer argument: mostly values that make sense as addresses and lengths in a
    /// memory of at most 4 MiB, so that calls reach memory instead of trapping at once.
    fn integer(&mut self) -> u64 {
        match self.below(4) {
            0 => self.below(64),
            1 => self.below(MAX_MEMORY_BYTES),
            2 => [
                0,
                1,
                u64::MAX,
                i32::MAX as u64,
                u32::MAX as u64,
                i64::MAX as u64,
            ][self.below(6) as usize],
            _ => self.next(),
        }
    }

    /// A float argument's bits: zeros, ones, NaNs and infinities besides random bits.
    fn float_bits(&mut self, zero: u64, one: u64, nan: u64, infinity: u64) -> u64 {
        match self.below(6) {
            0 => zero,
            1 => one,
            2 => nan,
            3 => infinity,
            _ => self.next(),
        }
    }

    fn argument(&mut self, ty: &ValType) -> Val {
        match ty {
            ValType::I32 => Val::I32(self.integer() as i32),
            ValType::I64 => Val::I64(self.integer() as i64),
            ValType::F32 => {
                Val::F32(self.float_bits(0, 0x3F80_0000, 0x7FC0_0000, 0x7F80_0000) as u32)
            }
            ValType::F64 => Val::F64(self.float_bits(
                0,
                0x3FF0_0000_0000_0000,
                0x7FF8_0000_0000_0000,
                0x7FF0_0000_0000_0000,
            )),
            ValType::V128 => {
                Val::V128((u128::from(self.next()) << 64 | u128::from(self.next())).into())
            }
            // Without GC (off in `smith_config`) every reference type is nullable.
            ValType::Ref(_) => Val::default_for_ty(ty).expect("a nullable reference type"),
        }
    }

    fn arguments(&mut self, ty: &FuncType) -> Vec<Val> {
        ty.params().map(|param| self.argument(&param)).collect()
    }
}

/// What `wasm-smith` generates: modules without imports whose every item is exported, with
/// up to three memories (32- or 64-bit, 4 MiB at most, each with a maximum), data segments,
/// bulk memory, SIMD and canonical NaNs, so that both sides must compute the same bits. Half
/// the seeds make modules that avoid traps (out-of-bounds accesses become no-ops), whose
/// calls run on to their end or their fuel's instead of stopping at the first bad address.
fn smith_config(seed: u64) -> wasm_smith::Config {
    wasm_smith::Config {
        disallow_traps: (seed / 4).is_multiple_of(2),
        export_everything: true,
        max_imports: 0,
        min_memories: 1,
        max_memories: 3,
        memory64_enabled: true,
        max_memory32_bytes: MAX_MEMORY_BYTES,
        max_memory64_bytes: u128::from(MAX_MEMORY_BYTES),
        memory_max_size_required: true,
        min_data_segments: 1,
        max_data_segments: 10,
        bulk_memory_enabled: true,
        canonicalize_nans: true,
        min_funcs: 4,
        max_funcs: 12,
        max_tables: 2,
        max_table_elements: 1_000,
        max_types: 20,
        max_globals: 20,
        // Features whose values or memories the comparison cannot see through, or that
        // samepage refuses (shared memories): left out on both sides.
        threads_enabled: false,
        shared_everything_threads_enabled: false,
        gc_enabled: false,
        exceptions_enabled: false,
        custom_page_sizes_enabled: false,
        ..wasm_smith::Config::default()
    }
}

/// The wasm features and fuel of both engines: the same on each side, whatever wasmtime's
/// defaults.
fn common_config() -> Config {
    let mut config = Config::new();
    config
        .consume_fuel(true)
        .wasm_bulk_memory(true)
        .wasm_multi_memory(true)
        .wasm_memory64(true)
        .wasm_multi_value(true)
        .wasm_reference_types(true)
        .wasm_simd(true)
        .wasm_relaxed_simd(true)
        .relaxed_simd_deterministic(true)
        .wasm_tail_call(true)
        .wasm_extended_const(true)
        .wasm_wide_arithmetic(true)
        .wasm_threads(false)
        .wasm_gc(false)
        .wasm_function_references(false)
        .wasm_exceptions(false);
    config
}

/// What the run did, printed at its end.
#[derive(Default, Debug)]
struct Figures {
    modules: u64,
    /// Modules both engines refused to compile.
    rejected: u64,
    /// Instantiations that failed on both sides (a start function trapped, a segment out of
    /// bounds).
    failed_instantiations: u64,
    /// Instantiations whose start function ran out of fuel on one side only.
    start_functions_at_the_fuel_limit: u64,
    instances: u64,
    calls: u64,
    traps: u64,
    out_of_fuel: u64,
    /// Calls made while the instance on B had pages mapping stable pages.
    calls_on_merged_pages: u64,
    memory_comparisons: u64,
    bytes_compared: u64,
    merge_now_calls: u64,
    /// Pages that map a stable page right after a merge-now, added up.
    pages_merged_by_merge_now: u64,
    unmerge_alls: u64,
    /// The most `pages_sharing` seen at the end of a module.
    most_pages_sharing: u64,
    /// Visits of B's regions while their instance ran (write-protect windows, running
    /// merges), at the end of the last module: the engine's count since it started.
    running_visits: u64,
    /// Modules that ended with a stable-node chain.
    modules_with_chains: u64,
}

/// The two sides.
struct Sides {
    a: Engine,
    linker_a: Linker<()>,
    b: Engine,
    samepage: Samepage,
    linker_b: Linker<StoreOwner>,
}

/// One instance of the module on each side, with its exports in the module's order.
struct Pair {
    store_a: Store<()>,
    store_b: Store<StoreOwner>,
    funcs: Vec<(Func, Func)>,
    memories: Vec<(Memory, Memory)>,
}

impl Sides {
    fn new() -> Self {
        let a = Engine::new(&common_config()).expect("engine A");
        let mut config_b = common_config();
        let knobs = Knobs {
            pages_to_scan: 1 << 16,
            sleep: Duration::ZERO,
            smart_scan: false,
            max_page_sharing: MAX_PAGE_SHARING,
            park_recheck: Duration::from_millis(1),
            // Merged inside calls from their first moment (write-protect windows).
            merge_running_after: Duration::ZERO,
            ..Knobs::default()
        };
        let samepage = Samepage::configure(
            &mut config_b,
            SamepageConfig {
                engine_config: EngineConfig {
                    knobs,
                    ..EngineConfig::default()
                },
                ..SamepageConfig::default()
            },
        )
        .expect("samepage");
        let b = Engine::new(&config_b).expect("engine B");
        Self {
            linker_a: Linker::new(&a),
            a,
            linker_b: Linker::new(&b),
            b,
            samepage,
        }
    }

    fn dedup(&self) -> &samepage_dedup::Engine {
        self.samepage.dedup().expect("B merges")
    }

    /// Runs one module on both sides; `Err` says where they diverged, or what failed.
    fn run_module(&self, bytes: &[u8], seed: u64, figures: &mut Figures) -> Result<(), String> {
        // A stream of its own for arguments and the merge schedule, apart from the one the
        // module is generated from: a module read from a file replays with the same calls.
        let mut rng = Rng::new(seed ^ 0xD1FF_E2E7_1A1C_0000);
        // Half the modules with zero pages punched out, half with them merged like any other
        // content; half with data segments lifted into module images, half copied by wasmtime.
        let use_zero_pages = seed.is_multiple_of(2);
        let lift = (seed / 2).is_multiple_of(2);
        let dedup = self.dedup();
        dedup
            .set_knobs(Knobs {
                use_zero_pages,
                ..dedup.knobs()
            })
            .map_err(|e| format!("cannot set knobs: {e}"))?;
        figures.modules += 1;

        let module_a = wasmtime::Module::new(&self.a, bytes);
        let module_b = if lift {
            samepage_runtime::Module::new(&self.b, bytes)
        } else {
            wasmtime::Module::new(&self.b, bytes).map(Into::into)
        };
        let (module_a, module_b) = match (module_a, module_b) {
            (Ok(a), Ok(b)) => (a, b),
            (Err(_), Err(_)) => {
                figures.rejected += 1;
                return Ok(());
            }
            (a, b) => {
                return Err(format!(
                    "compiling: A {}, B {}",
                    a.map(|_| "compiled".to_string())
                        .unwrap_or_else(|e| format!("failed: {e:#}")),
                    b.map(|_| "compiled".to_string())
                        .unwrap_or_else(|e| format!("failed: {e:#}")),
                ));
            }
        };
        let mut func_exports = Vec::new();
        let mut memory_exports = Vec::new();
        for export in module_a.exports() {
            match export.ty() {
                ExternType::Func(ty) => func_exports.push((export.name().to_string(), ty)),
                ExternType::Memory(_) => memory_exports.push(export.name().to_string()),
                _ => {}
            }
        }

        let mut pairs = Vec::new();
        for instance in 0..INSTANCES {
            let mut store_a = Store::new(&self.a, ());
            let owner = self.samepage.owner(0);
            let mut store_b = Store::new(&self.b, owner.clone());
            store_a.set_fuel(FUEL).map_err(|e| format!("{e:#}"))?;
            store_b.set_fuel(FUEL).map_err(|e| format!("{e:#}"))?;
            let instance_a = self.linker_a.instantiate(&mut store_a, &module_a);
            let instance_b = owner.instantiate(&mut store_b, &self.linker_b, &module_b);
            let (instance_a, instance_b) = match (instance_a, instance_b) {
                (Ok(a), Ok(b)) => (a, b),
                (Err(a), Err(RuntimeError::Instantiate(b))) => {
                    let (a, b) = (failure(&a), failure(&b));
                    if a != b {
                        return Err(format!(
                            "instance {instance}: instantiation {a} on A, {b} on B"
                        ));
                    }
                    figures.failed_instantiations += 1;
                    continue;
                }
                (a, b) => {
                    let a = a.map_or_else(|e| failure(&e), |_| "succeeded".to_string());
                    let b = b.map_or_else(
                        |e| match e {
                            RuntimeError::Instantiate(e) => failure(&e),
                            e => format!("failed: {e}"),
                        },
                        |_| "succeeded".to_string(),
                    );
                    // wasmtime charges fuel for initialising data segments, and what it
                    // charges depends on how it initialises them: from its copy-on-write
                    // image (A), by copying (B with `memory_init_cow` off) or not at all
                    // (B's memories mapped from samepage's images). A start function that
                    // runs out of fuel on one side only ended within those few units of
                    // the limit: that is wasmtime's accounting, not the memories.
                    if a.contains("OutOfFuel") || b.contains("OutOfFuel") {
                        figures.start_functions_at_the_fuel_limit += 1;
                        continue;
                    }
                    return Err(format!(
                        "instance {instance}: instantiation {a} on A, {b} on B"
                    ));
                }
            };
            // Fuel left after instantiation is not compared, for the reason above; every
            // call starts from `FUEL` on both sides, and there it must agree to the unit.
            let mut funcs = Vec::new();
            for (name, _) in &func_exports {
                let a = instance_a.get_func(&mut store_a, name);
                let b = instance_b.get_func(&mut store_b, name);
                funcs.push(a.zip(b).ok_or_else(|| format!("no function {name:?}"))?);
            }
            let mut memories = Vec::new();
            for name in &memory_exports {
                let a = instance_a.get_memory(&mut store_a, name);
                let b = instance_b.get_memory(&mut store_b, name);
                memories.push(a.zip(b).ok_or_else(|| format!("no memory {name:?}"))?);
            }
            let mut pair = Pair {
                store_a,
                store_b,
                funcs,
                memories,
            };
            self.compare_memories(&mut pair, &memory_exports, figures)
                .map_err(|e| format!("instance {instance}, after instantiation: {e}"))?;
            pairs.push(pair);
            figures.instances += 1;
        }

        let mut call = 0;
        for _ in 0..ROUNDS {
            for (func, (name, ty)) in func_exports.iter().enumerate() {
                // The same arguments in every instance mostly, so that the instances stay
                // alike and their pages keep merging; now and then their own.
                let shared = rng.arguments(ty);
                for (instance, pair) in pairs.iter_mut().enumerate() {
                    let args = if rng.below(4) == 0 {
                        rng.arguments(ty)
                    } else {
                        shared.clone()
                    };
                    call += 1;
                    let whereabouts = || {
                        format!(
                            "instance {instance}, call {call} (`{name}` with {})",
                            show_all(&args)
                        )
                    };
                    if pair.store_b.data().stats().pages_merged > 0 {
                        figures.calls_on_merged_pages += 1;
                    }
                    let (func_a, func_b) = pair.funcs[func];
                    let results = ty.results().len();
                    let a = outcome(&mut pair.store_a, func_a, &args, results);
                    let b = outcome(&mut pair.store_b, func_b, &args, results);
                    if a != b {
                        return Err(format!("{}: A {a}, B {b}", whereabouts()));
                    }
                    figures.calls += 1;
                    if a.starts_with("trapped") {
                        figures.traps += 1;
                    }
                    if a.contains("OutOfFuel") {
                        figures.out_of_fuel += 1;
                    }
                    self.compare_memories(pair, &memory_exports, figures)
                        .map_err(|e| format!("{}: {e}", whereabouts()))?;
                    self.drive_merging(&mut rng, pair, figures)
                        .map_err(|e| format!("{}, merging afterwards: {e}", whereabouts()))?;
                }
            }
        }

        let stats = dedup.stats();
        figures.most_pages_sharing = figures.most_pages_sharing.max(stats.pages_sharing);
        figures.running_visits = stats.regions_running_visits;
        if stats.stable_node_chains > 0 {
            figures.modules_with_chains += 1;
        }
        drop(pairs);
        drop(module_b);
        let audit = dedup.audit();
        if !audit.index_sound
            || !audit.mismatched_slots.is_empty()
            || audit.max_sharers > MAX_PAGE_SHARING
        {
            return Err(format!("B's audit at the end of the module: {audit:?}"));
        }
        let stats = dedup.stats();
        if stats.errors != 0 {
            return Err(format!(
                "B's scanner met {} errors, the last: {:?}",
                stats.errors,
                dedup.last_error()
            ));
        }
        Ok(())
    }

    /// Compares every memory of `pair` (sizes, then bytes), and checks that B's engine has
    /// each registered at its base and size.
    fn compare_memories(
        &self,
        pair: &mut Pair,
        names: &[String],
        figures: &mut Figures,
    ) -> Result<(), String> {
        let owner = pair.store_b.data().clone();
        let regions = owner.regions();
        if regions.len() != pair.memories.len() {
            return Err(format!(
                "B's owner has {} regions for {} memories",
                regions.len(),
                pair.memories.len()
            ));
        }
        for (&(memory_a, memory_b), name) in pair.memories.iter().zip(names) {
            let base = memory_b.data_ptr(&pair.store_b) as usize;
            let size = memory_b.data_size(&pair.store_b);
            let registered = regions
                .iter()
                .find(|region| region.base == base)
                .and_then(|region| self.dedup().region_len(region.id));
            if registered != Some(size) {
                return Err(format!(
                    "memory {name:?} of {size} bytes at {base:#x}: B's engine has it at \
                     {registered:?} bytes"
                ));
            }
            let a = memory_a.data(&pair.store_a);
            let difference = owner.access(|| first_difference(a, memory_b.data(&pair.store_b)));
            if let Some((offset, byte_a, byte_b)) = difference {
                return Err(format!(
                    "memory {name:?} ({} bytes on A, {size} on B) differs first at offset \
                     {offset:#x}: A {byte_a:?}, B {byte_b:?}",
                    a.len()
                ));
            }
            figures.memory_comparisons += 1;
            figures.bytes_compared += size as u64;
        }
        Ok(())
    }

    /// Between calls on B: merges the instance's memories at once (half the time), unmerges
    /// every region (one time in eight), or leaves it to the scanner.
    fn drive_merging(
        &self,
        rng: &mut Rng,
        pair: &mut Pair,
        figures: &mut Figures,
    ) -> Result<(), String> {
        match rng.below(8) {
            0..4 => {
                let report = pair
                    .store_b
                    .data()
                    .merge_now()
                    .map_err(|e| format!("merge-now: {e}"))?
                    .expect("B merges");
                figures.merge_now_calls += 1;
                figures.pages_merged_by_merge_now += report.pages_merged;
            }
            4 => {
                let busy = self
                    .dedup()
                    .unmerge_all()
                    .map_err(|e| format!("unmerge-all: {e}"))?;
                // No instance runs between calls: every region was unmerged.
                if busy != 0 {
                    return Err(format!("unmerge-all found {busy} busy regions"));
                }
                figures.unmerge_alls += 1;
            }
            _ => {}
        }
        Ok(())
    }
}

/// Calls `func` with fuel `FUEL` and says what came of it: the results (floats by their
/// bits) or the trap, and the fuel left.
fn outcome<T>(store: &mut Store<T>, func: Func, args: &[Val], results: usize) -> String {
    if let Err(e) = store.set_fuel(FUEL) {
        return format!("cannot set fuel: {e:#}");
    }
    let mut values = vec![Val::I32(0); results];
    let result = func.call(&mut *store, args, &mut values);
    let fuel = store
        .get_fuel()
        .map_or_else(|e| format!("unknown ({e:#})"), |fuel| fuel.to_string());
    match result {
        Ok(()) => format!("returned [{}], fuel left {fuel}", show_all(&values)),
        Err(e) => format!("{}, fuel left {fuel}", failure(&e)),
    }
}

/// A failure, as both sides must agree on it: the trap code, or else the error's message.
fn failure(error: &wasmtime::Error) -> String {
    match error.downcast_ref::<Trap>() {
        Some(trap) => format!("trapped ({trap:?})"),
        None => format!("failed: {}", error.root_cause()),
    }
}

fn show_all(values: &[Val]) -> String {
    values.iter().map(show).collect::<Vec<_>>().join(", ")
}

/// A value as compared: numbers exactly, floats by their bits, references by being null or
/// not (two stores' references cannot be compared otherwise).
fn show(value: &Val) -> String {
    let reference =
        |kind: &str, null: bool| format!("{kind} {}", if null { "null" } else { "non-null" });
    match value {
        Val::I32(v) => format!("i32 {v}"),
        Val::I64(v) => format!("i64 {v}"),
        Val::F32(bits) => format!("f32 {bits:#010x}"),
        Val::F64(bits) => format!("f64 {bits:#018x}"),
        Val::V128(v) => format!("v128 {:#034x}", v.as_u128()),
        Val::FuncRef(r) => reference("funcref", r.is_none()),
        Val::ExternRef(r) => reference("externref", r.is_none()),
        Val::AnyRef(r) => reference("anyref", r.is_none()),
        Val::ExnRef(r) => reference("exnref", r.is_none()),
        Val::ContRef(r) => reference("contref", r.is_none()),
    }
}

/// Where `a` and `b` first differ, and their bytes there (`None` past an end).
fn first_difference(a: &[u8], b: &[u8]) -> Option<(usize, Option<u8>, Option<u8>)> {
    if a == b {
        return None;
    }
    let offset = a
        .iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .unwrap_or(a.len().min(b.len()));
    Some((offset, a.get(offset).copied(), b.get(offset).copied()))
}

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(value) => value
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value:?} is not a number")),
        Err(_) => default,
    }
}

/// The module of seed `seed`: `wasm-smith`'s output for bytes of the seeded generator.
fn generate(seed: u64) -> Vec<u8> {
    let entropy = Rng::new(seed).bytes(MODULE_ENTROPY);
    let mut input = arbitrary::Unstructured::new(&entropy);
    wasm_smith::Module::new(smith_config(seed), &mut input)
        .unwrap_or_else(|e| panic!("wasm-smith cannot make module of seed {seed}: {e}"))
        .to_bytes()
}

#[test]
fn generated_modules_run_alike_on_samepage_memories_and_on_wasmtimes_own() {
    let modules = env_u64("SAMEPAGE_DIFFERENTIAL_MODULES", DEFAULT_MODULES);
    let first_seed = env_u64("SAMEPAGE_DIFFERENTIAL_SEED", DEFAULT_SEED);
    let replay = std::env::var_os("SAMEPAGE_DIFFERENTIAL_WASM").map(PathBuf::from);
    let sides = Sides::new();
    let mut figures = Figures::default();
    let started = Instant::now();
    for index in 0..modules {
        let seed = first_seed.wrapping_add(index);
        let bytes = match &replay {
            Some(path) => std::fs::read(path)
                .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display())),
            None => generate(seed),
        };
        if let Err(divergence) = sides.run_module(&bytes, seed, &mut figures) {
            let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
                .join(format!("differential-seed-{seed}.wasm"));
            let written = match std::fs::write(&path, &bytes) {
                Ok(()) => format!("written to {}", path.display()),
                Err(e) => format!("not written to {}: {e}", path.display()),
            };
            panic!(
                "module {index} (seed {seed}) diverges: {divergence}\nthe module is {written}; \
                 replay it with SAMEPAGE_DIFFERENTIAL_SEED={seed} \
                 SAMEPAGE_DIFFERENTIAL_MODULES=1 cargo test --release --test differential"
            );
        }
    }
    eprintln!(
        "{modules} modules from seed {first_seed} in {:.1?}: {figures:#?}",
        started.elapsed()
    );
    // Not vacuous: most modules ran, calls ran on merged pages, merging happened.
    assert!(
        figures.instances >= modules,
        "too few instances ran: {figures:?}"
    );
    assert!(
        figures.calls_on_merged_pages * 4 >= figures.calls && figures.calls > 0,
        "too few calls ran on merged pages: {figures:?}"
    );
    assert!(
        figures.pages_merged_by_merge_now > 0 && figures.most_pages_sharing > 0,
        "nothing merged: {figures:?}"
    );
    assert!(
        figures.running_visits > 0,
        "the scanner never merged inside a call: {figures:?}"
    );
}
