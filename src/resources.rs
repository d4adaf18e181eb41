//! The host's limits a run must fit: file descriptors (every linear memory keeps its memfd
//! open) and memory (the machine's, or a cgroup limit above the run).
//!
//! A run raises its soft descriptor limit to the hard one at start, measures what its first
//! instance took of each, and says before starting the others when the whole run will not
//! fit, with the figures. `/proc` is read through the `procfs` crate here; the PSS sampler
//! (`samepage_runtime::measure`) keeps its own reader, because it samples every few milliseconds from
//! one file descriptor opened before the instances can use them all.

use std::path::PathBuf;

use anyhow::{Result, bail};
use procfs::Current;
use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

/// The process's descriptor limit after [`raise_descriptor_limit`]: (soft, hard).
pub fn descriptor_limits() -> (Option<u64>, Option<u64>) {
    let limit = getrlimit(Resource::Nofile);
    (limit.current, limit.maximum)
}

/// Raises the soft limit on open file descriptors to the hard one, as far as the kernel
/// allows; returns the soft limit now in force (`None`: unlimited).
pub fn raise_descriptor_limit() -> Option<u64> {
    let limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        let raised = Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        if setrlimit(Resource::Nofile, raised).is_err() {
            // A hard limit above the kernel's nr_open: take what the kernel has.
            let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
                .ok()
                .and_then(|text| text.trim().parse().ok());
            let _ = setrlimit(
                Resource::Nofile,
                Rlimit {
                    current: nr_open,
                    maximum: limit.maximum,
                },
            );
        }
    }
    getrlimit(Resource::Nofile).current
}

/// File descriptors the process has open.
pub fn open_descriptors() -> Result<u64> {
    Ok(procfs::process::Process::myself()?.fd_count()? as u64)
}

/// Refuses a run when `instances` more instances need more descriptors than the limit
/// allows: `before` were open before one instance was made, `after` once it existed.
pub fn check_descriptors(instances: u32, before: u64, after: u64) -> Result<()> {
    let per_instance = after.saturating_sub(before);
    // Room for the files the run opens itself (the report, /proc, a plot).
    let needed = before + per_instance * u64::from(instances) + 16;
    let (soft, hard) = descriptor_limits();
    if let Some(soft) = soft.filter(|&soft| needed > soft) {
        let hard = hard.map_or_else(|| "unlimited".to_owned(), |h| h.to_string());
        bail!(
            "this run needs about {needed} file descriptors ({per_instance} per instance, each \
             linear memory keeps its memfd open, × {instances} instances, + {before} open \
             already), but its limit (RLIMIT_NOFILE) is {soft}, hard limit {hard}: raise it \
             (ulimit -n {needed}) or run fewer instances"
        );
    }
    Ok(())
}

/// The memory a run may still take: the machine's available memory, or less when a cgroup
/// above the run limits it.
#[derive(Clone, Debug)]
pub struct Headroom {
    pub bytes: u64,
    /// What limits it, for messages.
    pub source: String,
}

impl Headroom {
    pub fn now() -> Option<Self> {
        let machine = procfs::Meminfo::current()
            .ok()
            .and_then(|info| info.mem_available);
        let cgroup: Option<(u64, PathBuf)> = crate::cgroup::memory_headroom();
        match (machine, cgroup) {
            (Some(machine), Some((room, dir))) if room < machine => Some(Self {
                bytes: room,
                source: format!("the memory limit of cgroup {}", dir.display()),
            }),
            (Some(machine), _) => Some(Self {
                bytes: machine,
                source: "the machine's available memory (MemAvailable)".to_owned(),
            }),
            (None, Some((room, dir))) => Some(Self {
                bytes: room,
                source: format!("the memory limit of cgroup {}", dir.display()),
            }),
            (None, None) => None,
        }
    }
}

/// Gives the heap memory that is free back to the system. glibc keeps what each thread
/// freed in that thread's arena: after compiling (Cranelift compiles on several threads),
/// tens of MiB for a large module, which would otherwise sit in the host for its whole life
/// (and in every mode's figures, by chance more in one run than in another); after a burst
/// of requests, what each handler thread's store and instance held.
/// Returns whether any was given back.
pub fn return_free_heap() -> bool {
    // SAFETY: malloc_trim only returns free heap memory to the kernel; it has no
    // preconditions and touches no memory in use.
    unsafe { libc::malloc_trim(0) == 1 }
}
