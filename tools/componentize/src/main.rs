//! Makes a component of a WASI preview 1 core module that uses the guest API, as
//! `wasm-tools component new --adapt` does: embeds the type of world `guest` from `wit/`,
//! then applies wasmtime 48's preview 1 command adapter. `scripts/build-c-guests` runs it.
//!
//! `cargo run --release -p componentize -- CORE.wasm OUT.wasm`

use std::path::Path;

use wit_component::{ComponentEncoder, StringEncoding, embed_component_metadata};
use wit_parser::Resolve;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args_os().skip(1);
    let (Some(core), Some(out)) = (args.next(), args.next()) else {
        return Err("usage: componentize CORE.wasm OUT.wasm".into());
    };
    let mut module = std::fs::read(&core)?;
    let mut resolve = Resolve::default();
    let wit = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../wit");
    let (package, _) = resolve.push_dir(&wit)?;
    let world = resolve.select_world(&[package], Some("guest"))?;
    embed_component_metadata(&mut module, &resolve, world, StringEncoding::UTF8)?;
    let component = ComponentEncoder::default()
        .validate(true)
        .module(&module)?
        .adapter(
            "wasi_snapshot_preview1",
            wasi_preview1_component_adapter_provider::WASI_SNAPSHOT_PREVIEW1_COMMAND_ADAPTER,
        )?
        .encode()?;
    std::fs::write(&out, component)?;
    Ok(())
}
