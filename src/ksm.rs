//! Driving Linux KSM through `/sys/kernel/mm/ksm`, for the `--dedup ksm` baseline.
//!
//! KSM's settings are system-wide, so a run that changes them must put them back however it
//! ends: when the session is dropped (normal end, error, panic unwinding) and on Ctrl-C, from
//! a signal handler thread that restores them and exits (Ctrl-C, and also `SIGTERM` and
//! `SIGHUP`: a benchmark killed by its runner must not leave ksmd at full speed). Every setting is saved before the
//! first write, and a write that fails half-way restores what was already written.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result, bail};
use parking_lot::Mutex;

/// A setting changed by a session, with its value before.
struct Saved {
    session: u64,
    path: PathBuf,
    value: String,
}

/// Every setting changed by a live session. The Ctrl-C handler restores them all; a
/// session's `Drop` restores its own.
static SAVED: Mutex<Vec<Saved>> = Mutex::new(Vec::new());

static NEXT_SESSION: AtomicU64 = AtomicU64::new(1);

/// A KSM sysfs directory: the system's, or a fake one in tests.
#[derive(Clone, Debug)]
pub struct KsmSysfs {
    root: PathBuf,
}

/// KSM configured for a run; dropping it restores the settings it changed.
#[derive(Debug)]
pub struct KsmSession {
    sysfs: KsmSysfs,
    /// Tags this session's entries in `SAVED`.
    id: u64,
}

impl KsmSysfs {
    pub fn system() -> Self {
        Self::at("/sys/kernel/mm/ksm")
    }

    pub fn at(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
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
        install_ctrl_c_restore()?;
        let session = KsmSession {
            sysfs: self.clone(),
            id: NEXT_SESSION.fetch_add(1, Ordering::Relaxed),
        };
        for &(name, value) in settings {
            let path = self.root.join(name);
            let old = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            // Saved and written under one lock: a Ctrl-C restore in between would otherwise
            // run before the write and leave the new value behind.
            let mut saved = SAVED.lock();
            saved.push(Saved {
                session: session.id,
                path,
                value: old.trim().to_owned(),
            });
            self.write(name, &value.to_string())?;
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
        if let Err(error) = restore_saved(Some(self.id)) {
            eprintln!("warning: could not restore KSM's settings: {error:#}");
        }
    }
}

/// Writes back the saved settings of `session` (of every session with `None`), last
/// written first.
fn restore_saved(session: Option<u64>) -> Result<()> {
    let mut saved = SAVED.lock();
    let mut failure = None;
    for entry in saved.iter().rev() {
        if session.is_some_and(|id| id != entry.session) {
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
    saved.retain(|entry| session.is_some_and(|id| id != entry.session));
    failure.map_or(Ok(()), Err)
}

fn install_ctrl_c_restore() -> Result<()> {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    let mut result = Ok(());
    INSTALLED.call_once(|| {
        result = ctrlc::set_handler(|| {
            if let Err(error) = restore_saved(None) {
                eprintln!("warning: could not restore KSM's settings: {error:#}");
            }
            std::process::exit(130);
        })
        .context("installing the Ctrl-C handler that restores KSM's settings");
    });
    result
}

/// CPU time ksmd has used so far, in seconds, from `/proc/<pid>/stat`.
pub fn ksmd_cpu_seconds() -> Result<f64> {
    let pid = ksmd_pid()?;
    let stat =
        std::fs::read_to_string(format!("/proc/{pid}/stat")).context("reading ksmd's stat")?;
    // Fields after the command name (which is in parentheses): utime and stime are the 12th
    // and 13th of them, in clock ticks.
    let after_name = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .context("ksmd's stat")?;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    Ok(ticks as f64 / clock_ticks_per_second())
}

fn ksmd_pid() -> Result<u32> {
    for entry in std::fs::read_dir("/proc")? {
        let entry = entry?;
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if std::fs::read_to_string(entry.path().join("comm")).is_ok_and(|c| c.trim() == "ksmd") {
            return Ok(pid);
        }
    }
    bail!("no ksmd thread found in /proc")
}

fn clock_ticks_per_second() -> f64 {
    rustix::param::clock_ticks_per_second() as f64
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
        (KsmSysfs::at(&root), root)
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
    fn ctrl_c_restores_the_settings_of_live_sessions() {
        let _one = ONE_AT_A_TIME.lock();
        let (sysfs, root) = fake_sysfs("ctrl-c", &[("run", "0")]);
        let session = sysfs.configure(&[("run", 1)]).expect("configure");
        // What the Ctrl-C handler does before exiting.
        restore_saved(None).expect("restore");
        assert_eq!(sysfs.read("run").expect("read"), 0);
        drop(session);
        assert_eq!(sysfs.read("run").expect("read"), 0);
        std::fs::remove_dir_all(root).ok();
    }

    #[test]
    fn a_missing_ksm_is_refused_with_the_reason() {
        let error = KsmSysfs::at("/nonexistent/ksm")
            .check_usable()
            .expect_err("no KSM");
        assert!(error.to_string().contains("not available"), "{error}");
    }
}
