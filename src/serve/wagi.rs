//! WASI preview 1 commands served as WAGI (the WebAssembly Gateway Interface) defines it,
//! after CGI (RFC 3875): the request goes in as environment variables (`REQUEST_METHOD`,
//! `PATH_INFO`, `QUERY_STRING`, `HTTP_*` for each header, ...), its query parameters as
//! arguments and its body on stdin; the command's stdout is the response, CGI headers
//! (`Content-Type`, `Location`, `Status`) then a blank line then the body.
//!
//! A command runs its `_start` once, with an environment that WASI fixes when the instance
//! is made: every request gets an instance of its own, made from the module's image.

use bytes::Bytes;
use samepage_runtime::StoreOwner;
use wasmtime::{Linker, Store, StoreLimits};
use wasmtime_wasi::I32Exit;
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::pipe::{MemoryInputPipe, MemoryOutputPipe};

use super::config::FunctionConfig;
use super::failure::Failure;
use super::wasi::wasi_context;

/// Most bytes of a request body handed to a command, and of its output.
pub const BODY_LIMIT: usize = 16 << 20;

/// What a WAGI command's store holds.
pub struct WagiState {
    wasi: WasiP1Ctx,
    limits: StoreLimits,
}

pub fn linker(engine: &wasmtime::Engine) -> wasmtime::Result<Linker<WagiState>> {
    let mut linker = Linker::new(engine);
    wasmtime_wasi::p1::add_to_linker_sync(&mut linker, |state: &mut WagiState| &mut state.wasi)?;
    Ok(linker)
}

/// The parts of a request a command sees.
pub struct CgiRequest {
    pub method: String,
    /// The path and query as the client sent them.
    pub uri: hyper::Uri,
    pub headers: hyper::HeaderMap,
    pub body: Bytes,
    pub client: std::net::SocketAddr,
    pub server: std::net::SocketAddr,
}

impl CgiRequest {
    /// CGI's meta-variables for `function`, whose route matched the request (set after the
    /// function's own environment, so that they win).
    fn environment(&self, function: &FunctionConfig) -> Vec<(String, String)> {
        let path = self.uri.path();
        let script = function.route.prefix.trim_end_matches('/');
        let path_info = path.strip_prefix(script).unwrap_or(path);
        let host = self
            .headers
            .get(hyper::header::HOST)
            .and_then(|host| host.to_str().ok())
            .unwrap_or("");
        let mut env: Vec<(String, String)> = Vec::new();
        let mut set = |name: &str, value: &str| env.push((name.to_owned(), value.to_owned()));
        set("GATEWAY_INTERFACE", "CGI/1.1");
        set(
            "SERVER_SOFTWARE",
            concat!("samepage/", env!("CARGO_PKG_VERSION")),
        );
        set("SERVER_PROTOCOL", "HTTP/1.1");
        set(
            "SERVER_NAME",
            host.rsplit_once(':').map_or(host, |(name, _)| name),
        );
        set("SERVER_PORT", &self.server.port().to_string());
        set("REQUEST_METHOD", &self.method);
        set("SCRIPT_NAME", script);
        set("PATH_INFO", path_info);
        set("X_RAW_PATH_INFO", path_info);
        set("PATH_TRANSLATED", path_info);
        set("X_MATCHED_ROUTE", &function.route.prefix);
        set("QUERY_STRING", self.uri.query().unwrap_or(""));
        set("REMOTE_ADDR", &self.client.ip().to_string());
        set("REMOTE_HOST", &self.client.ip().to_string());
        set("X_FULL_URL", &format!("http://{host}{}", self.uri));
        set("CONTENT_LENGTH", &self.body.len().to_string());
        if let Some(kind) = self.headers.get(hyper::header::CONTENT_TYPE) {
            set("CONTENT_TYPE", kind.to_str().unwrap_or(""));
        }
        for (name, value) in &self.headers {
            // CGI hands these over as CONTENT_* above, and never passes credentials.
            if name == hyper::header::CONTENT_TYPE
                || name == hyper::header::CONTENT_LENGTH
                || name == hyper::header::AUTHORIZATION
            {
                continue;
            }
            let Ok(value) = value.to_str() else { continue };
            let name = format!(
                "HTTP_{}",
                name.as_str().to_ascii_uppercase().replace('-', "_")
            );
            env.push((name, value.to_owned()));
        }
        env
    }

    /// argv: the script's name, then each query parameter, as WAGI passes them.
    fn arguments(&self, function: &FunctionConfig) -> Vec<String> {
        let mut args = vec![function.route.prefix.clone()];
        if let Some(query) = self.uri.query() {
            args.extend(
                query
                    .split('&')
                    .filter(|p| !p.is_empty())
                    .map(str::to_owned),
            );
        }
        args
    }
}

/// Runs `module` for `request` in a new instance with `owner`'s memories; the response is
/// what its stdout says.
pub fn run(
    engine: &wasmtime::Engine,
    linker: &Linker<WagiState>,
    module: &samepage_runtime::Module,
    owner: &StoreOwner,
    function: &FunctionConfig,
    request: &CgiRequest,
) -> Result<hyper::Response<Bytes>, Failure> {
    let stdout = MemoryOutputPipe::new(BODY_LIMIT);
    let mut wasi = wasi_context(function)?;
    wasi.args(&request.arguments(function))
        .envs(&request.environment(function))
        .stdin(MemoryInputPipe::new(request.body.clone()))
        .stdout(stdout.clone());
    let limits = function.limits();
    let mut store = Store::new(
        engine,
        WagiState {
            wasi: wasi.build_p1(),
            limits: limits.store_limits(),
        },
    );
    store.limiter(|state| &mut state.limits);
    limits
        .apply(&mut store)
        .map_err(|error| Failure::Internal(format!("{error:#}")))?;
    let instance = owner
        .instantiate(&mut store, linker, module)
        .map_err(|error| Failure::Instantiate(crate::cli::causes_once(&error.into())))?;
    let start = instance
        .get_typed_func::<(), ()>(&mut store, "_start")
        .map_err(|_| {
            Failure::Instantiate("the module is not a WASI command: it exports no _start".into())
        })?;
    match start.call(&mut store, ()) {
        Ok(()) => {}
        Err(error) => match error.downcast_ref::<I32Exit>() {
            Some(I32Exit(0)) => {}
            Some(I32Exit(code)) => {
                return Err(Failure::Trapped(format!(
                    "the command exited with status {code}"
                )));
            }
            None => {
                return Err(match error.downcast_ref::<wasmtime::Trap>() {
                    Some(wasmtime::Trap::Interrupt) => Failure::TimedOut(limits.timeout),
                    _ => Failure::Trapped(format!("{error:#}")),
                });
            }
        },
    }
    drop(store);
    parse_response(&stdout.contents())
}

/// A command's output as an HTTP response: CGI header lines up to a blank line, then the
/// body. Without `Status`, a `Location` redirects (302) and anything else is 200; a response
/// with neither `Content-Type` nor `Location` is not one.
fn parse_response(output: &[u8]) -> Result<hyper::Response<Bytes>, Failure> {
    let invalid = |why: &str| {
        Failure::BadResponse(format!("the command's output is not a CGI response: {why}"))
    };
    let (head, body) =
        find_blank_line(output).ok_or_else(|| invalid("no blank line ends its headers"))?;
    let head = std::str::from_utf8(head).map_err(|_| invalid("its headers are not UTF-8"))?;
    let mut response = hyper::Response::builder();
    let mut status = None;
    let mut located = false;
    let mut typed = false;
    for line in head.lines() {
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| invalid(&format!("{line:?} is not a header")))?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("status") {
            let code = value.split_whitespace().next().unwrap_or("");
            status = Some(
                code.parse::<u16>()
                    .ok()
                    .and_then(|code| hyper::StatusCode::from_u16(code).ok())
                    .ok_or_else(|| invalid(&format!("Status {value:?}")))?,
            );
            continue;
        }
        located |= name.eq_ignore_ascii_case("location");
        typed |= name.eq_ignore_ascii_case("content-type");
        response = response.header(name.trim(), value);
    }
    if !located && !typed {
        return Err(invalid("it has neither Content-Type nor Location"));
    }
    let status = status.unwrap_or(if located {
        hyper::StatusCode::FOUND
    } else {
        hyper::StatusCode::OK
    });
    response
        .status(status)
        .body(Bytes::copy_from_slice(body))
        .map_err(|error| invalid(&error.to_string()))
}

/// The headers and the body either side of the first empty line (`\n\n` or `\r\n\r\n`).
fn find_blank_line(output: &[u8]) -> Option<(&[u8], &[u8])> {
    let mut at = 0;
    while at < output.len() {
        let end = output[at..]
            .iter()
            .position(|&b| b == b'\n')
            .map(|n| at + n)?;
        let line = &output[at..end];
        if line.is_empty() || line == b"\r" {
            return Some((&output[..at], &output[end + 1..]));
        }
        at = end + 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgi_output_becomes_a_response() {
        let response = parse_response(b"Content-Type: text/plain\r\n\r\nhello").expect("valid");
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["content-type"], "text/plain");
        assert_eq!(response.body().as_ref(), b"hello");
        let redirect = parse_response(b"Location: /elsewhere\n\n").expect("valid");
        assert_eq!(redirect.status(), 302);
        let missing = parse_response(b"Status: 404 Not Found\nContent-Type: text/plain\n\nno")
            .expect("valid");
        assert_eq!(missing.status(), 404);
        for bad in [
            &b"hello"[..],
            b"X-Only: 1\n\nbody",
            b"Status: nine\nContent-Type: a\n\n",
        ] {
            assert!(matches!(parse_response(bad), Err(Failure::BadResponse(_))));
        }
    }
}
