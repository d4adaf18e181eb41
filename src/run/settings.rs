//! `samepage run`'s command line: the clap arguments, their parsers, and the settings they
//! make.
//!
//! The surface is `wasmtime run`'s where the two overlap, with its meanings: options come
//! before the program, and everything after the program goes to the guest (with or without
//! a `--`); `--dir HOST[::GUEST]`, `--env NAME[=VALUE]`, `--invoke NAME`, `-W fuel=N,
//! timeout=DURATION,max-memory-size=BYTES` and `-C cache=y|n,cache-config=PATH`. The merge
//! engine's knobs carry the names of `/sys/kernel/mm/ksm/` (`--pages-to-scan`,
//! `--sleep-millisecs`, `--use-zero-pages`, ...); each also answers to its sysfs spelling
//! with underscores, and the spellings of earlier versions stay as hidden aliases. They are
//! derived from the engine's declaration of each knob ([`KnobFlags`]), as `samepage serve`'s
//! are.

use std::path::PathBuf;

use clap::{Args, ValueEnum};
use samepage_dedup::{Knobs, MergeScope};
use samepage_runtime::{CompilationCache, Limits};

use super::DedupMode;
use crate::cli::{
    CodegenSetting, KnobFlags, LimitSetting, Switch, compilation_cache, environment, parse_codegen,
    parse_dir, parse_env, parse_limit,
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
    /// Print samepage's report after the guests' output (on stderr when the guests write to
    /// stdout): how much merging saved. The default with more than one instance; with one,
    /// `samepage run` prints only what the guest prints, as `wasmtime run` does, and exits
    /// when the guest does.
    #[arg(long)]
    pub report: bool,
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

    #[command(flatten)]
    pub knobs: KnobFlags,
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
    pub fn knobs(&self) -> anyhow::Result<Knobs> {
        self.knobs.apply(Knobs::default())
    }

    /// Whether the run measures merging and reports it: asked for (`--report`, `--json`), or
    /// more than one instance. Otherwise the run ends when its guests do, with no settling:
    /// their memory is about to be freed whole.
    pub fn wants_report(&self) -> bool {
        self.report || self.json || self.instances > 1
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

/// Seconds from 0 to a day.
fn parse_seconds(text: &str) -> Result<f64, String> {
    let seconds: f64 = text.parse().map_err(|e| format!("{text:?}: {e}"))?;
    if (0.0..=86_400.0).contains(&seconds) {
        Ok(seconds)
    } else {
        Err(format!("{seconds} is not in 0..=86400 seconds"))
    }
}
