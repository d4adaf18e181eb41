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
//! limit pay nothing for it. A dup is freed the moment its last sharer leaves (the engine
//! learns of every departure when it happens to visit the page, not later), and a chain with
//! no dups left is removed at once, so no stale dup ever waits for a prune.
//!
//! The engine keeps a read-only view of the whole memfd: comparisons read stable pages there,
//! and no write can reach a published stable page through it (quiescence rule 5).

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;

use memfd::{Memfd, MemfdOptions};
use rustix::mm::{MapFlags, ProtFlags, mmap, munmap};

use crate::quiesce::DomainId;
use crate::{Error, PAGE_SIZE, remap};

/// Index of a page in the stable memfd.
pub(crate) type Slot = u32;

/// Content key of the stable and unstable indexes.
pub(crate) type ContentKey = (DomainId, u64);

/// What the stable index holds for one content.
#[derive(Clone, Debug)]
enum IndexEntry {
    /// The only stable page of this content.
    Page(Slot),
    /// The content hit the sharing limit: its dups, each a page of the same bytes.
    Chain(Vec<Slot>),
}

impl IndexEntry {
    fn slots(&self) -> &[Slot] {
        match self {
            IndexEntry::Page(slot) => std::slice::from_ref(slot),
            IndexEntry::Chain(dups) => dups,
        }
    }
}

/// A slot in use: one stable page, or a place in a merged window where the regions that map
/// the window hold private copies of their own (see [`crate::state`]'s windows).
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
    /// Whether the slot holds a stable page (from publication until its last sharer left).
    pub(crate) content: bool,
    /// Whether the index finds this page (false after a checksum collision).
    pub(crate) indexed: bool,
}

pub(crate) struct StableStore {
    /// The pages themselves.
    memfd: Memfd,
    /// Read-only view of `capacity` slots of the memfd.
    view: *mut u8,
    /// Slots the view covers; allocation fails beyond it.
    capacity: Slot,
    /// Per slot, its node while in use (`None` for free slots).
    nodes: Vec<Option<StableNode>>,
    /// Free slots below `nodes.len()`, as extents start -> length, coalesced.
    free: BTreeMap<Slot, Slot>,
    /// Content key -> the stable page, or the chain of dups, of that content.
    index: HashMap<ContentKey, IndexEntry>,
    /// Most sharers a stable page may have (`max_page_sharing`).
    max_sharing: u32,
    /// Chain entries in the index (`stable_node_chains`).
    chains: u64,
    /// Dups in those chains (`stable_node_dups`).
    dups: u64,
    /// Slots in use, i.e. `pages_shared`.
    in_use: u64,
    /// Sum of sharers over slots in use.
    sharers: u64,
}

// SAFETY: `view` points into a mapping this store owns; it is only read, and the store is
// only used under the engine's state lock.
unsafe impl Send for StableStore {}

impl StableStore {
    pub(crate) fn new(capacity_bytes: usize, max_sharing: u32) -> Result<Self, Error> {
        let memfd = MemfdOptions::new()
            .close_on_exec(true)
            .create("samepage-stable")
            .map_err(|e| Error::StableMemfd(io::Error::other(e)))?;
        let capacity = (capacity_bytes / PAGE_SIZE).min(Slot::MAX as usize) as Slot;
        let bytes = capacity as usize * PAGE_SIZE;
        memfd
            .as_file()
            .set_len(bytes as u64)
            .map_err(Error::StableMemfd)?;
        // SAFETY: a fresh mapping chosen by the kernel; nothing else refers to that range.
        let view = unsafe {
            mmap(
                std::ptr::null_mut(),
                bytes,
                ProtFlags::READ,
                MapFlags::SHARED | MapFlags::NORESERVE,
                memfd.as_file(),
                0,
            )
        }
        .map_err(|e| Error::StableReserve {
            bytes,
            source: e.into(),
        })?;
        Ok(Self {
            memfd,
            view: view.cast(),
            capacity,
            nodes: Vec::new(),
            free: BTreeMap::new(),
            index: HashMap::new(),
            max_sharing,
            chains: 0,
            dups: 0,
            in_use: 0,
            sharers: 0,
        })
    }

    pub(crate) fn fd(&self) -> impl AsFd + '_ {
        self.memfd.as_file()
    }

    /// The bytes of a stable page.
    pub(crate) fn page(&self, slot: Slot) -> &[u8] {
        debug_assert!(self.node(slot).is_some_and(|node| node.content));
        // SAFETY: the slot is below `capacity`, so inside the view; a slot in use was written
        // before use and is immutable (quiescence rule 5), so the bytes stay put.
        unsafe { std::slice::from_raw_parts(self.view.add(slot as usize * PAGE_SIZE), PAGE_SIZE) }
    }

    pub(crate) fn node(&self, slot: Slot) -> Option<&StableNode> {
        self.nodes.get(slot as usize).and_then(Option::as_ref)
    }

    /// The indexed stable page with `key` that has room for one more sharer (the fullest
    /// such dup of a chain), if its bytes equal `content`.
    pub(crate) fn lookup(&self, key: ContentKey, content: &[u8]) -> Option<Slot> {
        let slot = self.with_room(key)?;
        (self.page(slot) == content).then_some(slot)
    }

    /// Whether the index has a page of `key` with room for one more sharer.
    pub(crate) fn has_room(&self, key: ContentKey) -> bool {
        self.with_room(key).is_some()
    }

    fn with_room(&self, key: ContentKey) -> Option<Slot> {
        self.index
            .get(&key)?
            .slots()
            .iter()
            .map(|&slot| (slot, self.sharers(slot)))
            .filter(|&(_, sharers)| sharers < self.max_sharing)
            .max_by_key(|&(_, sharers)| sharers)
            .map(|(slot, _)| slot)
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

    /// Adds a freshly written `slot` to the index under `key`: as the page of a new content,
    /// or as a dup of a full one. Returns false (not indexed) when `key` names other bytes.
    fn index_slot(&mut self, key: ContentKey, slot: Slot) -> bool {
        let Some(entry) = self.index.get(&key) else {
            self.index.insert(key, IndexEntry::Page(slot));
            return true;
        };
        // Other bytes under the same key (a checksum collision), or a page of this content
        // that still has room (the same bytes twice in one run): no dup, just unindexed.
        if self.page(entry.slots()[0]) != self.page(slot) || self.with_room(key).is_some() {
            return false;
        }
        let entry = self.index.get_mut(&key).expect("looked up above");
        match entry {
            IndexEntry::Page(first) => {
                *entry = IndexEntry::Chain(vec![*first, slot]);
                self.chains += 1;
                self.dups += 2;
            }
            IndexEntry::Chain(dups) => {
                dups.push(slot);
                self.dups += 1;
            }
        }
        true
    }

    /// Takes `slot` out of the index entry of `key`; a chain left empty goes too.
    fn unindex_slot(&mut self, key: ContentKey, slot: Slot) {
        match self.index.get_mut(&key) {
            Some(IndexEntry::Page(page)) if *page == slot => {
                self.index.remove(&key);
            }
            Some(IndexEntry::Chain(dups)) => {
                if let Some(at) = dups.iter().position(|&dup| dup == slot) {
                    dups.swap_remove(at);
                    self.dups -= 1;
                    if dups.is_empty() {
                        self.index.remove(&key);
                        self.chains -= 1;
                    }
                }
            }
            _ => {}
        }
    }

    /// `stable_node_chains` and `stable_node_dups`.
    pub(crate) fn chain_counts(&self) -> (u64, u64) {
        (self.chains, self.dups)
    }

    /// Walks the index: the chains and dups it holds, and whether every page it names is in
    /// use, within the sharing limit and of the same bytes as the others of its entry.
    pub(crate) fn walk_index(&self) -> (u64, u64, bool) {
        let (mut chains, mut dups, mut sound) = (0, 0, true);
        for entry in self.index.values() {
            if let IndexEntry::Chain(slots) = entry {
                chains += 1;
                dups += slots.len() as u64;
            }
            let first = entry.slots()[0];
            for &slot in entry.slots() {
                sound &= self
                    .node(slot)
                    .is_some_and(|node| node.sharers <= self.max_sharing)
                    && self.page(slot) == self.page(first);
            }
        }
        (chains, dups, sound)
    }

    /// Publishes a window of contiguous slots, with no sharers yet: where `keys` has a key,
    /// the page of `bytes` there becomes a stable page, indexed under the key; where it has
    /// none, the slot stays empty, a place for private copies. `None` when the store is full.
    pub(crate) fn publish(
        &mut self,
        bytes: &[u8],
        keys: &[Option<ContentKey>],
    ) -> io::Result<Option<Slot>> {
        let Some(first) = self.allocate(keys.len() as Slot) else {
            return Ok(None);
        };
        let mut n = 0;
        while n < keys.len() {
            if keys[n].is_none() {
                n += 1;
                continue;
            }
            let start = n;
            while n < keys.len() && keys[n].is_some() {
                n += 1;
            }
            self.memfd.as_file().write_all_at(
                &bytes[start * PAGE_SIZE..n * PAGE_SIZE],
                ((first as usize + start) * PAGE_SIZE) as u64,
            )?;
        }
        for (n, key) in keys.iter().enumerate() {
            let slot = first + n as Slot;
            self.nodes[slot as usize] = Some(StableNode {
                key: key.unwrap_or_default(),
                sharers: 0,
                copies: 0,
                content: key.is_some(),
                indexed: false,
            });
            if let Some(key) = *key {
                let indexed = self.index_slot(key, slot);
                self.nodes[slot as usize]
                    .as_mut()
                    .expect("just set")
                    .indexed = indexed;
                self.in_use += 1;
            }
        }
        Ok(Some(first))
    }

    /// Records one more private copy over `slot`.
    pub(crate) fn add_copy(&mut self, slot: Slot) {
        self.nodes[slot as usize]
            .as_mut()
            .expect("copy over a free slot")
            .copies += 1;
    }

    /// Records that a private copy over `slot` went; frees the slot when nothing covers it.
    pub(crate) fn drop_copy(&mut self, slot: Slot) {
        let node = self.nodes[slot as usize]
            .as_mut()
            .expect("copy over a free slot");
        node.copies -= 1;
        if node.copies == 0 && node.sharers == 0 {
            self.nodes[slot as usize] = None;
            self.release(slot, 1);
        }
    }

    /// Punches the empty slots among `count` from `first`: a private copy made over an
    /// empty slot faults a page of zeros into it first.
    pub(crate) fn punch_empty(&self, first: Slot, count: Slot) -> io::Result<()> {
        for slot in first..first + count {
            if self.node(slot).is_some_and(|node| !node.content) {
                remap::punch(
                    self.memfd.as_file(),
                    slot as u64 * PAGE_SIZE as u64,
                    PAGE_SIZE,
                )?;
            }
        }
        Ok(())
    }

    /// Records one more sharer of `slot`.
    pub(crate) fn add_sharer(&mut self, slot: Slot) {
        let node = self.nodes[slot as usize]
            .as_mut()
            .expect("sharer of a free slot");
        node.sharers += 1;
        self.sharers += 1;
    }

    /// Records that one sharer of `slot` left; frees the page when it was the last.
    pub(crate) fn drop_sharer(&mut self, slot: Slot) -> io::Result<()> {
        let node = self.nodes[slot as usize]
            .as_mut()
            .expect("sharer of a free slot");
        node.sharers -= 1;
        self.sharers -= 1;
        if node.sharers > 0 {
            return Ok(());
        }
        let node = *node;
        if node.indexed {
            self.unindex_slot(node.key, slot);
        }
        self.in_use -= 1;
        if node.copies == 0 {
            self.nodes[slot as usize] = None;
            self.release(slot, 1);
        } else {
            // Private copies still lie over the slot: it keeps its place, not its page.
            let node = self.nodes[slot as usize].as_mut().expect("kept");
            node.content = false;
            node.indexed = false;
        }
        remap::punch(
            self.memfd.as_file(),
            slot as u64 * PAGE_SIZE as u64,
            PAGE_SIZE,
        )
    }

    /// Frees a published run that never got a sharer (a merge that failed half-way).
    pub(crate) fn unpublish(&mut self, first: Slot, count: Slot) -> io::Result<()> {
        for slot in first..first + count {
            let node = self.nodes[slot as usize]
                .take()
                .expect("unpublish of a free slot");
            debug_assert_eq!((node.sharers, node.copies), (0, 0));
            if node.indexed {
                self.unindex_slot(node.key, slot);
            }
            if node.content {
                self.in_use -= 1;
            }
        }
        remap::punch(
            self.memfd.as_file(),
            first as u64 * PAGE_SIZE as u64,
            count as usize * PAGE_SIZE,
        )?;
        self.release(first, count);
        Ok(())
    }

    /// `pages_shared`: stable pages in use.
    pub(crate) fn pages_shared(&self) -> u64 {
        self.in_use
    }

    /// `pages_sharing`: sharers beyond the first of each page.
    pub(crate) fn pages_sharing(&self) -> u64 {
        self.sharers - self.in_use
    }

    pub(crate) fn metadata_bytes(&self) -> usize {
        self.nodes.capacity() * size_of::<Option<StableNode>>()
            + self.index.capacity() * size_of::<(ContentKey, IndexEntry)>()
            + self.dups as usize * size_of::<Slot>()
            + self.free.len() * 2 * size_of::<Slot>()
    }

    /// Every slot in use with its node, for checks that walk the store.
    pub(crate) fn nodes(&self) -> impl Iterator<Item = (Slot, &StableNode)> {
        self.nodes
            .iter()
            .enumerate()
            .filter_map(|(slot, node)| node.as_ref().map(|node| (slot as Slot, node)))
    }

    /// First fit among free extents, else fresh slots at the end.
    fn allocate(&mut self, count: Slot) -> Option<Slot> {
        let fit = self
            .free
            .iter()
            .find(|&(_, &len)| len >= count)
            .map(|(&start, &len)| (start, len));
        if let Some((start, len)) = fit {
            self.free.remove(&start);
            if len > count {
                self.free.insert(start + count, len - count);
            }
            return Some(start);
        }
        let start = self.nodes.len() as Slot;
        if start.checked_add(count)? > self.capacity {
            return None;
        }
        self.nodes.resize(start as usize + count as usize, None);
        Some(start)
    }

    fn release(&mut self, start: Slot, count: Slot) {
        let mut start = start;
        let mut len = count;
        if let Some((&before, &before_len)) = self.free.range(..start).next_back()
            && before + before_len == start
        {
            self.free.remove(&before);
            start = before;
            len += before_len;
        }
        if let Some(after_len) = self.free.remove(&(start + len)) {
            len += after_len;
        }
        self.free.insert(start, len);
    }
}

impl Drop for StableStore {
    fn drop(&mut self) {
        // SAFETY: the view was mapped in `new` with this length and nothing borrows it now
        // (borrows of pages end with the `&self` they came from).
        unsafe {
            let _ = munmap(self.view.cast(), self.capacity as usize * PAGE_SIZE);
        }
    }
}
