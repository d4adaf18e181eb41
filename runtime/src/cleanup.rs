//! What a process must undo however it ends, even when a signal ends it: `samepage run`'s
//! memory cgroup, and KSM's system-wide settings under the lab's `--dedup ksm`.
//!
//! Each undo is registered here while it is owed. A normal end, an error or a panic runs it
//! from the owner's `Drop`; `SIGINT`, `SIGTERM` and `SIGHUP` run every one still owed, from a
//! thread that then dies of the signal as it would have without a handler (so that a shell
//! sees the signal, and stops a loop on Ctrl-C). One lock, [`critical`], is held while an undo
//! runs, while the signal thread undoes and exits, and by whoever changes what an undo will
//! put back: a signal never finds an undo half done, or a change half recorded.
//! `SIGKILL` (an OOM kill included) runs nothing: for that, every start sweeps what
//! dead runs left (`samepage run`'s cgroups by their names, KSM's settings through the state
//! file the lab's KSM driver keeps).

use std::sync::Once;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};

/// An undo, by the id its registration returned.
type Undo = (u64, Box<dyn FnOnce() + Send>);

/// The undos still owed, in registration order.
static OWED: Mutex<Vec<Undo>> = Mutex::new(Vec::new());

/// Held while an undo runs, and by [`critical`] sections; taken before `OWED` and before any
/// lock an undo takes.
static UNDOING: Mutex<()> = Mutex::new(());

/// Runs `f` where no signal's undo can run meanwhile: for changes that an undo would put
/// back, made together with the record of what to put back.
pub fn critical<R>(f: impl FnOnce() -> R) -> R {
    let _undoing = UNDOING.lock();
    f()
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A registered undo; [`Owed::run`] runs it now, dropping it without running cancels it.
#[derive(Debug)]
pub struct Owed {
    id: u64,
}

/// Registers `undo` to run on a terminating signal, until [`Owed::run`] or a drop settles
/// it. Installs the signal handler on first use.
pub fn owe(undo: impl FnOnce() + Send + 'static) -> Owed {
    watch_signals();
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    OWED.lock().push((id, Box::new(undo)));
    Owed { id }
}

impl Owed {
    /// Runs the undo now (unless a signal handler already did).
    pub fn run(self) {
        let _undoing = UNDOING.lock();
        if let Some(undo) = take(self.id) {
            undo();
        }
    }
}

impl Drop for Owed {
    fn drop(&mut self) {
        take(self.id);
    }
}

/// Removes undo `id` from those owed, if it still is.
fn take(id: u64) -> Option<Box<dyn FnOnce() + Send>> {
    let mut owed = OWED.lock();
    let at = owed.iter().position(|(owed_id, _)| *owed_id == id)?;
    Some(owed.remove(at).1)
}

/// Runs every undo still owed, last registered first; the caller holds `UNDOING`.
fn run_all() {
    let owed = std::mem::take(&mut *OWED.lock());
    for (_, undo) in owed.into_iter().rev() {
        undo();
    }
}

/// Starts the thread that runs the undos on a terminating signal (once; later calls do
/// nothing). Called before anything is owed, so that no signal falls between a change and
/// its registration.
pub fn watch_signals() {
    static INSTALLED: Once = Once::new();
    INSTALLED.call_once(|| {
        let signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP]);
        match signals {
            Ok(mut signals) => {
                let spawned = std::thread::Builder::new()
                    .name("samepage-signals".into())
                    .spawn(move || {
                        if let Some(signal) = signals.forever().next() {
                            let _undoing = UNDOING.lock();
                            run_all();
                            // Dies of the signal, with its default action.
                            let _ = signal_hook::low_level::emulate_default_handler(signal);
                            std::process::exit(128 + signal);
                        }
                    });
                if let Err(error) = spawned {
                    eprintln!("warning: cannot watch for signals, a killed run may leave state behind: {error}");
                }
            }
            Err(error) => {
                eprintln!("warning: cannot watch for signals, a killed run may leave state behind: {error}");
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;

    #[test]
    fn an_undo_runs_when_settled_and_not_when_dropped() {
        let ran = Arc::new(AtomicBool::new(false));
        let flag = ran.clone();
        owe(move || flag.store(true, Ordering::Relaxed)).run();
        assert!(ran.load(Ordering::Relaxed));

        let ran = Arc::new(AtomicBool::new(false));
        let flag = ran.clone();
        let owed = owe(move || flag.store(true, Ordering::Relaxed));
        let id = owed.id;
        drop(owed);
        assert!(take(id).is_none(), "a dropped undo is no longer owed");
        assert!(!ran.load(Ordering::Relaxed));
    }
}
