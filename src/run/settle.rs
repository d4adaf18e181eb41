//! Waiting for the merger to converge: sampling it and PSS until a pass finds nothing new or
//! time runs out, and reading the time to converge off the PSS trace.

use std::time::{Duration, Instant};

use anyhow::Result;
use indicatif::ProgressBar;

use crate::merger::{Merger, Sample};
use samepage_runtime::measure::pss_bytes;

/// How merging went, once `settle` returned.
pub struct Settled {
    pub last: Sample,
    pub converge_seconds: f64,
    /// Seconds from the start of merging until the merger converged (or time ran out).
    pub settle_seconds: f64,
    pub timed_out: bool,
    /// (seconds since merging began, PSS bytes), from `pss_before` at 0.
    pub pss_trace: Vec<(f64, u64)>,
}

impl Settled {
    /// No settling: the run reports nothing, and ends as soon as its guests did.
    pub fn skipped(pss_before: u64, last: Sample) -> Self {
        Self {
            last,
            converge_seconds: 0.0,
            settle_seconds: 0.0,
            timed_out: false,
            pss_trace: vec![(0.0, pss_before)],
        }
    }

    /// PSS once the merger converged: the trace's last point, read as it did.
    pub fn pss_after(&self) -> u64 {
        self.pss_trace.last().map_or(0, |&(_, pss)| pss)
    }
}

/// Samples PSS and the merger every `every` until the merger converged or `limit` passed.
/// Convergence time is read off the PSS trace, the same way for every mode.
pub fn settle(
    merger: &mut Merger,
    pss_before: u64,
    limit: Duration,
    every: Duration,
) -> Result<Settled> {
    let start = Instant::now();
    let mut pss_trace = vec![(0.0, pss_before)];
    // Drawn on a terminal only (indicatif hides it elsewhere).
    let progress = ProgressBar::new_spinner();
    let (last, timed_out) = loop {
        std::thread::sleep(every);
        let sample = merger.sample()?;
        let pss = pss_bytes()?;
        pss_trace.push((start.elapsed().as_secs_f64(), pss));
        progress.set_message(format!(
            "merging: {} pages sharing, {} full scans, PSS {:.1} MiB, {:.1} s",
            sample.stats.pages_sharing,
            sample.stats.full_scans,
            pss as f64 / (1 << 20) as f64,
            start.elapsed().as_secs_f64()
        ));
        progress.tick();
        if sample.converged {
            break (sample, false);
        }
        if start.elapsed() >= limit {
            break (sample, true);
        }
    };
    progress.finish_and_clear();
    let settle_seconds = start.elapsed().as_secs_f64();
    let final_pss = pss_trace.last().map_or(pss_before, |&(_, pss)| pss);
    let saving = pss_before.saturating_sub(final_pss) as f64;
    let converge_seconds = pss_trace
        .iter()
        .find(|&&(_, pss)| pss_before.saturating_sub(pss) as f64 >= 0.99 * saving)
        .map_or(0.0, |&(t, _)| t);
    Ok(Settled {
        last,
        converge_seconds,
        settle_seconds,
        timed_out,
        pss_trace,
    })
}
