//! What a host measures about itself: proportional memory (PSS) and CPU time. `samepage
//! run` and `samepage serve` measure with it, and so does the lab.
//!
//! PSS, not RSS: one host process maps a merged page into many instances, and RSS would
//! count it once per mapping.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::OnceLock;

use rustix::time::{ClockId, clock_gettime};

/// Why the process's PSS could not be read.
#[derive(Debug, thiserror::Error)]
pub enum PssError {
    #[error("reading /proc/self/smaps_rollup")]
    Read(#[source] std::io::Error),
    #[error("no Pss line in /proc/self/smaps_rollup")]
    NoPss,
}

/// `/proc/self/smaps_rollup`, opened once and read again from its start each time: a run
/// that uses every file descriptor it may have can still measure itself (the run opens it
/// before any instance exists), and the sampling loop opens no file.
static ROLLUP: OnceLock<File> = OnceLock::new();

/// The process's proportional set size, from `/proc/self/smaps_rollup`, in bytes.
pub fn pss_bytes() -> Result<u64, PssError> {
    let file = match ROLLUP.get() {
        Some(file) => file,
        None => {
            let file = File::open("/proc/self/smaps_rollup").map_err(PssError::Read)?;
            ROLLUP.get_or_init(|| file)
        }
    };
    // The rollup is a few hundred bytes; read until the kernel has no more.
    let mut text = Vec::with_capacity(2048);
    let mut chunk = [0u8; 2048];
    loop {
        let read = file
            .read_at(&mut chunk, text.len() as u64)
            .map_err(PssError::Read)?;
        if read == 0 {
            break;
        }
        text.extend_from_slice(&chunk[..read]);
    }
    pss_in_rollup(&String::from_utf8_lossy(&text)).ok_or(PssError::NoPss)
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
