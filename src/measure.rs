//! What the host measures about itself: proportional memory (PSS) and CPU time.
//!
//! PSS, not RSS: one host process maps a merged page into many instances, and RSS would
//! count it once per mapping.

use anyhow::{Context, Result};
use rustix::time::{ClockId, clock_gettime};

/// The process's proportional set size, from `/proc/self/smaps_rollup`, in bytes.
pub fn pss_bytes() -> Result<u64> {
    let rollup = std::fs::read_to_string("/proc/self/smaps_rollup")
        .context("reading /proc/self/smaps_rollup")?;
    rollup
        .lines()
        .find_map(|line| line.strip_prefix("Pss:"))
        .and_then(|rest| rest.trim().strip_suffix("kB"))
        .and_then(|kb| kb.trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .context("no Pss line in /proc/self/smaps_rollup")
}

/// CPU time of the calling thread, in seconds.
pub fn thread_cpu_seconds() -> f64 {
    seconds(clock_gettime(ClockId::ThreadCPUTime))
}

fn seconds(time: rustix::time::Timespec) -> f64 {
    time.tv_sec as f64 + time.tv_nsec as f64 * 1e-9
}
