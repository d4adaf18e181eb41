//! The stable store: one memfd holding every stable page, the nodes that describe them, and
//! the stable index that finds them by content.
//!
//! A stable page is a page of the stable memfd (a *slot*) that one or more region pages map
//! copy-on-write. The pages of a run merged together get contiguous slots, so a region page
//! run maps with one `mmap`, and a later sharer of the same run finds the next page's stable
//! copy in the next slot without an index lookup.
//!
//! The index is keyed by (domain, xxh3 of the content). A key names one content: a lookup
//! always confirms the full bytes before anybody maps the page, and a stable page whose
//! content collides with an indexed one of other bytes is left out of the index (it keeps
//! its sharers, it just takes no new ones).
//!
//! # Sharing limits: chains and dups
//!
//! No stable page has more than `max_page_sharing` sharers: every sharer is one more mapping
//! of the page in the kernel's reverse map, which compaction, migration and reclaim walk, and
//! one page shared by everyone is one page whose loss hits everyone. As in Linux KSM, a
//! content whose page is full gets another page of the same content, a *dup*; the first time
//! that happens, its index entry turns from a single page into a *chain* of dups. The index
//! still holds each content once, so lookups cost the same; a lookup through a chain picks the
//! fullest dup with room, so dups fill before new ones appear. Contents that never hit the
//! limit pay nothing for it. The two pages of the same bytes that one merged run can make
//! (a run may hold a content twice) are dups as well, so that neither is lost to lookups. A
//! dup is freed the moment its last sharer leaves (the engine
//! learns of every departure when it happens to visit the page, not later), and a chain with
//! no dups left is removed at once, so no stale dup ever waits for a prune.
//!
//! The engine keeps a read-only view of the whole memfd: comparisons read stable pages there,
//! and no write can reach a published stable page through it (quiescence rule 5).
//!
//! This file holds the store and its slots' lifecycle (publish, sharers and copies come and
//! go, free); `index.rs` the index with its chains and dups; `slots.rs` the free-slot
//! allocator.

mod index;
mod slots;

use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;

use memfd::Memfd;

use crate::memfds::{ReadOnlyView, create, punch_stable};
use crate::quiesce::DomainId;
use crate::{Error, PAGE_SIZE};

use index::StableIndex;
use slots::SlotAllocator;

/// Index of a page in the stable memfd.
pub(crate) type Slot = u32;

/// Most slots a store holds (128 GiB of stable pages): a page record keeps a slot in 25 bits.
pub(crate) const MAX_SLOTS: Slot = (1 << 25) - 2;

/// Content key of the stable and unstable indexes.
pub(crate) type ContentKey = (DomainId, u64);

/// A slot in use: one stable page, or a place in a merged window where the regions that map
/// the window hold private copies of their own (see the engine's `state::merge`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct StableNode {
    /// Index key of the content (the domain of its sharers and the xxh3 of its bytes).
    pub(crate) key: ContentKey,
    /// Region pages mapping this page that have not written it (yet).
    pub(crate) sharers: u32,
    /// Region pages whose mapping covers this slot but that hold a private copy instead. They
    /// keep the slot from being reused, so that nothing a mapping covers ever changes under
    /// it, but need no content in it.
    pub(crate) copies: u32,
    /// Module images that hold this page for instances still to come ([`crate::image`]):
    /// a pinned page keeps its content with no sharer.
    pub(crate) pins: u32,
    /// Whether the slot holds a stable page (from publication until its last sharer left
    /// and its last pin went).
    pub(crate) content: bool,
    /// Whether the index finds this page (false after a checksum collision).
    pub(crate) indexed: bool,
}

pub(crate) struct StableStore {
    /// The pages themselves.
    memfd: Memfd,
    /// Read-only view of `capacity` slots of the memfd.
    view: ReadOnlyView,
    /// Per slot, its node while in use (`None` for free slots); as long as the slots ever
    /// handed out.
    nodes: Vec<Option<StableNode>>,
    /// Free slots.
    slots: SlotAllocator,
    /// Content key -> the stable page, or the chain of dups, of that content.
    index: StableIndex,
    /// Most sharers a stable page may have (`max_page_sharing`).
    max_sharing: u32,
    /// Slots in use, i.e. `pages_shared`.
    in_use: u64,
    /// Sum of sharers over slots in use.
    sharers: u64,
    /// Slots in use that no region page shares (pinned image pages, and pages just
    /// published): they save nothing yet.
    idle: u64,
    /// Slots that module images pin.
    pinned: u64,
}

impl StableStore {
    pub(crate) fn new(capacity_bytes: usize, max_sharing: u32) -> Result<Self, Error> {
        let memfd = create("samepage-stable").map_err(Error::StableMemfd)?;
        let capacity = (capacity_bytes / PAGE_SIZE).min(MAX_SLOTS as usize) as Slot;
        let bytes = capacity as usize * PAGE_SIZE;
        memfd
            .as_file()
            .set_len(bytes as u64)
            .map_err(Error::StableMemfd)?;
        let view = ReadOnlyView::new(&memfd, bytes)
            .map_err(|source| Error::StableReserve { bytes, source })?;
        Ok(Self {
            memfd,
            view,
            nodes: Vec::new(),
            slots: SlotAllocator::new(capacity),
            index: StableIndex::default(),
            max_sharing,
            in_use: 0,
            sharers: 0,
            idle: 0,
            pinned: 0,
        })
    }

    pub(crate) fn fd(&self) -> impl AsFd + '_ {
        self.memfd.as_file()
    }

    /// The bytes of a stable page.
    pub(crate) fn page(&self, slot: Slot) -> &[u8] {
        debug_assert!(self.node(slot).is_some_and(|node| node.content));
        // SAFETY: a slot with a node is below the capacity, so inside the view; a slot with
        // content was written before its first sharer mapped it and is immutable since
        // (quiescence rule 5), so the bytes stay put while borrowed.
        unsafe { self.view.page(slot as usize) }
    }

    pub(crate) fn node(&self, slot: Slot) -> Option<&StableNode> {
        self.nodes.get(slot as usize).and_then(Option::as_ref)
    }

    fn node_mut(&mut self, slot: Slot) -> &mut StableNode {
        self.nodes[slot as usize]
            .as_mut()
            .expect("callers name slots in use")
    }

    fn sharers(&self, slot: Slot) -> u32 {
        self.node(slot).map_or(0, |node| node.sharers)
    }

    /// Whether `slot` holds a stable page that can take one more sharer.
    pub(crate) fn has_room_at(&self, slot: Slot) -> bool {
        self.node(slot).is_some_and(|node| node.content) && self.sharers(slot) < self.max_sharing
    }

    /// Changes the sharing limit; only while nothing is shared, so that no page is above it.
    pub(crate) fn set_max_sharing(&mut self, max_sharing: u32) -> Result<(), Error> {
        if max_sharing != self.max_sharing && self.in_use > 0 {
            return Err(Error::SharingLimitInUse {
                pages_shared: self.in_use,
            });
        }
        self.max_sharing = max_sharing;
        Ok(())
    }

    /// Publishes a window of contiguous slots, with no sharers yet: where `keys` has a key,
    /// the page of `bytes` there becomes a stable page, indexed under the key; where it has
    /// none, the slot stays empty, a place for private copies. `None` when the store is full.
    pub(crate) fn publish(
        &mut self,
        bytes: &[u8],
        keys: &[Option<ContentKey>],
    ) -> Result<Option<Slot>, Error> {
        let Some(first) = self.slots.allocate(keys.len() as Slot) else {
            return Ok(None);
        };
        let end = self.slots.end() as usize;
        if self.nodes.len() < end {
            // Grow by an eighth at a time, not by doubling: a node is 32 bytes a stable page,
            // and half an empty vector is what the metadata of a converged host would be.
            let more = end - self.nodes.len();
            if self.nodes.capacity() < end {
                self.nodes
                    .reserve_exact(more.max(self.nodes.capacity() / 8));
            }
            self.nodes.resize(end, None);
        }
        let written = crate::layout::runs_of(keys, Option::is_some).try_for_each(|pages| {
            crate::faults::check(crate::faults::Syscall::Pwrite)?;
            self.memfd.as_file().write_all_at(
                &bytes[pages.start * PAGE_SIZE..pages.end * PAGE_SIZE],
                ((first as usize + pages.start) * PAGE_SIZE) as u64,
            )
        });
        if let Err(source) = written {
            // Nothing refers to the slots yet: give them back, holes and all.
            let _ = punch_stable(&self.memfd, first as usize, keys.len());
            self.slots.release(first, keys.len() as Slot);
            return Err(Error::StableWrite(source));
        }
        for (n, key) in keys.iter().enumerate() {
            let slot = first + n as Slot;
            self.nodes[slot as usize] = Some(StableNode {
                key: key.unwrap_or_default(),
                sharers: 0,
                copies: 0,
                pins: 0,
                content: key.is_some(),
                indexed: false,
            });
            if let Some(key) = *key {
                let indexed = self.index_slot(key, slot);
                self.node_mut(slot).indexed = indexed;
                self.in_use += 1;
                self.idle += 1;
            }
        }
        Ok(Some(first))
    }

    /// Records one more private copy over `slot`.
    pub(crate) fn add_copy(&mut self, slot: Slot) {
        self.node_mut(slot).copies += 1;
    }

    /// Records that a private copy over `slot` went; frees the slot when nothing covers it
    /// and no image pins it (an image's page stays for instances still to come).
    pub(crate) fn drop_copy(&mut self, slot: Slot) {
        let node = self.node_mut(slot);
        node.copies -= 1;
        if node.copies == 0 && node.sharers == 0 && node.pins == 0 {
            self.free(slot, 1);
        }
    }

    /// Punches the empty slots among `count` from `first`: a private copy made over an
    /// empty slot faults a page of zeros into it first.
    pub(crate) fn punch_empty(&self, first: Slot, count: Slot) -> io::Result<()> {
        for slot in first..first + count {
            if self.node(slot).is_some_and(|node| !node.content) {
                punch_stable(&self.memfd, slot as usize, 1)?;
            }
        }
        Ok(())
    }

    /// Records one more sharer of `slot`; returns the checksum of its page.
    pub(crate) fn add_sharer(&mut self, slot: Slot) -> u64 {
        let node = self.node_mut(slot);
        node.sharers += 1;
        let (first, checksum) = (node.sharers == 1, node.key.1);
        if first {
            self.idle -= 1;
        }
        self.sharers += 1;
        checksum
    }

    /// Records that one sharer of `slot` left; frees the page when it was the last and no
    /// image pins it.
    pub(crate) fn drop_sharer(&mut self, slot: Slot) -> Result<(), Error> {
        let node = self.node_mut(slot);
        node.sharers -= 1;
        let node = *node;
        self.sharers -= 1;
        if node.sharers > 0 {
            return Ok(());
        }
        self.idle += 1;
        if node.pins > 0 {
            return Ok(());
        }
        self.retire(slot)
    }

    /// Pins `slot`'s page for a module image: it keeps its content with no sharer.
    pub(crate) fn pin(&mut self, slot: Slot) {
        let node = self.node_mut(slot);
        node.pins += 1;
        let first = node.pins == 1;
        if first {
            self.pinned += 1;
        }
    }

    /// Takes an image's pin off `slot`; frees the page when nothing else holds it.
    pub(crate) fn unpin(&mut self, slot: Slot) -> Result<(), Error> {
        let node = self.node_mut(slot);
        node.pins -= 1;
        let node = *node;
        if node.pins > 0 {
            return Ok(());
        }
        self.pinned -= 1;
        if node.sharers > 0 {
            return Ok(());
        }
        self.retire(slot)
    }

    /// Takes an image's pins off `count` slots from `first`; the last failure to free a page
    /// is returned, after every pin is taken off.
    pub(crate) fn unpin_run(&mut self, first: Slot, count: Slot) -> Result<(), Error> {
        let mut result = Ok(());
        for slot in first..first + count {
            if let Err(error) = self.unpin(slot) {
                result = Err(error);
            }
        }
        result
    }

    /// Ends the page of `slot`, which nothing shares or pins any more: out of the index, and
    /// its memory punched; the slot itself goes once no private copy lies over it.
    fn retire(&mut self, slot: Slot) -> Result<(), Error> {
        let node = *self.node_mut(slot);
        self.idle -= 1;
        if node.indexed {
            self.unindex_slot(node.key, slot);
        }
        self.in_use -= 1;
        if node.copies == 0 {
            self.free(slot, 1);
        } else {
            // Private copies still lie over the slot: it keeps its place, not its page.
            let node = self.node_mut(slot);
            node.content = false;
            node.indexed = false;
        }
        punch_stable(&self.memfd, slot as usize, 1).map_err(Error::StablePunch)
    }

    /// Frees a published run that never got a sharer (a merge that failed half-way).
    pub(crate) fn unpublish(&mut self, first: Slot, count: Slot) -> Result<(), Error> {
        for slot in first..first + count {
            let node = *self.node_mut(slot);
            debug_assert_eq!((node.sharers, node.copies), (0, 0));
            if node.indexed {
                self.unindex_slot(node.key, slot);
            }
            if node.content {
                self.in_use -= 1;
                self.idle -= 1;
            }
            self.nodes[slot as usize] = None;
        }
        punch_stable(&self.memfd, first as usize, count as usize).map_err(Error::StablePunch)?;
        self.slots.release(first, count);
        Ok(())
    }

    /// Forgets the nodes of `count` slots from `first` and gives the slots back.
    fn free(&mut self, first: Slot, count: Slot) {
        for slot in first..first + count {
            self.nodes[slot as usize] = None;
        }
        self.slots.release(first, count);
    }

    /// `pages_shared`: stable pages in use that at least one region page shares.
    pub(crate) fn pages_shared(&self) -> u64 {
        self.in_use - self.idle
    }

    /// `pages_sharing`: sharers beyond the first of each page.
    pub(crate) fn pages_sharing(&self) -> u64 {
        self.sharers - self.pages_shared()
    }

    /// Stable pages that module images pin, shared or not.
    pub(crate) fn pinned_pages(&self) -> u64 {
        self.pinned
    }

    /// Whether `slot`'s page has no sharer.
    pub(crate) fn unshared(&self, slot: Slot) -> bool {
        self.sharers(slot) == 0
    }

    pub(crate) fn metadata_bytes(&self) -> usize {
        self.nodes.capacity() * size_of::<Option<StableNode>>()
            + self.index.metadata_bytes()
            + self.slots.metadata_bytes()
    }

    /// Every slot in use with its node, for checks that walk the store.
    pub(crate) fn nodes(&self) -> impl Iterator<Item = (Slot, &StableNode)> {
        self.nodes
            .iter()
            .enumerate()
            .filter_map(|(slot, node)| node.as_ref().map(|node| (slot as Slot, node)))
    }
}
