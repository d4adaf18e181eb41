//! The serve suite's servers, each in a child process on loopback: `samepage serve` (this
//! same binary) or `wasmtime serve`, read for readiness from its stderr, measured through
//! its admin endpoint, its PSS and its CPU time, and stopped with SIGTERM.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::metrics::{Metrics, scrape};

/// Longest a server may take from its start to serving (compiling, pre-warming).
const START_TIMEOUT: Duration = Duration::from_secs(5 * 60);
/// How often the server's PSS is sampled during a load.
pub(crate) const PSS_EVERY: Duration = Duration::from_millis(200);

/// A server in a child process, serving.
pub(crate) struct Host {
    child: Child,
    pub(crate) addr: SocketAddr,
    pub(crate) admin: Option<SocketAddr>,
    /// From its start to its saying that it serves.
    pub(crate) ready: Duration,
    /// Everything it printed on stderr so far.
    log: Arc<Mutex<Vec<String>>>,
    name: String,
}

impl Host {
    /// `samepage serve` with `args`, on ports of loopback the kernel picks.
    pub(crate) fn samepage(args: &[&str]) -> Result<Self> {
        Self::samepage_on("127.0.0.1:0", "127.0.0.1:0", args)
    }

    /// `samepage serve` with `args`, serving on `addr` and its admin address on `admin`
    /// (port 0: one the kernel picks).
    pub(crate) fn samepage_on(addr: &str, admin: &str, args: &[&str]) -> Result<Self> {
        let exe = std::env::current_exe().context("locating the samepage binary")?;
        let mut command = Command::new(exe);
        command
            .args(["serve", "--addr", addr, "--admin-addr", admin])
            .args(args);
        Self::start("samepage serve", command, |line, host| {
            if let Some(addr) = line.strip_prefix("samepage: admin http://") {
                host.1 = addr.trim().parse().ok();
            }
            if let Some(addr) = line.strip_prefix("samepage: serving http://") {
                host.0 = addr.trim().parse().ok();
            }
        })
    }

    /// `wasmtime serve` with every WASI interface (componentize-py components import
    /// wasi:cli), on a free port of loopback.
    pub(crate) fn wasmtime(wasmtime: &Path, component: &Path) -> Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let mut command = Command::new(wasmtime);
        command
            .args(["serve", "-Scli", "--addr"])
            .arg(format!("127.0.0.1:{port}"))
            .arg(component);
        Self::start("wasmtime serve", command, |line, host| {
            // "Serving HTTP on http://127.0.0.1:PORT/"
            if let Some(at) = line.find("http://") {
                let rest = &line[at + "http://".len()..];
                host.0 = rest.trim().trim_end_matches('/').parse().ok();
            }
        })
    }

    /// Starts `command` and reads its stderr until `ready` found its address (a thread
    /// keeps reading it after, so that the server never blocks writing).
    fn start(
        name: &str,
        mut command: Command,
        ready: fn(&str, &mut (Option<SocketAddr>, Option<SocketAddr>)),
    ) -> Result<Self> {
        let started = Instant::now();
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        let stderr = child.stderr.take().expect("stderr is piped");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (lines, received) = mpsc::channel();
        {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    log.lock().expect("log lock").push(line.clone());
                    let _ = lines.send(line);
                }
            });
        }
        let mut found = (None, None);
        let mut host = Self {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            admin: None,
            ready: Duration::ZERO,
            log,
            name: name.to_owned(),
        };
        loop {
            let left = START_TIMEOUT.saturating_sub(started.elapsed());
            match received.recv_timeout(left) {
                Ok(line) => {
                    ready(&line, &mut found);
                    if let Some(addr) = found.0 {
                        host.addr = addr;
                        host.admin = found.1;
                        host.ready = started.elapsed();
                        return Ok(host);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    bail!(
                        "{name} was not serving after {START_TIMEOUT:?}:\n{}",
                        host.tail()
                    )
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let status = host.child.wait()?;
                    bail!("{name} ended before serving ({status}):\n{}", host.tail());
                }
            }
        }
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(crate) fn log_lines(&self) -> Vec<String> {
        self.log.lock().expect("log lock").clone()
    }

    /// The last lines it printed.
    fn tail(&self) -> String {
        let log = self.log.lock().expect("log lock");
        log[log.len().saturating_sub(20)..].join("\n")
    }

    pub(crate) fn metrics(&self) -> Result<Metrics> {
        scrape(self.admin.context("the host has no admin address")?)
    }

    /// SIGTERM, then waits for it to drain and exit (a minute at most, then SIGKILL).
    pub(crate) fn stop(&mut self) -> Result<ExitStatus> {
        let pid = rustix::process::Pid::from_child(&self.child);
        rustix::process::kill_process(pid, rustix::process::Signal::TERM)
            .with_context(|| format!("stopping {}", self.name))?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                self.child.kill().ok();
                self.child.wait().ok();
                bail!("{} did not stop within a minute of SIGTERM", self.name);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.child.kill().ok();
            self.child.wait().ok();
        }
    }
}

/// One reading of a process's PSS, in bytes: all of it, and its anonymous, file-backed and
/// shared-memory (memfd, tmpfs) parts, as `smaps_rollup` splits it.
#[derive(Clone, Copy, Default)]
pub(crate) struct Pss {
    pub(crate) total: f64,
    pub(crate) anon: f64,
    pub(crate) file: f64,
    pub(crate) shmem: f64,
}

impl Pss {
    /// The largest of `samples` by total (zero for none).
    pub(crate) fn peak(samples: &[Self]) -> Self {
        samples
            .iter()
            .copied()
            .max_by(|a, b| a.total.total_cmp(&b.total))
            .unwrap_or_default()
    }

    /// "anon / file / shmem" in MiB.
    pub(crate) fn parts(&self) -> String {
        format!(
            "{:.1} / {:.1} / {:.1}",
            self.anon / 1048576.0,
            self.file / 1048576.0,
            self.shmem / 1048576.0
        )
    }
}

/// Samples a process's PSS on a thread until stopped.
pub(crate) struct PssSampler {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<Pss>>,
}

impl PssSampler {
    pub(crate) fn start(pid: u32) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut samples = Vec::new();
                loop {
                    let last = stop.load(Ordering::Acquire);
                    samples.extend(pss_of(pid));
                    if last {
                        break samples;
                    }
                    std::thread::sleep(PSS_EVERY);
                }
            })
        };
        Self { stop, thread }
    }

    /// Stops sampling (after one last sample) and returns the samples.
    pub(crate) fn stop(self) -> Vec<Pss> {
        self.stop.store(true, Ordering::Release);
        self.thread.join().expect("the PSS sampler panicked")
    }
}

/// A process's PSS, from `/proc/PID/smaps_rollup`.
fn pss_of(pid: u32) -> Option<Pss> {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let field = |name: &str| -> f64 {
        rollup
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.trim().strip_suffix("kB"))
            .and_then(|kb| kb.trim().parse::<f64>().ok())
            .map_or(0.0, |kb| kb * 1024.0)
    };
    Some(Pss {
        total: samepage_runtime::measure::pss_in_rollup(&rollup)? as f64,
        anon: field("Pss_Anon:"),
        file: field("Pss_File:"),
        shmem: field("Pss_Shmem:"),
    })
}

/// A process's CPU time so far, in seconds: all of it, and its merge scanner's thread's
/// (`samepage-scan`; zero for a process without one).
#[derive(Clone, Copy, Default)]
pub(crate) struct Cpu {
    pub(crate) total: f64,
    pub(crate) scanner: f64,
}

impl Cpu {
    /// Now, of `pid` (zero where `/proc` cannot say).
    pub(crate) fn of(pid: u32) -> Self {
        let Ok(process) = procfs::process::Process::new(pid as i32) else {
            return Self::default();
        };
        let ticks = procfs::ticks_per_second() as f64;
        // The process's figure counts its threads, those that ended too.
        let total = process
            .stat()
            .map_or(0.0, |stat| (stat.utime + stat.stime) as f64 / ticks);
        let scanner = process.tasks().map_or(0.0, |tasks| {
            tasks
                .flatten()
                .filter_map(|task| task.stat().ok())
                .filter(|stat| stat.comm == "samepage-scan")
                .map(|stat| (stat.utime + stat.stime) as f64 / ticks)
                .sum()
        });
        Self { total, scanner }
    }

    /// What was spent from `earlier` to this.
    pub(crate) fn since(self, earlier: Self) -> Self {
        Self {
            total: self.total - earlier.total,
            scanner: self.scanner - earlier.scanner,
        }
    }
}
