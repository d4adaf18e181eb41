//! What `samepage serve` serves: the functions, their routes, pools and limits, the tenants
//! and the engine's knobs. Read from the TOML file of `--config`, or made from the command
//! line for one component.
//!
//! ```toml
//! [server]
//! addr = "127.0.0.1:8080"
//! admin_addr = "127.0.0.1:9090"   # /metrics and /healthz
//! memory_budget = "2GiB"          # the host's PSS, after merging
//!
//! [engine]                        # the knobs of /sys/kernel/mm/ksm/, by their names
//! dedup = true
//! pages_to_scan = 4096
//! sleep_millisecs = 20
//!
//! [tenant.globex]
//! merge_domain = "acme"           # globex's pages may merge with acme's
//!
//! [[function]]
//! name = "hello"
//! route = "/hello"                # a path prefix; or host = "hello.example.com"
//! component = "hello.wasm"        # wasi:http/proxy; or module = "cgi.wasm" (WAGI)
//! tenant = "acme"
//! env = { GREETING = "hi" }
//! dirs = ["data::/data"]
//! reuse = "warm"                  # warm, reset or fresh
//! min_instances = 2
//! max_instances = 64
//! idle_timeout = "5m"
//! request_timeout = "10s"
//! max_memory_size = "256MiB"
//! ```
//!
//! Every mistake is refused before anything is served, with the file, the line and column,
//! and the reason ([`ConfigError`]): TOML syntax, unknown keys, values out of range,
//! contradictions (two functions on one route, a WAGI module asked to stay warm).
//! Relative paths are the config file's directory's.
//!
//! One function's settings, their defaults and the checks between them are
//! `config/function.rs`'s builder's, which the command line's one function goes through too;
//! this file reads the file's shape into it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use samepage_dedup::{DomainId, KNOBS, Knobs};
use serde::Deserialize;
use toml::Spanned;

use crate::cli::{parse_bytes, parse_duration};

mod budget;
mod function;

pub use budget::MemoryBudget;
use function::Contradiction;
pub use function::{
    ConfigError, DEFAULT_MAX_INSTANCES, FunctionConfig, Location, Program, Reuse, Route,
};

/// Everything `samepage serve` serves, and how.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    pub addr: SocketAddr,
    /// Where `/metrics` and `/healthz` are served; `None` for nowhere.
    pub admin_addr: Option<SocketAddr>,
    /// Most PSS the host may hold; `None` for no cap.
    pub memory_budget: Option<MemoryBudget>,
    /// Merge instances' memories (`false`: memfd memories, never merged, to compare with).
    pub dedup: bool,
    pub knobs: Knobs,
    /// Longest SIGTERM waits for the requests in flight.
    pub drain_timeout: Duration,
    /// Handlers that run at once; more wait in arrival order (`running.rs`).
    pub running_handlers: usize,
    pub functions: Vec<FunctionConfig>,
}

impl ServeConfig {
    /// Serving `functions`, with the server and the engine at their defaults.
    pub fn new(functions: Vec<FunctionConfig>) -> Self {
        Self {
            addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            admin_addr: None,
            memory_budget: None,
            dedup: true,
            knobs: Knobs::default(),
            drain_timeout: Duration::from_secs(30),
            running_handlers: super::running::RunSlots::per_cpu(),
            functions,
        }
    }
}

// The file's shape. Fields that are checked after parsing keep their spans.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    server: Option<ServerTable>,
    engine: Option<Spanned<EngineTable>>,
    #[serde(default)]
    tenant: BTreeMap<String, TenantTable>,
    #[serde(default)]
    function: Vec<Spanned<FunctionTable>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ServerTable {
    addr: Option<Spanned<String>>,
    admin_addr: Option<Spanned<String>>,
    memory_budget: Option<Spanned<Size>>,
    drain_timeout: Option<Spanned<String>>,
    running_handlers: Option<Spanned<u64>>,
}

/// A size as a number of bytes or a string with a unit.
#[derive(Deserialize)]
#[serde(untagged)]
enum Size {
    Bytes(u64),
    Text(String),
}

/// `[engine]`: `dedup`, and one key per knob of the engine's declaration
/// ([`samepage_dedup::KNOBS`]), each value with its place in the file.
type EngineTable = BTreeMap<String, Spanned<toml::Value>>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TenantTable {
    merge_domain: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FunctionTable {
    name: Spanned<String>,
    route: Option<Spanned<String>>,
    host: Option<Spanned<String>>,
    component: Option<Spanned<PathBuf>>,
    module: Option<Spanned<PathBuf>>,
    tenant: Option<Spanned<String>>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    dirs: Vec<Spanned<String>>,
    reuse: Option<Spanned<Reuse>>,
    min_instances: Option<Spanned<u64>>,
    max_instances: Option<Spanned<u64>>,
    idle_timeout: Option<Spanned<String>>,
    request_timeout: Option<Spanned<String>>,
    max_memory_size: Option<Spanned<Size>>,
    warmup: Option<Spanned<String>>,
}

/// Reads and checks the config file at `path`.
pub fn read(path: &Path) -> Result<ServeConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|error| ConfigError {
        file: path.to_owned(),
        line: 0,
        column: 0,
        reason: format!("cannot read it: {error}"),
    })?;
    parse(path, &text)
}

/// Checks `text`, the contents of the config file at `path`.
pub fn parse(path: &Path, text: &str) -> Result<ServeConfig, ConfigError> {
    let at = Locator { file: path, text };
    let file: File = toml::from_str(text).map_err(|error| {
        at.error(
            error.span().unwrap_or(0..0),
            error.message().trim_end().to_owned(),
        )
    })?;
    let base = path.parent().unwrap_or(Path::new("."));

    let server = file.server.unwrap_or(ServerTable {
        addr: None,
        admin_addr: None,
        memory_budget: None,
        drain_timeout: None,
        running_handlers: None,
    });
    let addr = server
        .addr
        .as_ref()
        .map(|addr| at.socket_addr(addr))
        .transpose()?;
    let admin_addr = server
        .admin_addr
        .as_ref()
        .map(|addr| at.socket_addr(addr))
        .transpose()?;
    let memory_budget = server
        .memory_budget
        .as_ref()
        .map(|size| at.budget(size))
        .transpose()?;
    let drain_timeout = server
        .drain_timeout
        .as_ref()
        .map(|text| at.duration(text))
        .transpose()?;

    let running_handlers = server
        .running_handlers
        .as_ref()
        .map(|count| match usize::try_from(*count.get_ref()) {
            Ok(count) if count > 0 => Ok(count),
            _ => Err(at.error(
                count.span(),
                "running_handlers must be at least 1".to_owned(),
            )),
        })
        .transpose()?;

    let (dedup, knobs) = match &file.engine {
        Some(engine) => at.engine(engine)?,
        None => (true, Knobs::default()),
    };

    let domains = Domains::new(&file.tenant);
    if file.function.is_empty() {
        return Err(at.error(
            0..0,
            "no [[function]]: there is nothing to serve".to_owned(),
        ));
    }
    let mut functions: Vec<FunctionConfig> = Vec::new();
    for table in &file.function {
        let function = at.function(table, base, &domains)?;
        if functions.iter().any(|other| other.name == function.name) {
            return Err(at.error(
                table.get_ref().name.span(),
                format!("a second function named {:?}", function.name),
            ));
        }
        if let Some(other) = functions.iter().find(|other| other.route == function.route) {
            return Err(at.error(
                table.span(),
                format!(
                    "function {:?} has the route of function {:?} (line {})",
                    function.name, other.name, other.defined_at.line
                ),
            ));
        }
        functions.push(function);
    }
    let mut config = ServeConfig::new(functions);
    config.addr = addr.unwrap_or(config.addr);
    config.admin_addr = admin_addr;
    config.memory_budget = memory_budget;
    config.dedup = dedup;
    config.knobs = knobs;
    config.drain_timeout = drain_timeout.unwrap_or(config.drain_timeout);
    config.running_handlers = running_handlers.unwrap_or(config.running_handlers);
    Ok(config)
}

/// Tenants' merge domains, numbered by name: a tenant's domain is its own name unless the
/// file gives it another's.
struct Domains {
    of_tenant: BTreeMap<String, String>,
    numbers: std::cell::RefCell<BTreeMap<String, DomainId>>,
}

impl Domains {
    fn new(tenants: &BTreeMap<String, TenantTable>) -> Self {
        let of_tenant = tenants
            .iter()
            .filter_map(|(name, table)| Some((name.clone(), table.merge_domain.clone()?)))
            .collect();
        Self {
            of_tenant,
            numbers: Default::default(),
        }
    }

    fn of(&self, tenant: &str) -> DomainId {
        let name = self.of_tenant.get(tenant).map_or(tenant, String::as_str);
        let mut numbers = self.numbers.borrow_mut();
        let next = numbers.len() as DomainId;
        *numbers.entry(name.to_owned()).or_insert(next)
    }
}

/// Turns byte offsets of the file into lines and columns for errors.
struct Locator<'a> {
    file: &'a Path,
    text: &'a str,
}

impl Locator<'_> {
    fn location(&self, span: Range<usize>) -> Location {
        let before = &self.text[..span.start.min(self.text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.len() - before.rfind('\n').map_or(0, |newline| newline + 1) + 1;
        Location {
            file: self.file.to_owned(),
            line,
            column,
        }
    }

    fn error(&self, span: Range<usize>, reason: String) -> ConfigError {
        self.location(span).error(reason)
    }

    fn socket_addr(&self, text: &Spanned<String>) -> Result<SocketAddr, ConfigError> {
        text.get_ref().parse().map_err(|error| {
            self.error(
                text.span(),
                format!("{:?} is not an address and port: {error}", text.get_ref()),
            )
        })
    }

    fn size(&self, size: &Spanned<Size>) -> Result<u64, ConfigError> {
        match size.get_ref() {
            Size::Bytes(bytes) => Ok(*bytes),
            Size::Text(text) => parse_bytes(text).map_err(|error| {
                self.error(size.span(), format!("{text:?} is not a size: {error}"))
            }),
        }
    }

    fn budget(&self, size: &Spanned<Size>) -> Result<MemoryBudget, ConfigError> {
        match size.get_ref() {
            Size::Bytes(bytes) => Ok(MemoryBudget::Bytes(*bytes)),
            Size::Text(text) => MemoryBudget::parse(text).map_err(|error| {
                self.error(
                    size.span(),
                    format!("{text:?} is not a size or a share of the memory limit: {error}"),
                )
            }),
        }
    }

    fn duration(&self, text: &Spanned<String>) -> Result<Duration, ConfigError> {
        parse_duration(text.get_ref()).map_err(|error| {
            self.error(
                text.span(),
                format!("{:?} is not a duration: {error}", text.get_ref()),
            )
        })
    }

    /// `[engine]`: whether to merge, and the knobs, each key and value checked by the
    /// knob's own declaration.
    fn engine(&self, table: &Spanned<EngineTable>) -> Result<(bool, Knobs), ConfigError> {
        let mut dedup = true;
        let mut knobs = Knobs::default();
        for (key, value) in table.get_ref() {
            let at = |reason: String| self.error(value.span(), reason);
            if key == "dedup" {
                dedup = value
                    .get_ref()
                    .as_bool()
                    .ok_or_else(|| at("dedup = true or false".to_owned()))?;
                continue;
            }
            let knob = Knobs::declared(key).ok_or_else(|| {
                let known: Vec<&str> = KNOBS.iter().map(|knob| knob.name).collect();
                at(format!(
                    "unknown key {key:?} in [engine]: it takes dedup, {}",
                    known.join(", ")
                ))
            })?;
            let parsed = match value.get_ref() {
                toml::Value::Integer(n) => u64::try_from(*n)
                    .map_err(|_| format!("{key} = {n}: expected {}", knob.values))
                    .and_then(|n| knob.number(n)),
                toml::Value::Float(seconds) => knob.seconds(*seconds),
                toml::Value::Boolean(on) => knob.switch(*on),
                toml::Value::String(name) => knob.choice(name),
                other => Err(format!("{key} = {other}: expected {}", knob.values)),
            };
            knob.set(&mut knobs, parsed.map_err(at)?).map_err(at)?;
        }
        knobs
            .validate()
            .map_err(|error| self.error(table.span(), error.to_string()))?;
        Ok((dedup, knobs))
    }

    fn function(
        &self,
        table: &Spanned<FunctionTable>,
        base: &Path,
        domains: &Domains,
    ) -> Result<FunctionConfig, ConfigError> {
        let f = table.get_ref();
        let defined_at = self.location(table.span());
        let name = f.name.get_ref().clone();
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(self.error(
                f.name.span(),
                format!("function name {name:?}: use letters, digits, '-', '_' and '.'"),
            ));
        }
        let program = match (&f.component, &f.module) {
            (Some(path), None) => Program::Proxy(base.join(path.get_ref())),
            (None, Some(path)) => Program::Wagi(base.join(path.get_ref())),
            (Some(_), Some(module)) => {
                return Err(self.error(
                    module.span(),
                    format!("function {name:?} has both a component and a module: give one"),
                ));
            }
            (None, None) => {
                return Err(defined_at.error(format!(
                    "function {name:?} has neither a component (wasi:http) nor a module (WAGI)"
                )));
            }
        };
        let prefix = match &f.route {
            Some(route) => {
                let text = route.get_ref();
                if !text.starts_with('/') {
                    return Err(self.error(
                        route.span(),
                        format!("route {text:?} must be a path, starting with /"),
                    ));
                }
                let trimmed = text.trim_end_matches('/');
                if trimmed.is_empty() {
                    "/".to_owned()
                } else {
                    trimmed.to_owned()
                }
            }
            None => "/".to_owned(),
        };
        let route = Route {
            host: f
                .host
                .as_ref()
                .map(|host| host.get_ref().to_ascii_lowercase()),
            prefix,
        };
        if f.route.is_none() && f.host.is_none() {
            return Err(defined_at.error(format!(
                "function {name:?} has neither a route nor a host: say which requests it answers"
            )));
        }
        let dirs = f
            .dirs
            .iter()
            .map(|dir| {
                let (host, guest) = dir
                    .get_ref()
                    .split_once("::")
                    .unwrap_or((dir.get_ref(), dir.get_ref()));
                let host = base.join(host);
                if !host.is_dir() {
                    return Err(self.error(
                        dir.span(),
                        format!("directory {} does not exist", host.display()),
                    ));
                }
                Ok((host, guest.to_owned()))
            })
            .collect::<Result<_, _>>()?;
        let count = |value: &Option<Spanned<u64>>, least: u64| match value {
            None => Ok(None),
            Some(value) if (least..=100_000).contains(value.get_ref()) => {
                Ok(Some(*value.get_ref() as usize))
            }
            Some(value) => Err(self.error(
                value.span(),
                format!("{} is out of range ({least} to 100000)", value.get_ref()),
            )),
        };
        let warmup = match &f.warmup {
            Some(path) if !path.get_ref().starts_with('/') => {
                return Err(self.error(
                    path.span(),
                    format!(
                        "warmup {:?} must be a path, starting with /",
                        path.get_ref()
                    ),
                ));
            }
            Some(path) => Some(path.get_ref().clone()),
            None => None,
        };
        let max_memory_size = f
            .max_memory_size
            .as_ref()
            .map(|size| {
                let bytes = self.size(size)?;
                usize::try_from(bytes)
                    .map_err(|_| self.error(size.span(), format!("{bytes} bytes is too many")))
            })
            .transpose()?;
        let duration = |text: &Option<Spanned<String>>| {
            text.as_ref().map(|text| self.duration(text)).transpose()
        };
        let mut function = FunctionConfig::builder(name, program, defined_at)
            .route(route)
            .tenant(f.tenant.as_ref().map(|tenant| tenant.get_ref().clone()))
            .env(f.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .dirs(dirs)
            .reuse(f.reuse.as_ref().map(|reuse| *reuse.get_ref()))
            .min_instances(count(&f.min_instances, 0)?)
            .max_instances(count(&f.max_instances, 1)?)
            .idle_timeout(duration(&f.idle_timeout)?)
            .request_timeout(duration(&f.request_timeout)?)
            .max_memory_size(max_memory_size)
            .warmup(warmup)
            .build()
            .map_err(|contradiction| {
                let span = match &contradiction {
                    Contradiction::MinAboveMax { .. } => {
                        f.min_instances.as_ref().map_or(0..0, Spanned::span)
                    }
                    Contradiction::WagiNotFresh { .. } => {
                        f.reuse.as_ref().map_or(table.span(), Spanned::span)
                    }
                    Contradiction::WagiPool => {
                        f.min_instances.as_ref().map_or(table.span(), Spanned::span)
                    }
                };
                self.error(span, contradiction.to_string())
            })?;
        function.domain = domains.of(&function.tenant);
        Ok(function)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_text(text: &str) -> Result<ServeConfig, ConfigError> {
        parse(Path::new("/srv/samepage.toml"), text)
    }

    fn refused(text: &str) -> String {
        parse_text(text).expect_err("refused").to_string()
    }

    const APP: &str = "[[function]]\nname = \"app\"\nroute = \"/\"\ncomponent = \"app.wasm\"\n";

    /// The configuration the Kubernetes deployment ships is one this server reads, and its
    /// drain ends within the pod's grace period.
    #[test]
    fn the_kubernetes_config_map_holds_a_valid_configuration_that_drains_in_time() {
        let map = include_str!("../../deploy/kubernetes/configmap.yaml");
        let (_, block) = map
            .split_once("samepage.toml: |\n")
            .expect("the TOML block");
        let toml: String = block
            .lines()
            .map(|line| line.strip_prefix("    ").unwrap_or(line))
            .map(|line| format!("{line}\n"))
            .collect();
        let config = parse_text(&toml).expect("valid");
        assert_eq!(config.memory_budget, Some(MemoryBudget::ShareOfLimit(75)));
        let daemonset = include_str!("../../deploy/kubernetes/daemonset.yaml");
        let grace: u64 = daemonset
            .lines()
            .find_map(|line| line.trim().strip_prefix("terminationGracePeriodSeconds:"))
            .expect("a grace period")
            .trim()
            .parse()
            .expect("seconds");
        assert!(
            config.drain_timeout < Duration::from_secs(grace),
            "{:?} against {grace} s",
            config.drain_timeout
        );
        assert_eq!(config.functions.len(), 2);
    }

    #[test]
    fn a_memory_budget_in_the_file_is_read() {
        let config = parse_text(
            "[server]\nmemory_budget = \"80%\"\n[[function]]\nname = \"x\"\nroute = \"/x\"\ncomponent = \"x.wasm\"\n",
        )
        .expect("valid");
        assert_eq!(config.memory_budget, Some(MemoryBudget::ShareOfLimit(80)));
    }

    #[test]
    fn a_whole_file_reads_as_written() {
        let config = parse_text(
            "[server]\naddr = \"127.0.0.1:0\"\nadmin_addr = \"127.0.0.1:9\"\n\
             memory_budget = \"1GiB\"\n[engine]\npages_to_scan = 100\nsleep_millisecs = 5\n\
             [tenant.b]\nmerge_domain = \"a\"\n\
             [[function]]\nname = \"x\"\nroute = \"/x/\"\ncomponent = \"x.wasm\"\ntenant = \"a\"\n\
             reuse = \"reset\"\nmin_instances = 2\nrequest_timeout = \"250ms\"\n\
             max_memory_size = \"64MiB\"\nenv = { K = \"v\" }\n\
             [[function]]\nname = \"y\"\nhost = \"y.example\"\nmodule = \"y.wasm\"\n\
             tenant = \"b\"\nreuse = \"fresh\"\n\
             [[function]]\nname = \"z\"\nroute = \"/z\"\ncomponent = \"/abs/z.wasm\"\ntenant = \"c\"\n",
        )
        .expect("valid");
        assert_eq!(config.memory_budget, Some(MemoryBudget::Bytes(1 << 30)));
        assert_eq!(config.knobs.pages_to_scan, 100);
        let [x, y, z] = &config.functions[..] else {
            panic!("three functions")
        };
        assert_eq!(x.route.prefix, "/x");
        assert_eq!(x.program, Program::Proxy("/srv/x.wasm".into()));
        assert_eq!(x.reuse, Reuse::Reset);
        assert_eq!(x.request_timeout, Some(Duration::from_millis(250)));
        assert_eq!(x.max_memory_size, Some(64 << 20));
        assert_eq!(x.env, vec![("K".to_owned(), "v".to_owned())]);
        assert_eq!(y.program, Program::Wagi("/srv/y.wasm".into()));
        assert_eq!(z.program, Program::Proxy("/abs/z.wasm".into()));
        // b merges with a; c is a domain of its own.
        assert_eq!(x.domain, y.domain);
        assert_ne!(x.domain, z.domain);
        assert_eq!(x.defined_at.line, 10);
    }

    #[test]
    fn mistakes_are_refused_with_their_line() {
        let cases = [
            ("[server]\naddr = \"nowhere\"\n", "2:8", "not an address"),
            ("[engine]\npages_to_scan = 0\n", "2:17", "pages_to_scan"),
            (
                "[engine]\nrun = 3\n",
                "2:7",
                "expected 0 (stop), 1 (merge), 2 (unmerge)",
            ),
            (
                "[engine]\npages = 1\n",
                "2:9",
                "unknown key \"pages\" in [engine]",
            ),
            ("[engine]\nsmart_scan = 1\n", "2:14", "expected on or off"),
            (
                "[server]\nmemory_budget = \"2 parsecs\"\n",
                "2:17",
                "not a size",
            ),
            ("[server]\nport = 80\n", "2:1", "unknown field `port`"),
            ("[server\n", "1:8", ""),
        ];
        for (text, at, reason) in cases {
            let error = refused(&format!("{text}{APP}"));
            assert!(
                error.starts_with(&format!("/srv/samepage.toml:{at}: ")),
                "{error}"
            );
            assert!(error.contains(reason), "{error}");
        }
        let two = format!("{APP}{}", APP.replace("\"app\"", "\"other\""));
        let error = refused(&two);
        assert!(error.starts_with("/srv/samepage.toml:5:1: "), "{error}");
        assert!(
            error.contains("has the route of function \"app\" (line 1)"),
            "{error}"
        );
        let error = refused(
            &APP.replace("component", "module")
                .replace("\"/\"", "\"/\"\nreuse = \"warm\""),
        );
        assert!(
            error.contains("WAGI module") && error.contains(":4:9: "),
            "{error}"
        );
        let error = refused(&format!("{APP}min_instances = 5\nmax_instances = 2\n"));
        assert!(
            error.contains(":5:17: min_instances = 5 is above"),
            "{error}"
        );
        assert!(refused("").contains("nothing to serve"));
        let error = refused(&APP.replace("route = \"/\"\n", ""));
        assert!(error.contains("neither a route nor a host"), "{error}");
    }

    #[test]
    fn the_bundled_example_reads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/http/samepage.toml");
        let config = read(&path).expect("examples/http/samepage.toml is valid");
        let names: Vec<&str> = config.functions.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["python", "small", "cgi"]);
        assert_eq!(config.memory_budget, Some(MemoryBudget::Bytes(1 << 30)));
        assert_ne!(config.functions[0].domain, config.functions[2].domain);
    }
}
