//! Module images: a module's initial memory, built once in the stable store and mapped into
//! every new memory of the module as pages that are merged already.
//!
//! wasmtime's own images (`MemoryImage` in its `runtime/vm/cow.rs`) put a module's initial
//! memory in a memfd of their own and map it `MAP_PRIVATE` into each instance's anonymous
//! memory. samepage's memories are the engine's regions, so the image lives where the
//! engine keeps shared pages, the stable store, and mapping it is what a merge does:
//!
//! - [`crate::Engine::image`] writes the image's non-zero pages into stable slots once (pages
//!   already stable in the same domain, such as another module's image of the same bytes, are
//!   reused) and *pins* them: an image's page stays while the image lives, sharers or not.
//! - [`crate::Engine::register_with_image`] maps each run of image pages over the new
//!   region with one `mmap` and records the region's pages as sharers of those slots. Nothing
//!   is copied; the pages are ordinary merged pages from then on: a write takes the kernel's
//!   copy-on-write fault, the scanner gives the written page back to the region, sharing
//!   limits hold (a run whose slots are full gets another copy, a dup), and pages the
//!   scanner finds equal elsewhere merge onto image pages.
//! - [`crate::Engine::reset_region`] puts a region back to its image in time proportional to
//!   what its owner touched.
//!
//! Images are per domain: an image's pages merge only with regions of its domain, so a host
//! builds one image per module and tenant.
//!
//! Invariants: an image's pages are immutable (quiescence rule 5, as every stable page);
//! an image is mapped only into a region whose pages all read zeros from its own memfd at
//! the time (a fresh region, or one just reset), so mapping it changes nothing but what the
//! image says; and a pinned page is never punched, so a region that maps it later reads
//! the image's bytes.

use std::sync::Arc;

use crate::quiesce::DomainId;
use crate::shared::Shared;

/// A module's initial memory in an engine's stable store; mapped into new regions by
/// [`crate::Engine::register_with_image`]. Dropping it lets its pages go once no region page
/// shares them.
pub struct MemoryImage {
    /// The state's number for it.
    pub(crate) id: u64,
    domain: DomainId,
    /// Bytes from the start of a region that the image covers.
    len: usize,
    pub(crate) shared: Arc<Shared>,
}

impl MemoryImage {
    pub(crate) fn new(id: u64, domain: DomainId, len: usize, shared: Arc<Shared>) -> Self {
        Self {
            id,
            domain,
            len,
            shared,
        }
    }

    /// The engine's number for the image, never reused while the process runs: two images
    /// with the same number are the same image.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Bytes from the start of a region that the image covers.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The domain whose regions the image may go into.
    pub fn domain(&self) -> DomainId {
        self.domain
    }

    /// The image's bytes, read back from the stable store (to build the same image for
    /// another domain without keeping a copy of the bytes around).
    pub fn read(&self) -> Vec<u8> {
        self.shared.state.lock().read_image(self.id, self.len)
    }
}

impl std::fmt::Debug for MemoryImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryImage")
            .field("domain", &self.domain)
            .field("len", &self.len)
            .finish()
    }
}

impl Drop for MemoryImage {
    fn drop(&mut self) {
        // Unpinning can only fail to punch a freed page: memory of the stable store leaks,
        // no data is affected, and the image is going away either way.
        let _ = self.shared.state.lock().drop_image(self.id);
    }
}
