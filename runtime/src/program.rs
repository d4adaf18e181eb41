//! Compiled programs: a core module or a component, told apart by the bytes' header, and
//! compiled with their data segments lifted into module images or left to wasmtime.
//!
//! [`compile`] is the one way bytes become a [`Program`], for [`crate::Samepage::compile`]
//! and [`crate::Host`] alike:
//!
//! - bytes that are neither the binary format (`\0asm`) nor UTF-8 text are refused with
//!   that reason, rather than wasmtime's complaint that they are not UTF-8;
//! - a component is a binary whose header's layer field is 1, or text whose first token
//!   (after `;;` comments) is `(component`; anything else is a core module;
//! - with `lift` (memfd memories with a merge engine) data segments are lifted into module
//!   images ([`crate::image`]); without, a plain wasmtime module or component keeps them, since
//!   a lifted segment needs the merge engine to be mapped.

use wasmtime::Engine;

use crate::image::{Component, Module};

/// A compiled program: a core module or a component, told apart by its header.
#[derive(Clone, Debug)]
pub enum Program {
    /// A WASI preview 1 core module (a command with `_start`, or a reactor).
    Module(Module),
    /// A component; a command exports `wasi:cli/run` and gets WASI preview 2.
    Component(Component),
}

impl Program {
    /// Its module images: what of its data is mapped into each instance, and what is not
    /// and why ([`crate::ModuleImages::unlifted`]).
    pub fn images(&self) -> &std::sync::Arc<crate::ModuleImages> {
        match self {
            Program::Module(module) => module.images(),
            Program::Component(component) => component.images(),
        }
    }
}

/// Compiles `bytes` as a module or a component, told apart by the header; with `lift`,
/// data segments are lifted into module images ([`crate::image`]), else wasmtime keeps them.
pub(crate) fn compile(engine: &Engine, bytes: &[u8], lift: bool) -> wasmtime::Result<Program> {
    // Without the binary magic wasmtime reads the bytes as text; say what they are not
    // rather than that they are not UTF-8.
    if !bytes.starts_with(b"\0asm") && std::str::from_utf8(bytes).is_err() {
        wasmtime::bail!(
            "it is neither a WebAssembly binary (which starts with \\0asm) nor the text \
             format (which is UTF-8)"
        );
    }
    Ok(match (is_component(bytes), lift) {
        (true, true) => Program::Component(Component::new(engine, bytes)?),
        (true, false) => {
            Program::Component(wasmtime::component::Component::new(engine, bytes)?.into())
        }
        (false, true) => Program::Module(Module::new(engine, bytes)?),
        (false, false) => Program::Module(wasmtime::Module::new(engine, bytes)?.into()),
    })
}

/// Whether `bytes` are a component: the binary header's layer field, or `(component` as the
/// text format's first token.
pub fn is_component(bytes: &[u8]) -> bool {
    if let Some(header) = bytes.strip_prefix(b"\0asm") {
        return header.get(2..4) == Some(&[1, 0]);
    }
    let mut text = std::str::from_utf8(bytes).unwrap_or("").trim_start();
    while let Some(rest) = text.strip_prefix(";;") {
        text = rest
            .split_once('\n')
            .map_or("", |(_, rest)| rest)
            .trim_start();
    }
    text.strip_prefix('(')
        .is_some_and(|rest| rest.trim_start().starts_with("component"))
}
