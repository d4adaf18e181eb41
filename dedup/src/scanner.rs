//! The scanner thread: KSM's `ksmd`, plus park visits.
//!
//! One thread per engine runs [`Shared::scan_loop`]: it takes the knobs, and in run mode
//! `merge` makes one *turn* at a time, either the first park visit that fell due (an owner
//! returned from a call: its regions are looked at at once and again `park_recheck` later)
//! or one batch of the cursor's pass, then sleeps `sleep_millisecs`, longer while every
//! region is idle. It never waits for an owner's gate (quiescence rule 2), so it never holds
//! up a running instance for more than the one batch that is visiting its regions. A host
//! that serves requests runs it at the lowest priority (`EngineConfig::scanner_yields`), so
//! that its batches take the CPU the instances leave, not theirs. Failures
//! cannot be returned from a thread: they are counted and the last one kept
//! ([`crate::Engine::last_error`]).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use rustix::time::{ClockId, clock_gettime};

use crate::quiesce::Owner;
use crate::shared::{ParkVisit, Shared};
use crate::{Error, Knobs, RunMode};

/// The pause between batches while every region is idle (its owner has not run since the
/// engine found nothing to do in it): owners that park wake the scanner at once anyway.
const IDLE_NAP: Duration = Duration::from_millis(250);

/// The scanner thread, if the engine has one; joins it when dropped (with the last engine
/// handle).
pub(crate) struct ScannerThread {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl ScannerThread {
    /// Starts the thread over `shared`, or none when `run` is false (a manual engine); at
    /// the lowest priority when it `yields`.
    pub(crate) fn start(shared: &Arc<Shared>, run: bool, yields: bool) -> Result<Self, Error> {
        let thread = if run {
            let scanner_shared = shared.clone();
            Some(
                std::thread::Builder::new()
                    .name("samepage-scan".into())
                    .spawn(move || {
                        if yields {
                            yield_to_instances();
                        }
                        scanner_shared.scan_loop()
                    })
                    .map_err(Error::SpawnScanner)?,
            )
        } else {
            None
        };
        Ok(Self {
            shared: shared.clone(),
            thread: Mutex::new(thread),
        })
    }
}

/// Lowers the calling thread (Linux's nice value is a thread's own) to the lowest priority.
/// Where that is refused (a seccomp filter, say), the scanner runs at the host's priority:
/// merging still works.
fn yield_to_instances() {
    let _ = rustix::process::setpriority_process(Some(rustix::thread::gettid()), 19);
}

impl Drop for ScannerThread {
    fn drop(&mut self) {
        *self.shared.shutdown.lock() = true;
        self.shared.wake.notify_all();
        if let Some(thread) = self.thread.lock().take() {
            let _ = thread.join();
        }
    }
}

impl Shared {
    /// Owes `owner` park visits: one now and one `park_recheck` later (see
    /// [`crate::Engine::parked`]); a visit already owed starts over.
    pub(crate) fn park(&self, owner: &Owner) {
        let mut parked = self.parked.lock();
        let now = Instant::now();
        match parked
            .iter_mut()
            .find(|visit| visit.owner.id() == owner.id())
        {
            Some(visit) => {
                visit.due = now;
                visit.visits_left = 2;
            }
            None => parked.push(ParkVisit {
                owner: owner.clone(),
                due: now,
                visits_left: 2,
            }),
        }
        drop(parked);
        self.wake.notify_all();
    }

    /// The scanner thread: KSM's `ksmd`, plus park visits.
    fn scan_loop(&self) {
        let cpu_start = thread_cpu_ns();
        let mut pass_start = (Instant::now(), cpu_start);
        loop {
            if *self.shutdown.lock() {
                return;
            }
            let knobs = {
                let mut state = self.state.lock();
                // Pages that merges on owners' calls replaced, freed after those calls.
                state.free_deferred();
                state.knobs.clone()
            };
            let mut nap = knobs.sleep;
            let result = match knobs.run {
                RunMode::Stop => {
                    // Nothing to do until the knobs change (or an owner's call leaves pages
                    // to free), which wakes the scanner.
                    nap = Duration::from_secs(3600);
                    Ok(())
                }
                RunMode::Merge => self.merge_turn(&knobs, &mut pass_start, &mut nap),
                RunMode::UnmergeAll => {
                    let mut state = self.state.lock();
                    state.unmerge_all().map(|busy| {
                        // Busy owners are tried again next turn; when none is left, stop.
                        if busy == 0 {
                            state.knobs.run = RunMode::Stop;
                        }
                    })
                }
            };
            self.scanner_cpu_ns
                .store(thread_cpu_ns() - cpu_start, Ordering::Relaxed);
            if let Err(error) = result {
                self.errors.fetch_add(1, Ordering::Relaxed);
                *self.last_error.lock() = Some(error.to_string());
            }
            if !nap.is_zero() {
                self.sleep(nap);
            }
        }
    }

    /// One turn of merging: the first due park visit if there is one, else a batch. Shortens
    /// `nap` for park visits (they follow activity, two per park, so they do not wait out
    /// the sleep between batches) and lengthens it while every region is idle (an owner that
    /// parks wakes the scanner anyway).
    fn merge_turn(
        &self,
        knobs: &Knobs,
        pass_start: &mut (Instant, u64),
        nap: &mut Duration,
    ) -> Result<(), Error> {
        let (visited, next_due) = self.visit_parked(knobs);
        if let Some(due) = next_due {
            *nap = (*nap).min(due.saturating_duration_since(Instant::now()));
        }
        if visited? {
            *nap = Duration::ZERO;
            return Ok(());
        }
        let (pass_ended, idle) = {
            let mut state = self.state.lock();
            let pass_ended = state.scan_batch()?;
            (pass_ended, state.last_pass_idle())
        };
        if pass_ended {
            if idle {
                *nap = (*nap).max(IDLE_NAP);
            }
            self.advise(knobs, pass_start);
        }
        Ok(())
    }

    /// Makes the first due park visit, if any. Returns whether it visited, and when the
    /// next visit falls due.
    fn visit_parked(&self, knobs: &Knobs) -> (Result<bool, Error>, Option<Instant>) {
        let now = Instant::now();
        let mut parked = self.parked.lock();
        if !knobs.scan_on_park {
            parked.clear();
            return (Ok(false), None);
        }
        let due = parked.iter().position(|visit| visit.due <= now);
        let Some(at) = due else {
            return (Ok(false), parked.iter().map(|visit| visit.due).min());
        };
        let visit = parked.swap_remove(at);
        drop(parked);
        let result = self.state.lock().scan_owner(&visit.owner);
        let mut parked = self.parked.lock();
        // A visit to an owner that parked again meanwhile is superseded by the new one; an
        // owner running right now parks again when its call returns.
        if matches!(result, Ok(true))
            && visit.visits_left > 1
            && !parked.iter().any(|v| v.owner.id() == visit.owner.id())
        {
            parked.push(ParkVisit {
                due: Instant::now() + knobs.park_recheck,
                visits_left: visit.visits_left - 1,
                ..visit
            });
        }
        (result, parked.iter().map(|visit| visit.due).min())
    }

    /// After a full pass: lets the advisor retune `pages_to_scan`.
    fn advise(&self, knobs: &Knobs, pass_start: &mut (Instant, u64)) {
        let now = (Instant::now(), thread_cpu_ns());
        let (wall, cpu) = (
            now.0 - pass_start.0,
            Duration::from_nanos(now.1 - pass_start.1),
        );
        *pass_start = now;
        if let Some(advisor) = knobs.active_advisor() {
            let mut state = self.state.lock();
            state.knobs.pages_to_scan =
                advisor.next_pages_to_scan(state.knobs.pages_to_scan, wall, cpu);
        }
    }

    /// Sleeps up to `duration`, waking early for new knobs or shutdown.
    fn sleep(&self, duration: Duration) {
        let mut shutdown = self.shutdown.lock();
        if !*shutdown {
            self.wake.wait_for(&mut shutdown, duration);
        }
    }
}

fn thread_cpu_ns() -> u64 {
    let now = clock_gettime(ClockId::ThreadCPUTime);
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}
