//! Starting a run's instances side by side, within the host's limits.
//!
//! Instances are created one after another; each then runs (a command's `_start` or
//! `wasi:cli/run`, or the `--invoke`d function) on a thread of its own, as `--instances`
//! separate `wasmtime run` processes would, and is kept once its run returns (a reactor,
//! once `_initialize` returned). The next is created once the last returned, or after
//! [`START_STAGGER`] if it runs on: short runs are merged as they end, one after another,
//! and long ones run side by side. After the first one the run knows
//! what an instance costs, and checks the whole run against the limits before creating the
//! others:
//!
//! - **descriptors**: every linear memory keeps its memfd open; a run that needs more than
//!   `RLIMIT_NOFILE` allows is refused, with the figures;
//! - **memory**: a run whose unmerged total exceeds what is available (the machine's
//!   `MemAvailable`, or a cgroup limit above the run) is told so. Once the run has used half
//!   of that, each instance is merged as soon as it ran ([`StoreOwner::merge_now`]), so that
//!   memory grows by merged instances; and the run stops starting instances before the next
//!   one would take it past nine tenths, rather than be killed by the OOM killer with no
//!   report.
//!
//! [`StoreOwner::merge_now`]: samepage_runtime::StoreOwner::merge_now

use std::io::Write;
use std::time::Instant;

use anyhow::{Result, bail};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use samepage_runtime::{GuestOutput, Host, HostStream, Instance, Program, RunOutcome, Val};

use super::RunArgs;
use super::settings::Stdio;
use crate::cgroup::MemoryCgroup;
use crate::resources::{Headroom, check_descriptors, open_descriptors};
use samepage_runtime::measure::pss_bytes;

/// How one instance's run ended.
#[derive(Debug)]
pub enum Ending {
    /// Its command ran (to an exit, a trap, or a limit).
    Ran(RunOutcome),
    /// A reactor, initialised and ready for calls.
    Ready,
    /// The `--invoke`d function returned these results.
    Invoked(Vec<String>),
    /// It could not be created, or the program is not what the run needs.
    Failed(String),
}

impl Ending {
    pub fn is_ok(&self) -> bool {
        matches!(
            self,
            Ending::Ran(RunOutcome::Exited(_)) | Ending::Ready | Ending::Invoked(_)
        )
    }

    pub fn is_trap(&self) -> bool {
        matches!(self, Ending::Ran(outcome) if !matches!(outcome, RunOutcome::Exited(_)))
    }

    pub fn is_failure(&self) -> bool {
        matches!(self, Ending::Failed(_))
    }

    /// The guest's exit status: its own, or 0 for a reactor or an invoked function.
    pub fn exit_code(&self) -> Option<i32> {
        match self {
            Ending::Ran(RunOutcome::Exited(code)) => Some(*code),
            Ending::Ready | Ending::Invoked(_) => Some(0),
            _ => None,
        }
    }
}

/// One instance of the run.
pub struct Record {
    pub index: u32,
    /// Its tenant (merge domain).
    pub domain: u32,
    /// `None` when it could not be created.
    pub instance: Option<Instance>,
    pub ending: Ending,
}

/// The instances of a run and how their runs went.
pub struct Started {
    pub records: Vec<Record>,
    /// Whether the run stopped before starting them all (memory ran short).
    pub stopped_early: bool,
    /// One line per instance that did not exit with 0, and per limit met.
    pub problems: Vec<String>,
    /// Wall time inside instantiation alone, over all instances.
    pub instantiate_seconds: f64,
    /// Wall time to create and run every instance.
    pub instantiate_and_run_seconds: f64,
    /// When the last instance started, in seconds since the first began to be created.
    pub last_started_seconds: f64,
    /// (seconds since the first instance began to be created, `pages_sharing`), sampled
    /// every [`SHARING_SAMPLE`] while instances run.
    pub sharing_while_running: Vec<(f64, u64)>,
}

impl Started {
    pub fn instances(&self) -> impl Iterator<Item = &Instance> {
        self.records.iter().filter_map(|r| r.instance.as_ref())
    }

    #[cfg(feature = "bench")]
    pub fn instances_mut(&mut self) -> impl Iterator<Item = &mut Instance> {
        self.records.iter_mut().filter_map(|r| r.instance.as_mut())
    }

    pub fn count(&self, which: impl Fn(&Ending) -> bool) -> u32 {
        self.records.iter().filter(|r| which(&r.ending)).count() as u32
    }

    /// The status `samepage` exits with: 134 when an instance trapped (as `wasmtime run`,
    /// which exits as an abort would), 1 when one failed, the run stopped early or the
    /// instances disagree, else the instances' own.
    pub fn exit_code(&self) -> i32 {
        if self.records.iter().any(|r| r.ending.is_trap()) {
            return 134;
        }
        let mut codes = self.records.iter().map(|r| r.ending.exit_code());
        let first = codes.next().flatten();
        match first {
            Some(code) if !self.stopped_early && codes.all(|c| c == Some(code)) => code,
            _ => 1,
        }
    }
}

/// Where each instance's output goes, from `--stdio` and `--json`.
struct GuestStdio {
    mode: Stdio,
    /// The host stream a guest's stdout goes to: stderr under `--json`, which keeps stdout
    /// for the report.
    stdout_to: HostStream,
    inherit_stdin: bool,
}

impl GuestStdio {
    fn of(args: &RunArgs) -> Self {
        let mode = match args.stdio {
            Stdio::Auto if args.instances == 1 => Stdio::Inherit,
            Stdio::Auto => Stdio::Prefix,
            mode => mode,
        };
        Self {
            mode,
            stdout_to: if args.json {
                HostStream::Stderr
            } else {
                HostStream::Stdout
            },
            // One stdin cannot be shared between instances.
            inherit_stdin: mode == Stdio::Inherit && args.instances == 1,
        }
    }

    /// (stdout, stderr) of instance `n`.
    fn outputs(&self, n: u32) -> (GuestOutput, GuestOutput) {
        let prefixed = |prefix: String, to| GuestOutput::Prefixed { prefix, to };
        match self.mode {
            Stdio::Inherit | Stdio::Auto if self.stdout_to == HostStream::Stdout => {
                (GuestOutput::Inherit, GuestOutput::Inherit)
            }
            Stdio::Inherit | Stdio::Auto => (
                prefixed(String::new(), self.stdout_to),
                GuestOutput::Inherit,
            ),
            Stdio::Prefix => (
                prefixed(format!("[{n}] "), self.stdout_to),
                prefixed(format!("[{n}] "), HostStream::Stderr),
            ),
            Stdio::Capture => (GuestOutput::Capture, GuestOutput::Capture),
            Stdio::Drop => (GuestOutput::Discard, GuestOutput::Discard),
        }
    }

    /// Whether guest output reaches the terminal (a progress bar would be drawn over it).
    fn shown(&self) -> bool {
        matches!(self.mode, Stdio::Inherit | Stdio::Prefix | Stdio::Auto)
    }

    /// Writes the results of an invoked function where instance `n`'s stdout goes, one per
    /// line, as `wasmtime run --invoke` prints them.
    fn print_results(&self, n: u32, results: &[String]) {
        let prefix = match self.mode {
            Stdio::Prefix => format!("[{n}] "),
            Stdio::Inherit | Stdio::Auto => String::new(),
            // Captured results are in the report; dropped ones nowhere.
            Stdio::Capture | Stdio::Drop => return,
        };
        for result in results {
            // A reader that went away (a closed pipe) loses the rest, as the guest's own
            // output would.
            let _ = match self.stdout_to {
                HostStream::Stdout => writeln!(std::io::stdout().lock(), "{prefix}{result}"),
                HostStream::Stderr => writeln!(std::io::stderr().lock(), "{prefix}{result}"),
            };
        }
    }
}

/// The run's memory as it grows, against what is available to it.
struct MemoryWatch<'a> {
    cgroup: Option<&'a MemoryCgroup>,
    /// What the run may still take, read before the first instance.
    headroom: Option<Headroom>,
    /// Memory in use then.
    at_start: u64,
}

impl<'a> MemoryWatch<'a> {
    fn new(cgroup: Option<&'a MemoryCgroup>) -> Result<Self> {
        let mut watch = Self {
            cgroup,
            headroom: Headroom::now(),
            at_start: 0,
        };
        watch.at_start = watch.usage()?;
        Ok(watch)
    }

    /// The cgroup's usage where the run has one (it counts memfd pages nobody maps), else
    /// PSS.
    fn usage(&self) -> Result<u64> {
        match self.cgroup.and_then(MemoryCgroup::usage_bytes) {
            Some(bytes) => Ok(bytes),
            None => Ok(pss_bytes()?),
        }
    }

    /// Bytes the run has taken since the first instance.
    fn used(&self) -> Result<u64> {
        Ok(self.usage()?.saturating_sub(self.at_start))
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

/// Creates and runs `--instances` instances, with a progress bar on a terminal, stopping at
/// the first that cannot be created; fails when none could be, and refuses a run that needs
/// more descriptors than it may have.
pub fn start_instances(
    host: &Host,
    program: &Program,
    args: &RunArgs,
    cgroup: Option<&MemoryCgroup>,
    merging_while_starting: bool,
) -> Result<Started> {
    let name = args
        .module
        .file_name()
        .map_or_else(|| "module".into(), |n| n.to_string_lossy().into_owned());
    let stdio = GuestStdio::of(args);
    let mut wasi = samepage_runtime::WasiOptions {
        args: std::iter::once(name)
            .chain(args.args.iter().cloned())
            .collect(),
        env: args.environment(),
        preopens: args.dirs.clone(),
        inherit_stdin: stdio.inherit_stdin,
        ..Default::default()
    };
    let progress = if stdio.shown() {
        ProgressBar::with_draw_target(
            Some(u64::from(args.instances)),
            ProgressDrawTarget::hidden(),
        )
    } else {
        ProgressBar::new(u64::from(args.instances))
    };
    progress.set_style(
        ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} {elapsed}")
            .expect("static template")
            .progress_chars("=> "),
    );
    progress.set_message("starting instances");
    let merging = merging_while_starting && host.dedup().is_some();
    let watch = MemoryWatch::new(cgroup)?;
    // Descriptors once the first instance exists: the first also opens what the whole run
    // shares (its module image, the engine's files), so the second tells what one costs.
    let mut descriptors_after_first = 0;
    let mut per_instance_bytes = 0;
    let mut started = Started {
        records: Vec::new(),
        stopped_early: false,
        problems: Vec::new(),
        instantiate_seconds: 0.0,
        instantiate_and_run_seconds: 0.0,
        last_started_seconds: 0.0,
        sharing_while_running: Vec::new(),
    };
    let all_started = Instant::now();
    std::thread::scope(|scope| -> Result<()> {
        let mut running = Vec::new();
        for n in 0..args.instances {
            if n == 1 {
                descriptors_after_first = open_descriptors()?;
                warn_if_too_big(&watch, per_instance_bytes, args.instances, merging);
            }
            if n == 2 {
                check_descriptors(
                    args.instances - 1,
                    descriptors_after_first,
                    open_descriptors()?,
                )?;
            }
            let used = watch.used()?;
            if let Some(headroom) = &watch.headroom
                && n >= 1
                && used + per_instance_bytes > headroom.bytes / 10 * 9
            {
                started.stopped_early = true;
                started.problems.push(format!(
                    "stopped after {n} of {} instances: they use {:.1} MiB of the {:.1} MiB \
                     available ({}), and another would take about {:.1} MiB",
                    args.instances,
                    mib(used),
                    mib(headroom.bytes),
                    headroom.source,
                    mib(per_instance_bytes)
                ));
                break;
            }
            let tight = watch
                .headroom
                .as_ref()
                .is_some_and(|headroom| used > headroom.bytes / 2);
            (wasi.stdout, wasi.stderr) = stdio.outputs(n);
            let domain = n % args.tenants;
            let began = Instant::now();
            let created = create_one(host, program, &wasi, domain);
            started.instantiate_seconds += began.elapsed().as_secs_f64();
            match created {
                Ok(instance) => {
                    let progress = progress.clone();
                    // Dropped when the run returns, which ends the wait below at once.
                    let (returned, returns) = std::sync::mpsc::channel::<()>();
                    let run = move || {
                        let outcome = run_one(instance, args, n, domain, merging && tight);
                        progress.inc(1);
                        drop(returned);
                        outcome
                    };
                    let spawned = std::thread::Builder::new()
                        .name(format!("instance {n}"))
                        .stack_size(GUEST_THREAD_STACK)
                        .spawn_scoped(scope, run);
                    match spawned {
                        Ok(handle) => {
                            running.push(handle);
                            let _ = returns.recv_timeout(START_STAGGER);
                        }
                        Err(error) => {
                            // Its instance went with the closure: the run has no room for it.
                            started.records.push(Record {
                                index: n,
                                domain,
                                instance: None,
                                ending: Ending::Failed(format!(
                                    "could not get a thread to run on: {error}"
                                )),
                            });
                            started.stopped_early = n + 1 < args.instances;
                            break;
                        }
                    }
                }
                Err(ending) => {
                    // What keeps one instance from being created (address space, memory,
                    // descriptors) keeps the rest from it too; a reactor whose
                    // `_initialize` ended is that instance's own answer.
                    let uncreatable = ending.is_failure();
                    progress.inc(1);
                    started.records.push(Record {
                        index: n,
                        domain,
                        instance: None,
                        ending,
                    });
                    if uncreatable {
                        started.stopped_early = n + 1 < args.instances;
                        break;
                    }
                }
            }
            // What an instance costs before anything merges it: the most any one creation
            // added, with what the instances already running wrote meanwhile.
            per_instance_bytes = per_instance_bytes.max(watch.used()?.saturating_sub(used));
        }
        started.last_started_seconds = all_started.elapsed().as_secs_f64();
        // How far merging gets while the guests run (running merges, `samepage_dedup::quiesce`
        // rule 7), until the last one returns.
        if let Some(engine) = host.dedup() {
            while running.iter().any(|handle| !handle.is_finished()) {
                let sharing = engine.pages_sharing();
                let at = all_started.elapsed().as_secs_f64();
                started.sharing_while_running.push((at, sharing));
                std::thread::sleep(SHARING_SAMPLE);
            }
        }
        for handle in running {
            let (record, problem) = handle.join().map_err(|_| {
                anyhow::anyhow!("an instance's thread panicked (a bug in samepage)")
            })?;
            started.problems.extend(problem);
            started.records.push(record);
        }
        Ok(())
    })?;
    started.records.sort_by_key(|record| record.index);
    for record in &started.records {
        if let Ending::Invoked(results) = &record.ending {
            stdio.print_results(record.index, results);
        }
        match &record.ending {
            Ending::Ran(RunOutcome::Exited(0)) | Ending::Ready | Ending::Invoked(_) => {}
            // A guest's exit status is its own answer, which the run's status carries: said
            // again only beside a report, as `wasmtime run` does not say it.
            Ending::Ran(RunOutcome::Exited(_)) if !args.wants_report() => {}
            Ending::Ran(outcome) => started
                .problems
                .push(format!("instance {} {outcome}", record.index)),
            Ending::Failed(message) => started
                .problems
                .push(format!("instance {} {message}", record.index)),
        }
    }
    started.instantiate_and_run_seconds = all_started.elapsed().as_secs_f64();
    progress.finish_and_clear();
    if started.records.iter().all(|r| r.instance.is_none()) {
        bail!(
            "no instance of {} could be created:\n  {}",
            args.module.display(),
            started.problems.join("\n  ")
        );
    }
    Ok(started)
}

/// How long the next instance waits for the one before it to return: a guest that returns
/// sooner (most commands that compute and exit) is parked, and merged, before the next one
/// writes its memory, so the run's peak is one unmerged instance, not all of them; a guest
/// that runs longer runs on beside the next ones, which start this much apart.
const START_STAGGER: std::time::Duration = std::time::Duration::from_millis(50);

/// How often the run samples `pages_sharing` while instances run.
const SHARING_SAMPLE: std::time::Duration = std::time::Duration::from_millis(25);

/// Stack of the thread each instance runs on: what `wasmtime run` has on Linux's main
/// thread, so that a guest that runs there runs here. Reserved, not used, until touched.
const GUEST_THREAD_STACK: usize = 8 << 20;

/// Creates an instance in tenant `domain`; how it ended when it could not be.
fn create_one(
    host: &Host,
    program: &Program,
    wasi: &samepage_runtime::WasiOptions,
    domain: u32,
) -> Result<Instance, Ending> {
    host.instantiate_in(program, wasi, domain)
        .map_err(|error| match error {
            // A reactor's `_initialize` that exited, trapped or met a limit.
            samepage_runtime::RuntimeError::Ended { outcome, .. } => Ending::Ran(outcome),
            samepage_runtime::RuntimeError::Call { .. } => {
                Ending::Ran(RunOutcome::Trapped(error.to_string()))
            }
            error => Ending::Failed(format!("could not be created: {error}")),
        })
}

/// Runs instance `n` (its command, or the `--invoke`d function), on a thread of its own; with
/// `merge_after`, merges it once it ran. Returns its record, and a line if the merge failed.
fn run_one(
    mut instance: Instance,
    args: &RunArgs,
    n: u32,
    domain: u32,
    merge_after: bool,
) -> (Record, Option<String>) {
    let ending = match &args.invoke {
        Some(function) => match instance.invoke(function, &args.args) {
            Ok(results) => Ending::Invoked(results.iter().map(display_value).collect()),
            Err(samepage_runtime::RuntimeError::Ended { outcome, .. }) => Ending::Ran(outcome),
            Err(error @ samepage_runtime::RuntimeError::Call { .. }) => {
                Ending::Ran(RunOutcome::Trapped(error.to_string()))
            }
            Err(error) => Ending::Failed(format!("failed: {error}")),
        },
        None if instance.is_component() || instance.has_export("_start") => {
            match instance.run_start() {
                Ok(outcome) => Ending::Ran(outcome),
                Err(error) => Ending::Failed(format!("failed: {error}")),
            }
        }
        None => Ending::Ready,
    };
    // The scanner merges it later if this fails; the instance is unaffected.
    let problem = merge_after
        .then(|| instance.store_owner().merge_now().err())
        .flatten()
        .map(|error| format!("instance {n} could not be merged at once: {error}"));
    let record = Record {
        index: n,
        domain,
        instance: Some(instance),
        ending,
    };
    (record, problem)
}

/// A result as `wasmtime run --invoke` prints it.
fn display_value(value: &Val) -> String {
    match value {
        Val::I32(v) => v.to_string(),
        Val::I64(v) => v.to_string(),
        Val::F32(bits) => f32::from_bits(*bits).to_string(),
        Val::F64(bits) => f64::from_bits(*bits).to_string(),
        Val::V128(v) => format!("{:#034x}", v.as_u128()),
        other => format!("{other:?}"),
    }
}

/// Says, before the other instances start, when the run will not fit unmerged.
fn warn_if_too_big(watch: &MemoryWatch, per_instance: u64, instances: u32, merging: bool) {
    let Some(headroom) = &watch.headroom else {
        return;
    };
    let total = per_instance.saturating_mul(u64::from(instances));
    if total <= headroom.bytes {
        return;
    }
    let fit = headroom.bytes / 10 * 9 / per_instance.max(1);
    let plan = if merging {
        format!(
            "instances are merged as they start once half of it is used, and starting stops \
             short of the limit if merging does not save enough (it must save {:.0}%)",
            100.0 * (1.0 - headroom.bytes as f64 / total as f64)
        )
    } else {
        format!("without merging about {fit} fit, and starting stops there")
    };
    eprintln!(
        "samepage: {instances} instances of about {:.1} MiB each need about {:.1} MiB \
         unmerged, but {:.1} MiB is available ({}): {plan}",
        mib(per_instance),
        mib(total),
        mib(headroom.bytes),
        headroom.source
    );
}
