//! Instances of `wasi:http/proxy` components: the store they live in, and one request
//! through their `wasi:http/incoming-handler`.

use bytes::Bytes;
use samepage_runtime::{Limits, StoreOwner};
use wasmtime::component::{Linker, ResourceTable};
use wasmtime::{Store, StoreLimits};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::p2::bindings::http::types::{ErrorCode, Scheme};
use wasmtime_wasi_http::p2::bindings::sync::Proxy;
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

use super::code::ProxyCode;
use super::config::FunctionConfig;
use super::failure::Failure;
use super::wasi::wasi_context;

/// The body of an HTTP message as wasi:http holds it.
pub type WasiBody = http_body_util::combinators::UnsyncBoxBody<Bytes, wasmtime_wasi_http::Error>;

/// Where a handler's response goes.
pub type ResponseSender =
    tokio::sync::oneshot::Sender<Result<hyper::Response<HyperOutgoingBody>, ErrorCode>>;

/// What a proxy's store holds.
pub struct ProxyState {
    wasi: WasiCtx,
    http: WasiHttpCtx,
    hooks: NoOutgoing,
    table: ResourceTable,
    limits: StoreLimits,
}

/// wasi:http's hooks with outgoing requests refused: without wasmtime-wasi-http's
/// `default-send-request` the host needs no TLS, and a function reaches nothing but its
/// caller.
struct NoOutgoing;

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

impl WasiView for ProxyState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for ProxyState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.hooks,
        }
    }
}

/// Links all of WASI (as `wasmtime serve -S cli` gives it: interpreters built into
/// components, such as componentize-py's, import more than the proxy world) and wasi:http.
pub fn linker(engine: &wasmtime::Engine) -> wasmtime::Result<Linker<ProxyState>> {
    let mut linker = Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_sync(&mut linker)?;
    wasmtime_wasi_http::p2::add_only_http_to_linker_sync(&mut linker)?;
    Ok(linker)
}

/// An instance of a proxy component, in a store of its own.
pub struct ProxyInstance {
    /// Its memories belong to `owner`, whom the store's call hook drives.
    store: Store<ProxyState>,
    proxy: Proxy,
    pub owner: StoreOwner,
    limits: Limits,
    /// Requests it has served.
    pub served: u64,
}

impl ProxyInstance {
    /// Instantiates `code` in a new store with `owner`'s memories and the function's
    /// environment, directories and memory limit: from its `InstancePre` (linked once, when
    /// the code was compiled), or through `linker` when it has none.
    pub fn new(
        engine: &wasmtime::Engine,
        linker: &Linker<ProxyState>,
        code: &ProxyCode,
        owner: StoreOwner,
        function: &FunctionConfig,
    ) -> Result<Self, Failure> {
        let mut wasi = wasi_context(function)?;
        let limits = function.limits();
        let mut store = Store::new(
            engine,
            ProxyState {
                wasi: wasi.build(),
                http: WasiHttpCtx::new(),
                hooks: NoOutgoing,
                table: ResourceTable::new(),
                limits: limits.store_limits(),
            },
        );
        store.limiter(|state| &mut state.limits);
        // Instantiation runs no handler; its deadline is only that it has one.
        limits
            .apply(&mut store)
            .map_err(|error| Failure::Instantiate(format!("{error:#}")))?;
        let instance = match code.pre() {
            Some(pre) => owner.instantiate_component_pre(&mut store, pre),
            None => owner.instantiate_component(&mut store, linker, code.component()),
        }
        .map_err(|error| Failure::Instantiate(crate::cli::causes_once(&error.into())))?;
        let proxy = Proxy::new(&mut store, &instance).map_err(|error| {
            Failure::Instantiate(format!(
                "the component does not export wasi:http/incoming-handler: {error:#}"
            ))
        })?;
        Ok(Self {
            store,
            proxy,
            owner,
            limits,
            served: 0,
        })
    }

    /// Runs the handler for `request`, whose response goes to `sender`. A trap or a timeout
    /// leaves the instance unfit for reuse: the caller drops it.
    pub fn handle(
        &mut self,
        request: hyper::Request<WasiBody>,
        sender: ResponseSender,
    ) -> Result<(), Failure> {
        self.served += 1;
        self.limits
            .apply(&mut self.store)
            .map_err(|error| Failure::Internal(format!("setting the deadline: {error:#}")))?;
        let mut http = self.store.data_mut().http();
        let request = http
            .new_incoming_request(Scheme::Http, request)
            .map_err(|error| Failure::Internal(format!("reading the request: {error:#}")))?;
        let out = http
            .new_response_outparam(sender)
            .map_err(|error| Failure::Internal(format!("making the response: {error:#}")))?;
        self.proxy
            .wasi_http_incoming_handler()
            .call_handle(&mut self.store, request, out)
            .map_err(|error| match error.downcast_ref::<wasmtime::Trap>() {
                Some(wasmtime::Trap::Interrupt) => Failure::TimedOut(self.limits.timeout),
                _ => Failure::Trapped(format!("{error:#}")),
            })
    }
}
