//! `samepage run`'s command line: the clap arguments, their parsers, and the engine knobs
//! they make. The knobs' ranges and defaults are the engine's own ([`Knobs`] and its
//! [`KnobRange`] constants), not copies.

use std::path::PathBuf;
use std::time::Duration;

use clap::builder::RangedI64ValueParser;
use clap::{Args, ValueEnum};
use samepage_dedup::{Advisor, KnobRange, Knobs, MergeScope};

use super::DedupMode;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Switch {
    On,
    Off,
}

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

impl From<bool> for Switch {
    fn from(on: bool) -> Self {
        if on { Switch::On } else { Switch::Off }
    }
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// The program to run: a WASI preview 1 command or reactor, or a component command
    /// (`wasi:cli/run`, WASI preview 2), as .wasm or .wat.
    pub module: PathBuf,
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
    /// Longest wait for the scanner to converge after the instances ran.
    #[arg(long, default_value_t = 30.0, value_parser = parse_seconds)]
    pub settle_secs: f64,
    /// Print the report as one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
    /// Preopen a host directory for the guests, as HOST::GUEST.
    #[arg(long = "dir", value_parser = parse_dir)]
    pub dirs: Vec<(PathBuf, String)>,
    /// Set an environment variable for the guests, as K=V.
    #[arg(long = "env", value_parser = parse_env)]
    pub envs: Vec<(String, String)>,
    /// Most instances that may share one stable page (KSM max_page_sharing).
    #[arg(long, default_value_t = Knobs::default().max_page_sharing,
        value_parser = knob(Knobs::MAX_PAGE_SHARING))]
    pub max_page_sharing: u32,
    /// Pages the scanner looks at per batch (KSM pages_to_scan).
    #[arg(long, default_value_t = default_pages_to_scan(),
        value_parser = knob(Knobs::PAGES_TO_SCAN))]
    pub pages_to_scan: u32,
    /// Pause between batches, in milliseconds (KSM sleep_millisecs).
    #[arg(long, default_value_t = default_sleep_ms(), value_parser = knob(Knobs::SLEEP_MILLISECS))]
    pub sleep_ms: u32,
    /// Free pages of zeros instead of merging them (KSM use_zero_pages).
    #[arg(long, value_enum, default_value_t = Knobs::default().use_zero_pages.into())]
    pub zero_pages: Switch,
    /// Tune pages_to_scan so that a full pass takes this long (KSM advisor_mode=scan-time).
    #[arg(long, value_parser = knob(Knobs::ADVISOR_TARGET_SCAN_TIME))]
    pub advisor_target_ms: Option<u32>,
    /// Look at an instance's memory as soon as it stops running.
    #[arg(long, value_enum, default_value_t = Knobs::default().scan_on_park.into())]
    pub scan_on_park: Switch,
    /// ksmd's pages_to_scan for --dedup ksm (default: full speed).
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub ksm_pages_to_scan: u64,
    /// ksmd's sleep_millisecs for --dedup ksm.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=60_000))]
    pub ksm_sleep_ms: u64,
    /// Sample PSS this often while merging, into the report's pss_trace.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(5..=10_000))]
    pub pss_trace_ms: u64,
    /// After converging, measure the merger's CPU over this many idle seconds.
    #[arg(long, default_value_t = 0.0, value_parser = parse_seconds)]
    pub idle_secs: f64,
    /// Arguments passed to the guest after its name.
    #[arg(last = true)]
    pub args: Vec<String>,
}

impl RunArgs {
    /// The engine's knobs these arguments ask for, validated.
    pub fn knobs(&self) -> Result<Knobs, samepage_dedup::Error> {
        let knobs = Knobs {
            max_page_sharing: self.max_page_sharing,
            pages_to_scan: self.pages_to_scan as usize,
            sleep: Duration::from_millis(u64::from(self.sleep_ms)),
            use_zero_pages: self.zero_pages == Switch::On,
            advisor: self.advisor_target_ms.map(|ms| Advisor {
                target_scan_time: Duration::from_millis(u64::from(ms)),
                ..Advisor::default()
            }),
            scan_on_park: self.scan_on_park == Switch::On,
            ..Knobs::default()
        };
        knobs.validate()?;
        Ok(knobs)
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

/// Seconds from 0 to a day.
fn parse_seconds(text: &str) -> Result<f64, String> {
    let seconds: f64 = text.parse().map_err(|e| format!("{text:?}: {e}"))?;
    if (0.0..=86_400.0).contains(&seconds) {
        Ok(seconds)
    } else {
        Err(format!("{seconds} is not in 0..=86400 seconds"))
    }
}

fn parse_dir(text: &str) -> Result<(PathBuf, String), String> {
    let (host, guest) = text
        .split_once("::")
        .ok_or_else(|| format!("expected HOST::GUEST, got {text:?}"))?;
    Ok((PathBuf::from(host), guest.to_owned()))
}

fn parse_env(text: &str) -> Result<(String, String), String> {
    let (key, value) = text
        .split_once('=')
        .ok_or_else(|| format!("expected K=V, got {text:?}"))?;
    Ok((key.to_owned(), value.to_owned()))
}
