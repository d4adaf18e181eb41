//! `samepage serve`: a wasi:http host whose instances stay warm and merged.
//!
//! This is the first step of the serverless host: one `wasi:http/proxy` component, served
//! over HTTP/1.1 on hyper and tokio as `wasmtime serve` serves it, with a pool of warm
//! instances whose memories are samepage's (memfd memories, module images mapped, merged by
//! the scanner as each instance parks after a request).
//!
//! A request takes an idle instance from the pool, or instantiates one (a cold start), and
//! calls its `wasi:http/incoming-handler` on a blocking thread, one request at a time per
//! instance. After it, the instance goes back to the pool (`--reuse warm`, execution
//! environment reuse as serverless platforms document it), or is dropped (`--reuse fresh`,
//! `wasmtime serve`'s fresh instance per request). An instance whose handler trapped answers
//! 500 and is never reused. SIGTERM and SIGINT stop accepting, let the requests in flight
//! finish, and exit.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use clap::{Args, ValueEnum};
use http_body_util::{BodyExt, Full};
use parking_lot::Mutex;
use samepage_runtime::{Samepage, SamepageConfig};
use wasmtime::Store;
use wasmtime::component::{Linker, ResourceTable};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::io::TokioIo;
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;
use wasmtime_wasi_http::p2::bindings::sync::Proxy;
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

/// What becomes of an instance after a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Reuse {
    /// Back to the pool, to serve a later request as it is.
    Warm,
    /// Dropped: every request gets a new instance.
    Fresh,
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Where to listen.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub addr: SocketAddr,
    /// What becomes of an instance after a request.
    #[arg(long, value_enum, default_value_t = Reuse::Warm)]
    pub reuse: Reuse,
    /// Most idle instances kept warm; more are dropped after their request.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(0..=100_000))]
    pub max_idle: u32,
    /// Codegen options, as `wasmtime serve -C`: cache=y|n (wasmtime's compilation cache, on
    /// by default), cache-config=PATH.
    #[arg(short = 'C', value_name = "KEY=VALUE[,...]",
        value_parser = crate::run::settings::parse_codegen)]
    pub codegen: Vec<Vec<crate::run::settings::CodegenSetting>>,
    /// The wasi:http/proxy component to serve.
    #[arg(value_name = "COMPONENT")]
    pub component: PathBuf,
}

/// What a store of the server holds.
struct ServeState {
    wasi: WasiCtx,
    http: WasiHttpCtx,
    hooks: NoOutgoing,
    table: ResourceTable,
}

/// wasi:http's hooks with their defaults; without wasmtime-wasi-http's
/// `default-send-request`, a guest's outgoing requests fail (and the host needs no TLS).
struct NoOutgoing;

/// The body of an HTTP message as wasi:http holds it.
type WasiBody = http_body_util::combinators::UnsyncBoxBody<Bytes, wasmtime_wasi_http::Error>;

/// What an outgoing request resolves to in wasi:http's hooks.
type Sent = Result<
    (
        hyper::Response<WasiBody>,
        Box<dyn std::future::Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>,
    ),
    wasmtime_wasi_http::Error,
>;

impl wasmtime_wasi_http::WasiHttpHooks for NoOutgoing {
    fn send_request(
        &mut self,
        _request: hyper::Request<WasiBody>,
        _options: Option<wasmtime_wasi_http::RequestOptions>,
        _body_sent: Box<
            dyn std::future::Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send,
        >,
    ) -> Box<dyn std::future::Future<Output = Sent> + Send> {
        Box::new(async { Err(wasmtime_wasi_http::Error::HttpRequestDenied) })
    }
}

impl WasiView for ServeState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for ServeState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.hooks,
        }
    }
}

/// An instance of the component, with the store it lives in.
struct Warm {
    /// Its memories belong to a `StoreOwner` that the store's call hook holds.
    store: Store<ServeState>,
    proxy: Proxy,
}

/// Counters of the server's life.
#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    cold_starts: AtomicU64,
    warm_starts: AtomicU64,
    traps: AtomicU64,
    in_flight: AtomicU64,
}

struct Server {
    engine: wasmtime::Engine,
    samepage: Samepage,
    linker: Linker<ServeState>,
    component: samepage_runtime::Component,
    reuse: Reuse,
    max_idle: usize,
    idle: Mutex<Vec<Warm>>,
    counters: Counters,
}

pub fn serve(args: ServeArgs) -> Result<()> {
    let mut config = wasmtime::Config::new();
    let samepage = Samepage::configure(&mut config, SamepageConfig::default())
        .context("starting the merge engine")?;
    crate::run::settings::compilation_cache(&args.codegen)
        .configure(&mut config)
        .context("setting up the compilation cache")?;
    let engine = wasmtime::Engine::new(&config).map_err(wasm("starting wasmtime"))?;
    let bytes = std::fs::read(&args.component)
        .with_context(|| format!("reading {}", args.component.display()))?;
    let invalid = format!("{} is not a valid component", args.component.display());
    let component = samepage_runtime::Component::new(&engine, &bytes).map_err(wasm(&invalid))?;
    let mut linker = Linker::new(&engine);
    // All of WASI, as `wasmtime serve -S cli` gives it: interpreters built into components
    // (componentize-py's) import more than the proxy world's interfaces.
    wasmtime_wasi::p2::add_to_linker_sync(&mut linker).map_err(wasm("linking WASI"))?;
    wasmtime_wasi_http::p2::add_only_http_to_linker_sync(&mut linker)
        .map_err(wasm("linking wasi:http"))?;
    let server = Arc::new(Server {
        engine,
        samepage,
        linker,
        component,
        reuse: args.reuse,
        max_idle: args.max_idle as usize,
        idle: Mutex::new(Vec::new()),
        counters: Counters::default(),
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting tokio")?;
    runtime.block_on(server.listen(args.addr))
}

impl Server {
    /// Accepts connections until SIGTERM or SIGINT, then waits for the requests in flight.
    async fn listen(self: Arc<Self>, addr: SocketAddr) -> Result<()> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("listening on {addr}"))?;
        eprintln!("samepage: serving http://{}", listener.local_addr()?);
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .context("watching SIGTERM")?;
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let Ok((client, _)) = accepted else { continue };
                    let server = self.clone();
                    tokio::spawn(async move {
                        let service = hyper::service::service_fn(move |request| {
                            let server = server.clone();
                            async move { Ok::<_, Infallible>(server.answer(request).await) }
                        });
                        // Malformed HTTP is hyper's to refuse; the connection just ends.
                        let _ = hyper::server::conn::http1::Builder::new()
                            .keep_alive(true)
                            .serve_connection(TokioIo::new(client), service)
                            .await;
                    });
                }
                _ = terminate.recv() => break,
                _ = tokio::signal::ctrl_c() => break,
            }
        }
        drop(listener);
        while self.counters.in_flight.load(Ordering::Acquire) > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let c = &self.counters;
        eprintln!(
            "samepage: stopped after {} requests ({} cold starts, {} warm, {} trapped)",
            c.requests.load(Ordering::Relaxed),
            c.cold_starts.load(Ordering::Relaxed),
            c.warm_starts.load(Ordering::Relaxed),
            c.traps.load(Ordering::Relaxed)
        );
        Ok(())
    }

    /// The response to one request: the guest's, or 500 when it trapped or sent none.
    async fn answer(
        self: Arc<Self>,
        request: hyper::Request<hyper::body::Incoming>,
    ) -> hyper::Response<HyperOutgoingBody> {
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        self.counters.in_flight.fetch_add(1, Ordering::AcqRel);
        let (sender, receiver) = tokio::sync::oneshot::channel();
        let server = self.clone();
        // wasm runs on a blocking thread: one request at a time per instance, and the
        // owner's guard is a lock held across the call.
        let handled = tokio::task::spawn_blocking(move || server.handle(request, sender));
        let response = match receiver.await {
            Ok(Ok(response)) => response,
            Ok(Err(code)) => error_response(format!("the handler failed: {code:?}")),
            Err(_) => match handled.await {
                Ok(Err(error)) => error_response(crate::causes_once(&error)),
                _ => error_response("the handler sent no response".to_owned()),
            },
        };
        self.counters.in_flight.fetch_sub(1, Ordering::AcqRel);
        response
    }

    /// Runs the handler of a warm or new instance for `request`; its response goes to
    /// `sender`.
    fn handle(
        &self,
        request: hyper::Request<hyper::body::Incoming>,
        sender: tokio::sync::oneshot::Sender<
            Result<
                hyper::Response<HyperOutgoingBody>,
                wasmtime_wasi_http::p2::bindings::http::types::ErrorCode,
            >,
        >,
    ) -> Result<()> {
        let warm = self.idle.lock().pop();
        let mut warm = match warm {
            Some(warm) => {
                self.counters.warm_starts.fetch_add(1, Ordering::Relaxed);
                warm
            }
            None => {
                self.counters.cold_starts.fetch_add(1, Ordering::Relaxed);
                self.instantiate()?
            }
        };
        let mut http = warm.store.data_mut().http();
        let request = http
            .new_incoming_request(Scheme::Http, request)
            .map_err(wasm("reading the request"))?;
        let out = http
            .new_response_outparam(sender)
            .map_err(wasm("making the response"))?;
        let called =
            warm.proxy
                .wasi_http_incoming_handler()
                .call_handle(&mut warm.store, request, out);
        if let Err(error) = called {
            // Never reused: its memory may be anything.
            self.counters.traps.fetch_add(1, Ordering::Relaxed);
            return Err(wasm("the handler trapped")(error));
        }
        if self.reuse == Reuse::Warm {
            let mut idle = self.idle.lock();
            if idle.len() < self.max_idle {
                idle.push(warm);
            }
        }
        Ok(())
    }

    /// A new instance in a store of its own, its memories samepage's.
    fn instantiate(&self) -> Result<Warm> {
        let owner = self.samepage.owner(0);
        let mut store = Store::new(
            &self.engine,
            ServeState {
                wasi: WasiCtx::builder().inherit_stderr().build(),
                http: WasiHttpCtx::new(),
                hooks: NoOutgoing,
                table: ResourceTable::new(),
            },
        );
        let instance = owner
            .instantiate_component(&mut store, &self.linker, &self.component)
            .context("instantiating the component")?;
        let proxy = Proxy::new(&mut store, &instance).map_err(wasm(
            "the component does not export wasi:http/incoming-handler",
        ))?;
        Ok(Warm { store, proxy })
    }
}

/// A wasmtime error (wasmtime has its own error type) as an `anyhow` one, after `what`.
fn wasm(what: &str) -> impl FnOnce(wasmtime::Error) -> anyhow::Error + '_ {
    move |error| anyhow::anyhow!("{what}: {error:#}")
}

fn error_response(message: String) -> hyper::Response<HyperOutgoingBody> {
    let body = Full::new(Bytes::from(message + "\n"))
        .map_err(|never: Infallible| match never {})
        .boxed_unsync();
    let mut response = hyper::Response::new(body);
    *response.status_mut() = hyper::StatusCode::INTERNAL_SERVER_ERROR;
    response
}
