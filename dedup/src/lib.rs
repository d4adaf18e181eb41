//! samepage-dedup: finds pages with identical content across memfd-backed memory regions and
//! merges them into one copy-on-write page. It is Linux KSM's `ksmd` rethought for a host that
//! owns the memory it merges; it knows nothing of WebAssembly.
//!
//! # The mechanism
//!
//! Every region is a `MAP_SHARED` mapping of its own memfd. To merge a page, the engine copies
//! its content once into a page of the *stable memfd*, maps that page `MAP_PRIVATE |
//! MAP_FIXED` over the page of every region that holds the same bytes, and punches the
//! regions' own memfd pages to free them. Reads then hit the one stable page; a write takes the
//! kernel's copy-on-write fault and gets a private copy, which no other sharer sees. Nothing
//! in the write path calls back into samepage.
//!
//! # Why runs
//!
//! Each `mmap` over the middle of a mapping splits it: an isolated merged page costs two
//! mappings (VMAs) and about 8 µs, and the process-wide `vm.max_map_count` (65,530 by default)
//! is exhausted after some 30,000 isolated pages. A run of pages costs two mappings and about
//! 0.1 µs a page. Real programs' identical pages come in long runs at the same offsets, so when
//! a page matches, the engine extends the match page by page and merges the whole run with one
//! `mmap` onto *contiguous* stable pages. A later sharer of the same run then finds page `i + 1`
//! of its run in stable slot `s + 1`, compares, and takes the whole run with one `mmap` too.
//! A run may also bridge a few pages that differ (up to eight in a row, and no more than it
//! shares): the whole *window* is mapped at once, and the differing pages get private copies
//! of their own bytes through the mapping's copy-on-write. A private copy costs a fault
//! (about 2 µs) and no memory beyond the page it replaces; the mappings it saves are what
//! runs out first when identical pages alternate with unique ones. A bridged page is still
//! scanned like any other: once its bytes match a page elsewhere, it is given back to its
//! memfd (splitting the window, if the map budget allows) and merged (if it allows that too;
//! if not, the page stays its region's own until a later pass).
//! The engine counts the mappings it creates and stays within a share of `vm.max_map_count`;
//! when that budget is tight it merges only long runs and counts what it skipped.
//!
//! # Two indexes, as in KSM
//!
//! - The *stable index* finds merged pages by content (domain and xxh3 of the bytes). It is
//!   never flushed: its pages cannot change, because nobody can write a stable page
//!   ([`quiesce`], rule 5).
//! - The *unstable index* holds this pass's pages that stayed unchanged since the last pass
//!   but matched nothing yet. Its pages belong to running instances and may change under it,
//!   so it is rebuilt every full pass, its entries are re-checked when found, and a match is
//!   always confirmed by comparing the full bytes. A hash match alone never merges.
//!
//! A page becomes a candidate once its checksum is unchanged since the previous pass (KSM's
//! volatility rule: pages written all the time are not worth merging), or at once when its
//! owner says the range is ready ([`Engine::merge_now`]). A page whose last checksum names a
//! stable page is compared with that page directly: equal bytes prove both that it did not
//! change and that it can merge, without hashing it again.
//!
//! # Sharers that leave
//!
//! The scanner reads `/proc/self/pagemap` for the merged pages it passes: a merged page that
//! became an anonymous page was written by its owner. The engine copies it back into the
//! region's own memfd, maps the memfd there again, and drops the sharer; a stable page that
//! no one maps any more is punched, and its slot is reused once no mapping covers it. Every
//! page of a region is thus its own memfd page, a stable page it shares, or a private copy in
//! a window the engine made (and accounts for) — never a stray copy nobody knows about.
//!
//! # Only pages that exist
//!
//! Like KSM's `rmap_item`s, the engine's page records exist only for pages that do: pages
//! whose region memfd holds data (found with `SEEK_DATA`, so a hole costs nothing to pass
//! over) and pages that map a stable page. A region of gigabytes that its owner barely
//! touched costs a few records and a few visits a pass, and never makes merging a loss.
//!
//! # Module images
//!
//! A module's initial memory can be built once in the stable store ([`MemoryImage`]) and
//! mapped into each new region as pages that are merged already: nothing is copied, and the
//! pages are ordinary sharers from then on. [`Engine::reset_region`] puts a region back to its
//! image in time proportional to what its owner touched.
//!
//! # What KSM grew, here too
//!
//! - *Sharing limits* (`max_page_sharing`): a content whose stable page is full gets another
//!   page of the same bytes, a dup, and its index entry becomes a chain of dups (the
//!   engine's `stable` module states how).
//! - *Zero pages* (`use_zero_pages`): a page of zeros is punched out of its own memfd, which
//!   then reads back zeros; it needs no stable page and no mapping.
//! - *Smart scan*: a page that stays unchanged and unmerged (it matches nothing, or its merge
//!   does not fit the map budget) is looked at less and less often, on passes aligned so that
//!   two such pages still meet.
//! - *The scan-time advisor* ([`Advisor`]) tunes `pages_to_scan` to a target pass time under
//!   a CPU cap.
//! - *Scan on park*, which KSM cannot have: the host tells the engine when an instance
//!   returns from a call ([`Engine::parked`]), and the engine looks at that instance's memory
//!   at once and again shortly after, merging what did not change in between.
//!
//! # Who may remap what
//!
//! See [`quiesce`]: the engine remaps a region only while holding its owner's gate, and the
//! scanner never waits for one.
//!
//! # Where each step lives
//!
//! One page's journey, file by file, in the order it happens:
//!
//! | step | file |
//! | --- | --- |
//! | the region is registered (a memfd mapped in a reservation) | `mapping.rs`, `region.rs`, `engine.rs` (what its handles share: `shared.rs`) |
//! | the scanner thread picks a batch or a park visit | `scanner.rs` |
//! | the visit: page map, checksum, volatility, smart scan, index lookups | `state/scan.rs` (the records, `Records` and `RegionPages`, in `state/records.rs`) |
//! | a match grows into a run or a window and is mapped onto stable slots | `state/merge.rs`, with `layout.rs` (window shape, mapping cost) and `state/budget.rs` (the map-count budget, `MapBudget`) |
//! | the stable page: slots, sharers, chains and dups | `stable/mod.rs` (`StableStore`), `stable/index.rs`, `stable/slots.rs` |
//! | the system calls: remapping, and memfd punches | `remap.rs`, `memfds.rs` |
//! | what the kernel says of the mappings (where anonymous memory keeps two apart) | `vma.rs` |
//! | module images: built in the stable store, mapped as merged pages, reset | `image.rs`, `state/image.rs` (`Images`) |
//! | copy-on-write break | the kernel (nothing of samepage runs) |
//! | sharer-left recovery and unmerge | `state/release.rs` (the page map is read in `pagemap.rs`) |
//! | counters, per-owner figures, audit | `state/accounting.rs` (`Counters`), `stats.rs` |
//!
//! `state/mod.rs` opens with the invariants that hold across those steps; its `MergeState`
//! holds each step's part (`Records`, `StableStore`, `MapBudget`, `Counters`) and does what
//! spans them.

pub mod advice;
pub mod advisor;
pub mod error;
pub mod faults;
pub mod image;
pub mod knobs;
pub mod mapping;
pub mod pattern;
pub mod quiesce;
pub mod stats;

mod engine;
mod layout;
mod memfds;
mod pagemap;
mod protect;
mod region;
mod remap;
mod scanner;
mod shared;
mod stable;
mod state;
mod vma;

pub use advice::{Advice, MergeScope};
pub use advisor::Advisor;
pub use engine::{Engine, EngineConfig, MergeNowReport, RegionHandle};
pub use error::Error;
pub use image::MemoryImage;
pub use knobs::{AdvisorMode, KNOBS, Knob, KnobRange, KnobValue, Knobs, RunMode};
pub use mapping::{MappingError, MemfdMapping};
pub use protect::{ProtectError, RunningMergesOff, WaitFigures};
pub use quiesce::{DomainId, LentGate, Owner, OwnerGuard, OwnerId};
pub use region::RegionId;
pub use state::Audit;
pub use stats::{Counter, OwnerStats, Stats, Value};

/// The page size samepage merges at: 4 KiB, as on x86_64 and most aarch64 Linux systems.
pub const PAGE_SIZE: usize = 4096;
