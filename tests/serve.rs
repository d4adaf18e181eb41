//! `samepage serve` through its binary, with a real HTTP/1.1 client on ephemeral loopback
//! ports: a real Python wasi:http component (`examples/http/app.py`), a real JavaScript one
//! (`examples/http/app.js`, componentize-js) and a small one written in the text format
//! (`examples/http/small.wat`), all built by `scripts/build-http-components`, and a C WAGI
//! program (`examples/guests/wagi-c`, built by `scripts/build-c-guests`).
//!
//! Concurrent requests; warm, reset and fresh reuse; an instance per request by default, so
//! that no request sees what another left; a component that fails on a reused instance is
//! switched to per-request instances and its GETs served again; a trap and a timeout answer
//! 500 and the next request succeeds; the memory limit; eviction under a tight budget; no
//! sharing across tenants unless joined; routes by host name and path; pool minimums and
//! idle expiry; malformed HTTP refused; `/metrics` parses as Prometheus text and its
//! counters move; `/healthz`; SIGTERM drains; a bad config is refused with its line; WAGI.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const COMPONENT: &str = "target/http-components/python-app.wasm";
const SMALL: &str = "target/http-components/small.wasm";
const JS: &str = "target/http-components/js-app.wasm";
const WAGI: &str = "target/c-guests/wagi-cgi.wasm";

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn built(relative: &str, by: &str) -> PathBuf {
    let path = root().join(relative);
    assert!(path.exists(), "{relative} is missing: run scripts/{by}");
    path
}

/// A running `samepage serve`, the addresses it serves, and what it printed so far.
struct Server {
    child: Child,
    addr: String,
    admin: Option<String>,
    stderr: std::sync::Arc<parking_lot::Mutex<String>>,
}

impl Server {
    /// `samepage serve` with `args` on ephemeral ports, once it serves.
    fn start(args: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_samepage"))
            .arg("serve")
            .args(["--addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0"])
            .args(args)
            .current_dir(root())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn samepage serve");
        let mut stderr = BufReader::new(child.stderr.take().expect("stderr"));
        let mut admin = None;
        let mut printed = String::new();
        let addr = loop {
            let mut line = String::new();
            let read = stderr.read_line(&mut line).expect("read stderr");
            assert!(read > 0, "samepage serve ended before serving:\n{printed}");
            printed.push_str(&line);
            if let Some(addr) = line.trim().strip_prefix("samepage: admin http://") {
                admin = Some(addr.to_owned());
            }
            if let Some(addr) = line.trim().strip_prefix("samepage: serving http://") {
                break addr.to_owned();
            }
        };
        let kept = std::sync::Arc::new(parking_lot::Mutex::new(printed));
        // Keep reading stderr, so that the server never blocks on it.
        std::thread::spawn({
            let kept = kept.clone();
            move || {
                let mut line = String::new();
                while stderr.read_line(&mut line).is_ok_and(|read| read > 0) {
                    kept.lock().push_str(&line);
                    line.clear();
                }
            }
        });
        Self {
            child,
            addr,
            admin,
            stderr: kept,
        }
    }

    /// `samepage serve COMPONENT` with `args` before it.
    fn component(args: &[&str]) -> Self {
        Self::serving(COMPONENT, args)
    }

    /// `samepage serve PROGRAM` (built by scripts/build-http-components) with `args` before it.
    fn serving(program: &str, args: &[&str]) -> Self {
        let program = built(program, "build-http-components");
        let mut all: Vec<&str> = args.to_vec();
        all.push(program.to_str().expect("UTF-8 path"));
        Self::start(&all)
    }

    /// `samepage serve --config` with `text` written to a file of its own.
    fn config(name: &str, text: &str) -> Self {
        let path = scratch(name).join("samepage.toml");
        std::fs::write(&path, text).expect("write the config");
        Self::start(&["--config", path.to_str().expect("UTF-8 path")])
    }

    fn get(&self, path: &str) -> Response {
        request(&self.addr, "GET", path, &[], b"")
    }

    /// The admin address's `/metrics`, parsed.
    fn metrics(&self) -> Metrics {
        let admin = self.admin.as_ref().expect("an admin address");
        let response = request(admin, "GET", "/metrics", &[], b"");
        assert_eq!(response.status, 200, "{}", response.body);
        assert!(
            response
                .header("content-type")
                .starts_with("application/openmetrics-text"),
            "{:?}",
            response.headers
        );
        Metrics::parse(&response.body)
    }

    fn terminate(&self) {
        rustix::process::kill_process(
            rustix::process::Pid::from_child(&self.child),
            rustix::process::Signal::TERM,
        )
        .expect("SIGTERM");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A directory of its own for one test.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("samepage-serve-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch directory");
    dir
}

struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Response {
    fn header(&self, name: &str) -> &str {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map_or("", |(_, value)| value)
    }

    /// The component's JSON answer.
    fn json(&self) -> serde_json::Value {
        assert_eq!(self.status, 200, "{}", self.body);
        serde_json::from_str(self.body.trim()).unwrap_or_else(|e| panic!("{e}: {:?}", self.body))
    }

    /// How many requests the answering instance has served.
    fn served(&self) -> u64 {
        self.json()["served"].as_u64().expect("served")
    }
}

/// One HTTP/1.1 request on a connection of its own.
fn request(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Response {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(120)))
        .expect("timeout");
    let host = headers
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case("host"))
        .map_or(addr, |(_, host)| host);
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers
        .iter()
        .filter(|(name, _)| !name.eq_ignore_ascii_case("host"))
    {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).expect("request head");
    stream.write_all(body).expect("request body");
    let mut response = Vec::new();
    stream.read_to_end(&mut response).expect("response");
    let response = String::from_utf8(response).expect("a UTF-8 response");
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|line| line.split(' ').nth(1))
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {response:?}"));
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_owned()
    };
    Response {
        status,
        headers,
        body,
    }
}

/// A body in HTTP/1.1's chunked transfer coding, decoded.
fn dechunk(mut body: &str) -> String {
    let mut decoded = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).expect("chunk size");
        if size == 0 {
            break;
        }
        decoded.push_str(&rest[..size]);
        body = &rest[size + 2..];
    }
    decoded
}

/// Samples of a Prometheus text exposition, by name and labels, checked line by line
/// against the format: `# HELP`/`# TYPE`/`# UNIT` comments, `name{label="value",...} value`
/// samples with valid names and numbers, and `# EOF` last.
struct Metrics {
    samples: BTreeMap<String, f64>,
}

impl Metrics {
    fn parse(text: &str) -> Self {
        let valid_name = |name: &str| {
            !name.is_empty()
                && name.chars().enumerate().all(|(i, c)| {
                    c.is_ascii_alphabetic() || c == '_' || c == ':' || (i > 0 && c.is_ascii_digit())
                })
        };
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines.last(),
            Some(&"# EOF"),
            "an OpenMetrics exposition ends with # EOF"
        );
        let mut samples = BTreeMap::new();
        let mut typed = BTreeMap::new();
        for line in &lines[..lines.len() - 1] {
            if let Some(comment) = line.strip_prefix("# ") {
                let mut words = comment.splitn(3, ' ');
                let (kind, name) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
                assert!(["HELP", "TYPE", "UNIT"].contains(&kind), "{line}");
                assert!(valid_name(name), "{line}");
                if kind == "TYPE" {
                    let family = words.next().unwrap_or("");
                    assert!(
                        ["counter", "gauge", "histogram"].contains(&family),
                        "{line}"
                    );
                    assert!(
                        typed.insert(name.to_owned(), family.to_owned()).is_none(),
                        "{line}"
                    );
                }
                continue;
            }
            let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("{line}"));
            let name = series.split('{').next().unwrap_or("");
            assert!(valid_name(name), "{line}");
            let labels = &series[name.len()..];
            if !labels.is_empty() {
                let inner = labels
                    .strip_prefix('{')
                    .and_then(|l| l.strip_suffix('}'))
                    .unwrap_or_else(|| panic!("{line}"));
                for label in inner.split("\",").filter(|l| !l.is_empty()) {
                    let (key, value) = label.split_once("=\"").unwrap_or_else(|| panic!("{line}"));
                    assert!(valid_name(key), "{line}");
                    assert!(!value.trim_end_matches('"').contains('"'), "{line}");
                }
            }
            let value: f64 = match value {
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                other => other
                    .parse()
                    .unwrap_or_else(|_| panic!("not a number: {line}")),
            };
            assert!(
                typed.keys().any(|family| name.starts_with(family.as_str())),
                "a sample without its TYPE: {line}"
            );
            assert!(
                samples.insert(series.to_owned(), value).is_none(),
                "twice: {line}"
            );
        }
        Self { samples }
    }

    /// The sample `series` (name and labels, as printed).
    fn get(&self, series: &str) -> f64 {
        *self
            .samples
            .get(series)
            .unwrap_or_else(|| panic!("no sample {series} in {:#?}", self.samples.keys()))
    }

    /// `function`'s sample of `name`, whatever its other labels.
    fn function(&self, name: &str, function: &str) -> f64 {
        let label = format!("function=\"{function}\"");
        let found: Vec<f64> = self
            .samples
            .iter()
            .filter(|(series, _)| {
                series.split('{').next() == Some(name)
                    && series.split(['{', ',', '}']).any(|l| l == label)
            })
            .map(|(_, value)| *value)
            .collect();
        match found[..] {
            [value] => value,
            _ => panic!(
                "{} samples {name} of {function} in {:#?}",
                found.len(),
                self.samples.keys()
            ),
        }
    }

    /// A function's sample of `name`, in tenant `tenant`.
    fn of(&self, name: &str, function: &str, tenant: &str) -> f64 {
        self.get(&format!(
            "{name}{{function=\"{function}\",tenant=\"{tenant}\"}}"
        ))
    }
}

/// The metrics once the scanner has settled: two more full passes, and pages_sharing the
/// same over the last three looks.
fn settled(server: &Server) -> Metrics {
    let first = server.metrics().get("samepage_full_scans");
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut sharing = Vec::new();
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let metrics = server.metrics();
        sharing.push(metrics.get("samepage_pages_sharing"));
        let steady = sharing.len() >= 3
            && sharing[sharing.len() - 3..]
                .windows(2)
                .all(|w| w[0] == w[1]);
        if steady && metrics.get("samepage_full_scans") >= first + 2.0 {
            return metrics;
        }
        assert!(
            Instant::now() < deadline,
            "the scanner did not settle: {sharing:?}"
        );
    }
}

/// `count` requests at once, the `n`th for `path(n)`.
fn concurrently(
    server: &Server,
    count: usize,
    path: impl Fn(usize) -> String + Sync,
) -> Vec<Response> {
    std::thread::scope(|scope| {
        let path = &path;
        let workers: Vec<_> = (0..count)
            .map(|n| scope.spawn(move || server.get(&path(n))))
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("worker"))
            .collect()
    })
}

#[test]
fn warm_instances_are_reused_a_trap_is_a_500_and_metrics_move() {
    // With one instance at most, each request finds the instance the last one left (its
    // response reaches the client a little before the instance is back in the pool).
    let one = Server::component(&["--reuse", "warm", "--max-instances", "1"]);
    assert_eq!(one.get("/hello?x=1").served(), 1);
    let answer = one.get("/remember?value=kept").json();
    assert_eq!(answer["served"], 2);
    assert_eq!(one.get("/again").json()["remembered"], "kept");
    let trapped = one.get("/trap");
    assert_eq!(trapped.status, 500, "{}", trapped.body);
    assert!(
        trapped.body.contains("the function failed"),
        "{}",
        trapped.body
    );
    // The trap was on a reused instance, so the GET was served again by a fresh one, which
    // trapped too: reuse was not the cause, and the function stays warm. The trapped
    // instances are gone; a new one serves the next request from scratch, and is reused.
    let after = one.get("/after-the-trap").json();
    assert_eq!(
        (after["served"].as_u64(), &after["remembered"]),
        (Some(1), &serde_json::Value::Null)
    );
    assert_eq!(one.get("/still-warm").served(), 2);
    let metrics = one.metrics();
    let of = |name| metrics.of(name, "python-app", "default");
    assert_eq!(
        (
            of("samepage_traps_total"),
            of("samepage_retries_total"),
            of("samepage_reuse_fallbacks_total")
        ),
        (2.0, 1.0, 0.0)
    );
    assert!(!one.stderr.lock().contains(SWITCHED));
    drop(one);

    let server = Server::component(&["--reuse", "warm", "--max-instances", "8"]);
    assert_eq!(server.get("/first").served(), 1);
    let before = server.metrics();
    // Each sleeps long enough for all six to be in flight at once.
    for response in concurrently(&server, 6, |n| format!("/concurrent/{n}/sleep?ms=300")) {
        let path = response.json()["path"].as_str().unwrap().to_owned();
        assert!(path.starts_with("/concurrent/"), "{path}");
    }
    let after = server.metrics();
    let moved = |name: &str| {
        after.of(name, "python-app", "default") - before.of(name, "python-app", "default")
    };
    assert_eq!(moved("samepage_requests_total"), 6.0);
    assert_eq!(moved("samepage_responses_2xx_total"), 6.0);
    assert_eq!(
        moved("samepage_cold_starts_total") + moved("samepage_warm_starts_total"),
        6.0
    );
    assert!(
        moved("samepage_cold_starts_total") >= 5.0,
        "six at once need six instances"
    );
    assert_eq!(
        moved("samepage_request_duration_seconds_count"),
        6.0,
        "each request is in the latency histogram"
    );
    let live = after.of("samepage_function_instances", "python-app", "default");
    assert!(
        (6.0..=8.0).contains(&live),
        "{live} instances for at most 8"
    );
    assert!(after.get("samepage_host_pss_bytes") > 0.0);
    assert!(after.get("samepage_pages_scanned") > 0.0);
    assert!(after.get("samepage_general_profit") != 0.0);

    let admin = server.admin.as_ref().unwrap();
    assert_eq!(request(admin, "GET", "/healthz", &[], b"").status, 200);
}

#[test]
fn reset_and_fresh_give_each_request_a_new_instance() {
    for reuse in ["reset", "fresh"] {
        let server = Server::component(&["--reuse", reuse, "--max-instances", "1"]);
        assert_eq!(server.get("/remember?value=lost").served(), 1);
        for path in ["/two", "/three"] {
            let answer = server.get(path).json();
            assert_eq!(answer["served"], 1, "{reuse}: {answer}");
            assert_eq!(
                answer["remembered"],
                serde_json::Value::Null,
                "{reuse}: {answer}"
            );
        }
        let metrics = server.metrics();
        let of = |name| metrics.of(name, "python-app", "default");
        match reuse {
            // Each replacement is made after the response: every request but the first
            // finds one ready.
            "reset" => {
                assert_eq!(
                    (
                        of("samepage_cold_starts_total"),
                        of("samepage_warm_starts_total")
                    ),
                    (1.0, 2.0)
                );
                assert!(of("samepage_prewarmed_total") >= 2.0);
            }
            _ => assert_eq!(of("samepage_cold_starts_total"), 3.0),
        }
    }
}

#[test]
fn timeouts_and_memory_limits_answer_500_and_the_server_serves_on() {
    // One instance at a time, so that each request finds the one the last left.
    let server = Server::component(&[
        "-W",
        "timeout=300ms,max-memory-size=96MiB",
        "--reuse",
        "warm",
        "--max-instances",
        "1",
    ]);
    assert_eq!(server.get("/warm").served(), 1);
    let started = Instant::now();
    let spun = server.get("/spin");
    assert_eq!(spun.status, 500, "{}", spun.body);
    assert!(spun.body.contains("timed out after 300ms"), "{}", spun.body);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    // The instance that timed out is dropped, never reused.
    assert_eq!(server.get("/next").served(), 1);
    let grown = server.get("/grow?mb=200");
    assert_eq!(grown.status, 500, "{}", grown.body);
    assert_eq!(server.get("/grow?mb=8").json()["held_mb"], 8);
    // Each failure was on a reused instance, so each GET was served again by a fresh one,
    // which failed the same way: two timeouts, two traps, and the function stays warm.
    let metrics = server.metrics();
    let of = |name| metrics.of(name, "python-app", "default");
    assert_eq!(
        (
            of("samepage_timeouts_total"),
            of("samepage_traps_total"),
            of("samepage_retries_total"),
            of("samepage_reuse_fallbacks_total")
        ),
        (2.0, 2.0, 2.0, 0.0)
    );
}

#[test]
fn sigterm_drains_the_requests_in_flight() {
    let mut server = Server::component(&[]);
    let slow = std::thread::scope(|scope| {
        let slow = scope.spawn(|| server.get("/sleep?ms=1500"));
        std::thread::sleep(Duration::from_millis(400));
        server.terminate();
        slow.join().expect("slow request")
    });
    assert_eq!(
        slow.json()["path"],
        "/sleep",
        "the request in flight is answered"
    );
    let status = server.child.wait().expect("wait");
    assert!(status.success(), "{status:?}\n{}", server.stderr.lock());
    assert!(
        TcpStream::connect(&server.addr).is_err(),
        "still accepting after SIGTERM"
    );
    assert!(
        server
            .stderr
            .lock()
            .contains("samepage: stopped after 1 requests")
    );
}

#[test]
fn a_tight_budget_evicts_the_least_recently_used_idle_instance() {
    let component = built(COMPONENT, "build-http-components");
    // Warm, so that a's instance keeps what it grew and idles in the pool; one instance of
    // each at most, so that a request waits for the last one's instance to be parked rather
    // than making a second.
    let functions = format!(
        "[[function]]\nname = \"a\"\nroute = \"/a\"\ncomponent = \"{0}\"\nreuse = \"warm\"\n\
         max_instances = 1\n\
         [[function]]\nname = \"b\"\nroute = \"/b\"\ncomponent = \"{0}\"\nreuse = \"warm\"\n\
         max_instances = 1\n",
        component.display()
    );
    // The budget must tell "a and b fit" from "a, grown, and b do not" across two server
    // processes whose PSS differs by a few MiB (heap layout, thread stacks), so every margin
    // is half of b's cost, made large by growing b on its first request. Unmerged, so that
    // each instance costs its whole size. Measured twice, so that the second run, like the
    // one under the budget, loads the compiled component from wasmtime's cache (compiling
    // leaves the host's heap larger).
    const B_FIRST: &str = "/b/grow?mb=24";
    let mut one = 0.0;
    let mut two = 0.0;
    for _ in 0..2 {
        let measure = Server::config("measure", &format!("[engine]\ndedup = false\n{functions}"));
        assert_eq!(measure.get("/a/x").served(), 1);
        one = measure.metrics().get("samepage_host_pss_bytes");
        assert_eq!(measure.get(B_FIRST).served(), 1);
        two = measure.metrics().get("samepage_host_pss_bytes");
    }
    let b_cost = two - one;
    assert!(
        b_cost > 24.0 * 1048576.0,
        "an unmerged instance of b holds {b_cost} bytes"
    );

    // With a and b made, half of b's cost is left. a then grows by b's cost on a warm request:
    // still within the budget (by half of b's cost) while b is absent, and over it (by as
    // much) once b is made. a, idle longest, is evicted; that frees more than a new instance
    // of a is expected to cost (its first request did not grow), so a fits again.
    let margin = b_cost / 2.0;
    let budget = (two + margin) as u64;
    let grow_mb = (b_cost / 1048576.0).round() as u64;
    let server = Server::config(
        "evict",
        &format!("[server]\nmemory_budget = {budget}\n[engine]\ndedup = false\n{functions}"),
    );
    assert_eq!(server.get("/a/remember?value=a").served(), 1);
    let grown = server.get(&format!("/a/grow?mb={grow_mb}")).json();
    assert_eq!(grown["held_mb"].as_u64(), Some(grow_mb), "{grown}");
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(
        server
            .metrics()
            .of("samepage_evictions_total", "a", "default"),
        0.0,
        "a was evicted before b came: the budget is {budget} bytes"
    );
    assert_eq!(server.get(B_FIRST).served(), 1);
    // b's instance put the host over its budget: a's, idle longest, goes.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let metrics = server.metrics();
        if metrics.of("samepage_evictions_total", "a", "default") == 1.0 {
            assert_eq!(
                metrics.of("samepage_function_instances", "a", "default"),
                0.0
            );
            assert_eq!(
                metrics.of("samepage_function_instances", "b", "default"),
                1.0
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no eviction: {:?}",
            metrics.samples
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let again = server.get("/a/x").json();
    assert_eq!(
        (again["served"].as_u64(), &again["remembered"]),
        (Some(1), &serde_json::Value::Null)
    );
    assert_eq!(
        server
            .metrics()
            .of("samepage_cold_starts_total", "a", "default"),
        2.0
    );
}

#[test]
fn tenants_share_no_page_unless_the_config_joins_them() {
    let component = built(COMPONENT, "build-http-components");
    let function = |name: &str, tenant: &str| {
        format!(
            "[[function]]\nname = \"{name}\"\nroute = \"/{name}\"\ncomponent = \"{}\"\n\
             tenant = \"{tenant}\"\nmin_instances = 1\nwarmup = \"/\"\nreuse = \"warm\"\n",
            component.display()
        )
    };
    let pages_sharing = |name: &str, joined: &str| {
        let server = Server::config(
            name,
            &format!(
                "{joined}{}{}",
                function("one", "acme"),
                function("two", "globex")
            ),
        );
        let metrics = server.metrics();
        assert_eq!(
            metrics.get("samepage_tenant_instances{tenant=\"acme\"}"),
            1.0
        );
        assert_eq!(
            metrics.get("samepage_tenant_instances{tenant=\"globex\"}"),
            1.0
        );
        settled(&server).get("samepage_pages_sharing")
    };
    let apart = pages_sharing("apart", "");
    let joined = pages_sharing("joined", "[tenant.globex]\nmerge_domain = \"acme\"\n");
    // Joined, the two instances share their runtime's pages; apart, only pages repeated
    // within one instance merge.
    assert!(
        joined > apart + 1000.0,
        "joined {joined} pages sharing, apart {apart}"
    );
}

#[test]
fn a_bad_config_is_refused_with_its_file_and_line() {
    let dir = scratch("bad");
    let cases = [
        (
            "[[function]]\nname = \"x\"\nroute = \"/\"\ncomponent = \"missing.wasm\"\n",
            ":1:1: function \"x\": reading",
        ),
        (
            "[server]\nmemory_budget = \"lots\"\n",
            ":2:17: \"lots\" is not a size",
        ),
        ("[engine]\nmax_page_sharing = 1\n", ":2:20: "),
        (
            "[[function]]\nname = \"x\"\nrout = \"/\"\n",
            ":3:1: unknown field `rout`",
        ),
    ];
    for (text, expected) in cases {
        let path = dir.join("bad.toml");
        std::fs::write(&path, text).unwrap();
        let output = Command::new(env!("CARGO_BIN_EXE_samepage"))
            .args(["serve", "--config"])
            .arg(&path)
            .output()
            .expect("run samepage serve");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{text}: accepted");
        let wanted = format!("{}{expected}", path.display());
        assert!(
            stderr.contains(&wanted),
            "{text}: wanted {wanted:?} in {stderr}"
        );
    }
    // A budget the host is over before it serves anything.
    let small = built(SMALL, "build-http-components");
    let output = Command::new(env!("CARGO_BIN_EXE_samepage"))
        .args(["serve", "--memory-budget", "1MiB"])
        .arg(&small)
        .output()
        .expect("run samepage serve");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("the memory budget (1 MiB) is below what the host holds"),
        "{stderr}"
    );
}

#[test]
fn wagi_commands_answer_from_their_environment_and_stdin() {
    let module = built(WAGI, "build-c-guests");
    let component = built(COMPONENT, "build-http-components");
    let server = Server::config(
        "wagi",
        &format!(
            "[[function]]\nname = \"cgi\"\nroute = \"/cgi\"\nmodule = \"{}\"\nreuse = \"fresh\"\n\
             env = {{ GREETING = \"hello\" }}\n\
             [[function]]\nname = \"app\"\nroute = \"/\"\ncomponent = \"{}\"\n",
            module.display(),
            component.display()
        ),
    );
    let response = request(
        &server.addr,
        "POST",
        "/cgi/some/path?a=1&b=2",
        &[("X-Test", "yes"), ("Content-Type", "text/plain")],
        b"the body",
    );
    assert_eq!(response.status, 200, "{}", response.body);
    assert_eq!(response.header("content-type"), "text/plain");
    assert_eq!(response.header("x-wagi-args"), "3");
    for line in [
        "method=POST",
        "script=/cgi",
        "path_info=/some/path",
        "query=a=1&b=2",
        "header=yes",
        "greeting=hello",
        "arg=a=1",
        "arg=b=2",
        "body=the body",
    ] {
        assert!(
            response.body.lines().any(|l| l == line),
            "{line} in {}",
            response.body
        );
    }
    assert_eq!(server.get("/cgi/fail").status, 500);
    assert_eq!(server.get("/cgi/garbage").status, 502);
    let redirect = server.get("/cgi/redirect");
    assert_eq!(
        (redirect.status, redirect.header("location")),
        (302, "/elsewhere")
    );
    // The longest route wins; the rest goes to the component.
    assert_eq!(server.get("/cgiother").json()["path"], "/cgiother");
    let metrics = server.metrics();
    assert_eq!(
        metrics.of("samepage_cold_starts_total", "cgi", "default"),
        4.0
    );
    assert_eq!(
        metrics.of("samepage_function_instances", "cgi", "default"),
        0.0
    );
}

/// The small component's answer: (requests its instance served, the path it saw).
fn small_answer(response: &Response) -> (u64, String) {
    assert_eq!(response.status, 200, "{}", response.body);
    let line = response.body.trim();
    let rest = line
        .strip_prefix("small served=")
        .unwrap_or_else(|| panic!("{line}"));
    let (served, path) = rest
        .split_once(" path=")
        .unwrap_or_else(|| panic!("{line}"));
    (served.parse().expect("a count"), path.to_owned())
}

#[test]
fn routes_go_by_host_name_then_the_longest_path_prefix() {
    let small = built(SMALL, "build-http-components");
    let function = |name: &str, route: &str| {
        format!(
            "[[function]]\nname = \"{name}\"\n{route}\ncomponent = \"{}\"\n",
            small.display()
        )
    };
    let server = Server::config(
        "routes",
        &[
            function("root", "route = \"/\""),
            function("api", "route = \"/api\""),
            function("api-v2", "route = \"/api/v2/\""),
            function("tenant-site", "host = \"site.example\""),
            function("tenant-api", "host = \"site.example\"\nroute = \"/api\""),
        ]
        .concat(),
    );
    let cases = [
        ("localhost", "/", "root"),
        ("localhost", "/apiary", "root"),
        ("localhost", "/api", "api"),
        ("localhost", "/api/v1/x?q=1", "api"),
        ("localhost", "/api/v2", "api-v2"),
        ("localhost", "/api/v2/deeper", "api-v2"),
        ("site.example", "/", "tenant-site"),
        ("SITE.example:8080", "/anything", "tenant-site"),
        ("site.example", "/api/v2", "tenant-api"),
    ];
    for (host, path, _) in cases {
        let response = request(&server.addr, "GET", path, &[("Host", host)], b"");
        assert_eq!(small_answer(&response).1, path, "{host} {path}");
    }
    let metrics = server.metrics();
    for name in ["root", "api", "api-v2", "tenant-site", "tenant-api"] {
        let expected = cases.iter().filter(|(_, _, to)| *to == name).count() as f64;
        let got = metrics.of("samepage_requests_total", name, "default");
        assert_eq!(got, expected, "requests routed to {name}");
    }
}

#[test]
fn pools_are_prewarmed_to_their_minimum_and_idle_instances_expire() {
    let small = built(SMALL, "build-http-components");
    let server = Server::config(
        "pools",
        &format!(
            "[[function]]\nname = \"kept\"\nroute = \"/kept\"\ncomponent = \"{0}\"\n\
             min_instances = 2\nidle_timeout = \"200ms\"\nreuse = \"warm\"\n\
             [[function]]\nname = \"brief\"\nroute = \"/brief\"\ncomponent = \"{0}\"\n\
             idle_timeout = \"200ms\"\nreuse = \"warm\"\n",
            small.display()
        ),
    );
    // Made before serving: the first request is a warm start.
    let metrics = server.metrics();
    assert_eq!(
        metrics.of("samepage_prewarmed_total", "kept", "default"),
        2.0
    );
    assert_eq!(
        metrics.of("samepage_function_idle_instances", "kept", "default"),
        2.0
    );
    assert_eq!(small_answer(&server.get("/kept/x")).0, 1);
    assert_eq!(small_answer(&server.get("/brief/x")).0, 1);
    let metrics = server.metrics();
    assert_eq!(
        metrics.of("samepage_warm_starts_total", "kept", "default"),
        1.0
    );
    assert_eq!(
        metrics.of("samepage_cold_starts_total", "brief", "default"),
        1.0
    );
    // Idle past its timeout, brief's instance goes; kept keeps its two.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let metrics = server.metrics();
        if metrics.of("samepage_expired_total", "brief", "default") == 1.0 {
            assert_eq!(
                metrics.of("samepage_function_instances", "brief", "default"),
                0.0
            );
            assert_eq!(
                metrics.of("samepage_function_instances", "kept", "default"),
                2.0
            );
            assert_eq!(metrics.of("samepage_expired_total", "kept", "default"), 0.0);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "brief's idle instance never expired"
        );
    }
}

#[test]
fn malformed_http_is_refused_and_the_server_serves_on() {
    let small = built(SMALL, "build-http-components");
    let server = Server::start(&[small.to_str().expect("UTF-8 path")]);
    let garbage: [&[u8]; 3] = [
        b"NOT HTTP AT ALL\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
    ];
    for bytes in garbage {
        let mut stream = TcpStream::connect(&server.addr).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        stream.write_all(bytes).unwrap();
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer);
        let answer = String::from_utf8_lossy(&answer);
        // hyper answers 400 or closes the connection; no function sees the request.
        assert!(
            answer.is_empty() || answer.starts_with("HTTP/1.1 400"),
            "{answer:?}"
        );
    }
    assert_eq!(
        small_answer(&server.get("/after-garbage")),
        (1, "/after-garbage".to_owned())
    );
    let metrics = server.metrics();
    assert_eq!(
        metrics.of("samepage_requests_total", "small", "default"),
        1.0
    );
}

/// `workers` clients at once, each sending `each` requests one after the other, the `n`th
/// request of all for `path(n)`; the answers in the order of `n`.
fn in_parallel(
    server: &Server,
    workers: usize,
    each: usize,
    path: impl Fn(usize) -> String + Sync,
) -> Vec<(String, Response)> {
    let mut answers: Vec<(usize, String, Response)> = std::thread::scope(|scope| {
        let path = &path;
        let clients: Vec<_> = (0..workers)
            .map(|worker| {
                scope.spawn(move || {
                    (0..each)
                        .map(|i| {
                            let n = worker * each + i;
                            let asked = path(n);
                            let response = server.get(&asked);
                            (n, asked, response)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        clients
            .into_iter()
            .flat_map(|c| c.join().expect("client"))
            .collect()
    });
    answers.sort_by_key(|(n, _, _)| *n);
    answers
        .into_iter()
        .map(|(_, asked, response)| (asked, response))
        .collect()
}

/// Every answer of the JavaScript component is its own request's, from an instance that
/// served no other (StarlingMonkey serves one request per instance).
fn assert_answered_right_by_fresh_instances(answers: &[(String, Response)]) {
    for (asked, response) in answers {
        assert_eq!(response.status, 200, "{asked}: {}", response.body);
        assert_eq!(
            response.header("content-type"),
            "application/json",
            "{asked}"
        );
        let answer = response.json();
        assert_eq!(answer["path"], asked.as_str(), "{asked}: {answer}");
        assert_eq!(answer["served"], 1, "{asked}: {answer}");
        assert_eq!(
            answer["stored"],
            serde_json::Value::Null,
            "{asked}: {answer}"
        );
    }
}

const SWITCHED: &str = "switched to per-request instances";

#[test]
fn a_javascript_component_is_served_right_by_default() {
    // componentize-js's runtime answers one request per instance: served with no option,
    // every request gets an instance of its own, and every answer is right.
    let server = Server::serving(JS, &[]);
    let answers = in_parallel(&server, 8, 25, |n| format!("/js/{n}"));
    assert_eq!(answers.len(), 200);
    assert_answered_right_by_fresh_instances(&answers);
    let metrics = server.metrics();
    assert_eq!(
        metrics.of("samepage_responses_2xx_total", "js-app", "default"),
        200.0
    );
    assert_eq!(
        metrics.of("samepage_responses_5xx_total", "js-app", "default"),
        0.0
    );
    assert_eq!(
        metrics.function("samepage_reuse_fallbacks_total", "js-app"),
        0.0
    );
    assert!(!server.stderr.lock().contains(SWITCHED));
}

#[test]
fn a_component_that_fails_on_a_reused_instance_is_switched_to_per_request_instances() {
    // Warm reuse forced on a component that cannot serve twice: the first reused instance
    // fails its request, the function goes to per-request instances (said once), and the
    // GET is served again on a fresh instance, so that no client sees the failure.
    let server = Server::serving(JS, &["--reuse", "warm"]);
    let sequential: Vec<(String, Response)> = (0..50)
        .map(|n| {
            let asked = format!("/sequential/{n}");
            let response = server.get(&asked);
            (asked, response)
        })
        .collect();
    assert_answered_right_by_fresh_instances(&sequential);
    let concurrent = in_parallel(&server, 10, 5, |n| format!("/concurrent/{n}"));
    assert_answered_right_by_fresh_instances(&concurrent);

    let stderr = server.stderr.lock().clone();
    let said: Vec<&str> = stderr.lines().filter(|l| l.contains(SWITCHED)).collect();
    assert_eq!(said.len(), 1, "{stderr}");
    assert!(
        said[0].contains("js-app"),
        "the function is named: {}",
        said[0]
    );
    assert!(
        said[0].len() > SWITCHED.len() + "js-app".len() + 16,
        "the reason is given: {}",
        said[0]
    );
    let metrics = server.metrics();
    assert_eq!(
        metrics.function("samepage_reuse_fallbacks_total", "js-app"),
        1.0
    );
    let retries = metrics.function("samepage_retries_total", "js-app");
    assert!(retries >= 1.0, "{retries} retries");
    assert_eq!(
        metrics.of("samepage_responses_2xx_total", "js-app", "default"),
        100.0
    );
}

/// What a component's instances let the next request see: `/store?value=...`, then `/read`,
/// a few times; the values `/read` answered.
fn read_after_store(server: &Server, rounds: usize) -> Vec<String> {
    (0..rounds)
        .map(|round| {
            let secret = format!("secret-{round}");
            let stored = server.get(&format!("/store?value={secret}"));
            assert_eq!(
                (stored.status, stored.body.as_str()),
                (200, secret.as_str())
            );
            let read = server.get("/read");
            assert_eq!(read.status, 200, "{}", read.body);
            read.body
        })
        .collect()
}

#[test]
fn by_default_no_request_sees_what_another_left() {
    // Under the default, each request has an instance of its own: what one stores, the
    // next never reads, even with one instance at a time.
    for program in [COMPONENT, JS] {
        for args in [&[][..], &["--max-instances", "1"][..]] {
            let server = Server::serving(program, args);
            let read = read_after_store(&server, 3);
            assert!(
                read.iter().all(String::is_empty),
                "{program} {args:?}: the next request read {read:?}"
            );
        }
    }
}

#[test]
fn warm_reuse_lets_the_next_request_see_what_the_last_left() {
    // Warm reuse, asked for, keeps state across requests: the check of the default's
    // isolation sees it here, so that it can fail.
    let warm = Server::component(&["--reuse", "warm", "--max-instances", "1"]);
    assert_eq!(
        read_after_store(&warm, 3),
        ["secret-0", "secret-1", "secret-2"]
    );
}

#[test]
fn a_handler_that_waits_holds_its_turn_to_run_for_one_quantum_at_most() {
    let component = built(COMPONENT, "build-http-components");
    // One handler runs at a time; three sleep for 4 s each (a handler that waits, as on a
    // slow client). A request sent while they sleep is answered long before they wake: each
    // gave its turn up after 50 ms.
    let server = Server::config(
        "running-handlers",
        &format!(
            "[server]\nrunning_handlers = 1\n\
             [[function]]\nname = \"py\"\nroute = \"/\"\ncomponent = \"{}\"\nmin_instances = 4\n",
            component.display()
        ),
    );
    std::thread::scope(|scope| {
        let sleepers: Vec<_> = (0..3)
            .map(|_| scope.spawn(|| server.get("/sleep?ms=4000")))
            .collect();
        std::thread::sleep(Duration::from_millis(500));
        let asked = Instant::now();
        let answer = server.get("/");
        let waited = asked.elapsed();
        assert_eq!(answer.status, 200);
        assert!(
            waited < Duration::from_millis(2500),
            "a request waited {waited:?} behind handlers that sleep"
        );
        for sleeper in sleepers {
            assert_eq!(sleeper.join().expect("sleeper").status, 200);
        }
    });
}
