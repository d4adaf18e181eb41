//! Makes a component of a core module, as `wasm-tools component new` does, so that building
//! the test guests needs no wasm-tools. `scripts/build-c-guests` and
//! `scripts/build-http-components` run it.
//!
//! - `componentize CORE.wasm OUT.wasm`: a WASI preview 1 module that uses the guest API;
//!   embeds the type of world `guest` from `wit/`, then applies wasmtime 48's preview 1
//!   command adapter.
//! - `componentize --wit DIR --world WORLD CORE.wasm OUT.wasm`: a module that imports WASI
//!   preview 2 directly through the canonical ABI; embeds the type of `WORLD` from the WIT
//!   package at `DIR` (with its `deps/`), and applies no adapter.
//!
//! Either way the component is validated. CORE may be in the text format.

use std::path::{Path, PathBuf};

use wit_component::{ComponentEncoder, StringEncoding, embed_component_metadata};
use wit_parser::Resolve;

const USAGE: &str = "usage: componentize [--wit DIR --world WORLD] CORE.wasm OUT.wasm";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut option = |name: &str| -> Result<Option<String>, Box<dyn std::error::Error>> {
        let Some(at) = args.iter().position(|arg| arg == name) else {
            return Ok(None);
        };
        args.remove(at);
        if at < args.len() {
            Ok(Some(args.remove(at)))
        } else {
            Err(format!("{name} needs a value; {USAGE}").into())
        }
    };
    let wit = option("--wit")?;
    let world = option("--world")?;
    let [core, out] = &args[..] else {
        return Err(USAGE.into());
    };
    // The text format is read too (`wat::parse_file` passes binaries through).
    let mut module = wat::parse_file(core)?;
    let mut resolve = Resolve::default();
    let (wit, world, adapter) = match (wit, world) {
        (None, None) => (
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../wit"),
            "guest".to_owned(),
            Some(wasi_preview1_component_adapter_provider::WASI_SNAPSHOT_PREVIEW1_COMMAND_ADAPTER),
        ),
        (Some(wit), Some(world)) => (PathBuf::from(wit), world, None),
        _ => return Err(format!("--wit and --world go together; {USAGE}").into()),
    };
    let (package, _) = resolve.push_dir(&wit)?;
    let world = resolve.select_world(&[package], Some(&world))?;
    embed_component_metadata(&mut module, &resolve, world, StringEncoding::UTF8)?;
    let mut encoder = ComponentEncoder::default().validate(true).module(&module)?;
    if let Some(adapter) = adapter {
        encoder = encoder.adapter("wasi_snapshot_preview1", adapter)?;
    }
    std::fs::write(out, encoder.encode()?)?;
    Ok(())
}
