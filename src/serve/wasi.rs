//! The WASI context every instance of a function starts from, whether a wasi:http
//! component's (`proxy.rs`) or a WAGI command's (`wagi.rs`): the function's environment and
//! directories, and the host's stderr, so that what a guest logs reaches the host's log.

use super::config::FunctionConfig;
use super::failure::Failure;

/// The WASI context every instance of `function` starts from; each kind of instance adds its
/// own (a command its arguments, stdin and stdout).
pub fn wasi_context(function: &FunctionConfig) -> Result<wasmtime_wasi::WasiCtxBuilder, Failure> {
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
