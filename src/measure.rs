//! What the host measures about itself: proportional memory (PSS) and CPU time.
//!
//! PSS, not RSS: one host process maps a merged page into many instances, and RSS would
//! count it once per mapping.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::OnceLock;

use anyhow::{Context, Result};
use rustix::time::{ClockId, clock_gettime};

/// `/proc/self/smaps_rollup`, opened once and read again from its start each time: a run
/// that uses every file descriptor it may have can still measure itself (the run opens it
/// before any instance exists), and the sampling loop opens no file.
static ROLLUP: OnceLock<File> = OnceLock::new();

/// The process's proportional set size, from `/proc/self/smaps_rollup`, in bytes.
pub fn pss_bytes() -> Result<u64> {
    let file = match ROLLUP.get() {
        Some(file) => file,
        None => {
            let file =
                File::open("/proc/self/smaps_rollup").context("opening /proc/self/smaps_rollup")?;
            ROLLUP.get_or_init(|| file)
        }
    };
    // The rollup is a few hundred bytes; read until the kernel has no more.
    let mut text = Vec::with_capacity(2048);
    let mut chunk = [0u8; 2048];
    loop {
        let read = file
            .read_at(&mut chunk, text.len() as u64)
            .context("reading /proc/self/smaps_rollup")?;
        if read == 0 {
            break;
        }
        text.extend_from_slice(&chunk[..read]);
    }
    pss_in_rollup(&String::from_utf8_lossy(&text)).context("no Pss line in /proc/self/smaps_rollup")
}

/// The `Pss:` figure of a `smaps_rollup` file's text, in bytes.
pub fn pss_in_rollup(rollup: &str) -> Option<u64> {
    rollup
        .lines()
        .find_map(|line| line.strip_prefix("Pss:"))
        .and_then(|rest| rest.trim().strip_suffix("kB"))
        .and_then(|kb| kb.trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
}

/// CPU time of the calling thread, in seconds.
pub fn thread_cpu_seconds() -> f64 {
    seconds(clock_gettime(ClockId::ThreadCPUTime))
}

fn seconds(time: rustix::time::Timespec) -> f64 {
    time.tv_sec as f64 + time.tv_nsec as f64 * 1e-9
}
