//! Functions' programs, compiled.
//!
//! Functions of one program share its compiled code, and so its module images and the pages
//! of its code: each file is compiled once, however many functions serve it. A program that
//! is not what its function says it is (a core module given as a component, or the other way
//! round) is refused with the function's place in the config. A program some of whose data
//! segments are copied into every instance, not mapped from a module image, is said once on
//! stderr, with the reason.

use std::collections::BTreeMap;
use std::path::PathBuf;

use samepage_runtime::{ComponentPre, Samepage};

use super::config::{ConfigError, FunctionConfig, Program};
use super::proxy::ProxyState;

/// What a function runs, compiled; clones share the compiled code and its module images.
#[derive(Clone)]
pub enum Code {
    /// A `wasi:http/proxy` component, instantiated into a pool.
    Proxy(ProxyCode),
    /// A WAGI command, instantiated once per request.
    Wagi(samepage_runtime::Module),
}

/// A proxy component, compiled, and linked once against the host's WASI and wasi:http: each
/// instance is made from the `InstancePre`, with no import to resolve.
#[derive(Clone)]
pub struct ProxyCode {
    component: samepage_runtime::Component,
    /// `None` when linking failed: instantiation then links each time, and fails with
    /// wasmtime's reason, as a component the host cannot satisfy always did.
    pre: Option<ComponentPre<ProxyState>>,
}

impl ProxyCode {
    /// Links `component` once against the proxy linker of `engine`.
    fn new(engine: &wasmtime::Engine, component: samepage_runtime::Component) -> Self {
        let pre = super::proxy::linker(engine)
            .ok()
            .and_then(|linker| ComponentPre::new(&linker, &component).ok());
        Self { component, pre }
    }

    pub fn component(&self) -> &samepage_runtime::Component {
        &self.component
    }

    /// The component pre-linked, when its imports are the host's.
    pub fn pre(&self) -> Option<&ComponentPre<ProxyState>> {
        self.pre.as_ref()
    }
}

/// The code of each of `functions`, in their order, each program compiled once.
pub fn compile_all(
    engine: &wasmtime::Engine,
    samepage: &Samepage,
    functions: &[FunctionConfig],
) -> Result<Vec<Code>, ConfigError> {
    let mut compiled: BTreeMap<(PathBuf, bool), Code> = BTreeMap::new();
    functions
        .iter()
        .map(|function| {
            let path = function.program.path();
            let key = (
                std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned()),
                matches!(function.program, Program::Wagi(_)),
            );
            if let Some(code) = compiled.get(&key) {
                return Ok(code.clone());
            }
            let code = compile(engine, samepage, function)?;
            compiled.insert(key, code.clone());
            Ok(code)
        })
        .collect()
}

/// Compiles a function's program, with errors that say which function and where.
fn compile(
    engine: &wasmtime::Engine,
    samepage: &Samepage,
    function: &FunctionConfig,
) -> Result<Code, ConfigError> {
    let path = function.program.path();
    let refuse = |why: String| {
        function
            .defined_at
            .error(format!("function {:?}: {why}", function.name))
    };
    let bytes = std::fs::read(path)
        .map_err(|error| refuse(format!("reading {}: {error}", path.display())))?;
    let program = samepage
        .compile(engine, &bytes)
        .map_err(|error| refuse(format!("{} is not valid: {error:#}", path.display())))?;
    match (&function.program, program) {
        (Program::Proxy(_), samepage_runtime::Program::Component(component)) => {
            say_unlifted(function, component.images());
            Ok(Code::Proxy(ProxyCode::new(engine, component)))
        }
        (Program::Wagi(_), samepage_runtime::Program::Module(module)) => {
            say_unlifted(function, module.images());
            Ok(Code::Wagi(module))
        }
        (Program::Proxy(_), _) => Err(refuse(format!(
            "{} is a core module, not a component: give it as `module` (WAGI)",
            path.display()
        ))),
        (Program::Wagi(_), _) => Err(refuse(format!(
            "{} is a component, not a core module: give it as `component`",
            path.display()
        ))),
    }
}

/// One line when some of a program's data is copied into every instance instead of mapped
/// from its module image: the first reason, and how many more there are.
fn say_unlifted(function: &FunctionConfig, images: &samepage_runtime::ModuleImages) {
    let unlifted = images.unlifted();
    if let Some(first) = unlifted.first() {
        let more = match unlifted.len() - 1 {
            0 => String::new(),
            more => format!(" (and {more} more)"),
        };
        eprintln!(
            "samepage: function {}: {}: {first}{more}",
            function.name,
            function.program.path().display()
        );
    }
}
