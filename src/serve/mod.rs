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
//! page is shared between tenants by default. With `--dedup off` they are wasmtime's own,
//! as a host without samepage has them (copy-on-write images, pooling allocator).
//!
//! Each request to a component gets an instance of its own by default, as `wasmtime serve`
//! gives every wasi:http 0.2 request (`reuse = "reset"`); warm reuse, which keeps state
//! across requests, is a function's choice (`answer.rs` and `lifecycle.rs` say what happens
//! when a reused instance fails).
//!
//! This file is the server's front: the listener, dispatch (a request to its function, then
//! to a blocking thread with one of the function's permits, at most `max_instances` at
//! once) and drain. A request's journey through an instance (a warm or a cold start within
//! the memory budget, the request, then the instance parked, replaced or retired by the
//! function's `reuse`) is `lifecycle.rs`'s; the pools it keeps are `pool.rs`'s and the
//! budget `budget.rs`'s. Files below this one never reach back up into it.
//!
//! SIGTERM and SIGINT stop accepting, let the requests in flight finish (up to the drain
//! timeout), and exit 0.

mod answer;
mod budget;
mod code;
pub(crate) mod config;
mod failure;
mod lifecycle;
mod metrics;
mod pool;
mod proxy;
mod response;
mod running;
mod wagi;
mod wasi;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use http_body_util::{BodyExt, Limited};
use samepage_dedup::EngineConfig;
use samepage_runtime::measure::pss_bytes;
use samepage_runtime::{EpochTicker, Samepage, SamepageConfig};
use wasmtime_wasi_http::io::TokioIo;
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;

use budget::Budget;
use code::Code;
use config::{FunctionConfig, Location, MemoryBudget, Program, Reuse, ServeConfig};
use failure::Failure;
use lifecycle::Pools;
use metrics::{Figures, ServerCounters};
use pool::Function;
use response::{full_body, text_response};
use running::RunSlots;

use crate::cli::{LimitSetting, Switch, parse_dir, parse_env};

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
    /// Or a share of the memory the host may use at all, such as 75%: of the lowest memory
    /// limit of its cgroups (a container's), or of the machine's memory without one.
    #[arg(long, value_parser = MemoryBudget::parse)]
    pub memory_budget: Option<MemoryBudget>,
    /// Merge instances' memories (off: wasmtime's own memories, copy-on-write images and
    /// pooling allocator, as a host without samepage runs them).
    #[arg(long, value_enum)]
    pub dedup: Option<Switch>,

    /// What becomes of an instance after a request [default: reset for a component (an
    /// instance per request, made ahead), fresh for a WAGI command, the only choice there].
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
    #[command(flatten)]
    pub knobs: crate::cli::KnobFlags,
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
        config.knobs = self.knobs.apply(config.knobs)?;
        Ok(config)
    }

    /// One function, the command line's component at `/`.
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
        let name = component
            .file_stem()
            .map_or("app".into(), |stem| stem.to_string_lossy().into_owned());
        let function = FunctionConfig::builder(name, program, Location::command_line())
            .env(crate::cli::environment(&self.envs))
            .dirs(self.dirs.clone())
            .reuse(self.reuse)
            .min_instances(Some(self.min_instances as usize))
            .max_instances(Some(self.max_instances as usize))
            .idle_timeout(self.idle_timeout)
            .request_timeout(request_timeout)
            .max_memory_size(max_memory_size)
            .warmup(self.warmup.clone())
            .build()
            .with_context(|| format!("serving {}", component.display()))?;
        Ok(ServeConfig::new(vec![function]))
    }
}

/// The server: its pools, and what it counts of the requests it routes.
struct Server {
    pools: Arc<Pools>,
    counters: Arc<ServerCounters>,
    /// What a request takes before its handler runs: about one per CPU.
    running: RunSlots,
    /// Advances the epoch for request timeouts, when a function has one.
    _ticker: Option<EpochTicker>,
}

pub fn serve(args: ServeArgs) -> Result<()> {
    let config = args.serve_config()?;
    let memory_budget = match config.memory_budget.map(MemoryBudget::resolve).transpose() {
        Ok(resolved) => resolved.map(|(bytes, from)| {
            eprintln!("samepage: memory budget {} MiB ({from})", bytes >> 20);
            bytes
        }),
        Err(error) => bail!("cannot size the memory budget: {error}"),
    };
    if let Some(budget) = memory_budget {
        let pss = pss_bytes()
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
    let samepage = if config.dedup {
        Samepage::configure(
            &mut wasm_config,
            SamepageConfig {
                dedup: true,
                // The scanner takes only the CPU that requests leave.
                engine_config: EngineConfig {
                    scanner_yields: true,
                    knobs: config.knobs.clone(),
                    ..EngineConfig::default()
                },
                merge_on_instantiate: true,
                // Requests that run long are merged while they run (the engine's
                // `merge_running` knob decides).
                merge_while_running: true,
            },
        )
        .context("starting the merge engine")?
    } else {
        Samepage::without_merging(&mut wasm_config, pooling_for(&config.functions))
    };
    let timeouts = config.functions.iter().any(|f| f.request_timeout.is_some());
    if timeouts {
        wasm_config.epoch_interruption(true);
    }
    crate::cli::compilation_cache(&args.codegen)
        .configure(&mut wasm_config)
        .context("setting up the compilation cache")?;
    let engine = wasmtime::Engine::new(&wasm_config).map_err(wasm("starting wasmtime"))?;
    let codes = code::compile_all(&engine, &samepage, &config.functions)?;
    crate::resources::return_free_heap();
    let functions = config
        .functions
        .into_iter()
        .zip(codes)
        .map(|(function, code)| Arc::new(Function::new(function, code)))
        .collect();
    let server = Arc::new(Server {
        _ticker: timeouts
            .then(|| EpochTicker::start(&engine))
            .transpose()
            .context("starting the epoch thread")?,
        pools: Arc::new(Pools::new(
            engine.clone(),
            samepage,
            proxy::linker(&engine).map_err(wasm("linking wasi:http"))?,
            wagi::linker(&engine).map_err(wasm("linking WASI"))?,
            functions,
            Budget::new(memory_budget),
        )),
        counters: Arc::default(),
        running: RunSlots::new(config.running_handlers),
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting tokio")?;
    runtime.block_on(server.run(config.addr, config.admin_addr, config.drain_timeout))
}

/// wasmtime's pooling allocator sized for every function's `max_instances` at once, as an
/// operator who runs wasmtime for density sizes it. Its defaults hold 1,000 core instances:
/// 71 instances of the bundled Python component (14 core instances each), so that a host
/// without merging stopped short of any memory budget. A component instance gets room for
/// up to 32 core instances, 4 memories and 8 tables; one with more is refused at its
/// instantiation, with wasmtime's reason. The limits reserve address space, not memory.
fn pooling_for(functions: &[FunctionConfig]) -> wasmtime::PoolingAllocationConfig {
    let defaults = 1_000;
    let instances: u32 = functions
        .iter()
        .map(|function| u32::try_from(function.max_instances).unwrap_or(u32::MAX))
        .fold(0, u32::saturating_add);
    let mut pooling = wasmtime::PoolingAllocationConfig::default();
    pooling
        .total_component_instances(instances.max(defaults))
        .total_core_instances(instances.saturating_mul(32).max(defaults))
        .total_memories(instances.saturating_mul(4).max(defaults))
        .total_tables(instances.saturating_mul(8).max(defaults));
    pooling
}

/// Counts a request in flight until dropped.
struct InFlight(Arc<ServerCounters>);

impl InFlight {
    fn new(counters: &Arc<ServerCounters>) -> Self {
        counters.in_flight.fetch_add(1, Ordering::AcqRel);
        Self(counters.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
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
        let pools = self.pools.clone();
        tokio::task::spawn_blocking(move || pools.prewarm_all())
            .await
            .context("pre-warming")?;
        let pool_keeper = {
            let pools = self.pools.clone();
            let runtime = tokio::runtime::Handle::current();
            std::thread::Builder::new()
                .name("samepage-pools".into())
                .spawn(move || {
                    let _runtime = runtime.enter();
                    pools.keep();
                })
                .context("starting the pool keeper")?
        };
        if let Some(admin) = admin {
            eprintln!("samepage: admin http://{}", admin.local_addr()?);
            let figures = Figures {
                pools: self.pools.clone(),
                counters: self.counters.clone(),
            };
            tokio::spawn(metrics::serve_admin(figures, admin));
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
        self.pools.drain();
        let deadline = Instant::now() + drain_timeout;
        while self.counters.in_flight.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let left = self.counters.in_flight.load(Ordering::Acquire);
        let _ = pool_keeper.join();
        let (mut requests, mut cold, mut warm, mut evicted, mut failed) = (0, 0, 0, 0, 0);
        for function in &self.pools.functions {
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
        self.pools
            .functions
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
        let in_flight = InFlight::new(&self.counters);
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

    /// A component's response: the request goes to a blocking thread, where the lifecycle
    /// serves it with an instance, and its response comes back as the handler writes it.
    async fn answer_proxy(
        self: &Arc<Self>,
        function: &Arc<Function>,
        request: hyper::Request<hyper::body::Incoming>,
        in_flight: InFlight,
    ) -> hyper::Response<HyperOutgoingBody> {
        let Ok(permit) = function.permits.clone().acquire_owned().await else {
            return Failure::Internal("the function's pool is closed".into()).response();
        };
        let running = self.running.take().await;
        let request =
            request.map(|body| body.map_err(wasmtime_wasi_http::Error::from).boxed_unsync());
        let (sender, receiver) = tokio::sync::oneshot::channel();
        let (pools, function) = (self.pools.clone(), function.clone());
        let handled = tokio::task::spawn_blocking(move || {
            let _held = (permit, running, in_flight);
            let served = pools.serve_proxy(&function, request, sender);
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

    /// A WAGI command's response: the whole body is read first (a command reads stdin to its
    /// end), then the command runs on a blocking thread.
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
        let running = self.running.take().await;
        let request = wagi::CgiRequest {
            method: parts.method.to_string(),
            uri: parts.uri,
            headers: parts.headers,
            body,
            client,
            server: local,
        };
        let (pools, function) = (self.pools.clone(), function.clone());
        let ran = tokio::task::spawn_blocking(move || {
            let _held = (permit, running, in_flight);
            let ran = pools.run_wagi(&function, &request);
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
}

/// A wasmtime error (wasmtime has its own error type) as an `anyhow` one, after `what`.
fn wasm(what: &str) -> impl FnOnce(wasmtime::Error) -> anyhow::Error + '_ {
    move |error| anyhow::anyhow!("{what}: {error:#}")
}
