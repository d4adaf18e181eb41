//! `samepage serve`: a serverless host whose warm instances stay merged.
//!
//! It serves functions over HTTP/1.1 on hyper and tokio: `wasi:http/proxy` components, as
//! `wasmtime serve`, Spin and wasmCloud run them, and WASI preview 1 commands as WAGI
//! defines it (`wagi.rs`). Which function answers a request is its route: a host name, a
//! path prefix, or both (`config.rs`); a route for the request's host name wins over one for
//! any host, as virtual hosts do, then the longest prefix wins.
//!
//! Every instance's memories are samepage's: memfds, module images mapped, registered with
//! one merge engine. Each tenant is a merge domain unless the config joins tenants, so no
//! page is shared between tenants by default.
//!
//! # A request's life
//!
//! A request takes a permit of its function (at most `max_instances` at once) and then an
//! instance: the most recently parked idle one (a warm start), or a new one (a cold start)
//! once the memory budget has room for it (`pool.rs`). wasm runs on a blocking thread, one
//! request at a time per instance, with the request's deadline armed (epoch interruption)
//! and the instance's memory limit. Then, by the function's `reuse`:
//!
//! - `warm`: the instance parks in its function's pool, and the scanner merges what it
//!   wrote as it parks (scan on park); a new instance is merged at once, so that the budget
//!   counts it at its merged size;
//! - `reset`: the instance is dropped and a new one is made from the module image after the
//!   response, off the next request's path. Resetting memories in place would not do: a
//!   component's state is also in its globals, tables and resource handles;
//! - `fresh`: the instance is dropped, as `wasmtime serve` does.
//!
//! A trap or a timeout answers 500 and its instance is never reused. A request for which
//! no instance fits the budget gets 503. In the background, idle instances above
//! `min_instances` expire after `idle_timeout`, pools are topped up to `min_instances`
//! when memory allows, and the budget is enforced as warm instances grow.
//!
//! SIGTERM and SIGINT stop accepting, let the requests in flight finish (up to the drain
//! timeout), and exit 0.

mod config;
mod metrics;
mod pool;
mod proxy;
mod wagi;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::Args;
use http_body_util::{BodyExt, Full, Limited};
use samepage_dedup::EngineConfig;
use samepage_runtime::{EpochTicker, Samepage, SamepageConfig, StoreOwner};
use wasmtime_wasi_http::io::TokioIo;
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;

use config::{FunctionConfig, Program, Reuse, Route, ServeConfig};
use pool::{Budget, Code, Function, OverBudget};
use proxy::{ProxyInstance, ProxyState, WasiBody};
use wagi::WagiState;

use crate::cli::{LimitSetting, Switch, parse_bytes, parse_dir, parse_env};

#[derive(Args, Debug)]
#[command(
    after_help = "Serve one component with `samepage serve APP.wasm`, as `wasmtime serve`, or \
                  many functions with `samepage serve --config samepage.toml` (see \
                  docs/serve.md). Options given with --config override the file's [server] \
                  and [engine] tables; the function options are for one component."
)]
pub struct ServeArgs {
    /// The functions to serve, their routes, tenants, pools and limits, and the engine's
    /// knobs, as a TOML file.
    #[arg(long, value_name = "FILE.toml", conflicts_with = "component")]
    pub config: Option<PathBuf>,
    /// Where to serve requests [default: 127.0.0.1:8080].
    #[arg(long)]
    pub addr: Option<SocketAddr>,
    /// Where to serve /metrics (Prometheus text) and /healthz.
    #[arg(long)]
    pub admin_addr: Option<SocketAddr>,
    /// Most memory the host may hold, as the kernel counts it (PSS, after merging), such as
    /// 2GiB; idle instances are evicted, least recently used first, to stay within it.
    #[arg(long, value_parser = parse_bytes)]
    pub memory_budget: Option<u64>,
    /// Merge instances' memories (off: memfd memories never merged, to compare with).
    #[arg(long, value_enum)]
    pub dedup: Option<Switch>,

    /// What becomes of an instance after a request [default: warm for a component, fresh
    /// for a WAGI command, the only choice there].
    #[arg(long, value_enum, help_heading = "One component")]
    pub reuse: Option<Reuse>,
    /// Instances kept ready, made before serving.
    #[arg(long, default_value_t = 0, help_heading = "One component",
        value_parser = clap::value_parser!(u32).range(0..=100_000))]
    pub min_instances: u32,
    /// Most instances at once, busy and idle; requests beyond wait for one.
    #[arg(long, default_value_t = config::DEFAULT_MAX_INSTANCES as u32,
        help_heading = "One component", value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_instances: u32,
    /// How long an idle instance above --min-instances is kept (such as 30s, 5m).
    #[arg(long, help_heading = "One component",
        value_parser = crate::cli::parse_duration)]
    pub idle_timeout: Option<Duration>,
    /// A path each pre-warmed instance is sent a GET for before it waits for requests.
    #[arg(long, value_name = "PATH", help_heading = "One component")]
    pub warmup: Option<String>,
    /// Limits, as `wasmtime serve -W`: timeout=DURATION (per request), max-memory-size=BYTES
    /// (per linear memory).
    #[arg(short = 'W', value_name = "KEY=VALUE[,...]", help_heading = "One component",
        value_parser = crate::cli::parse_limit)]
    pub wasm: Vec<Vec<LimitSetting>>,
    /// Grant the component a host directory, as HOST or HOST::GUEST.
    #[arg(long = "dir", value_name = "HOST[::GUEST]", help_heading = "One component",
        value_parser = parse_dir)]
    pub dirs: Vec<(PathBuf, String)>,
    /// Set an environment variable, as NAME=VALUE, or NAME to pass on the host's value.
    #[arg(long = "env", value_name = "NAME[=VALUE]", help_heading = "One component",
        value_parser = parse_env)]
    pub envs: Vec<(String, Option<String>)>,
    /// Codegen options, as `wasmtime serve -C`: cache=y|n (wasmtime's compilation cache, on
    /// by default), cache-config=PATH.
    #[arg(short = 'C', value_name = "KEY=VALUE[,...]",
        value_parser = crate::cli::parse_codegen)]
    pub codegen: Vec<Vec<crate::cli::CodegenSetting>>,
    /// The wasi:http/proxy component (or WAGI command module) to serve at /.
    #[arg(value_name = "APP.wasm", required_unless_present = "config")]
    pub component: Option<PathBuf>,
}

impl ServeArgs {
    /// The configuration these arguments ask for: the file's, or one function's.
    fn serve_config(&self) -> Result<ServeConfig> {
        let mut config = match (&self.config, &self.component) {
            (Some(file), _) => config::read(file)?,
            (None, Some(component)) => self.one_function(component)?,
            (None, None) => bail!("give a component to serve, or --config FILE"),
        };
        if let Some(addr) = self.addr {
            config.addr = addr;
        }
        if self.admin_addr.is_some() {
            config.admin_addr = self.admin_addr;
        }
        if self.memory_budget.is_some() {
            config.memory_budget = self.memory_budget;
        }
        if let Some(dedup) = self.dedup {
            config.dedup = dedup == Switch::On;
        }
        Ok(config)
    }

    fn one_function(&self, component: &std::path::Path) -> Result<ServeConfig> {
        let mut request_timeout = None;
        let mut max_memory_size = None;
        for setting in self.wasm.iter().flatten() {
            match setting {
                LimitSetting::Timeout(timeout) => request_timeout = Some(*timeout),
                LimitSetting::MaxMemorySize(bytes) => max_memory_size = Some(*bytes),
                LimitSetting::Fuel(_) => {
                    bail!("-W fuel is not for serve: a request's limit is -W timeout")
                }
            }
        }
        let bytes =
            std::fs::read(component).with_context(|| format!("reading {}", component.display()))?;
        let program = if samepage_runtime::is_component(&bytes) {
            Program::Proxy(component.to_owned())
        } else {
            Program::Wagi(component.to_owned())
        };
        let wagi = matches!(program, Program::Wagi(_));
        let reuse = self
            .reuse
            .unwrap_or(if wagi { Reuse::Fresh } else { Reuse::Warm });
        if wagi && reuse != Reuse::Fresh {
            bail!(
                "{} is a core module, served as a WAGI command, which runs once per request: \
                 its --reuse can only be fresh",
                component.display()
            );
        }
        if wagi && self.min_instances > 0 {
            bail!(
                "{} is a WAGI command, instantiated for each request: it has no pool to \
                 pre-warm (--min-instances)",
                component.display()
            );
        }
        let env = crate::cli::environment(&self.envs);
        let function = FunctionConfig {
            name: component
                .file_stem()
                .map_or("app".into(), |stem| stem.to_string_lossy().into_owned()),
            route: Route {
                host: None,
                prefix: "/".into(),
            },
            program,
            tenant: config::DEFAULT_TENANT.into(),
            domain: 0,
            env,
            dirs: self.dirs.clone(),
            reuse,
            min_instances: self.min_instances as usize,
            max_instances: self.max_instances as usize,
            idle_timeout: self.idle_timeout.unwrap_or(config::DEFAULT_IDLE_TIMEOUT),
            request_timeout,
            max_memory_size,
            warmup: self.warmup.clone(),
            defined_at: config::Location {
                file: "command line".into(),
                line: 0,
                column: 0,
            },
        };
        if function.min_instances > function.max_instances {
            bail!("--min-instances is above --max-instances");
        }
        Ok(ServeConfig {
            addr: config::DEFAULT_ADDR
                .parse()
                .expect("the default address parses"),
            admin_addr: None,
            memory_budget: None,
            dedup: true,
            knobs: samepage_dedup::Knobs::default(),
            drain_timeout: config::DEFAULT_DRAIN_TIMEOUT,
            functions: vec![function],
        })
    }
}

/// Why a request got no response from its function.
#[derive(Debug)]
pub enum Failure {
    /// No instance could be made: the program's instantiation failed.
    Instantiate(String),
    /// The guest trapped, or a command exited with a failure status.
    Trapped(String),
    /// The request's time ran out in wasm.
    TimedOut(Option<Duration>),
    /// A WAGI command's output is not a CGI response (502, as a gateway answers).
    BadResponse(String),
    /// No instance fits the memory budget.
    OverBudget(OverBudget),
    /// The host failed around the guest.
    Internal(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Instantiate(why) => write!(f, "instantiating it failed: {why}"),
            Failure::Trapped(why) => write!(f, "it trapped: {why}"),
            Failure::TimedOut(Some(after)) => write!(f, "it timed out after {after:?}"),
            Failure::TimedOut(None) => write!(f, "it was interrupted"),
            Failure::BadResponse(why) => write!(f, "{why}"),
            Failure::OverBudget(over) => write!(f, "{over}"),
            Failure::Internal(why) => write!(f, "the host failed: {why}"),
        }
    }
}

impl Failure {
    /// The client's answer: the status, and a line saying what happened without the guest's
    /// internals (the host's log has those).
    fn response(&self) -> hyper::Response<HyperOutgoingBody> {
        let (status, message) = match self {
            Failure::Instantiate(_) => (500, "the function could not be instantiated".to_owned()),
            Failure::Trapped(_) => (500, "the function failed".to_owned()),
            Failure::TimedOut(_) => (500, self.to_string()),
            Failure::BadResponse(_) => (502, self.to_string()),
            Failure::OverBudget(_) => (503, self.to_string()),
            Failure::Internal(_) => (500, "the host failed".to_owned()),
        };
        let status = hyper::StatusCode::from_u16(status).expect("a valid status");
        let mut response = text_response(status, message);
        if let Failure::OverBudget(_) = self {
            response.headers_mut().insert(
                hyper::header::RETRY_AFTER,
                hyper::header::HeaderValue::from_static("1"),
            );
        }
        response
    }
}

/// Counters of the whole server.
#[derive(Default)]
pub struct ServerCounters {
    /// Requests being handled, wasm and the work after the response included.
    pub in_flight: AtomicU64,
    /// Requests no function's route matched.
    pub unrouted: AtomicU64,
}

/// The server: one wasmtime engine and merge engine, and its functions.
pub struct Server {
    engine: wasmtime::Engine,
    samepage: Samepage,
    proxy_linker: wasmtime::component::Linker<ProxyState>,
    wagi_linker: wasmtime::Linker<WagiState>,
    pub functions: Vec<Arc<Function>>,
    pub budget: Budget,
    pub counters: ServerCounters,
    /// Set by SIGTERM: /healthz says so, and the pools stop topping up.
    draining: AtomicBool,
    started: Instant,
    /// Advances the epoch for request timeouts, when a function has one.
    _ticker: Option<EpochTicker>,
}

pub fn serve(args: ServeArgs) -> Result<()> {
    let config = args.serve_config()?;
    if let Some(budget) = config.memory_budget {
        let pss = crate::measure::pss_bytes()
            .context("the memory budget is counted in PSS, which this host cannot read")?;
        if pss >= budget {
            bail!(
                "the memory budget ({} MiB) is below what the host holds before serving \
                 ({} MiB of PSS)",
                budget >> 20,
                pss >> 20
            );
        }
    }
    let mut wasm_config = wasmtime::Config::new();
    let samepage = Samepage::configure(
        &mut wasm_config,
        SamepageConfig {
            dedup: config.dedup,
            engine_config: EngineConfig {
                knobs: config.knobs.clone(),
                ..EngineConfig::default()
            },
            merge_on_instantiate: config.dedup,
        },
    )
    .context("starting the merge engine")?;
    let timeouts = config.functions.iter().any(|f| f.request_timeout.is_some());
    if timeouts {
        wasm_config.epoch_interruption(true);
    }
    crate::cli::compilation_cache(&args.codegen)
        .configure(&mut wasm_config)
        .context("setting up the compilation cache")?;
    let engine = wasmtime::Engine::new(&wasm_config).map_err(wasm("starting wasmtime"))?;
    let mut functions = Vec::new();
    // Functions of one program share its compiled code (and so its module images, and
    // the pages of its code): compiled once per file.
    let mut compiled: std::collections::BTreeMap<(PathBuf, bool), Code> = Default::default();
    for function in config.functions {
        let path = function.program.path();
        let wagi = matches!(function.program, Program::Wagi(_));
        let key = (
            std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned()),
            wagi,
        );
        let code = match compiled.get(&key) {
            Some(code) => code.clone(),
            None => {
                let code = compile(&engine, &samepage, &function)?;
                compiled.insert(key, code.clone());
                code
            }
        };
        functions.push(Arc::new(Function::new(function, code)));
    }
    let server = Arc::new(Server {
        proxy_linker: proxy::linker(&engine).map_err(wasm("linking wasi:http"))?,
        wagi_linker: wagi::linker(&engine).map_err(wasm("linking WASI"))?,
        _ticker: timeouts
            .then(|| EpochTicker::start(&engine))
            .transpose()
            .context("starting the epoch thread")?,
        engine,
        samepage,
        functions,
        budget: Budget::new(config.memory_budget),
        counters: ServerCounters::default(),
        draining: AtomicBool::new(false),
        started: Instant::now(),
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting tokio")?;
    runtime.block_on(server.run(config.addr, config.admin_addr, config.drain_timeout))
}

/// Compiles a function's program, with errors that say which function and where.
fn compile(
    engine: &wasmtime::Engine,
    samepage: &Samepage,
    function: &FunctionConfig,
) -> Result<Code> {
    let path = function.program.path();
    let at = &function.defined_at;
    let bytes = std::fs::read(path).map_err(|error| {
        at.error(format!(
            "function {:?}: reading {}: {error}",
            function.name,
            path.display()
        ))
    })?;
    let program = samepage.compile(engine, &bytes).map_err(|error| {
        at.error(format!(
            "function {:?}: {} is not valid: {error:#}",
            function.name,
            path.display()
        ))
    })?;
    match (&function.program, program) {
        (Program::Proxy(_), samepage_runtime::Program::Component(component)) => {
            Ok(Code::Proxy(component))
        }
        (Program::Wagi(_), samepage_runtime::Program::Module(module)) => Ok(Code::Wagi(module)),
        (Program::Proxy(_), _) => Err(at
            .error(format!(
                "function {:?}: {} is a core module, not a component: give it as `module` (WAGI)",
                function.name,
                path.display()
            ))
            .into()),
        (Program::Wagi(_), _) => Err(at
            .error(format!(
                "function {:?}: {} is a component, not a core module: give it as `component`",
                function.name,
                path.display()
            ))
            .into()),
    }
}

/// Counts a request in flight until dropped.
struct InFlight(Arc<Server>);

impl InFlight {
    fn new(server: &Arc<Server>) -> Self {
        server.counters.in_flight.fetch_add(1, Ordering::AcqRel);
        Self(server.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.counters.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Server {
    /// Pre-warms the pools, then serves until SIGTERM or SIGINT, then drains.
    async fn run(
        self: Arc<Self>,
        addr: SocketAddr,
        admin_addr: Option<SocketAddr>,
        drain_timeout: Duration,
    ) -> Result<()> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("listening on {addr}"))?;
        let admin = match admin_addr {
            Some(addr) => Some(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("listening on {addr} (the admin address)"))?,
            ),
            None => None,
        };
        let server = self.clone();
        tokio::task::spawn_blocking(move || server.prewarm_all())
            .await
            .context("pre-warming")?;
        let pool_keeper = {
            let server = self.clone();
            let runtime = tokio::runtime::Handle::current();
            std::thread::Builder::new()
                .name("samepage-pools".into())
                .spawn(move || {
                    let _runtime = runtime.enter();
                    server.keep_pools();
                })
                .context("starting the pool keeper")?
        };
        if let Some(admin) = admin {
            eprintln!("samepage: admin http://{}", admin.local_addr()?);
            tokio::spawn(metrics::serve_admin(self.clone(), admin));
        }
        let local = listener.local_addr()?;
        eprintln!("samepage: serving http://{local}");
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .context("watching SIGTERM")?;
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let Ok((client, peer)) = accepted else { continue };
                    // A response's head and body go out in separate writes: without this,
                    // Nagle's algorithm holds the body for the client's delayed ACK (40 ms).
                    let _ = client.set_nodelay(true);
                    let server = self.clone();
                    tokio::spawn(async move {
                        let service = hyper::service::service_fn(move |request| {
                            let server = server.clone();
                            async move {
                                Ok::<_, Infallible>(server.answer(request, peer, local).await)
                            }
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
        self.draining.store(true, Ordering::Release);
        let deadline = Instant::now() + drain_timeout;
        while self.counters.in_flight.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let left = self.counters.in_flight.load(Ordering::Acquire);
        let _ = pool_keeper.join();
        let (mut requests, mut cold, mut warm, mut evicted, mut failed) = (0, 0, 0, 0, 0);
        for function in &self.functions {
            let c = &function.counters;
            requests += c.requests.load(Ordering::Relaxed);
            cold += c.cold_starts.load(Ordering::Relaxed);
            warm += c.warm_starts.load(Ordering::Relaxed);
            evicted += c.evictions.load(Ordering::Relaxed);
            failed += c.traps.load(Ordering::Relaxed) + c.timeouts.load(Ordering::Relaxed);
        }
        eprintln!(
            "samepage: stopped after {requests} requests ({cold} cold starts, {warm} warm, \
             {evicted} evictions, {failed} trapped or timed out{})",
            if left > 0 {
                format!("; {left} still running at the drain timeout")
            } else {
                String::new()
            }
        );
        Ok(())
    }

    /// The function whose route matches best: one for the request's host name before one for
    /// any host (as virtual hosts), then the longest path prefix.
    fn route(&self, host: Option<&str>, path: &str) -> Option<&Arc<Function>> {
        self.functions
            .iter()
            .filter_map(|function| Some((function.config.route.matches(host, path)?, function)))
            .max_by_key(|(length, function)| (function.config.route.host.is_some(), *length))
            .map(|(_, function)| function)
    }

    /// The response to one request.
    async fn answer(
        self: Arc<Self>,
        request: hyper::Request<hyper::body::Incoming>,
        client: SocketAddr,
        local: SocketAddr,
    ) -> hyper::Response<HyperOutgoingBody> {
        let arrived = Instant::now();
        let host = request
            .uri()
            .authority()
            .map(|authority| authority.as_str().to_owned())
            .or_else(|| {
                let host = request.headers().get(hyper::header::HOST)?;
                Some(host.to_str().ok()?.to_owned())
            });
        let Some(function) = self.route(host.as_deref(), request.uri().path()).cloned() else {
            self.counters.unrouted.fetch_add(1, Ordering::Relaxed);
            return text_response(
                hyper::StatusCode::NOT_FOUND,
                "no function serves this path".into(),
            );
        };
        function.counters.requests.fetch_add(1, Ordering::Relaxed);
        let in_flight = InFlight::new(&self);
        let response = match &function.code {
            Code::Proxy(_) => self.answer_proxy(&function, request, in_flight).await,
            Code::Wagi(_) => {
                self.answer_wagi(&function, request, client, local, in_flight)
                    .await
            }
        };
        let class = match response.status().as_u16() {
            400..=499 => &function.counters.responses_4xx,
            500..=599 => &function.counters.responses_5xx,
            _ => &function.counters.responses_2xx,
        };
        class.fetch_add(1, Ordering::Relaxed);
        function.latency.observe(arrived.elapsed().as_secs_f64());
        response
    }

    async fn answer_proxy(
        self: &Arc<Self>,
        function: &Arc<Function>,
        request: hyper::Request<hyper::body::Incoming>,
        in_flight: InFlight,
    ) -> hyper::Response<HyperOutgoingBody> {
        let Ok(permit) = function.permits.clone().acquire_owned().await else {
            return Failure::Internal("the function's pool is closed".into()).response();
        };
        let request =
            request.map(|body| body.map_err(wasmtime_wasi_http::Error::from).boxed_unsync());
        let (sender, receiver) = tokio::sync::oneshot::channel();
        let (server, function) = (self.clone(), function.clone());
        let handled = tokio::task::spawn_blocking(move || {
            let _held = (permit, in_flight);
            let served = server.serve_proxy(&function, request, sender);
            if let Err(failure) = &served {
                eprintln!("samepage: function {}: {failure}", function.config.name);
            }
            served
        });
        match receiver.await {
            Ok(Ok(response)) => response,
            Ok(Err(code)) => {
                Failure::Trapped(format!("the handler answered with an error: {code:?}")).response()
            }
            Err(_) => match handled.await {
                Ok(Err(failure)) => failure.response(),
                _ => Failure::Trapped("the handler sent no response".into()).response(),
            },
        }
    }

    /// Serves `request` with an instance of `function` (on a blocking thread), then parks,
    /// replaces or drops it by the function's `reuse`.
    fn serve_proxy(
        &self,
        function: &Arc<Function>,
        request: hyper::Request<WasiBody>,
        sender: proxy::ResponseSender,
    ) -> Result<(), Failure> {
        let (mut instance, room) = match function.take_idle() {
            Some(instance) => {
                function
                    .counters
                    .warm_starts
                    .fetch_add(1, Ordering::Relaxed);
                (instance, None)
            }
            None => {
                let room = self.cold_start(function)?;
                (self.instantiate(function)?, Some(room))
            }
        };
        if let Err(failure) = instance.handle(request, sender) {
            function.count_failure(&failure);
            function.retire(instance);
            return Err(failure);
        }
        match function.config.reuse {
            Reuse::Warm => {
                // Parked first: a request that takes it while it is merged waits only for
                // the owner's guard, not for a cold start.
                let owner = instance.owner.clone();
                function.park(instance);
                if let Some(room) = room {
                    self.settle_new(function, &owner, room);
                }
            }
            Reuse::Reset => {
                drop(room);
                function.retire(instance);
                if !self.draining.load(Ordering::Acquire) {
                    // Over budget, the next request makes its own (evicting as it may).
                    let _ = self.prewarm(function);
                }
            }
            Reuse::Fresh => {
                if let Some(before) = room.as_ref().and_then(|room| room.pss_before) {
                    let after = crate::measure::pss_bytes().unwrap_or(before);
                    function.measured_cost(after.saturating_sub(before));
                }
                function.retire(instance);
            }
        }
        Ok(())
    }

    /// Merges a new instance at once and, under a budget, records what it added to the
    /// host's PSS; then gives back the room it was promised.
    fn settle_new(&self, function: &Function, owner: &StoreOwner, room: pool::Room<'_>) {
        if let Err(error) = owner.merge_now() {
            eprintln!(
                "samepage: function {}: merging a new instance: {error}",
                function.config.name
            );
        }
        if let Some(before) = room.pss_before {
            let after = crate::measure::pss_bytes().unwrap_or(before);
            function.measured_cost(after.saturating_sub(before));
        }
    }

    /// Counts a cold start of `function` and makes room for its new instance, evicting idle
    /// ones as needed.
    fn cold_start(&self, function: &Function) -> Result<pool::Room<'_>, Failure> {
        function
            .counters
            .cold_starts
            .fetch_add(1, Ordering::Relaxed);
        self.budget
            .make_room(function, &self.functions, true)
            .map_err(|over| {
                function
                    .counters
                    .over_budget
                    .fetch_add(1, Ordering::Relaxed);
                Failure::OverBudget(over)
            })
    }

    /// A new instance of `function`'s component, counted live.
    fn instantiate(&self, function: &Function) -> Result<ProxyInstance, Failure> {
        let Code::Proxy(component) = &function.code else {
            return Err(Failure::Internal("a WAGI function has no pool".into()));
        };
        // An instance that serves one request is not merged first.
        let owner = self.samepage.owner_merging_on_instantiate(
            function.config.domain,
            function.config.reuse == Reuse::Warm,
        );
        function.born(&owner);
        ProxyInstance::new(
            &self.engine,
            &self.proxy_linker,
            component,
            owner.clone(),
            &function.config,
        )
        .inspect_err(|_| function.forget(&owner))
    }

    /// Makes one instance of `function` ahead of requests, within the budget without
    /// evicting, sends it the function's warm-up request, merges it and parks it.
    fn prewarm(&self, function: &Function) -> Result<(), Failure> {
        let room = self
            .budget
            .make_room(function, &self.functions, false)
            .map_err(Failure::OverBudget)?;
        let mut instance = self.instantiate(function)?;
        if let Some(path) = &function.config.warmup
            && let Err(failure) = warm_up(&mut instance, path)
        {
            function.retire(instance);
            return Err(failure);
        }
        self.settle_new(function, &instance.owner, room);
        function.counters.prewarmed.fetch_add(1, Ordering::Relaxed);
        function.park(instance);
        Ok(())
    }

    /// Fills every pool to its `min_instances` before serving.
    fn prewarm_all(&self) {
        for function in &self.functions {
            let want = function.config.min_instances;
            while function.live() < want {
                let Ok(permit) = function.permits.clone().try_acquire_owned() else {
                    break;
                };
                let made = self.prewarm(function);
                drop(permit);
                if let Err(failure) = made {
                    eprintln!(
                        "samepage: function {}: {} of {want} instances pre-warmed: {failure}",
                        function.config.name,
                        function.live()
                    );
                    break;
                }
            }
        }
    }

    /// Until the server drains: expires idle instances, keeps the budget, and tops the
    /// pools up to their minimum, four times a second.
    fn keep_pools(&self) {
        while !self.draining.load(Ordering::Acquire) {
            std::thread::sleep(Duration::from_millis(250));
            let now = Instant::now();
            for function in &self.functions {
                function.expire(now);
            }
            self.budget.enforce(&self.functions);
            for function in &self.functions {
                if function.live() >= function.config.min_instances {
                    continue;
                }
                let Ok(permit) = function.permits.clone().try_acquire_owned() else {
                    continue;
                };
                let _ = self.prewarm(function);
                drop(permit);
            }
        }
    }

    async fn answer_wagi(
        self: &Arc<Self>,
        function: &Arc<Function>,
        request: hyper::Request<hyper::body::Incoming>,
        client: SocketAddr,
        local: SocketAddr,
        in_flight: InFlight,
    ) -> hyper::Response<HyperOutgoingBody> {
        let (parts, body) = request.into_parts();
        let body = match Limited::new(body, wagi::BODY_LIMIT).collect().await {
            Ok(body) => body.to_bytes(),
            Err(_) => {
                return text_response(
                    hyper::StatusCode::PAYLOAD_TOO_LARGE,
                    format!(
                        "a request body of a WAGI function may have {} bytes",
                        wagi::BODY_LIMIT
                    ),
                );
            }
        };
        let Ok(permit) = function.permits.clone().acquire_owned().await else {
            return Failure::Internal("the function's pool is closed".into()).response();
        };
        let request = wagi::CgiRequest {
            method: parts.method.to_string(),
            uri: parts.uri,
            headers: parts.headers,
            body,
            client,
            server: local,
        };
        let (server, function) = (self.clone(), function.clone());
        let ran = tokio::task::spawn_blocking(move || {
            let _held = (permit, in_flight);
            let ran = server.run_wagi(&function, &request);
            if let Err(failure) = &ran {
                eprintln!("samepage: function {}: {failure}", function.config.name);
            }
            ran
        })
        .await;
        match ran {
            Ok(Ok(response)) => response.map(full_body),
            Ok(Err(failure)) => failure.response(),
            Err(error) => Failure::Internal(error.to_string()).response(),
        }
    }

    /// Runs a WAGI command for `request` in an instance of its own.
    fn run_wagi(
        &self,
        function: &Function,
        request: &wagi::CgiRequest,
    ) -> Result<hyper::Response<Bytes>, Failure> {
        let Code::Wagi(module) = &function.code else {
            return Err(Failure::Internal("not a WAGI function".into()));
        };
        let _room = self.cold_start(function)?;
        let owner = self
            .samepage
            .owner_merging_on_instantiate(function.config.domain, false);
        function.born(&owner);
        let ran = wagi::run(
            &self.engine,
            &self.wagi_linker,
            module,
            &owner,
            &function.config,
            request,
        );
        function.forget(&owner);
        if let Err(failure) = &ran {
            function.count_failure(failure);
        }
        ran
    }
}

/// The WASI context every instance of `function` starts from: its environment and
/// directories, the host's stderr.
fn wasi_context(function: &FunctionConfig) -> Result<wasmtime_wasi::WasiCtxBuilder, Failure> {
    let mut wasi = wasmtime_wasi::WasiCtxBuilder::new();
    wasi.envs(&function.env).inherit_stderr();
    for (host, guest) in &function.dirs {
        wasi.preopened_dir(host, guest, wasmtime_wasi::FsPerms::ReadWrite)
            .map_err(|error| {
                Failure::Instantiate(format!("preopening {}: {error:#}", host.display()))
            })?;
    }
    Ok(wasi)
}

/// Sends a pre-warmed instance a GET for `path` and waits for its response's body.
fn warm_up(instance: &mut ProxyInstance, path: &str) -> Result<(), Failure> {
    let request = hyper::Request::get(path)
        .header(hyper::header::HOST, "localhost")
        .body(full_body(Bytes::new()))
        .map_err(|error| Failure::Internal(format!("warm-up request {path}: {error}")))?;
    let (sender, receiver): (proxy::ResponseSender, _) = tokio::sync::oneshot::channel();
    // The body is read while the handler writes it, as a client would.
    let drained = tokio::spawn(async move {
        match receiver.await {
            Ok(Ok(response)) => {
                let status = response.status();
                response
                    .into_body()
                    .collect()
                    .await
                    .map(|_| status)
                    .map_err(|e| e.to_string())
            }
            Ok(Err(code)) => Err(format!("{code:?}")),
            Err(_) => Err("no response".to_owned()),
        }
    });
    instance.handle(request, sender)?;
    let status = tokio::runtime::Handle::current()
        .block_on(drained)
        .map_err(|error| Failure::Internal(error.to_string()))?
        .map_err(|why| Failure::Trapped(format!("warm-up request {path}: {why}")))?;
    if !status.is_success() {
        return Err(Failure::Trapped(format!(
            "warm-up request {path} answered {status}"
        )));
    }
    Ok(())
}

/// A wasmtime error (wasmtime has its own error type) as an `anyhow` one, after `what`.
fn wasm(what: &str) -> impl FnOnce(wasmtime::Error) -> anyhow::Error + '_ {
    move |error| anyhow::anyhow!("{what}: {error:#}")
}

fn full_body(bytes: Bytes) -> HyperOutgoingBody {
    Full::new(bytes)
        .map_err(|never: Infallible| match never {})
        .boxed_unsync()
}

fn text_response(status: hyper::StatusCode, message: String) -> hyper::Response<HyperOutgoingBody> {
    let mut response = hyper::Response::new(full_body(Bytes::from(message + "\n")));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
