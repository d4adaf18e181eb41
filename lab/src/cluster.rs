//! The cluster suite: three `samepage serve` nodes on loopback, each with a memory budget of
//! its own, behind a real NGINX (Debian's package), sent one trace twice: routed by a
//! consistent hash of the function (`hash $function consistent`, what ingress-nginx's
//! `upstream-hash-by` does), and round-robin. NGINX marks a node that fails as down for a while
//! (`max_fails`, `fail_timeout`) and retries a request on the next node
//! (`proxy_next_upstream`). Then a rolling restart: mid-trace, one node is sent SIGTERM (it
//! drains: its `/healthz` answers 503 and it refuses new requests) and started again on the
//! same ports.
//!
//! Nothing here decides membership or placement: NGINX's hash ring does, as it would in front
//! of a Kubernetes DaemonSet (`deploy/kubernetes/`, `docs/scale-out.md`).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::child::median;
use crate::serve::REQUEST_TIMEOUT;
use crate::serve::arrivals::{Arrival, schedule_over};
use crate::serve::http::get;
use crate::serve::metrics::{Metrics, scrape};
use crate::serve::server::Host;
use crate::serve::trace::{functions_config, percentile};
use crate::{mib, table};

/// Nodes behind NGINX.
const NODES: usize = 3;
/// Functions of the trace, all the same component on routes /f0 … /f23, over [`TENANTS`].
const FUNCTIONS: usize = 24;
const TENANTS: usize = 3;
/// The trace: requests, mean rate (Poisson arrivals), seed.
const REQUESTS: usize = 600;
const RATE: f64 = 25.0;
const SEED: u64 = 0xc1a5_7e12_2026_0022;
/// Most instances of a function on one node.
const MAX_INSTANCES: u32 = 3;
/// Each node's memory budget: the node alone, serving no instance, and this much room.
const ROOM_MIB: u64 = 64;
/// When, in the trace, the rolling restart sends SIGTERM to node 1.
const RESTART_AT: f64 = 0.4;

/// How NGINX picks a node.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Policy {
    ConsistentHash,
    RoundRobin,
}

impl Policy {
    fn name(self) -> &'static str {
        match self {
            Policy::ConsistentHash => "consistent hash of the function",
            Policy::RoundRobin => "round-robin",
        }
    }

    fn directive(self) -> &'static str {
        match self {
            Policy::ConsistentHash => "hash $function consistent;",
            Policy::RoundRobin => "",
        }
    }
}

/// What one request got: its status (`None`: no response) and its latency in seconds, from
/// its scheduled time to the end of its body.
struct Outcome {
    status: Option<u16>,
    seconds: f64,
}

/// One run of the trace through NGINX.
struct Run {
    outcomes: Vec<Outcome>,
    /// Each node's metrics at the end.
    nodes: Vec<Metrics>,
}

impl Run {
    fn sum(&self, name: &str) -> f64 {
        self.nodes.iter().map(|m| m.sum(name)).sum()
    }

    fn share_cold(&self) -> f64 {
        100.0 * self.sum("samepage_cold_starts_total")
            / self.sum("samepage_requests_total").max(1.0)
    }

    fn latencies(&self) -> Vec<f64> {
        self.outcomes
            .iter()
            .filter(|o| o.status.is_some_and(|s| (200..300).contains(&s)))
            .map(|o| o.seconds)
            .collect()
    }

    fn failed(&self) -> usize {
        self.outcomes
            .iter()
            .filter(|o| !o.status.is_some_and(|s| (200..300).contains(&s)))
            .count()
    }

    fn mib_per_warm_instance(&self) -> f64 {
        self.sum("samepage_host_pss_bytes")
            / 1048576.0
            / self.sum("samepage_function_instances").max(1.0)
    }

    /// The same above what the nodes hold serving no instance (`alone` each).
    fn mib_per_warm_instance_above(&self, alone: f64) -> f64 {
        (self.sum("samepage_host_pss_bytes") - alone * NODES as f64).max(0.0)
            / 1048576.0
            / self.sum("samepage_function_instances").max(1.0)
    }
}

pub fn suite(rounds: u32) -> Result<String> {
    let nginx = nginx()?;
    // Two programs, so that functions differ in what they hold, as a fleet's do: the Python
    // and the JavaScript wasi:http components (built together).
    let python = crate::serve::python_component()?;
    let components = [python.clone(), python.with_file_name("js-app.wasm")];
    let scratch = std::env::temp_dir().join(format!("samepage-cluster-{}", std::process::id()));
    std::fs::create_dir_all(&scratch)?;
    let plan = schedule_over(REQUESTS, FUNCTIONS, RATE, SEED);
    // The node alone, serving the functions with no instance: its budget is that and room.
    let config = scratch.join("node.toml");
    std::fs::write(&config, node_config(&components, None))?;
    // Twice: the first start compiles the components (wasmtime's cache is then warm, as
    // for every node after), and holds what compiling took until it is trimmed.
    let mut alone = 0.0;
    for _ in 0..2 {
        let mut host = Host::samepage(&["--config", path(&config)?])?;
        std::thread::sleep(Duration::from_secs(2));
        alone = host.metrics()?.sum("samepage_host_pss_bytes");
        host.stop()?;
    }
    let budget_mib = (alone / 1048576.0).ceil() as u64 + ROOM_MIB;
    std::fs::write(&config, node_config(&components, Some(budget_mib)))?;
    let config = path(&config)?.to_owned();

    let policies = [Policy::ConsistentHash, Policy::RoundRobin];
    let mut runs: [Vec<Run>; 2] = [Vec::new(), Vec::new()];
    for round in 0..rounds as usize {
        for k in 0..2 {
            let index = (round + k) % 2;
            eprintln!(
                "bench: cluster: round {} of {rounds}, {}: {} requests over {:.0} s",
                round + 1,
                policies[index].name(),
                plan.len(),
                plan.last().map_or(0.0, |a| a.at)
            );
            runs[index].push(run(
                &nginx,
                &scratch,
                &config,
                policies[index],
                &plan,
                false,
            )?);
        }
    }
    eprintln!("bench: cluster: rolling restart, consistent hash");
    let restart = run(
        &nginx,
        &scratch,
        &config,
        Policy::ConsistentHash,
        &plan,
        true,
    )?;
    let _ = std::fs::remove_dir_all(&scratch);
    Ok(report(&runs, &restart, budget_mib, alone, rounds))
}

/// Starts the nodes and NGINX, sends the trace on time, and stops them; with `restart`, node
/// 1 is stopped with SIGTERM at [`RESTART_AT`] of the trace and started again at once.
fn run(
    nginx: &Path,
    scratch: &Path,
    config: &str,
    policy: Policy,
    plan: &[Arrival],
    restart: bool,
) -> Result<Run> {
    let mut nodes: Vec<Host> = (0..NODES)
        .map(|_| Host::samepage(&["--config", config]))
        .collect::<Result<_>>()?;
    let addrs: Vec<SocketAddr> = nodes.iter().map(|n| n.addr).collect();
    let proxy = Nginx::start(nginx, scratch, policy, &addrs)?;
    let start = Instant::now();
    let outcomes = std::thread::scope(|scope| -> Result<Vec<Outcome>> {
        let mut requests = Vec::with_capacity(plan.len());
        let restart_due = plan.last().map_or(0.0, |a| a.at) * RESTART_AT;
        let mut restarted = !restart;
        for arrival in plan {
            let due = start + Duration::from_secs_f64(arrival.at);
            if !restarted && arrival.at >= restart_due {
                restarted = true;
                // The node drains, then comes back on its ports, as a DaemonSet's rolling
                // update does with a pod; requests go on arriving meanwhile (below, late).
                let node = &mut nodes[1];
                let (addr, admin) = (node.addr, node.admin.context("an admin address")?);
                node.stop()?;
                *node = Host::samepage_on(
                    &addr.to_string(),
                    &admin.to_string(),
                    &["--config", config],
                )?;
            }
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            let target = proxy.addr;
            let path = format!("/f{}", arrival.function);
            requests.push(scope.spawn(move || {
                let status = get(target, &path, REQUEST_TIMEOUT).ok().map(|r| r.status);
                Outcome {
                    status,
                    seconds: due.elapsed().as_secs_f64(),
                }
            }));
        }
        Ok(requests
            .into_iter()
            .map(|request| request.join().expect("a trace request panicked"))
            .collect())
    })?;
    let nodes_metrics = nodes
        .iter()
        .map(|node| scrape(node.admin.context("an admin address")?))
        .collect::<Result<Vec<_>>>()?;
    drop(proxy);
    for node in &mut nodes {
        node.stop()?;
    }
    Ok(Run {
        outcomes,
        nodes: nodes_metrics,
    })
}

fn report(runs: &[Vec<Run>; 2], restart: &Run, budget_mib: u64, alone: f64, rounds: u32) -> String {
    let policies = [Policy::ConsistentHash, Policy::RoundRobin];
    let med = |runs: &[Run], f: &dyn Fn(&Run) -> f64| median(runs.iter().map(f).collect());
    let rows: Vec<Vec<String>> = policies
        .iter()
        .zip(runs)
        .map(|(policy, runs)| {
            let spread = |f: &dyn Fn(&Run) -> f64, unit: &str| {
                let values: Vec<f64> = runs.iter().map(f).collect();
                let (lo, hi) = values
                    .iter()
                    .fold((f64::MAX, f64::MIN), |(lo, hi), &v| (lo.min(v), hi.max(v)));
                format!("{:.1}{unit} ({lo:.1}–{hi:.1})", median(values))
            };
            vec![
                policy.name().to_owned(),
                spread(&Run::share_cold, "%"),
                format!(
                    "{:.0}",
                    med(runs, &|r| r.sum("samepage_function_instances"))
                ),
                mib(med(runs, &|r| r.sum("samepage_host_pss_bytes"))),
                spread(&Run::mib_per_warm_instance, " MiB"),
                spread(&|r: &Run| r.mib_per_warm_instance_above(alone), " MiB"),
                format!(
                    "{:.0} ms",
                    med(runs, &|r| percentile(&r.latencies(), 0.5) * 1e3)
                ),
                format!(
                    "{:.0} ms",
                    med(runs, &|r| percentile(&r.latencies(), 0.99) * 1e3)
                ),
                format!("{}", runs.iter().map(Run::failed).sum::<usize>()),
            ]
        })
        .collect();
    let cold = |runs: &[Run]| median(runs.iter().map(Run::share_cold).collect());
    let per_instance = |runs: &[Run]| median(runs.iter().map(Run::mib_per_warm_instance).collect());
    let mut text = format!(
        "# A cluster of three nodes behind NGINX: function affinity against round-robin\n\n\
         Three `samepage serve` processes on loopback, each a node with a memory budget of \
         {budget_mib} MiB (the node alone and {ROOM_MIB} MiB), behind NGINX \
         (`upstream` with `max_fails=1 fail_timeout=3s`, `proxy_next_upstream error timeout \
         http_502 http_503`, 3 tries). Each node serves the same {FUNCTIONS} functions of \
         {TENANTS} tenants (the Python and the JavaScript wasi:http components in turn, on \
         routes /f0 … /f23; function k is of tenant k mod {TENANTS}; at most \
         {MAX_INSTANCES} instances of each per node, in `samepage serve`'s default reuse). \
         The trace: {REQUESTS} requests, Poisson arrivals at {RATE} a second, functions drawn \
         by Zipf popularity (s = 1), seed {SEED:#x}, sent on time through NGINX, in {rounds} \
         rounds per policy, the policies' order alternating. Cold starts, instances and PSS \
         are the nodes' own figures (`/metrics`) at the end of a run, added up over the \
         three; latency is from a request's scheduled time to the end of its body. Medians \
         of the rounds, the range in brackets.\n\n{}\n",
        table(
            &[
                "policy",
                "requests that waited for a cold start",
                "warm instances held (3 nodes)",
                "nodes' PSS, summed",
                "MiB of PSS per warm instance",
                "the same above the nodes alone",
                "p50",
                "p99",
                "errors (no answer or not 2xx, all rounds)",
            ],
            &rows,
        )
    );
    let (hash_cold, rr_cold) = (cold(&runs[0]), cold(&runs[1]));
    let _ = writeln!(
        text,
        "- Cold starts, round-robin against affinity: {:.1}× (target ≥ 2×: {}).",
        rr_cold / hash_cold.max(f64::MIN_POSITIVE),
        if rr_cold >= 2.0 * hash_cold {
            "met"
        } else {
            "**missed**"
        }
    );
    let (hash_mib, rr_mib) = (per_instance(&runs[0]), per_instance(&runs[1]));
    let above = |runs: &[Run]| {
        median(
            runs.iter()
                .map(|r| r.mib_per_warm_instance_above(alone))
                .collect(),
        )
    };
    let _ = writeln!(
        text,
        "- MiB of PSS per warm instance: {hash_mib:.2} with affinity against {rr_mib:.2} \
         round-robin (target: fewer: {}); above what the nodes hold alone ({} each): {:.2} \
         against {:.2}.",
        if hash_mib < rr_mib {
            "met"
        } else {
            "**missed**"
        },
        mib(alone),
        above(&runs[0]),
        above(&runs[1])
    );
    let statuses = |f: &dyn Fn(&Outcome) -> bool| restart.outcomes.iter().filter(|o| f(o)).count();
    let _ = writeln!(
        text,
        "\n## Rolling restart\n\nThe same trace with the consistent hash; at {:.0}% of it, node 1 \
         is sent SIGTERM (it drains: `/healthz` answers 503, new requests are refused) and is \
         started again on the same ports once it exited. Requests: {} answered 2xx, {} \
         answered otherwise, {} not answered (target: 0 and 0: {}). p99 {:.0} ms.",
        RESTART_AT * 100.0,
        statuses(&|o| o.status.is_some_and(|s| (200..300).contains(&s))),
        statuses(&|o| o.status.is_some_and(|s| !(200..300).contains(&s))),
        statuses(&|o| o.status.is_none()),
        if restart.failed() == 0 {
            "met"
        } else {
            "**missed**"
        },
        percentile(&restart.latencies(), 0.99) * 1e3
    );
    text
}

/// A node's configuration: the trace's functions, components and tenants in turn, within
/// `budget_mib`.
fn node_config(components: &[PathBuf], budget_mib: Option<u64>) -> String {
    let components: Vec<&Path> = components.iter().map(PathBuf::as_path).collect();
    functions_config(&components, FUNCTIONS, TENANTS, MAX_INSTANCES, budget_mib)
}

fn path(path: &Path) -> Result<&str> {
    path.to_str().context("a UTF-8 path")
}

/// Debian's NGINX, installed if it is not there.
fn nginx() -> Result<PathBuf> {
    let installed = Path::new("/usr/sbin/nginx");
    if !installed.exists() {
        eprintln!("bench: cluster: installing Debian's nginx");
        let status = Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends", "nginx"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(Stdio::null())
            .status()
            .context("running apt-get")?;
        if !status.success() || !installed.exists() {
            bail!("NGINX is missing and `apt-get install nginx` failed ({status})");
        }
    }
    Ok(installed.to_owned())
}

/// NGINX in front of the nodes, in the foreground, with a prefix of its own.
struct Nginx {
    child: Child,
    addr: SocketAddr,
}

impl Nginx {
    fn start(nginx: &Path, scratch: &Path, policy: Policy, nodes: &[SocketAddr]) -> Result<Self> {
        let prefix = scratch.join("nginx");
        std::fs::create_dir_all(prefix.join("logs"))?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let servers: String = nodes
            .iter()
            .map(|addr| format!("        server {addr} max_fails=1 fail_timeout=3s;\n"))
            .collect();
        let user = if rustix::process::geteuid().is_root() {
            "user root;\n"
        } else {
            ""
        };
        let conf = format!(
            "{user}daemon off;\nworker_processes 1;\npid {prefix}/nginx.pid;\n\
             error_log {prefix}/logs/error.log warn;\n\
             events {{ worker_connections 4096; }}\n\
             http {{\n    access_log off;\n\
             \x20   client_body_temp_path {prefix}/body;\n    proxy_temp_path {prefix}/proxy;\n\
             \x20   # The function is the first segment of the path.\n\
             \x20   map $uri $function {{ ~^/(?<name>[^/]+) $name; default $uri; }}\n\
             \x20   upstream nodes {{\n        {}\n{servers}        keepalive 64;\n    }}\n\
             \x20   server {{\n        listen 127.0.0.1:{port};\n        location / {{\n\
             \x20           proxy_pass http://nodes;\n            proxy_http_version 1.1;\n\
             \x20           proxy_set_header Connection \"\";\n\
             \x20           proxy_next_upstream error timeout http_502 http_503;\n\
             \x20           proxy_next_upstream_tries 3;\n\
             \x20           proxy_connect_timeout 1s;\n            proxy_read_timeout 30s;\n\
             \x20       }}\n    }}\n}}\n",
            policy.directive(),
            prefix = prefix.display(),
        );
        let conf_path = prefix.join("nginx.conf");
        std::fs::write(&conf_path, conf)?;
        let child = Command::new(nginx)
            .arg("-p")
            .arg(&prefix)
            .arg("-c")
            .arg(&conf_path)
            .arg("-e")
            .arg(prefix.join("logs/error.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting nginx")?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(addr).is_err() {
            if Instant::now() > deadline {
                let log =
                    std::fs::read_to_string(prefix.join("logs/error.log")).unwrap_or_default();
                bail!("nginx was not listening on {addr} after 10 s:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Self { child, addr })
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGQUIT: NGINX's graceful stop.
        let pid = rustix::process::Pid::from_child(&self.child);
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::QUIT);
        let _ = self.child.wait();
    }
}
