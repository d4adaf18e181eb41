//! The parsers both commands share, with `wasmtime run`'s and `wasmtime serve`'s spellings:
//! `--dir HOST[::GUEST]`, `--env NAME[=VALUE]`, `-W KEY=VALUE,...` (fuel, timeout,
//! max-memory-size), `-C KEY=VALUE,...` (cache, cache-config), durations with units (`500ms`,
//! `2s`) and sizes with binary units (`64MiB`).

use std::path::PathBuf;
use std::time::Duration;

use clap::ValueEnum;
use samepage_runtime::{CompilationCache, Limits};

/// An on/off setting, with the spellings of sysfs (`1`, `0`) and of people (`yes`, `off`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Switch {
    #[value(alias = "1", alias = "y", alias = "yes", alias = "true")]
    On,
    #[value(alias = "0", alias = "n", alias = "no", alias = "false")]
    Off,
}

impl From<bool> for Switch {
    fn from(on: bool) -> Self {
        if on { Switch::On } else { Switch::Off }
    }
}

/// One `-W` setting.
#[derive(Clone, Debug, PartialEq)]
pub enum LimitSetting {
    Fuel(u64),
    Timeout(Duration),
    MaxMemorySize(usize),
}

/// One `-C` setting.
#[derive(Clone, Debug, PartialEq)]
pub enum CodegenSetting {
    Cache(bool),
    CacheConfig(PathBuf),
}

/// The limits that `-W` settings ask for; a key given twice keeps its last value.
pub fn limits(wasm: &[Vec<LimitSetting>]) -> Limits {
    let mut limits = Limits::default();
    for setting in wasm.iter().flatten() {
        match *setting {
            LimitSetting::Fuel(fuel) => limits.fuel = Some(fuel),
            LimitSetting::Timeout(after) => limits.timeout = Some(after),
            LimitSetting::MaxMemorySize(bytes) => limits.max_memory_size = Some(bytes),
        }
    }
    limits
}

/// A guest environment from `--env` settings: `NAME` alone takes the host's value, and is
/// left out when the host has none (as `wasmtime run --env NAME`).
pub fn environment(envs: &[(String, Option<String>)]) -> Vec<(String, String)> {
    envs.iter()
        .filter_map(|(name, value)| match value {
            Some(value) => Some((name.clone(), value.clone())),
            None => std::env::var(name).ok().map(|value| (name.clone(), value)),
        })
        .collect()
}

/// What `-C` settings say of wasmtime's compilation cache: on unless `cache=n`, configured
/// by `cache-config` if given.
pub fn compilation_cache(codegen: &[Vec<CodegenSetting>]) -> CompilationCache {
    let mut cache = CompilationCache::Default;
    let mut config = None;
    for setting in codegen.iter().flatten() {
        match setting {
            CodegenSetting::Cache(true) => cache = CompilationCache::Default,
            CodegenSetting::Cache(false) => cache = CompilationCache::Off,
            CodegenSetting::CacheConfig(path) => config = Some(path.clone()),
        }
    }
    match (cache, config) {
        (CompilationCache::Off, _) => CompilationCache::Off,
        (_, Some(path)) => CompilationCache::Config(path),
        (cache, None) => cache,
    }
}

pub fn parse_dir(text: &str) -> Result<(PathBuf, String), String> {
    match text.split_once("::") {
        Some((host, guest)) if !host.is_empty() && !guest.is_empty() => {
            Ok((PathBuf::from(host), guest.to_owned()))
        }
        Some(_) => Err(format!("expected HOST or HOST::GUEST, got {text:?}")),
        None if text.is_empty() => Err("expected a directory".to_owned()),
        None => Ok((PathBuf::from(text), text.to_owned())),
    }
}

pub fn parse_env(text: &str) -> Result<(String, Option<String>), String> {
    let (name, value) = match text.split_once('=') {
        Some((name, value)) => (name, Some(value.to_owned())),
        None => (text, None),
    };
    if name.is_empty() {
        return Err(format!("expected NAME=VALUE or NAME, got {text:?}"));
    }
    Ok((name.to_owned(), value))
}

/// Splits `KEY=VALUE[,KEY=VALUE...]` and parses each pair with `one`.
fn settings<T>(
    text: &str,
    one: impl Fn(&str, &str) -> Result<T, String>,
) -> Result<Vec<T>, String> {
    text.split(',')
        .map(|pair| {
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| format!("expected KEY=VALUE, got {pair:?}"))?;
            one(key.trim(), value.trim())
        })
        .collect()
}

pub fn parse_limit(text: &str) -> Result<Vec<LimitSetting>, String> {
    settings(text, |key, value| match key {
        "fuel" => value
            .parse()
            .map(LimitSetting::Fuel)
            .map_err(|e| format!("fuel={value}: {e}")),
        "timeout" => parse_duration(value)
            .map(LimitSetting::Timeout)
            .map_err(|e| format!("timeout={value}: {e}")),
        "max-memory-size" => parse_bytes(value)
            .and_then(|bytes| usize::try_from(bytes).map_err(|e| e.to_string()))
            .map(LimitSetting::MaxMemorySize)
            .map_err(|e| format!("max-memory-size={value}: {e}")),
        _ => Err(format!(
            "unknown -W option {key:?}: samepage takes fuel, timeout and max-memory-size"
        )),
    })
}

pub fn parse_codegen(text: &str) -> Result<Vec<CodegenSetting>, String> {
    settings(text, |key, value| match key {
        "cache" => match value {
            "y" | "yes" | "true" => Ok(CodegenSetting::Cache(true)),
            "n" | "no" | "false" => Ok(CodegenSetting::Cache(false)),
            _ => Err(format!("cache={value}: expected y or n")),
        },
        "cache-config" => Ok(CodegenSetting::CacheConfig(PathBuf::from(value))),
        _ => Err(format!(
            "unknown -C option {key:?}: samepage takes cache and cache-config"
        )),
    })
}

/// A duration as `wasmtime run -W timeout` takes it: a number with a unit (`ns`, `us`,
/// `ms`, `s`, `m`, `h`), or bare seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let (number, unit) = split_unit(text);
    let number: f64 = number
        .parse()
        .map_err(|_| "expected a number and a unit, such as 2s".to_owned())?;
    let seconds_per_unit = match unit {
        "" | "s" => 1.0,
        "ns" => 1e-9,
        "us" | "µs" => 1e-6,
        "ms" => 1e-3,
        "m" => 60.0,
        "h" => 3600.0,
        other => return Err(format!("unknown unit {other:?} (ns, us, ms, s, m or h)")),
    };
    Duration::try_from_secs_f64(number * seconds_per_unit).map_err(|e| e.to_string())
}

/// A size in bytes: a whole number, bare or with a unit (`K`, `M`, `G`, or `KiB`, `MiB`,
/// `GiB`; all powers of 1024, as wasmtime's and the kernel's sizes are).
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let (number, unit) = split_unit(text);
    let number: u64 = number
        .parse()
        .map_err(|_| "expected a whole number of bytes, with K, M or G if wanted".to_owned())?;
    let shift = match unit.trim_end_matches("iB").trim_end_matches('B') {
        "" => 0,
        "K" | "k" => 10,
        "M" => 20,
        "G" => 30,
        _ => return Err(format!("unknown unit {unit:?} (K, M, G, KiB, MiB or GiB)")),
    };
    number
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("{text} does not fit in 64 bits"))
}

/// `text`'s leading number and the unit after it, spaces dropped.
fn split_unit(text: &str) -> (&str, &str) {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    (number, unit.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dir_takes_both_forms() {
        assert_eq!(parse_dir("data"), Ok(("data".into(), "data".to_owned())));
        assert_eq!(parse_dir("data::/d"), Ok(("data".into(), "/d".to_owned())));
        assert!(parse_dir("data::").is_err());
    }

    #[test]
    fn limits_parse_as_wasmtime_writes_them() {
        assert_eq!(
            parse_limit("fuel=1000,timeout=250ms"),
            Ok(vec![
                LimitSetting::Fuel(1000),
                LimitSetting::Timeout(Duration::from_millis(250))
            ])
        );
        assert_eq!(
            parse_limit("max-memory-size=65536"),
            Ok(vec![LimitSetting::MaxMemorySize(65536)])
        );
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert!(parse_limit("fule=1").is_err());
        assert!(parse_duration("5 parsecs").is_err());
    }
}
