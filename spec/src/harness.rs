//! Running the files: once on wasmtime's own memories, then on samepage's in each zero-page
//! mode, in one process, each side with a wasmtime engine of its own and the same wasm
//! features.

use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use samepage_dedup::{EngineConfig, Knobs};
use samepage_runtime::{RuntimeError, Samepage, SamepageConfig, StoreOwner};
use wasmtime_wast::{Async, SpectestConfig, WastContext};

use crate::directives::{self, Directive, SplitError};
use crate::report::{
    FileReport, Memories, MergeActivity, Outcome, Report, SamepageOutcome, SideSummary, ZeroPages,
};
use crate::suite::SpecFile;

/// Why a run could not be made (as against a file failing, which is a result).
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error("{file} cannot be cut into directives: {source}")]
    Split {
        file: String,
        #[source]
        source: SplitError,
    },
    #[error("building the wasmtime engine for {memories}: {message}")]
    Engine { memories: Memories, message: String },
    #[error("setting samepage up: {0}")]
    Samepage(#[from] RuntimeError),
}

/// The `spectest` module the scripts import (its `print` functions quiet).
const SPECTEST: SpectestConfig = SpectestConfig {
    use_shared_memory: false,
    suppress_prints: true,
};

/// Runs `files` on every side and reports. `progress` hears of each file as it starts on
/// each side.
pub fn run(
    files: &[SpecFile],
    mut progress: impl FnMut(Memories, &SpecFile),
) -> Result<Report, HarnessError> {
    let scripts = files
        .iter()
        .map(|file| {
            directives::split(file.text).map_err(|source| HarnessError::Split {
                file: file.name.clone(),
                source,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;

    let mut sides = Vec::new();
    let started = Instant::now();
    let engine = wasmtime_engine(&features(), Memories::Wasmtime)?;
    let mut reports: Vec<FileReport> = Vec::new();
    for (file, directives) in files.iter().zip(&scripts) {
        progress(Memories::Wasmtime, file);
        let mut cx = context(&engine, |_| {});
        reports.push(FileReport {
            name: file.name.clone(),
            directives: directives.len(),
            wasmtime: run_script(&mut cx, file, directives, None),
            samepage: Vec::new(),
        });
    }
    drop(engine);
    sides.push(summary(
        Memories::Wasmtime,
        started.elapsed(),
        reports.iter().map(|r| &r.wasmtime),
        None,
    ));

    for zero_pages in ZeroPages::BOTH {
        let memories = Memories::Samepage(zero_pages);
        let started = Instant::now();
        let mut side = SamepageSide::new(zero_pages)?;
        for ((file, directives), report) in files.iter().zip(&scripts).zip(&mut reports) {
            progress(memories, file);
            report.samepage.push(side.run_file(file, directives));
        }
        let activity = side.finish();
        sides.push(summary(
            memories,
            started.elapsed(),
            reports
                .iter()
                .map(|r| &r.samepage[r.samepage.len() - 1].outcome),
            Some(activity),
        ));
    }
    Ok(Report {
        files: reports,
        sides,
    })
}

fn summary<'a>(
    memories: Memories,
    elapsed: Duration,
    outcomes: impl Iterator<Item = &'a Outcome>,
    merging: Option<MergeActivity>,
) -> SideSummary {
    SideSummary {
        memories,
        passed: outcomes.filter(|outcome| outcome.passed()).count(),
        elapsed,
        merging,
    }
}

/// The wasm features of every side: what the suite tests, less the two proposals whose
/// memories samepage refuses by design (shared memories, which other threads would write
/// without the owner's guard, and page sizes below the 4 KiB pages it maps); with those on,
/// their files would differ for that documented reason alone. Off on both sides, their
/// files fail alike.
fn features() -> wasmtime::Config {
    let mut config = wasmtime::Config::new();
    config
        .wasm_simd(true)
        .wasm_relaxed_simd(true)
        .wasm_bulk_memory(true)
        .wasm_multi_value(true)
        .wasm_multi_memory(true)
        .wasm_memory64(true)
        .wasm_reference_types(true)
        .wasm_function_references(true)
        .wasm_gc(true)
        .wasm_tail_call(true)
        .wasm_extended_const(true)
        .wasm_exceptions(true)
        .wasm_wide_arithmetic(true)
        .wasm_threads(false)
        .wasm_custom_page_sizes(false);
    config
}

/// A context for one file, as on every side.
///
/// Error messages of `assert_invalid`, `assert_malformed` and `assert_unlinkable` are not
/// compared, only that the module is refused: `wasmtime-wast` 48 without its
/// `component-model` feature refuses every text module of an `assert_malformed` (`module
/// quote`) and every binary that is not a core module with "component-model support not
/// enabled", which would end each such file early; and that feature needs wasmtime's
/// `component-model-async`, which would change the wasmtime the whole workspace builds.
/// Refusing is what memories could change, never the wording of a validation error.
fn context(
    engine: &wasmtime::Engine,
    configure: impl Fn(&mut wasmtime::Store<()>) + Send + Sync + 'static,
) -> WastContext {
    let mut cx = WastContext::new(engine, Async::No, configure);
    cx.ignore_error_messages(true);
    cx
}

fn wasmtime_engine(
    config: &wasmtime::Config,
    memories: Memories,
) -> Result<wasmtime::Engine, HarnessError> {
    wasmtime::Engine::new(config).map_err(|error| HarnessError::Engine {
        memories,
        message: format!("{error:#}"),
    })
}

/// The scanner flat out: every page each batch, no pause, no pages skipped by smart scan,
/// the second look of a park visit at once.
fn flat_out(zero_pages: ZeroPages) -> Knobs {
    Knobs {
        pages_to_scan: Knobs::PAGES_TO_SCAN.max as usize,
        sleep: Duration::ZERO,
        smart_scan: false,
        park_recheck: Duration::ZERO,
        // Merged inside calls from their first moment (write-protect windows).
        merge_running_after: Duration::ZERO,
        use_zero_pages: zero_pages.use_zero_pages(),
        ..Knobs::default()
    }
}

/// Runs `directives` of `file` one at a time on `cx`; on samepage's side, `store` runs those
/// that may instantiate as the owner's instantiations and acts between directives.
fn run_script(
    cx: &mut WastContext,
    file: &SpecFile,
    directives: &[Directive<'_>],
    mut store: Option<&mut SamepageStore<'_>>,
) -> Outcome {
    let spectest = match store.as_deref_mut() {
        None => cx
            .register_spectest(&SPECTEST)
            .map_err(|e| format!("{e:#}")),
        Some(store) => store.instantiating(|| {
            cx.register_spectest(&SPECTEST)
                .map_err(|e| format!("{e:#}"))
        }),
    };
    if let Err(message) = spectest {
        return Outcome::Fail(format!("registering spectest: {message}"));
    }
    for (index, directive) in directives.iter().enumerate() {
        let mut run = || {
            cx.run_wast(&file.name, directive.text.as_bytes())
                .map_err(|e| format!("{e:#}"))
        };
        let result = match store.as_deref_mut() {
            Some(store) if directive.mentions_module => store.instantiating(run),
            _ => run(),
        };
        if let Err(message) = result {
            return Outcome::Fail(format!("line {}: {message}", directive.line));
        }
        if let Some(store) = store.as_deref_mut() {
            store.between(index, directive.line);
        }
    }
    Outcome::Pass
}

/// samepage's memories in one zero-page mode: its wasmtime engine and merge engine.
struct SamepageSide {
    zero_pages: ZeroPages,
    samepage: Samepage,
    engine: wasmtime::Engine,
    activity: MergeActivity,
}

impl SamepageSide {
    fn new(zero_pages: ZeroPages) -> Result<Self, HarnessError> {
        let mut config = features();
        let samepage = Samepage::configure(
            &mut config,
            SamepageConfig {
                engine_config: EngineConfig {
                    knobs: flat_out(zero_pages),
                    ..EngineConfig::default()
                },
                ..SamepageConfig::default()
            },
        )?;
        let engine = wasmtime_engine(&config, Memories::Samepage(zero_pages))?;
        Ok(Self {
            zero_pages,
            samepage,
            engine,
            activity: MergeActivity::default(),
        })
    }

    fn dedup(&self) -> &samepage_dedup::Engine {
        self.samepage
            .dedup()
            .expect("the harness configures samepage with merging")
    }

    fn run_file(&mut self, file: &SpecFile, directives: &[Directive<'_>]) -> SamepageOutcome {
        let errors_before = self.dedup().stats().errors;
        // `WastContext` makes its stores itself (the core store first, at once) and lets the
        // harness configure each: each gets an owner, driven by samepage's call hook.
        let owners: Arc<Mutex<Vec<StoreOwner>>> = Arc::default();
        let configure = {
            let (samepage, owners) = (self.samepage.clone(), owners.clone());
            move |store: &mut wasmtime::Store<()>| {
                let owner = samepage.owner(0);
                owner.drive(store);
                owners.lock().expect("no panics while held").push(owner);
            }
        };
        let mut cx = context(&self.engine, configure);
        let owner = owners.lock().expect("no panics while held")[0].clone();
        let mut problems = Vec::new();
        let engine = self.dedup().clone();
        let run = std::panic::catch_unwind(AssertUnwindSafe(|| {
            let mut store = SamepageStore {
                owner: &owner,
                engine: &engine,
                activity: &mut self.activity,
                problems: &mut problems,
            };
            run_script(&mut cx, file, directives, Some(&mut store))
        }));
        let outcome = run.unwrap_or_else(|panic| Outcome::Fail(panic_message(&*panic)));
        check_audit(&engine, "with the file's store alive", &mut problems);
        drop(cx);
        drop(owner);
        drop(owners);
        // The file's memories wait, reset, for the next file's instances: let them go, so
        // that any region still registered is one leaked.
        self.samepage.release_idle_slots();
        check_audit(&engine, "after the file's store was dropped", &mut problems);
        let stats = engine.stats();
        if stats.regions != 0 {
            problems.push(format!(
                "{} regions still registered after the file's store was dropped",
                stats.regions
            ));
        }
        if stats.errors > errors_before {
            problems.push(format!(
                "{} scanner errors, the last: {}",
                stats.errors - errors_before,
                engine.last_error().unwrap_or_default()
            ));
        }
        SamepageOutcome {
            zero_pages: self.zero_pages,
            outcome,
            engine_problems: problems,
        }
    }

    /// The side's merge activity, with the scanner's figures, once every file ran.
    fn finish(self) -> MergeActivity {
        let stats = self.dedup().stats();
        MergeActivity {
            full_scans: stats.full_scans,
            pages_scanned: stats.pages_scanned,
            running_visits: stats.regions_running_visits,
            ..self.activity
        }
    }
}

/// Records a problem unless the engine's audit is clean.
fn check_audit(engine: &samepage_dedup::Engine, when: &str, problems: &mut Vec<String>) {
    let audit = engine.audit();
    if !audit.index_sound || !audit.mismatched_slots.is_empty() {
        problems.push(format!("audit {when}: {audit:?}"));
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    let message = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_default();
    format!("the harness panicked: {message}")
}

/// The file's core store on samepage's side, between and around directives.
struct SamepageStore<'a> {
    owner: &'a StoreOwner,
    engine: &'a samepage_dedup::Engine,
    activity: &'a mut MergeActivity,
    problems: &'a mut Vec<String>,
}

impl SamepageStore<'_> {
    /// Runs `f`, which may instantiate or create memories, as the owner's instantiation.
    fn instantiating(&mut self, f: impl FnOnce() -> Result<(), String>) -> Result<(), String> {
        self.owner.instantiating(f).map_err(|error| {
            let message = format!("samepage: {error}");
            self.problems.push(message.clone());
            message
        })?
    }

    /// What happens after directive `index` (which started on `line`): merge-now of the
    /// store's memories, unmerge-all, merge-now, unmerge of each of the store's regions, and
    /// round again, so that every directive runs on memories just merged or just unmerged.
    fn between(&mut self, index: usize, line: usize) {
        let result = match index % 4 {
            0 | 2 => self.owner.merge_now().map(|report| {
                let report = report.expect("the harness configures samepage with merging");
                self.activity.merge_now_calls += 1;
                self.activity.pages_merged += report.pages_merged;
                self.activity.zero_pages_freed += report.zero_pages;
                let sharing = self.engine.stats().pages_sharing;
                self.activity.peak_pages_sharing = self.activity.peak_pages_sharing.max(sharing);
            }),
            1 => self
                .engine
                .unmerge_all()
                .map_err(RuntimeError::from)
                .map(|_busy| {
                    self.activity.unmerge_all_calls += 1;
                }),
            _ => self.unmerge_regions(),
        };
        if let Err(error) = result {
            self.problems
                .push(format!("between directives after line {line}: {error}"));
        }
    }

    fn unmerge_regions(&mut self) -> Result<(), RuntimeError> {
        for region in self.owner.regions() {
            self.owner
                .access(|| {
                    self.owner
                        .with_guard(|guard| self.engine.unmerge_region(guard, region.id))
                })
                .transpose()?;
            self.activity.unmerge_region_calls += 1;
        }
        Ok(())
    }
}
