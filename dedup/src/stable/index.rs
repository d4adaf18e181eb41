//! The stable index: content key -> the stable page of that content, or, once the content
//! hit `max_page_sharing`, the chain of its dups (see the module docs of the store for why).
//!
//! The transitions, each done by one method here:
//!
//! ```text
//!   (absent) --publish--> Page(s) --publish while s is full--> Chain[s, d1] --full--> Chain[s, d1, d2]
//!   Page(s) --last sharer of s leaves--> (absent)
//!   Chain[..., d, ...] --last sharer of d leaves--> Chain[...]     Chain[d] --d leaves--> (absent)
//! ```
//!
//! A page published under a key whose page still has room (the same bytes twice in one run),
//! or whose indexed bytes differ (a checksum collision), is left out of the index: it keeps
//! its sharers and takes no new ones.

use std::collections::HashMap;

use super::{ContentKey, Slot, StableStore};

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

#[derive(Default)]
pub(super) struct StableIndex {
    entries: HashMap<ContentKey, IndexEntry>,
    /// Chain entries (`stable_node_chains`).
    chains: u64,
    /// Dups in those chains (`stable_node_dups`).
    dups: u64,
}

impl StableIndex {
    pub(super) fn metadata_bytes(&self) -> usize {
        self.entries.capacity() * size_of::<(ContentKey, IndexEntry)>()
            + self.dups as usize * size_of::<Slot>()
    }
}

impl StableStore {
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
            .entries
            .get(&key)?
            .slots()
            .iter()
            .map(|&slot| (slot, self.sharers(slot)))
            .filter(|&(_, sharers)| sharers < self.max_sharing)
            .max_by_key(|&(_, sharers)| sharers)
            .map(|(slot, _)| slot)
    }

    /// Adds a freshly written `slot` to the index under `key`: as the page of a new content,
    /// or as a dup of a full one. Returns false (not indexed) when `key` names other bytes.
    pub(super) fn index_slot(&mut self, key: ContentKey, slot: Slot) -> bool {
        let Some(entry) = self.index.entries.get(&key) else {
            self.index.entries.insert(key, IndexEntry::Page(slot));
            return true;
        };
        // Other bytes under the same key (a checksum collision), or a page of this content
        // that still has room (the same bytes twice in one run): no dup, just unindexed.
        if self.page(entry.slots()[0]) != self.page(slot) || self.with_room(key).is_some() {
            return false;
        }
        let index = &mut self.index;
        let entry = index.entries.get_mut(&key).expect("looked up above");
        match entry {
            IndexEntry::Page(first) => {
                *entry = IndexEntry::Chain(vec![*first, slot]);
                index.chains += 1;
                index.dups += 2;
            }
            IndexEntry::Chain(dups) => {
                dups.push(slot);
                index.dups += 1;
            }
        }
        true
    }

    /// Takes `slot` out of the index entry of `key`; a chain left empty goes too.
    pub(super) fn unindex_slot(&mut self, key: ContentKey, slot: Slot) {
        let index = &mut self.index;
        match index.entries.get_mut(&key) {
            Some(IndexEntry::Page(page)) if *page == slot => {
                index.entries.remove(&key);
            }
            Some(IndexEntry::Chain(dups)) => {
                if let Some(at) = dups.iter().position(|&dup| dup == slot) {
                    dups.swap_remove(at);
                    index.dups -= 1;
                    if dups.is_empty() {
                        index.entries.remove(&key);
                        index.chains -= 1;
                    }
                }
            }
            _ => {}
        }
    }

    /// `stable_node_chains` and `stable_node_dups`.
    pub(crate) fn chain_counts(&self) -> (u64, u64) {
        (self.index.chains, self.index.dups)
    }

    /// Walks the index: the chains and dups it holds, and whether every page it names is in
    /// use, within the sharing limit and of the same bytes as the others of its entry.
    pub(crate) fn walk_index(&self) -> (u64, u64, bool) {
        let (mut chains, mut dups, mut sound) = (0, 0, true);
        for entry in self.index.entries.values() {
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PAGE_SIZE;

    const KEY: ContentKey = (0, 42);
    const LIMIT: u32 = 3;

    fn store() -> StableStore {
        StableStore::new(64 * PAGE_SIZE, LIMIT).expect("stable store")
    }

    fn bytes(fill: u8) -> Vec<u8> {
        vec![fill; PAGE_SIZE]
    }

    /// Publishes one page of `fill` under `key` and gives it `sharers` sharers.
    fn publish(store: &mut StableStore, key: ContentKey, fill: u8, sharers: u32) -> Slot {
        let slot = store
            .publish(&bytes(fill), &[Some(key)])
            .expect("write")
            .expect("room");
        for _ in 0..sharers {
            store.add_sharer(slot);
        }
        slot
    }

    fn check(store: &StableStore, chains: u64, dups: u64) {
        assert_eq!(store.chain_counts(), (chains, dups));
        assert_eq!(store.walk_index(), (chains, dups, true));
    }

    #[test]
    fn a_full_page_becomes_a_chain_and_dups_fill_before_new_ones() {
        let mut store = store();
        let first = publish(&mut store, KEY, 7, LIMIT);
        check(&store, 0, 0);
        assert_eq!(store.lookup(KEY, &bytes(7)), None, "full");
        // Page -> chain of two.
        let dup = publish(&mut store, KEY, 7, 1);
        check(&store, 1, 2);
        assert_eq!(store.lookup(KEY, &bytes(7)), Some(dup));
        // A third dup only once both are full.
        store.add_sharer(dup);
        store.add_sharer(dup);
        assert_eq!(store.lookup(KEY, &bytes(7)), None);
        let third = publish(&mut store, KEY, 7, 1);
        check(&store, 1, 3);
        // The lookup picks the fullest dup with room.
        store.drop_sharer(first).expect("punch");
        assert_eq!(
            store.lookup(KEY, &bytes(7)),
            Some(first),
            "2 sharers before 1"
        );
        assert_eq!(store.sharers(third), 1);
        assert_eq!(store.lookup(KEY, &bytes(8)), None, "bytes are compared");
    }

    #[test]
    fn dups_go_with_their_last_sharer_and_the_chain_with_its_last_dup() {
        let mut store = store();
        let first = publish(&mut store, KEY, 7, LIMIT);
        let dup = publish(&mut store, KEY, 7, 1);
        check(&store, 1, 2);
        store.drop_sharer(dup).expect("punch");
        check(&store, 1, 1);
        assert!(store.node(dup).is_none(), "freed");
        for _ in 0..LIMIT {
            store.drop_sharer(first).expect("punch");
        }
        check(&store, 0, 0);
        assert_eq!(store.pages_shared(), 0);
        // The key is free again: a new page of it is a plain page.
        publish(&mut store, KEY, 7, 2);
        check(&store, 0, 0);
        assert_eq!(store.pages_shared(), 1);
        assert_eq!(store.pages_sharing(), 1);
    }

    #[test]
    fn a_page_leaves_the_index_with_its_last_sharer() {
        let mut store = store();
        let slot = publish(&mut store, KEY, 7, 2);
        store.drop_sharer(slot).expect("punch");
        assert_eq!(store.lookup(KEY, &bytes(7)), Some(slot));
        store.drop_sharer(slot).expect("punch");
        assert_eq!(store.lookup(KEY, &bytes(7)), None);
        assert!(store.node(slot).is_none());
    }

    #[test]
    fn a_colliding_key_or_a_page_with_room_leaves_the_new_page_unindexed() {
        let mut store = store();
        let first = publish(&mut store, KEY, 7, 1);
        // Other bytes under the same key: kept, never found.
        let collision = publish(&mut store, KEY, 9, 1);
        assert!(!store.node(collision).expect("in use").indexed);
        assert_eq!(store.lookup(KEY, &bytes(9)), None);
        // The same bytes while the first page has room: no dup.
        let twin = publish(&mut store, KEY, 7, 1);
        assert!(!store.node(twin).expect("in use").indexed);
        check(&store, 0, 0);
        assert_eq!(store.lookup(KEY, &bytes(7)), Some(first));
        // An unindexed page's last sharer leaving does not touch the entry.
        store.drop_sharer(twin).expect("punch");
        assert_eq!(store.lookup(KEY, &bytes(7)), Some(first));
    }

    #[test]
    fn a_slot_under_private_copies_keeps_its_place_but_not_its_page() {
        let mut store = store();
        let slot = publish(&mut store, KEY, 7, 1);
        store.add_copy(slot);
        store.drop_sharer(slot).expect("punch");
        let node = *store.node(slot).expect("kept for the copy");
        assert!(!node.content && !node.indexed);
        assert_eq!(store.pages_shared(), 0);
        assert_eq!(store.lookup(KEY, &bytes(7)), None);
        // A new run cannot take the slot while the copy lies over it.
        let next = publish(&mut store, (0, 1), 1, 1);
        assert_ne!(next, slot);
        store.drop_copy(slot);
        assert!(store.node(slot).is_none());
        assert_eq!(publish(&mut store, (0, 2), 2, 1), slot, "reused once free");
    }

    #[test]
    fn unpublish_takes_a_window_back_whole() {
        let mut store = store();
        let keys = [Some((0, 1)), None, Some((0, 3))];
        let mut window = bytes(1);
        window.extend(bytes(2));
        window.extend(bytes(3));
        let first = store.publish(&window, &keys).expect("write").expect("room");
        assert_eq!(store.nodes().filter(|(_, node)| node.content).count(), 2);
        assert_eq!(store.pages_shared(), 0, "no sharer yet");
        assert_eq!(store.lookup((0, 3), &bytes(3)), Some(first + 2));
        store.unpublish(first, 3).expect("punch");
        assert_eq!(store.pages_shared(), 0);
        assert_eq!(store.lookup((0, 3), &bytes(3)), None);
        assert_eq!(store.nodes().count(), 0);
        assert_eq!(
            store.publish(&window, &keys).expect("write"),
            Some(first),
            "the slots are free again"
        );
    }

    #[test]
    fn a_full_store_refuses_to_publish() {
        let mut store = StableStore::new(2 * PAGE_SIZE, LIMIT).expect("stable store");
        let keys = [Some((0, 1)), Some((0, 2)), Some((0, 3))];
        assert_eq!(
            store.publish(&bytes(1).repeat(3), &keys).expect("no write"),
            None
        );
    }
}
