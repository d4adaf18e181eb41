//! What merges the instances' memory in a `run`, behind one face: samepage's engine, Linux
//! KSM, or nothing (the baselines). The run samples it to know when it has converged.

use anyhow::{Context, Result};
use samepage_dedup::{Engine, Knobs};

use crate::ksm::{KsmSession, KsmSysfs, ksmd_cpu_seconds};

/// One look at the merger's counters, with KSM's names and meanings.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sample {
    pub pages_shared: u64,
    pub pages_sharing: u64,
    pub pages_unshared: u64,
    pub pages_volatile: u64,
    pub full_scans: u64,
    /// CPU the merger spent since it started, in seconds.
    pub cpu_seconds: f64,
    /// Whether a whole pass, begun after the merger had seen every page twice, merged
    /// nothing new.
    pub converged: bool,
}

pub enum Merger {
    /// samepage's scanner; `first_full_scans` is where it stood when merging began.
    Samepage {
        engine: Engine,
        first_full_scans: u64,
    },
    /// ksmd, configured for the run; `cpu_start` is ksmd's CPU time when merging began, and
    /// `last_pass` the full-scan count and sharing seen at the latest pass end.
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
    /// Starts samepage's scanner with `knobs` (it waited while the instances ran).
    pub fn samepage(engine: &Engine, knobs: Knobs) -> Result<Self> {
        let first_full_scans = engine.stats().full_scans;
        engine.set_knobs(knobs).context("starting the scanner")?;
        Ok(Self::Samepage {
            engine: engine.clone(),
            first_full_scans,
        })
    }

    /// Starts ksmd at the given speed; the memories must already be `MADV_MERGEABLE`.
    pub fn ksm(sysfs: &KsmSysfs, pages_to_scan: u64, sleep_ms: u64) -> Result<Self> {
        let session = sysfs.configure(&[
            ("pages_to_scan", pages_to_scan),
            ("sleep_millisecs", sleep_ms),
            ("run", 1),
        ])?;
        let first_full_scans = session.sysfs().read("full_scans")?;
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
                first_full_scans,
            } => {
                let stats = engine.stats();
                Sample {
                    pages_shared: stats.pages_shared,
                    pages_sharing: stats.pages_sharing,
                    pages_unshared: stats.pages_unshared,
                    pages_volatile: stats.pages_volatile,
                    full_scans: stats.full_scans,
                    cpu_seconds: stats.scanner_cpu_ns as f64 * 1e-9,
                    converged: stats.full_scans >= *first_full_scans + 3
                        && stats.merges_last_pass == 0,
                }
            }
            Self::Ksm {
                session,
                first_full_scans,
                cpu_start,
                last_pass,
                converged_at,
            } => {
                let sysfs = session.sysfs();
                let full_scans = sysfs.read("full_scans")?;
                let pages_sharing = sysfs.read("pages_sharing")?;
                if full_scans > last_pass.0 {
                    // A pass ended: KSM needs two to merge anything, so count from the third.
                    if full_scans >= *first_full_scans + 3 && pages_sharing == last_pass.1 {
                        converged_at.get_or_insert(full_scans);
                    }
                    *last_pass = (full_scans, pages_sharing);
                }
                Sample {
                    pages_shared: sysfs.read("pages_shared")?,
                    pages_sharing,
                    pages_unshared: sysfs.read("pages_unshared")?,
                    pages_volatile: sysfs.read("pages_volatile")?,
                    full_scans,
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

    /// Mappings the merger created in this process (samepage's only).
    pub fn vmas(&self) -> u64 {
        match self {
            Self::Samepage { engine, .. } => engine.stats().vmas,
            _ => 0,
        }
    }
}
