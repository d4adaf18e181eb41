//! Driving Linux KSM through `/sys/kernel/mm/ksm`, for the `--dedup ksm` baseline.
//!
//! KSM's settings are system-wide, so a run that changes them must put them back however it
//! ends:
//!
//! - when the session is dropped (normal end, error, panic unwinding);
//! - on `SIGINT`, `SIGTERM` and `SIGHUP`, through [`cleanup`] (a benchmark killed by
//!   its runner must not leave ksmd at full speed);
//! - after a `SIGKILL`, by the next run: every setting is written to a state file
//!   ([`KsmSysfs::state_file`]) before it is changed, and a start that finds the file of a run
//!   that is gone writes the settings back ([`KsmSysfs::repair_stale`]).
//!
//! A write that fails half-way restores what was already written.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result, bail};
use parking_lot::Mutex;
use samepage_runtime::Instance;
use samepage_runtime::cleanup::{self, Owed};

/// A setting changed by a session, with its value before.
struct Saved {
    session: u64,
    path: PathBuf,
    value: String,
}

/// Every setting changed by a live session, with its value before; each session restores its
/// own, on drop or on a signal.
static SAVED: Mutex<Vec<Saved>> = Mutex::new(Vec::new());

static NEXT_SESSION: AtomicU64 = AtomicU64::new(1);

/// A KSM sysfs directory (the system's, or a fake one in tests) and the state file that
/// records what a run changed in it.
#[derive(Clone, Debug)]
pub struct KsmSysfs {
    root: PathBuf,
    state_file: PathBuf,
}

/// KSM configured for a run; dropping it restores the settings it changed.
#[derive(Debug)]
pub struct KsmSession {
    sysfs: KsmSysfs,
    /// Tags this session's entries in `SAVED`.
    id: u64,
    /// The restore a terminating signal runs; settled on drop.
    restore: Option<Owed>,
    /// An exclusive lock on the file beside the state file, held for the session: KSM's
    /// settings are the whole system's, and a second run driving them at once would record
    /// the first one's settings as the ones to put back.
    _exclusive: std::fs::File,
}

impl KsmSysfs {
    /// The system's KSM, with its state file in `/run` (which a reboot clears, as it resets
    /// KSM's settings).
    pub fn system() -> Self {
        Self::at("/sys/kernel/mm/ksm", "/run/samepage-ksm.state")
    }

    pub fn at(root: impl Into<PathBuf>, state_file: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            state_file: state_file.into(),
        }
    }

    /// Where a run records KSM's settings before it changes them: a line `pid N`, then one
    /// line `path value` per setting.
    pub fn state_file(&self) -> &std::path::Path {
        &self.state_file
    }

    /// Writes back the settings a run that is gone left changed, as its state file records
    /// them, and removes the file. Returns the dead run's PID when it repaired something.
    pub fn repair_stale(&self) -> Result<Option<u32>> {
        let Ok(text) = std::fs::read_to_string(&self.state_file) else {
            return Ok(None);
        };
        let mut lines = text.lines();
        let pid: Option<u32> = lines
            .next()
            .and_then(|line| line.strip_prefix("pid "))
            .and_then(|pid| pid.trim().parse().ok());
        let alive = pid.is_some_and(|pid| {
            pid == std::process::id()
                || std::fs::read_to_string(format!("/proc/{pid}/comm"))
                    .is_ok_and(|comm| comm.trim() == "samepage")
        });
        if alive {
            return Ok(None);
        }
        // Last written first, as a live session restores.
        let settings: Vec<&str> = lines.collect();
        for line in settings.iter().rev() {
            let Some((path, value)) = line.split_once(' ') else {
                continue;
            };
            std::fs::write(path, value).with_context(|| {
                format!(
                    "restoring {path} to {value}, as {} records",
                    self.state_file.display()
                )
            })?;
        }
        std::fs::remove_file(&self.state_file)
            .with_context(|| format!("removing {}", self.state_file.display()))?;
        Ok(Some(pid.unwrap_or(0)))
    }

    /// Records the saved settings of `session` in the state file, or removes the file when
    /// there are none.
    fn record(&self, saved: &[Saved], session: u64) -> Result<()> {
        let mine: Vec<&Saved> = saved.iter().filter(|s| s.session == session).collect();
        if mine.is_empty() {
            let _ = std::fs::remove_file(&self.state_file);
            return Ok(());
        }
        let mut text = format!("pid {}\n", std::process::id());
        for entry in mine {
            text.push_str(&format!("{} {}\n", entry.path.display(), entry.value));
        }
        let partial = self.state_file.with_extension("partial");
        std::fs::write(&partial, text)
            .and_then(|()| std::fs::rename(&partial, &self.state_file))
            .with_context(|| format!("writing {}", self.state_file.display()))
    }

    /// Refuses, saying why, when KSM cannot be driven here.
    pub fn check_usable(&self) -> Result<()> {
        if !self.root.join("run").exists() {
            bail!(
                "Linux KSM is not available: {} does not exist (a kernel without CONFIG_KSM)",
                self.root.display()
            );
        }
        if !rustix::process::geteuid().is_root() {
            bail!(
                "driving Linux KSM needs root: its settings in {} are system-wide",
                self.root.display()
            );
        }
        Ok(())
    }

    pub fn read(&self, name: &str) -> Result<u64> {
        let path = self.root.join(name);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        text.trim()
            .parse()
            .with_context(|| format!("{} holds {text:?}, not a number", path.display()))
    }

    fn write(&self, name: &str, value: &str) -> Result<()> {
        let path = self.root.join(name);
        std::fs::write(&path, value)
            .with_context(|| format!("writing {value} to {}", path.display()))
    }

    /// Writes `settings` in order, saving each old value first. On failure, what was written
    /// is restored before the error returns.
    pub fn configure(&self, settings: &[(&str, u64)]) -> Result<KsmSession> {
        let lock_path = self.state_file.with_extension("lock");
        let exclusive = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .with_context(|| format!("opening {}", lock_path.display()))?;
        if rustix::fs::flock(
            &exclusive,
            rustix::fs::FlockOperation::NonBlockingLockExclusive,
        )
        .is_err()
        {
            bail!(
                "another samepage run is driving Linux KSM ({} is locked): KSM's settings are \
                 system-wide, so one run at a time",
                lock_path.display()
            );
        }
        let id = NEXT_SESSION.fetch_add(1, Ordering::Relaxed);
        let restore = cleanup::owe({
            let sysfs = self.clone();
            move || sysfs.restore(id)
        });
        let session = KsmSession {
            sysfs: self.clone(),
            id,
            restore: Some(restore),
            _exclusive: exclusive,
        };
        for &(name, value) in settings {
            let path = self.root.join(name);
            let old = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            // Saved, recorded and written where no signal's restore can run: one in between
            // would run before the write and leave the new value behind.
            cleanup::critical(|| {
                let mut saved = SAVED.lock();
                saved.push(Saved {
                    session: session.id,
                    path,
                    value: old.trim().to_owned(),
                });
                self.record(&saved, session.id)?;
                self.write(name, &value.to_string())
            })?;
        }
        Ok(session)
    }
}

impl KsmSession {
    pub fn sysfs(&self) -> &KsmSysfs {
        &self.sysfs
    }
}

impl Drop for KsmSession {
    fn drop(&mut self) {
        if let Some(restore) = self.restore.take() {
            restore.run();
        }
    }
}

impl KsmSysfs {
    /// Writes back what `session` changed and, once all is back, removes the state file.
    fn restore(&self, session: u64) {
        match restore_saved(session) {
            Ok(()) => {
                let _ = std::fs::remove_file(&self.state_file);
            }
            Err(error) => eprintln!(
                "warning: could not restore KSM's settings ({} keeps them for the next run): \
                 {error:#}",
                self.state_file.display()
            ),
        }
    }
}

/// Writes back the saved settings of `session`, last written first.
fn restore_saved(session: u64) -> Result<()> {
    let mut saved = SAVED.lock();
    let mut failure = None;
    for entry in saved.iter().rev() {
        if entry.session != session {
            continue;
        }
        if let Err(error) = std::fs::write(&entry.path, &entry.value) {
            failure = Some(anyhow::Error::new(error).context(format!(
                "writing {} back to {}",
                entry.value,
                entry.path.display()
            )));
        }
    }
    saved.retain(|entry| entry.session != session);
    failure.map_or(Ok(()), Err)
}

/// CPU time ksmd has used so far, in seconds, from its `/proc/PID/stat`.
pub fn ksmd_cpu_seconds() -> Result<f64> {
    let ksmd = procfs::process::all_processes()
        .context("listing processes")?
        .flatten()
        .find(|process| process.stat().is_ok_and(|stat| stat.comm == "ksmd"))
        .context("no ksmd thread found in /proc")?;
    let stat = ksmd.stat().context("reading ksmd's stat")?;
    Ok((stat.utime + stat.stime) as f64 / procfs::ticks_per_second() as f64)
}

/// Opts an instance's memory into Linux KSM.
pub fn mark_mergeable(instance: &mut Instance) -> Result<()> {
    instance
        .with_memory(|memory| {
            // SAFETY: the range is the instance's own linear memory, a mapping wasmtime made
            // and keeps; MADV_MERGEABLE changes nothing anyone can observe in it.
            unsafe {
                rustix::mm::madvise(
                    memory.as_mut_ptr().cast(),
                    memory.len(),
                    rustix::mm::Advice::LinuxMergeable,
                )
            }
        })?
        .context("madvise(MADV_MERGEABLE) on a linear memory")
}

/// The process's own KSM figures, from `/proc/self/ksm_stat` (Linux 6.1 and later): each
/// line's name and number (`ksm_merge_type` and the like, which are words, are left out).
pub fn process_ksm_stat() -> BTreeMap<String, i64> {
    std::fs::read_to_string("/proc/self/ksm_stat")
        .unwrap_or_default()
        .lines()
        .filter_map(|line| {
            let (name, value) = line.split_once(char::is_whitespace)?;
            Some((name.to_owned(), value.trim().parse().ok()?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tests share the process-wide record of saved settings; one at a time.
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

    fn fake_sysfs(name: &str, values: &[(&str, &str)]) -> (KsmSysfs, PathBuf) {
        let root =
            std::env::temp_dir().join(format!("samepage-fake-ksm-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&root).expect("fake sysfs");
        for (name, value) in values {
            std::fs::write(root.join(name), format!("{value}\n")).expect("fake setting");
        }
        let state = root.with_extension("state");
        (KsmSysfs::at(&root, state), root)
    }

    #[test]
    fn a_session_restores_every_setting_it_changed() {
        let _one = ONE_AT_A_TIME.lock();
        let (sysfs, root) = fake_sysfs(
            "restore",
            &[
                ("run", "0"),
                ("pages_to_scan", "100"),
                ("sleep_millisecs", "20"),
            ],
        );
        {
            let _session = sysfs
                .configure(&[
                    ("pages_to_scan", 100_000),
                    ("sleep_millisecs", 0),
                    ("run", 1),
                ])
                .expect("configure");
            assert_eq!(sysfs.read("pages_to_scan").expect("read"), 100_000);
            assert_eq!(sysfs.read("run").expect("read"), 1);
        }
        assert_eq!(sysfs.read("pages_to_scan").expect("read"), 100);
        assert_eq!(sysfs.read("sleep_millisecs").expect("read"), 20);
        assert_eq!(sysfs.read("run").expect("read"), 0);
        std::fs::remove_dir_all(root).ok();
    }

    #[test]
    fn a_failed_write_restores_what_was_written_before_it() {
        let _one = ONE_AT_A_TIME.lock();
        let (sysfs, root) = fake_sysfs(
            "failed",
            &[("pages_to_scan", "100"), ("sleep_millisecs", "20")],
        );
        let error = sysfs
            .configure(&[("pages_to_scan", 5), ("no_such_setting", 1)])
            .expect_err("missing file");
        assert!(
            format!("{error:#}").contains("no_such_setting"),
            "{error:#}"
        );
        assert_eq!(sysfs.read("pages_to_scan").expect("read"), 100);
        std::fs::remove_dir_all(root).ok();
    }

    #[test]
    fn the_next_start_restores_what_a_killed_run_changed() {
        let _one = ONE_AT_A_TIME.lock();
        let (sysfs, root) = fake_sysfs("killed", &[("run", "0"), ("pages_to_scan", "100")]);
        let session = sysfs
            .configure(&[("pages_to_scan", 5000), ("run", 1)])
            .expect("configure");
        // A SIGKILL: no destructor, no signal handler; the state file names a process that
        // is gone.
        std::mem::forget(session);
        let mut child = std::process::Command::new("true").spawn().expect("true");
        let dead = child.id();
        child.wait().expect("wait");
        let recorded = std::fs::read_to_string(sysfs.state_file()).expect("state file");
        let (_, settings) = recorded.split_once('\n').expect("pid line");
        std::fs::write(sysfs.state_file(), format!("pid {dead}\n{settings}")).expect("rewrite");
        assert_eq!(sysfs.read("run").expect("read"), 1);

        assert_eq!(sysfs.repair_stale().expect("repair"), Some(dead));
        assert_eq!(sysfs.read("run").expect("read"), 0);
        assert_eq!(sysfs.read("pages_to_scan").expect("read"), 100);
        assert!(!sysfs.state_file().exists());
        assert_eq!(sysfs.repair_stale().expect("nothing left"), None);
        SAVED.lock().clear();
        std::fs::remove_dir_all(root).ok();
    }

    #[test]
    fn one_run_at_a_time_drives_ksm() {
        let _one = ONE_AT_A_TIME.lock();
        let (sysfs, root) = fake_sysfs("exclusive", &[("run", "0")]);
        let first = sysfs.configure(&[("run", 1)]).expect("configure");
        let error = sysfs
            .configure(&[("run", 1)])
            .expect_err("a second at once");
        assert!(error.to_string().contains("one run at a time"), "{error}");
        drop(first);
        let again = sysfs
            .configure(&[("run", 1)])
            .expect("after the first ended");
        drop(again);
        assert_eq!(sysfs.read("run").expect("read"), 0);
        std::fs::remove_dir_all(root).ok();
    }

    #[test]
    fn a_live_runs_state_is_left_alone() {
        let _one = ONE_AT_A_TIME.lock();
        let (sysfs, root) = fake_sysfs("live", &[("run", "0")]);
        let session = sysfs.configure(&[("run", 1)]).expect("configure");
        assert_eq!(sysfs.repair_stale().expect("repair"), None);
        assert_eq!(sysfs.read("run").expect("read"), 1);
        drop(session);
        assert_eq!(sysfs.read("run").expect("read"), 0);
        assert!(
            !sysfs.state_file().exists(),
            "the state file goes with the session"
        );
        std::fs::remove_dir_all(root).ok();
    }

    #[test]
    fn a_missing_ksm_is_refused_with_the_reason() {
        let error = KsmSysfs::at("/nonexistent/ksm", "/nonexistent/state")
            .check_usable()
            .expect_err("no KSM");
        assert!(error.to_string().contains("not available"), "{error}");
    }
}
