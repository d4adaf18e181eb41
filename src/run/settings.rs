//! `samepage run`'s command line: the clap arguments, their parsers, and the settings they
//! make.
//!
//! The surface is `wasmtime run`'s where the two overlap, with its meanings: options come
//! before the program, and everything after the program goes to the guest (with or without
//! a `--`); `--dir HOST[::GUEST]`, `--env NAME[=VALUE]`, `--invoke NAME`, `-W fuel=N,
//! timeout=DURATION,max-memory-size=BYTES` and `-C cache=y|n,cache-config=PATH`. The merge
//! engine's knobs carry the names of `/sys/kernel/mm/ksm/` (`--pages-to-scan`,
//! `--sleep-millisecs`, `--use-zero-pages`, ...); each also answers to its sysfs spelling
//! with underscores, and the spellings of earlier versions stay as hidden aliases. Their
//! ranges and defaults are the engine's own ([`Knobs`] and its [`KnobRange`] constants).

use std::path::PathBuf;
use std::time::Duration;

use clap::builder::RangedI64ValueParser;
use clap::{Args, ValueEnum};
use samepage_dedup::{Advisor, KnobRange, Knobs, MergeScope, RunMode};
use samepage_runtime::{CompilationCache, Limits};

use super::DedupMode;
use crate::cli::{
    CodegenSetting, LimitSetting, Switch, compilation_cache, environment, parse_codegen, parse_dir,
    parse_env, parse_limit,
};

/// `--merge-scope`: [`MergeScope`] on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Scope {
    All,
    Advised,
}

impl From<Scope> for MergeScope {
    fn from(scope: Scope) -> Self {
        match scope {
            Scope::All => MergeScope::All,
            Scope::Advised => MergeScope::Advised,
        }
    }
}

/// `--run`: KSM's `run`, by number or by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Run {
    #[value(name = "0", alias = "stop")]
    Stop,
    #[value(name = "1", alias = "merge")]
    Merge,
    #[value(name = "2", alias = "unmerge")]
    Unmerge,
}

impl From<Run> for RunMode {
    fn from(run: Run) -> Self {
        match run {
            Run::Stop => RunMode::Stop,
            Run::Merge => RunMode::Merge,
            Run::Unmerge => RunMode::UnmergeAll,
        }
    }
}

/// `--advisor-mode`: KSM's `advisor_mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum AdvisorMode {
    None,
    ScanTime,
}

/// `--stdio`: what becomes of the guests' stdout and stderr.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Stdio {
    /// `inherit` for one instance, `prefix` for more.
    Auto,
    /// The guest writes to samepage's own stdout and stderr (and reads its stdin, with one
    /// instance), as under `wasmtime run`.
    Inherit,
    /// Each line behind its instance's index, `[3] `.
    Prefix,
    /// Kept, and put into the JSON report (`per_instance[].stdout`, `.stderr`).
    Capture,
    /// Thrown away.
    Drop,
}

#[derive(Args, Debug)]
#[command(
    after_help = "Everything after PROGRAM (with or without a `--` first) is passed to the guest \
                  as its arguments, as `wasmtime run` does; samepage's own options go before \
                  PROGRAM.\n\nThe exit status is the guests' own when they all agree, 134 when \
                  one trapped (as `wasmtime run`), 1 when they disagree or one failed."
)]
pub struct RunArgs {
    /// How many instances to create and keep.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub instances: u32,
    #[arg(long, value_enum, default_value_t = DedupMode::On)]
    pub dedup: DedupMode,
    /// Spread the instances round-robin over this many tenants, each a merge domain: no page
    /// is shared between tenants.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub tenants: u32,
    /// Which pages may merge without guest advice: all (as KSM's PR_SET_MEMORY_MERGE) or
    /// only ranges a guest advised mergeable (as MADV_MERGEABLE).
    #[arg(long, value_enum, default_value_t = Scope::All)]
    pub merge_scope: Scope,
    /// Merge while the instances start (each instance is looked at as it parks, and merged
    /// at once when memory is tight), so that the peak follows the merged size; `off` waits
    /// until every instance ran, so that the report's `pss_bytes_before` is memory before any
    /// merging.
    #[arg(long, value_enum, default_value_t = Switch::On)]
    pub merge_while_starting: Switch,
    /// Longest wait for the scanner to converge after the instances ran.
    #[arg(long, default_value_t = 30.0, value_parser = parse_seconds)]
    pub settle_secs: f64,
    /// Print the report as one JSON object on stdout (guests' stdout then goes to stderr,
    /// unless captured or dropped).
    #[arg(long)]
    pub json: bool,
    /// Draw the run's PSS trace into this SVG file.
    #[cfg(feature = "bench")]
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
    /// Where the guests' stdout and stderr go.
    #[arg(long, value_enum, default_value_t = Stdio::Auto)]
    pub stdio: Stdio,
    /// Grant the guests a host directory, as HOST (seen by the guest at the same path) or
    /// HOST::GUEST.
    #[arg(long = "dir", value_name = "HOST[::GUEST]", value_parser = parse_dir)]
    pub dirs: Vec<(PathBuf, String)>,
    /// Set an environment variable for the guests, as NAME=VALUE, or NAME to pass on the
    /// host's value.
    #[arg(long = "env", value_name = "NAME[=VALUE]", value_parser = parse_env)]
    pub envs: Vec<(String, Option<String>)>,
    /// Call this exported function instead of running the program's `_start`, with the
    /// guest arguments as its parameters; its results are printed one per line.
    #[arg(long, value_name = "NAME")]
    pub invoke: Option<String>,
    /// WebAssembly limits, as `wasmtime run -W`: fuel=N, timeout=DURATION (such as 500ms,
    /// 2s, 1m), max-memory-size=BYTES; comma-separated or repeated.
    #[arg(short = 'W', value_name = "KEY=VALUE[,...]", value_parser = parse_limit)]
    pub wasm: Vec<Vec<LimitSetting>>,
    /// Codegen options, as `wasmtime run -C`: cache=y|n (wasmtime's compilation cache, on by
    /// default), cache-config=PATH.
    #[arg(short = 'C', value_name = "KEY=VALUE[,...]", value_parser = parse_codegen)]
    pub codegen: Vec<Vec<CodegenSetting>>,

    /// KSM run: 1 merges, 0 stops the scanner (what is merged stays), 2 unmerges everything
    /// once the instances ran.
    #[arg(long, value_enum, default_value_t = Run::Merge, help_heading = "KSM knobs")]
    pub run: Run,
    /// Pages the scanner looks at per batch (KSM pages_to_scan).
    #[arg(long, alias = "pages_to_scan", default_value_t = default_pages_to_scan(),
        value_parser = knob(Knobs::PAGES_TO_SCAN), help_heading = "KSM knobs")]
    pub pages_to_scan: u32,
    /// Pause between batches, in milliseconds (KSM sleep_millisecs).
    #[arg(long, aliases = ["sleep_millisecs", "sleep-ms"], default_value_t = default_sleep_ms(),
        value_parser = knob(Knobs::SLEEP_MILLISECS), help_heading = "KSM knobs")]
    pub sleep_millisecs: u32,
    /// Most instances that may share one stable page (KSM max_page_sharing).
    #[arg(long, alias = "max_page_sharing", default_value_t = Knobs::default().max_page_sharing,
        value_parser = knob(Knobs::MAX_PAGE_SHARING), help_heading = "KSM knobs")]
    pub max_page_sharing: u32,
    /// Free pages of zeros instead of merging them (KSM use_zero_pages).
    #[arg(long, aliases = ["use_zero_pages", "zero-pages"], value_enum,
        default_value_t = Knobs::default().use_zero_pages.into(), help_heading = "KSM knobs")]
    pub use_zero_pages: Switch,
    /// Skip pages that keep failing to merge for exponentially more passes (KSM smart_scan).
    #[arg(long, alias = "smart_scan", value_enum,
        default_value_t = Knobs::default().smart_scan.into(), help_heading = "KSM knobs")]
    pub smart_scan: Switch,
    /// Tune pages_to_scan to a target pass time (KSM advisor_mode).
    #[arg(long, alias = "advisor_mode", value_enum, default_value_t = AdvisorMode::None,
        help_heading = "KSM knobs")]
    pub advisor_mode: AdvisorMode,
    /// The advisor's target time for a full pass, in seconds (KSM advisor_target_scan_time).
    #[arg(long, alias = "advisor_target_scan_time",
        default_value_t = Advisor::default().target_scan_time.as_secs_f64(),
        value_parser = parse_scan_time, help_heading = "KSM knobs")]
    pub advisor_target_scan_time: f64,
    /// Most of one core the advisor lets the scanner use, in percent (KSM advisor_max_cpu).
    #[arg(long, alias = "advisor_max_cpu",
        default_value_t = u32::from(Advisor::default().max_cpu_percent),
        value_parser = knob(Knobs::ADVISOR_MAX_CPU), help_heading = "KSM knobs")]
    pub advisor_max_cpu: u32,
    /// The advisor's lowest pages_to_scan (KSM advisor_min_pages_to_scan).
    #[arg(long, alias = "advisor_min_pages_to_scan",
        default_value_t = Advisor::default().min_pages_to_scan as u32,
        value_parser = knob(Knobs::ADVISOR_PAGES_TO_SCAN), help_heading = "KSM knobs")]
    pub advisor_min_pages_to_scan: u32,
    /// The advisor's highest pages_to_scan (KSM advisor_max_pages_to_scan).
    #[arg(long, alias = "advisor_max_pages_to_scan",
        default_value_t = Advisor::default().max_pages_to_scan as u32,
        value_parser = knob(Knobs::ADVISOR_PAGES_TO_SCAN), help_heading = "KSM knobs")]
    pub advisor_max_pages_to_scan: u32,

    /// Look at an instance's memory as soon as it stops running.
    #[arg(long, alias = "scan_on_park", value_enum,
        default_value_t = Knobs::default().scan_on_park.into(), help_heading = "samepage knobs")]
    pub scan_on_park: Switch,
    /// How long after a park the scanner looks again, in milliseconds.
    #[arg(long, alias = "park_recheck_millisecs", default_value_t = default_park_recheck_ms(),
        value_parser = knob(Knobs::PARK_RECHECK_MILLISECS), help_heading = "samepage knobs")]
    pub park_recheck_millisecs: u32,
    /// Share of the map-count limit the engine's own mappings may use, in percent.
    #[arg(long, alias = "map_budget_percent",
        default_value_t = u32::from(Knobs::default().map_budget_percent),
        value_parser = knob(Knobs::MAP_BUDGET_PERCENT), help_heading = "samepage knobs")]
    pub map_budget_percent: u32,
    /// Budget mappings as if vm.max_map_count were this (only lower limits are taken).
    #[arg(long, alias = "max_map_count", help_heading = "samepage knobs",
        value_parser = clap::value_parser!(u64).range(64..))]
    pub max_map_count: Option<u64>,

    /// ksmd's pages_to_scan for --dedup ksm (default: full speed).
    #[cfg(feature = "bench")]
    #[arg(long, default_value_t = 100_000, help_heading = "--dedup ksm",
        value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub ksm_pages_to_scan: u64,
    /// ksmd's sleep_millisecs for --dedup ksm.
    #[cfg(feature = "bench")]
    #[arg(long, alias = "ksm-sleep-ms", default_value_t = 0, help_heading = "--dedup ksm",
        value_parser = clap::value_parser!(u64).range(0..=60_000))]
    pub ksm_sleep_millisecs: u64,

    /// Sample PSS this often while merging, into the report's pss_trace.
    #[arg(long, default_value_t = 50, help_heading = "Measuring",
        value_parser = clap::value_parser!(u64).range(5..=10_000))]
    pub pss_trace_ms: u64,
    /// After converging, measure the merger's CPU over this many idle seconds.
    #[arg(long, default_value_t = 0.0, value_parser = parse_seconds, help_heading = "Measuring")]
    pub idle_secs: f64,

    /// The program to run (a WASI preview 1 command or reactor, or a component command with
    /// `wasi:cli/run`, WASI preview 2, as .wasm or .wat), then the guest's arguments: all
    /// that follows the program is the guest's, samepage's own options included.
    #[arg(value_name = "PROGRAM [ARGS]", required = true, trailing_var_arg = true,
        num_args = 1..)]
    pub program_and_args: Vec<String>,
    /// The program, split off `program_and_args`.
    #[arg(skip)]
    pub module: PathBuf,
    /// The guest's arguments, split off `program_and_args` (less a leading `--`).
    #[arg(skip)]
    pub args: Vec<String>,
}

impl RunArgs {
    /// Splits the program from its arguments, as `wasmtime run` does: everything after the
    /// program goes to the guest, less one `--` right after it.
    pub fn split_program(&mut self) {
        let mut rest = std::mem::take(&mut self.program_and_args).into_iter();
        self.module = rest.next().map(PathBuf::from).unwrap_or_default();
        self.args = rest.collect();
        if self.args.first().is_some_and(|first| first == "--") {
            self.args.remove(0);
        }
    }

    /// The engine's knobs these arguments ask for, validated.
    pub fn knobs(&self) -> Result<Knobs, samepage_dedup::Error> {
        let knobs = Knobs {
            run: self.run.into(),
            max_page_sharing: self.max_page_sharing,
            pages_to_scan: self.pages_to_scan as usize,
            sleep: Duration::from_millis(u64::from(self.sleep_millisecs)),
            use_zero_pages: self.use_zero_pages == Switch::On,
            smart_scan: self.smart_scan == Switch::On,
            advisor: (self.advisor_mode == AdvisorMode::ScanTime).then(|| Advisor {
                target_scan_time: Duration::from_secs_f64(self.advisor_target_scan_time),
                min_pages_to_scan: self.advisor_min_pages_to_scan as usize,
                max_pages_to_scan: self.advisor_max_pages_to_scan as usize,
                max_cpu_percent: u8::try_from(self.advisor_max_cpu).unwrap_or(u8::MAX),
            }),
            scan_on_park: self.scan_on_park == Switch::On,
            park_recheck: Duration::from_millis(u64::from(self.park_recheck_millisecs)),
            map_budget_percent: u8::try_from(self.map_budget_percent).unwrap_or(u8::MAX),
        };
        knobs.validate()?;
        Ok(knobs)
    }

    /// Whether the guests' stdout goes to samepage's stdout.
    pub fn guest_output_on_stdout(&self) -> bool {
        !self.json && matches!(self.stdio, Stdio::Auto | Stdio::Inherit | Stdio::Prefix)
    }

    /// The `-W` limits; a key given twice keeps its last value.
    pub fn limits(&self) -> Limits {
        crate::cli::limits(&self.wasm)
    }

    /// The `-C` cache settings: wasmtime's cache is on unless `cache=n`.
    pub fn compilation_cache(&self) -> CompilationCache {
        compilation_cache(&self.codegen)
    }

    /// The guests' environment ([`environment`]).
    pub fn environment(&self) -> Vec<(String, String)> {
        environment(&self.envs)
    }
}

/// A parser of a `u32` knob that accepts what the engine accepts.
fn knob(range: KnobRange) -> RangedI64ValueParser<u32> {
    let bound = |value: u64| i64::try_from(value).unwrap_or(i64::MAX);
    clap::value_parser!(u32).range(bound(range.min)..=bound(range.max))
}

fn default_pages_to_scan() -> u32 {
    u32::try_from(Knobs::default().pages_to_scan).unwrap_or(u32::MAX)
}

fn default_sleep_ms() -> u32 {
    u32::try_from(Knobs::default().sleep.as_millis()).unwrap_or(u32::MAX)
}

fn default_park_recheck_ms() -> u32 {
    u32::try_from(Knobs::default().park_recheck.as_millis()).unwrap_or(u32::MAX)
}

/// Seconds from 0 to a day.
fn parse_seconds(text: &str) -> Result<f64, String> {
    let seconds: f64 = text.parse().map_err(|e| format!("{text:?}: {e}"))?;
    if (0.0..=86_400.0).contains(&seconds) {
        Ok(seconds)
    } else {
        Err(format!("{seconds} is not in 0..=86400 seconds"))
    }
}

/// KSM's advisor_target_scan_time, in seconds, within the engine's range of it.
fn parse_scan_time(text: &str) -> Result<f64, String> {
    let seconds: f64 = text.parse().map_err(|e| format!("{text:?}: {e}"))?;
    let range = Knobs::ADVISOR_TARGET_SCAN_TIME;
    let ms = seconds * 1e3;
    if ms.is_finite() && range.contains(ms.round() as u64) && ms >= 0.0 {
        Ok(seconds)
    } else {
        Err(format!(
            "{seconds} s is out of range: accepted {} to {} s",
            range.min as f64 / 1e3,
            range.max as f64 / 1e3
        ))
    }
}
