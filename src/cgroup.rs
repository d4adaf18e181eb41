//! The run's own memory cgroup, and the memory limits of the cgroups above it.
//!
//! A run moves itself into a new child of its memory cgroup, `samepage-PID`, so that
//! everything it allocates afterwards (anonymous memory, memfd pages mapped or not, page
//! cache) is counted in one figure: PSS cannot see a memfd page that nobody maps, such as
//! the parts of wasmtime's module image that no instance touched; the cgroup does.
//!
//! The cgroup must go however the run ends: its `Drop` removes it, a terminating signal
//! removes it through [`cleanup`], and, for runs that died by `SIGKILL` (an OOM kill
//! among them), every new run first removes the `samepage-PID` cgroups beside its own whose
//! process is gone.
//!
//! This is driven by hand rather than through a cgroup crate: it is five files (the
//! membership in `/proc/self/cgroup`, `cgroup.procs`, the usage and the limit of v1 or v2),
//! and the crates that manage cgroups (`cgroups-rs`) set hierarchies up for containers,
//! which this does not need.

use std::path::{Path, PathBuf};

use samepage_runtime::cleanup::{self, Owed};

/// Which files a memory cgroup has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Version {
    /// `memory.usage_in_bytes`, `memory.limit_in_bytes`.
    V1,
    /// `memory.current`, `memory.max`.
    V2,
}

impl Version {
    fn usage(self) -> &'static str {
        match self {
            Version::V1 => "memory.usage_in_bytes",
            Version::V2 => "memory.current",
        }
    }

    fn peak(self) -> &'static str {
        match self {
            Version::V1 => "memory.max_usage_in_bytes",
            Version::V2 => "memory.peak",
        }
    }

    fn limit(self) -> &'static str {
        match self {
            Version::V1 => "memory.limit_in_bytes",
            Version::V2 => "memory.max",
        }
    }
}

/// A cgroup of the run's own; dropping it moves the process back and removes it.
#[derive(Debug)]
pub struct MemoryCgroup {
    /// Its usage file.
    usage: PathBuf,
    /// Its file of the highest usage so far (v2's `memory.peak` needs Linux 5.19).
    peak: PathBuf,
    /// Under v2, the descriptor a reset of the peak was written through, which alone reads
    /// the peak since then.
    peak_reader: Option<std::fs::File>,
    /// The removal a terminating signal runs, settled on drop.
    removal: Option<Owed>,
}

/// Where the process's memory cgroup is: its directory and version, for each hierarchy that
/// has the memory controller. A v2 cgroup is listed even when it does not account memory
/// itself (its parent did not hand it the controller): its ancestors' limits still apply.
fn memory_cgroups() -> Vec<(PathBuf, Version)> {
    let Ok(membership) = std::fs::read_to_string("/proc/self/cgroup") else {
        return Vec::new();
    };
    membership
        .lines()
        .filter_map(|line| {
            let mut fields = line.splitn(3, ':');
            let (_, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
            let path = path.trim_start_matches('/');
            if controllers.split(',').any(|c| c == "memory") {
                Some((Path::new("/sys/fs/cgroup/memory").join(path), Version::V1))
            } else if controllers.is_empty() {
                Some((Path::new("/sys/fs/cgroup").join(path), Version::V2))
            } else {
                None
            }
        })
        .collect()
}

fn read_number(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Moves the process into `procs` (a `cgroup.procs` file).
fn move_into(procs: &Path) -> std::io::Result<()> {
    std::fs::write(procs, std::process::id().to_string())
}

impl MemoryCgroup {
    /// Moves the process into a new child of its memory cgroup, after removing those that
    /// dead runs left there; `None` where that is not possible (no memory controller, not
    /// allowed).
    pub fn enter_new() -> Option<Self> {
        // Before the cgroup exists: a signal from then on removes it.
        cleanup::watch_signals();
        for (parent, version) in memory_cgroups() {
            if !parent.join(version.usage()).exists() {
                continue;
            }
            Self::sweep_stale(&parent);
            // Made, entered and owed where no signal's undo can run. A signal in between
            // would find no removal owed and leave the cgroup behind: moving the process can
            // take milliseconds, and under cgroup v1 two runs in thirty signalled as soon as
            // their cgroup appeared left it.
            if let Some(cgroup) = cleanup::critical(|| Self::make_and_enter(&parent, version)) {
                return Some(cgroup);
            }
        }
        None
    }

    /// Makes `samepage-PID` in `parent` and moves the process into it, with its removal owed;
    /// `None`, with nothing left behind, if it cannot be made or does not account memory.
    fn make_and_enter(parent: &Path, version: Version) -> Option<Self> {
        let dir = parent.join(format!("samepage-{}", std::process::id()));
        std::fs::create_dir(&dir).ok()?;
        // A v2 child accounts memory only if its parent hands it the controller.
        if dir.join(version.usage()).exists() && move_into(&dir.join("cgroup.procs")).is_ok() {
            let removal = cleanup::owe({
                let (dir, parent) = (dir.clone(), parent.to_owned());
                move || remove(&dir, &parent)
            });
            return Some(Self {
                usage: dir.join(version.usage()),
                peak: dir.join(version.peak()),
                peak_reader: None,
                removal: Some(removal),
            });
        }
        let _ = std::fs::remove_dir(&dir);
        None
    }

    /// Removes the `samepage-PID` cgroups in `parent` whose run is gone: no process left in
    /// them, and no live samepage process with that PID. Returns how many it removed.
    pub fn sweep_stale(parent: &Path) -> usize {
        let Ok(entries) = std::fs::read_dir(parent) else {
            return 0;
        };
        let mut removed = 0;
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(pid) = name
                .to_str()
                .and_then(|n| n.strip_prefix("samepage-"))
                .and_then(|pid| pid.parse::<u32>().ok())
            else {
                continue;
            };
            let alive = std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|comm| comm.trim() == "samepage");
            let empty = std::fs::read_to_string(entry.path().join("cgroup.procs"))
                .is_ok_and(|procs| procs.trim().is_empty());
            if pid != std::process::id() && !alive && empty {
                removed += usize::from(std::fs::remove_dir(entry.path()).is_ok());
            }
        }
        removed
    }

    /// Bytes charged to the cgroup now.
    pub fn usage_bytes(&self) -> Option<u64> {
        read_number(&self.usage)
    }

    /// The most bytes charged to the cgroup at any time since [`MemoryCgroup::reset_peak`]
    /// (or since the run made it).
    pub fn peak_bytes(&self) -> Option<u64> {
        match &self.peak_reader {
            Some(file) => {
                let mut text = [0u8; 32];
                let read = std::os::unix::fs::FileExt::read_at(file, &mut text, 0).ok()?;
                std::str::from_utf8(&text[..read]).ok()?.trim().parse().ok()
            }
            None => read_number(&self.peak),
        }
    }

    /// Starts the peak afresh from the usage now: v1 takes a write of 0; v2 (Linux 6.12 and
    /// later) resets it for reads through the descriptor that wrote, which is kept for them.
    pub fn reset_peak(&mut self) {
        if self.peak.ends_with(Version::V1.peak()) {
            let _ = std::fs::write(&self.peak, "0");
            return;
        }
        if let Ok(mut file) = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.peak)
            && std::io::Write::write_all(&mut file, b"reset").is_ok()
        {
            self.peak_reader = Some(file);
        }
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        if let Some(removal) = self.removal.take() {
            removal.run();
        }
    }
}

/// Moves the process back to `parent` and removes `dir` (its charges go to the parent).
fn remove(dir: &Path, parent: &Path) {
    let _ = move_into(&parent.join("cgroup.procs"));
    let _ = std::fs::remove_dir(dir);
}

/// The tightest memory limit over the process's cgroups and their ancestors: how many more
/// bytes may be charged before one of them is full, and which cgroup that is. `None` when no
/// cgroup limits memory.
pub fn memory_headroom() -> Option<(u64, PathBuf)> {
    tightest_limit(|limit, usage| limit.saturating_sub(usage))
}

/// The lowest memory limit over the process's cgroups and their ancestors (a container's
/// limit, wherever its cgroup sits), and which cgroup sets it. `None` when none limits memory.
pub fn memory_limit() -> Option<(u64, PathBuf)> {
    tightest_limit(|limit, _| limit)
}

/// The least of `room(limit, usage)` over the process's memory cgroups and their ancestors
/// that have a limit, and which cgroup gives it.
fn tightest_limit(room: impl Fn(u64, u64) -> u64) -> Option<(u64, PathBuf)> {
    let mut tightest: Option<(u64, PathBuf)> = None;
    for (dir, version) in memory_cgroups() {
        let root = match version {
            Version::V1 => Path::new("/sys/fs/cgroup/memory"),
            Version::V2 => Path::new("/sys/fs/cgroup"),
        };
        for cgroup in dir.ancestors().take_while(|a| a.starts_with(root)) {
            // "max" (v2) and v1's huge default mean no limit; neither parses as a limit.
            let Some(limit) = read_number(&cgroup.join(version.limit())) else {
                continue;
            };
            if limit >= 1 << 60 {
                continue;
            }
            let usage = read_number(&cgroup.join(version.usage())).unwrap_or(0);
            let headroom = room(limit, usage);
            if tightest.as_ref().is_none_or(|(room, _)| headroom < *room) {
                tightest = Some((headroom, cgroup.to_owned()));
            }
        }
    }
    tightest
}
