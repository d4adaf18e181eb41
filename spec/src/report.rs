//! What a run found: per file the outcome on each side, what merging did, and where
//! samepage's memories made a difference (which must be nowhere).

use std::time::Duration;

/// Which memories a side runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Memories {
    /// wasmtime's own (its default memories and copy-on-write images).
    Wasmtime,
    /// samepage's, merged while the file runs, with zero pages handled as said.
    Samepage(ZeroPages),
}

/// What the merge engine does with pages of zeros (its `use_zero_pages` knob).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ZeroPages {
    /// Punched out of the instance's memfd, to read back as zeros (`use_zero_pages` on).
    Punched,
    /// Merged into a stable page of zeros like any other content (`use_zero_pages` off).
    Merged,
}

impl ZeroPages {
    pub const BOTH: [ZeroPages; 2] = [ZeroPages::Punched, ZeroPages::Merged];

    pub(crate) fn use_zero_pages(self) -> bool {
        self == ZeroPages::Punched
    }
}

impl std::fmt::Display for Memories {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Memories::Wasmtime => f.write_str("wasmtime's memories"),
            Memories::Samepage(ZeroPages::Punched) => {
                f.write_str("samepage's memories, zero pages punched")
            }
            Memories::Samepage(ZeroPages::Merged) => {
                f.write_str("samepage's memories, zero pages merged")
            }
        }
    }
}

/// How a file ended on one side.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Every directive did what the script says.
    Pass,
    /// The first directive that did not, with its line and `wasmtime-wast`'s message.
    Fail(String),
}

impl Outcome {
    pub fn passed(&self) -> bool {
        *self == Outcome::Pass
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Pass => f.write_str("pass"),
            Outcome::Fail(message) => write!(f, "fail: {message}"),
        }
    }
}

/// One file on samepage's memories.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SamepageOutcome {
    pub zero_pages: ZeroPages,
    pub outcome: Outcome,
    /// What went wrong in the merge engine around the file, whatever the outcome: an audit
    /// that found disagreeing records, scanner errors, a merge or unmerge between directives
    /// that failed, regions left registered after the file's store was dropped.
    pub engine_problems: Vec<String>,
}

/// One file on every side.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileReport {
    /// As [`crate::SpecFile::name`].
    pub name: String,
    /// Top-level directives in the file.
    pub directives: usize,
    pub wasmtime: Outcome,
    /// One per zero-page mode, in the order of [`ZeroPages::BOTH`].
    pub samepage: Vec<SamepageOutcome>,
}

/// Where samepage's memories made a difference.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Divergence {
    /// The file passed on one side and failed on the other.
    Outcome {
        file: String,
        zero_pages: ZeroPages,
        wasmtime: Outcome,
        samepage: Outcome,
    },
    /// The merge engine went wrong while the file ran.
    Engine {
        file: String,
        zero_pages: ZeroPages,
        problem: String,
    },
}

impl std::fmt::Display for Divergence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Divergence::Outcome {
                file,
                zero_pages,
                wasmtime,
                samepage,
            } => write!(
                f,
                "{file}: on wasmtime's memories {wasmtime}; on {} {samepage}",
                Memories::Samepage(*zero_pages)
            ),
            Divergence::Engine {
                file,
                zero_pages,
                problem,
            } => write!(
                f,
                "{file}: on {}, the merge engine: {problem}",
                Memories::Samepage(*zero_pages)
            ),
        }
    }
}

/// What the merge engine did in one zero-page mode, over every file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MergeActivity {
    /// Merge-now calls between directives.
    pub merge_now_calls: u64,
    /// Pages that mapped a stable page after those calls, added up over the calls.
    pub pages_merged: u64,
    /// Pages of zeros freed by those calls, added up.
    pub zero_pages_freed: u64,
    /// Unmerge-all calls, and unmerges of each of the store's regions, between directives.
    pub unmerge_all_calls: u64,
    pub unmerge_region_calls: u64,
    /// The most `pages_sharing` the engine counted right after a merge-now call.
    pub peak_pages_sharing: u64,
    /// The scanner's passes and page visits over the run.
    pub full_scans: u64,
    pub pages_scanned: u64,
    /// Visits of regions whose instance was inside a call (write-protect windows).
    pub running_visits: u64,
}

/// One side over every file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SideSummary {
    pub memories: Memories,
    pub passed: usize,
    pub elapsed: Duration,
    /// `None` on wasmtime's memories.
    pub merging: Option<MergeActivity>,
}

/// A whole run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    pub files: Vec<FileReport>,
    /// wasmtime's side, then samepage's in each zero-page mode.
    pub sides: Vec<SideSummary>,
}

impl Report {
    /// Every difference samepage's memories made; a sound run has none.
    pub fn divergences(&self) -> Vec<Divergence> {
        let mut divergences = Vec::new();
        for file in &self.files {
            for side in &file.samepage {
                if side.outcome.passed() != file.wasmtime.passed() {
                    divergences.push(Divergence::Outcome {
                        file: file.name.clone(),
                        zero_pages: side.zero_pages,
                        wasmtime: file.wasmtime.clone(),
                        samepage: side.outcome.clone(),
                    });
                }
                divergences.extend(
                    side.engine_problems
                        .iter()
                        .map(|problem| Divergence::Engine {
                            file: file.name.clone(),
                            zero_pages: side.zero_pages,
                            problem: problem.clone(),
                        }),
                );
            }
        }
        divergences
    }

    /// Files whose outcome on some side differs from wasmtime's: the symmetric difference of
    /// the pass sets.
    pub fn differing_files(&self) -> Vec<&str> {
        self.files
            .iter()
            .filter(|file| {
                file.samepage
                    .iter()
                    .any(|side| side.outcome.passed() != file.wasmtime.passed())
            })
            .map(|file| file.name.as_str())
            .collect()
    }

    /// Files that failed on wasmtime's memories, with wasmtime's message.
    pub fn failed_on_wasmtime(&self) -> impl Iterator<Item = (&str, &str)> {
        self.files.iter().filter_map(|file| match &file.wasmtime {
            Outcome::Pass => None,
            Outcome::Fail(message) => Some((file.name.as_str(), message.as_str())),
        })
    }

    pub fn side(&self, memories: Memories) -> Option<&SideSummary> {
        self.sides.iter().find(|side| side.memories == memories)
    }
}
