//! What merges the instances' memory in a `run`, behind one face: samepage's engine, Linux
//! KSM (the lab's baseline, driven by `samepage_lab::ksm` in a build with `--features
//! bench`), or nothing (the baselines). The run samples it to know when it has converged.

use anyhow::{Context, Result};
use samepage_dedup::{Engine, RunMode, Stats};
#[cfg(feature = "bench")]
use samepage_lab::ksm::{KsmSession, KsmSysfs, ksmd_cpu_seconds};

/// The counters a run takes from its merger as it converges, whichever merger it is: under
/// `--dedup ksm` these are ksmd's own (read from the sysfs files [`Counter::ksm`] names);
/// every other counter of a run's report is samepage's engine's.
///
/// [`Counter::ksm`]: samepage_dedup::Counter::ksm
pub const SAMPLED: [&str; 5] = [
    "pages_shared",
    "pages_sharing",
    "pages_unshared",
    "pages_volatile",
    "full_scans",
];

/// One look at the merger's counters, with KSM's names and meanings.
#[derive(Clone, Debug, Default)]
pub struct Sample {
    /// samepage's engine's counters; for ksmd, those of [`SAMPLED`] (the others zero).
    pub stats: Stats,
    /// CPU the merger spent since it started, in seconds.
    pub cpu_seconds: f64,
    /// Whether the merger has nothing left to merge: for ksmd, a whole pass begun after it
    /// had seen every page twice merged nothing new; for samepage, as many passes as smart
    /// scan may skip a page for went by without sharing changing.
    pub converged: bool,
}

pub enum Merger {
    /// samepage's scanner; `last_change` is the full-scan count and sharing when sharing last
    /// changed (or merging began), and `quiet_passes` how many passes without a change mean
    /// convergence whatever the engine's horizon says (pages that change at every pass keep
    /// moving it).
    Samepage {
        engine: Engine,
        last_change: (u64, u64),
        quiet_passes: u64,
    },
    /// ksmd, configured for the run; `first_full_scans` is ksmd's count of passes before
    /// it started (the run reports its own passes), `cpu_start` ksmd's CPU time then, and
    /// `last_pass` the full-scan count and sharing seen at the latest pass end.
    #[cfg(feature = "bench")]
    Ksm {
        session: KsmSession,
        first_full_scans: u64,
        cpu_start: f64,
        last_pass: (u64, u64),
        converged_at: Option<u64>,
    },
    /// No merging (`off`, `cow`).
    Nothing,
}

impl Merger {
    /// Lets samepage's scanner run as `run` says, if it waited while the instances ran: the
    /// engine already has every other knob from the host's config.
    pub fn samepage(engine: &Engine, run: RunMode) -> Result<Self> {
        let first_full_scans = engine.stats().full_scans;
        let mut knobs = engine.knobs();
        let quiet_passes = knobs.passes_to_see_every_page();
        if knobs.run != run {
            knobs.run = run;
            engine.set_knobs(knobs).context("starting the scanner")?;
        }
        Ok(Self::Samepage {
            engine: engine.clone(),
            last_change: (first_full_scans, engine.stats().pages_sharing),
            quiet_passes,
        })
    }

    /// Starts ksmd at the given speed; the memories must already be `MADV_MERGEABLE`.
    #[cfg(feature = "bench")]
    pub fn ksm(sysfs: &KsmSysfs, pages_to_scan: u64, sleep_ms: u64) -> Result<Self> {
        // Before ksmd starts: at full speed it completes a pass within milliseconds.
        let first_full_scans = sysfs.read("full_scans")?;
        let session = sysfs.configure(&[
            ("pages_to_scan", pages_to_scan),
            ("sleep_millisecs", sleep_ms),
            ("run", 1),
        ])?;
        Ok(Self::Ksm {
            first_full_scans,
            cpu_start: ksmd_cpu_seconds()?,
            last_pass: (first_full_scans, 0),
            converged_at: None,
            session,
        })
    }

    pub fn sample(&mut self) -> Result<Sample> {
        Ok(match self {
            Self::Samepage {
                engine,
                last_change,
                quiet_passes,
            } => {
                let stats = engine.stats();
                if stats.merges_last_pass > 0 || stats.pages_sharing != last_change.1 {
                    *last_change = (stats.full_scans, stats.pages_sharing);
                }
                Sample {
                    cpu_seconds: stats.scanner_cpu_ns as f64 * 1e-9,
                    // Converged once a pass changed nothing and every page that may still
                    // merge was looked at again since (the engine's horizon: pages new or
                    // changed, pages smart scan held back), or after as many quiet passes
                    // as smart scan can hold a page back, whichever comes first.
                    converged: stats.full_scans > last_change.0
                        && (stats.full_scans >= stats.smart_scan_horizon
                            || stats.full_scans >= last_change.0 + *quiet_passes),
                    stats,
                }
            }
            #[cfg(feature = "bench")]
            Self::Ksm {
                session,
                first_full_scans,
                cpu_start,
                last_pass,
                converged_at,
            } => {
                let mut stats = read_sampled(session.sysfs())?;
                let (full_scans, pages_sharing) = (stats.full_scans, stats.pages_sharing);
                // The passes are this run's; the page counts are ksmd's, for the whole
                // system (a dead process's merged pages stay counted until ksmd next runs,
                // so a difference would mean nothing: the run's own pages are in
                // `process_ksm_stat`).
                stats.full_scans -= *first_full_scans;
                if full_scans > last_pass.0 {
                    // A pass ended: KSM needs two to merge anything, so count from the third.
                    if full_scans >= *first_full_scans + 3 && pages_sharing == last_pass.1 {
                        converged_at.get_or_insert(full_scans);
                    }
                    *last_pass = (full_scans, pages_sharing);
                }
                Sample {
                    stats,
                    cpu_seconds: ksmd_cpu_seconds()? - *cpu_start,
                    converged: converged_at.is_some(),
                }
            }
            Self::Nothing => Sample {
                converged: true,
                ..Sample::default()
            },
        })
    }
}

/// ksmd's figures for the counters of [`SAMPLED`], from the files their [`Counter::ksm`]
/// names.
///
/// [`Counter::ksm`]: samepage_dedup::Counter::ksm
#[cfg(feature = "bench")]
fn read_sampled(sysfs: &KsmSysfs) -> Result<Stats> {
    let mut stats = Stats::default();
    for counter in Stats::COUNTERS {
        if let (true, Some(file)) = (SAMPLED.contains(&counter.name), counter.ksm) {
            let value = samepage_dedup::Value::Count(sysfs.read(file)?);
            if !stats.set(counter.name, value) {
                anyhow::bail!("ksmd's {file} ({value}) does not fit {}", counter.name);
            }
        }
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_sampled_counter_is_one_ksm_counts_too() {
        for name in SAMPLED {
            let counter = Stats::COUNTERS.iter().find(|c| c.name == name);
            assert!(counter.and_then(|c| c.ksm).is_some(), "{name}");
        }
    }
}
