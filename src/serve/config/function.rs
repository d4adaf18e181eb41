//! One function's configuration, and the one builder that makes it, whether from a
//! `[[function]]` of the config file or from the command line: every default and every check
//! that both share is here, so that the two cannot drift apart.
//!
//! A built [`FunctionConfig`] is consistent: `min_instances <= max_instances`, and a WAGI
//! command is `fresh` with no pool to pre-warm. What only one source can get wrong (a
//! route's spelling, a function's name, a directory in the file) is that source's to check.

use std::path::{Path, PathBuf};
use std::time::Duration;

use samepage_dedup::DomainId;
use serde::Deserialize;

/// Most instances of a function at once, unless it says otherwise.
pub const DEFAULT_MAX_INSTANCES: usize = 64;
/// How long an idle instance above the minimum is kept, unless its function says otherwise.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// The tenant of a function that names none.
pub const DEFAULT_TENANT: &str = "default";

/// A configuration refused: where, and why.
#[derive(Debug, thiserror::Error)]
#[error("{}:{line}:{column}: {reason}", file.display())]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
    pub reason: String,
}

/// A place in the config file (or the command line, which has no file).
#[derive(Clone, Debug)]
pub struct Location {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
}

impl Location {
    /// The command line, as a place things are defined at.
    pub fn command_line() -> Self {
        Self {
            file: "command line".into(),
            line: 0,
            column: 0,
        }
    }

    pub fn error(&self, reason: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.file.clone(),
            line: self.line,
            column: self.column,
            reason: reason.into(),
        }
    }
}

/// What becomes of an instance after a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Reuse {
    /// Parked in its function's pool to serve later requests as it is: state is kept
    /// across requests (what it built at start-up or in earlier requests stays, and one
    /// request may see what another left). For components built for it, such as
    /// componentize-py's; one whose reused instance fails a request a fresh one serves is
    /// switched to `reset`.
    Warm,
    /// Each request gets an instance of its own, as just instantiated (wasi:http 0.2's
    /// contract, as `wasmtime serve` keeps it), taken from a few made ahead of demand off
    /// the request path: the default for a component.
    Reset,
    /// Each request instantiates on its own path, as `wasmtime serve` does.
    Fresh,
}

/// What a function runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Program {
    /// A `wasi:http/proxy` component.
    Proxy(PathBuf),
    /// A WASI preview 1 command served as WAGI defines it: the request in environment
    /// variables and stdin, the response (CGI headers, then the body) on stdout.
    Wagi(PathBuf),
}

impl Program {
    pub fn path(&self) -> &Path {
        match self {
            Program::Proxy(path) | Program::Wagi(path) => path,
        }
    }
}

/// Which requests a function answers: those to `host` (any, when `None`) whose path is
/// `prefix` or under it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub host: Option<String>,
    /// Starts with `/`, never ends with one (except `/` itself).
    pub prefix: String,
}

impl Route {
    /// How well this route matches a request: the length of its prefix, or `None`.
    pub fn matches(&self, host: Option<&str>, path: &str) -> Option<usize> {
        if let Some(want) = &self.host {
            let host = host?.rsplit_once(':').map_or(host?, |(name, _)| name);
            if !host.eq_ignore_ascii_case(want) {
                return None;
            }
        }
        let rest = path.strip_prefix(self.prefix.as_str())?;
        let on_boundary = self.prefix == "/" || rest.is_empty() || rest.starts_with(['/', '?']);
        on_boundary.then_some(self.prefix.len())
    }
}

/// One function: what it runs, where, for whom, and within what.
#[derive(Clone, Debug)]
pub struct FunctionConfig {
    pub name: String,
    pub route: Route,
    pub program: Program,
    pub tenant: String,
    /// The merge domain of the function's tenant: pages merge only within one.
    pub domain: DomainId,
    pub env: Vec<(String, String)>,
    /// Preopened directories, as (host path, guest path).
    pub dirs: Vec<(PathBuf, String)>,
    pub reuse: Reuse,
    /// Instances kept ready even when idle (pre-warmed at start, topped up later), memory
    /// budget allowing.
    pub min_instances: usize,
    /// Most instances at once, busy and idle; requests beyond wait for one.
    pub max_instances: usize,
    /// How long an idle instance above `min_instances` is kept.
    pub idle_timeout: Duration,
    /// Longest a request may run in wasm; then it answers 500 and its instance is dropped.
    pub request_timeout: Option<Duration>,
    /// Most bytes of any one linear memory of an instance.
    pub max_memory_size: Option<usize>,
    /// A path each pre-warmed instance is sent a GET request for before it is parked, so
    /// that it is warm (caches filled, lazy start-up done) before its first real request.
    pub warmup: Option<String>,
    /// Where the function is defined, for errors about it found later (its program).
    pub defined_at: Location,
}

impl FunctionConfig {
    /// A builder of the function `name`, which runs `program` and is defined at
    /// `defined_at`, with every other setting at its default until set.
    pub fn builder(name: String, program: Program, defined_at: Location) -> FunctionBuilder {
        FunctionBuilder {
            config: FunctionConfig {
                name,
                route: Route {
                    host: None,
                    prefix: "/".into(),
                },
                program,
                tenant: DEFAULT_TENANT.into(),
                // One domain until the config file numbers its tenants'.
                domain: 0,
                env: Vec::new(),
                dirs: Vec::new(),
                // Decided in `build`, by the program, unless set.
                reuse: Reuse::Reset,
                min_instances: 0,
                max_instances: DEFAULT_MAX_INSTANCES,
                idle_timeout: DEFAULT_IDLE_TIMEOUT,
                request_timeout: None,
                max_memory_size: None,
                warmup: None,
                defined_at,
            },
            reuse: None,
        }
    }

    /// What each of the function's instances may use: its memory maximum, and the deadline
    /// of each request (armed again before each).
    pub fn limits(&self) -> samepage_runtime::Limits {
        samepage_runtime::Limits {
            fuel: None,
            timeout: self.request_timeout,
            max_memory_size: self.max_memory_size,
        }
    }
}

/// Makes a [`FunctionConfig`]. Each setter's `None` keeps the default.
pub struct FunctionBuilder {
    config: FunctionConfig,
    /// The `reuse` asked for; by default, `reset` for a component and `fresh` for a WAGI
    /// command, the only one it can have.
    reuse: Option<Reuse>,
}

/// Settings of a function that cannot hold together.
#[derive(Debug, thiserror::Error)]
pub enum Contradiction {
    #[error("min_instances = {min} is above max_instances = {max}")]
    MinAboveMax { min: usize, max: usize },
    /// A WAGI command runs its `_start` once per request, with the request in its
    /// environment, which WASI fixes when the instance is made.
    #[error(
        "function {name:?} is a WAGI module, which runs once per request: its reuse can only \
         be \"fresh\""
    )]
    WagiNotFresh { name: String },
    #[error("a WAGI module is instantiated for each request: it has no pool to pre-warm")]
    WagiPool,
}

impl FunctionBuilder {
    pub fn route(mut self, route: Route) -> Self {
        self.config.route = route;
        self
    }

    pub fn tenant(mut self, tenant: Option<String>) -> Self {
        if let Some(tenant) = tenant {
            self.config.tenant = tenant;
        }
        self
    }

    pub fn env(mut self, env: Vec<(String, String)>) -> Self {
        self.config.env = env;
        self
    }

    pub fn dirs(mut self, dirs: Vec<(PathBuf, String)>) -> Self {
        self.config.dirs = dirs;
        self
    }

    pub fn reuse(mut self, reuse: Option<Reuse>) -> Self {
        self.reuse = reuse;
        self
    }

    pub fn min_instances(mut self, min: Option<usize>) -> Self {
        self.config.min_instances = min.unwrap_or(self.config.min_instances);
        self
    }

    pub fn max_instances(mut self, max: Option<usize>) -> Self {
        self.config.max_instances = max.unwrap_or(self.config.max_instances);
        self
    }

    pub fn idle_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.config.idle_timeout = timeout.unwrap_or(self.config.idle_timeout);
        self
    }

    pub fn request_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.config.request_timeout = timeout;
        self
    }

    pub fn max_memory_size(mut self, bytes: Option<usize>) -> Self {
        self.config.max_memory_size = bytes;
        self
    }

    pub fn warmup(mut self, path: Option<String>) -> Self {
        self.config.warmup = path;
        self
    }

    /// The function, once its settings are checked against each other.
    pub fn build(self) -> Result<FunctionConfig, Contradiction> {
        let mut config = self.config;
        let wagi = matches!(config.program, Program::Wagi(_));
        config.reuse = self
            .reuse
            .unwrap_or(if wagi { Reuse::Fresh } else { Reuse::Reset });
        if config.min_instances > config.max_instances {
            return Err(Contradiction::MinAboveMax {
                min: config.min_instances,
                max: config.max_instances,
            });
        }
        if wagi && config.reuse != Reuse::Fresh {
            return Err(Contradiction::WagiNotFresh { name: config.name });
        }
        if wagi && config.min_instances > 0 {
            return Err(Contradiction::WagiPool);
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_by_program_and_contradictions_are_refused() {
        let build = |program: Program| {
            FunctionConfig::builder("f".into(), program, Location::command_line())
        };
        let component = build(Program::Proxy("a.wasm".into()))
            .build()
            .expect("valid");
        assert_eq!(component.reuse, Reuse::Reset);
        assert_eq!(component.route.prefix, "/");
        assert_eq!(component.tenant, DEFAULT_TENANT);
        assert_eq!(component.max_instances, DEFAULT_MAX_INSTANCES);
        assert_eq!(component.idle_timeout, DEFAULT_IDLE_TIMEOUT);
        let command = build(Program::Wagi("c.wasm".into()))
            .build()
            .expect("valid");
        assert_eq!(command.reuse, Reuse::Fresh);
        assert!(matches!(
            build(Program::Proxy("a.wasm".into()))
                .min_instances(Some(3))
                .max_instances(Some(2))
                .build(),
            Err(Contradiction::MinAboveMax { min: 3, max: 2 })
        ));
        assert!(matches!(
            build(Program::Wagi("c.wasm".into()))
                .reuse(Some(Reuse::Warm))
                .build(),
            Err(Contradiction::WagiNotFresh { .. })
        ));
        assert!(matches!(
            build(Program::Wagi("c.wasm".into()))
                .min_instances(Some(1))
                .build(),
            Err(Contradiction::WagiPool)
        ));
    }

    #[test]
    fn routes_match_on_path_segments_and_host() {
        let route = Route {
            host: None,
            prefix: "/api".into(),
        };
        assert_eq!(route.matches(None, "/api"), Some(4));
        assert_eq!(route.matches(None, "/api/x?y"), Some(4));
        assert_eq!(route.matches(None, "/api?q"), Some(4));
        assert_eq!(route.matches(None, "/apix"), None);
        let root = Route {
            host: Some("a.example".into()),
            prefix: "/".into(),
        };
        assert_eq!(root.matches(Some("A.example:8080"), "/anything"), Some(1));
        assert_eq!(root.matches(Some("b.example"), "/"), None);
        assert_eq!(root.matches(None, "/"), None);
    }
}
