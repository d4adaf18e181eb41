//! What the host measures about itself: proportional memory (PSS) and CPU time.
//!
//! PSS, not RSS: one host process maps a merged page into many instances, and RSS would
//! count it once per mapping.

use std::path::{Path, PathBuf};

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

/// A memory cgroup of the process's own, so that everything it allocates afterwards —
/// anonymous memory, memfd pages (mapped or not), page cache — is counted in one figure.
/// PSS cannot see a memfd page that nobody maps, such as the parts of wasmtime's module
/// image that no instance touched; the cgroup does.
pub struct MemoryCgroup {
    /// The cgroup's directory.
    dir: PathBuf,
    /// Its usage file: `memory.usage_in_bytes` (cgroup v1) or `memory.current` (v2).
    usage: PathBuf,
    /// Where the process was before, to go back to on drop.
    parent_procs: PathBuf,
}

impl MemoryCgroup {
    /// Moves the process into a new child of its memory cgroup; `None` where that is not
    /// possible (no memory controller, not allowed).
    pub fn enter_new() -> Option<Self> {
        let membership = std::fs::read_to_string("/proc/self/cgroup").ok()?;
        let candidates = membership.lines().filter_map(|line| {
            let mut fields = line.splitn(3, ':');
            let (_, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
            let path = path.trim_start_matches('/');
            if controllers.split(',').any(|c| c == "memory") {
                Some((
                    Path::new("/sys/fs/cgroup/memory").join(path),
                    "memory.usage_in_bytes",
                ))
            } else if controllers.is_empty() {
                Some((Path::new("/sys/fs/cgroup").join(path), "memory.current"))
            } else {
                None
            }
        });
        for (parent, usage) in candidates {
            if !parent.join(usage).exists() {
                continue;
            }
            let dir = parent.join(format!("samepage-{}", std::process::id()));
            if std::fs::create_dir(&dir).is_err() {
                continue;
            }
            if std::fs::write(dir.join("cgroup.procs"), std::process::id().to_string()).is_ok() {
                return Some(Self {
                    usage: dir.join(usage),
                    parent_procs: parent.join("cgroup.procs"),
                    dir,
                });
            }
            let _ = std::fs::remove_dir(&dir);
        }
        None
    }

    /// Bytes charged to the cgroup now.
    pub fn usage_bytes(&self) -> Option<u64> {
        std::fs::read_to_string(&self.usage)
            .ok()?
            .trim()
            .parse()
            .ok()
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        // Back to the parent, then remove ours (its charges go to the parent).
        let _ = std::fs::write(&self.parent_procs, std::process::id().to_string());
        let _ = std::fs::remove_dir(&self.dir);
    }
}
