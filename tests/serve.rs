//! `samepage serve` on a real Python wasi:http component (`examples/http/app.py`, built by
//! `scripts/build-http-components`), over HTTP/1.1 on an ephemeral loopback port: warm reuse
//! and fresh instances, concurrent requests, a trap answering 500 with the next request
//! served, and SIGTERM.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const COMPONENT: &str = "target/http-components/python-app.wasm";

/// A running `samepage serve` and the address it listens on.
struct Server {
    child: Child,
    addr: String,
}

impl Server {
    fn start(options: &[&str]) -> Self {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        assert!(
            root.join(COMPONENT).exists(),
            "{COMPONENT} is missing: run scripts/build-http-components"
        );
        let mut child = Command::new(env!("CARGO_BIN_EXE_samepage"))
            .arg("serve")
            .args(["--addr", "127.0.0.1:0"])
            .args(options)
            .arg(COMPONENT)
            .current_dir(root)
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn samepage serve");
        let mut stderr = BufReader::new(child.stderr.take().expect("stderr"));
        let mut line = String::new();
        let addr = loop {
            line.clear();
            let read = stderr.read_line(&mut line).expect("read stderr");
            assert!(read > 0, "samepage serve ended before serving");
            if let Some(addr) = line.trim().strip_prefix("samepage: serving http://") {
                break addr.to_owned();
            }
        };
        // Keep draining stderr so that the server never blocks on it.
        std::thread::spawn(move || {
            let mut rest = String::new();
            let _ = stderr.read_to_string(&mut rest);
            rest
        });
        Self { child, addr }
    }

    /// GET `path`: the status and the body.
    fn get(&self, path: &str) -> (u16, String) {
        let mut stream = TcpStream::connect(&self.addr).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(120)))
            .expect("timeout");
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            self.addr
        )
        .expect("request");
        let mut response = String::new();
        stream.read_to_string(&mut response).expect("response");
        let status = response
            .split(' ')
            .nth(1)
            .and_then(|code| code.parse().ok())
            .unwrap_or_else(|| panic!("no status line in {response:?}"));
        let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
        let chunked = head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked");
        (
            status,
            if chunked {
                dechunk(body)
            } else {
                body.to_owned()
            },
        )
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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

/// The `served` count in the component's answer: how many requests its instance served.
fn served(body: &str) -> u64 {
    let value: serde_json::Value =
        serde_json::from_str(body.trim()).unwrap_or_else(|e| panic!("{e}: {body:?}"));
    value["served"].as_u64().expect("served")
}

#[test]
fn warm_instances_are_reused_and_a_trap_is_a_500() {
    let server = Server::start(&[]);
    let (status, body) = server.get("/hello?x=1");
    assert_eq!(status, 200, "{body}");
    assert_eq!(served(&body), 1);
    assert!(body.contains("\"entries\": 20000"), "{body}");
    // One request at a time: the same warm instance serves the next.
    let (status, body) = server.get("/again");
    assert_eq!((status, served(&body)), (200, 2));

    let (status, body) = server.get("/trap");
    assert_eq!(status, 500, "{body}");
    assert!(body.contains("trapped"), "{body}");
    // The trapped instance is gone; the warm one that is left serves on.
    let (status, body) = server.get("/after-the-trap");
    assert_eq!(status, 200, "{body}");

    // Concurrent requests: each instance serves one at a time, more are started.
    let answers: Vec<(u16, String)> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..6)
            .map(|n| {
                scope.spawn({
                    let server = &server;
                    move || server.get(&format!("/concurrent/{n}"))
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("worker"))
            .collect()
    });
    for (status, body) in &answers {
        assert_eq!(*status, 200, "{body}");
        assert!(body.contains("/concurrent/"), "{body}");
    }
}

#[test]
fn fresh_instances_serve_one_request_each_and_sigterm_stops_the_server() {
    let mut server = Server::start(&["--reuse", "fresh"]);
    for path in ["/one", "/two", "/three"] {
        let (status, body) = server.get(path);
        assert_eq!((status, served(&body)), (200, 1), "{body}");
    }
    rustix::process::kill_process(
        rustix::process::Pid::from_child(&server.child),
        rustix::process::Signal::TERM,
    )
    .expect("SIGTERM");
    let status = server.child.wait().expect("wait");
    assert!(status.success(), "{status:?}");
}
