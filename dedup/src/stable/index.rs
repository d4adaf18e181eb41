//! The stable index: content key -> the stable page of that content, or, once the content
//! has more than one stable page, the chain of its dups (see the module docs of the store for
//! why).
//!
//! The transitions, each done by one method here:
//!
//! ```text
//!   (absent) --publish--> Page(s) --publish--> Chain[s, d1] --publish--> Chain[s, d1, d2]
//!   Page(s) --last sharer of s leaves--> (absent)
//!   Chain[..., d, ...] --last sharer of d leaves--> Chain[...]     Chain[d] --d leaves--> (absent)
//! ```
//!
//! A page is published under a key that has a page already when that page is full (a dup,
//! as in KSM) or when one merged run holds the same bytes twice: both are dups, so that each
//! stays findable while it has room. A page whose indexed bytes differ (a checksum collision)
//! is left out of the index: it keeps its sharers and takes no new ones.

use hashbrown::HashTable;

use super::{ContentKey, Slot, StableNode, StableStore};

/// An index entry: the slot of the content's only stable page, or, with [`CHAIN`] set, the
/// number of its chain of dups. The entry holds no key: the key is the page's node's (or the
/// chain's), so an entry costs 4 bytes and a control byte of the table.
type Entry = u32;

/// Marks an entry that names a chain. Slots stay below it (`MAX_SLOTS`).
const CHAIN: Entry = 1 << 31;

/// A content with more than one stable page: its key and its dups, each a page of its bytes.
#[derive(Debug)]
struct Chain {
    key: ContentKey,
    dups: Vec<Slot>,
}

#[derive(Default)]
pub(super) struct StableIndex {
    /// Content key -> entry; hashed by [`hash`] of the key the entry's node or chain holds.
    table: HashTable<Entry>,
    /// Chains by number; `None` for numbers free for reuse (listed in `free_chains`).
    chains: Vec<Option<Chain>>,
    free_chains: Vec<u32>,
    /// Chain entries (`stable_node_chains`).
    chain_count: u64,
    /// Dups in those chains (`stable_node_dups`).
    dups: u64,
}

/// The table's hash of a key: the content's xxh3 with the domain mixed in.
fn hash(key: ContentKey) -> u64 {
    key.1 ^ u64::from(key.0).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// The key an entry stands for.
fn key_of(nodes: &[Option<StableNode>], chains: &[Option<Chain>], entry: Entry) -> ContentKey {
    if entry & CHAIN != 0 {
        chains[(entry & !CHAIN) as usize]
            .as_ref()
            .expect("an entry names a live chain")
            .key
    } else {
        nodes[entry as usize]
            .as_ref()
            .expect("an entry names a slot in use")
            .key
    }
}

impl StableIndex {
    pub(super) fn metadata_bytes(&self) -> usize {
        self.table.capacity() * (size_of::<Entry>() + 1)
            + self.chains.capacity() * size_of::<Option<Chain>>()
            + self.dups as usize * size_of::<Slot>()
    }

    /// The chain an entry with [`CHAIN`] set names.
    fn chain(&self, entry: Entry) -> &Chain {
        self.chains[(entry & !CHAIN) as usize]
            .as_ref()
            .expect("an entry names a live chain")
    }
}

impl StableStore {
    /// The entry of `key`, if the index has one.
    fn entry(&self, key: ContentKey) -> Option<Entry> {
        let (nodes, chains) = (&self.nodes, &self.index.chains);
        self.index
            .table
            .find(hash(key), |&entry| key_of(nodes, chains, entry) == key)
            .copied()
    }

    /// The pages of `entry`: one, or a chain's dups.
    fn entry_slots(&self, entry: Entry) -> Vec<Slot> {
        if entry & CHAIN != 0 {
            self.index.chain(entry).dups.clone()
        } else {
            vec![entry]
        }
    }

    /// The first page of `entry`.
    fn first_slot(&self, entry: Entry) -> Slot {
        if entry & CHAIN != 0 {
            self.index.chain(entry).dups[0]
        } else {
            entry
        }
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
        let entry = self.entry(key)?;
        if entry & CHAIN == 0 {
            return (self.sharers(entry) < self.max_sharing).then_some(entry);
        }
        self.index
            .chain(entry)
            .dups
            .iter()
            .map(|&slot| (slot, self.sharers(slot)))
            .filter(|&(_, sharers)| sharers < self.max_sharing)
            .max_by_key(|&(_, sharers)| sharers)
            .map(|(slot, _)| slot)
    }

    /// Adds a freshly written `slot` to the index under `key`: as the page of a new content,
    /// or as a dup of a full one. Returns false (not indexed) when `key` names other bytes.
    pub(super) fn index_slot(&mut self, key: ContentKey, slot: Slot) -> bool {
        debug_assert!(slot < CHAIN);
        let Some(entry) = self.entry(key) else {
            let (nodes, chains) = (&self.nodes, &self.index.chains);
            self.index
                .table
                .insert_unique(hash(key), slot, |&entry| hash(key_of(nodes, chains, entry)));
            return true;
        };
        // Other bytes under the same key (a checksum collision): unindexed. The same bytes
        // make a dup, whether the content's pages are full or one run held them twice: left
        // out of the index, a page with room would never take another sharer, and a page of
        // its bytes could stay unmerged beside it.
        if self.page(self.first_slot(entry)) != self.page(slot) {
            return false;
        }
        if entry & CHAIN != 0 {
            let chain = self.index.chains[(entry & !CHAIN) as usize]
                .as_mut()
                .expect("an entry names a live chain");
            chain.dups.push(slot);
            self.index.dups += 1;
            return true;
        }
        // Page -> chain of two.
        let chain = Chain {
            key,
            dups: vec![entry, slot],
        };
        let number = match self.index.free_chains.pop() {
            Some(number) => {
                self.index.chains[number as usize] = Some(chain);
                number
            }
            None => {
                self.index.chains.push(Some(chain));
                (self.index.chains.len() - 1) as u32
            }
        };
        self.set_entry(key, number | CHAIN);
        self.index.chain_count += 1;
        self.index.dups += 2;
        true
    }

    /// Points the entry of `key` (which exists) at `entry`.
    fn set_entry(&mut self, key: ContentKey, entry: Entry) {
        let StableIndex { table, chains, .. } = &mut self.index;
        let nodes = &self.nodes;
        let found = table
            .find_mut(hash(key), |&old| key_of(nodes, chains, old) == key)
            .expect("the entry exists");
        *found = entry;
    }

    /// Takes `slot` out of the index entry of `key`; a chain left empty goes too.
    pub(super) fn unindex_slot(&mut self, key: ContentKey, slot: Slot) {
        let Some(entry) = self.entry(key) else {
            return;
        };
        if entry & CHAIN == 0 {
            if entry == slot {
                self.remove_entry(key);
            }
            return;
        }
        let number = (entry & !CHAIN) as usize;
        let chain = self.index.chains[number]
            .as_mut()
            .expect("an entry names a live chain");
        let Some(at) = chain.dups.iter().position(|&dup| dup == slot) else {
            return;
        };
        chain.dups.swap_remove(at);
        self.index.dups -= 1;
        if chain.dups.is_empty() {
            self.remove_entry(key);
            self.index.chains[number] = None;
            self.index.free_chains.push(number as u32);
            self.index.chain_count -= 1;
        }
    }

    fn remove_entry(&mut self, key: ContentKey) {
        let StableIndex { table, chains, .. } = &mut self.index;
        let nodes = &self.nodes;
        if let Ok(found) = table.find_entry(hash(key), |&entry| key_of(nodes, chains, entry) == key)
        {
            found.remove();
        }
    }

    /// `stable_node_chains` and `stable_node_dups`.
    pub(crate) fn chain_counts(&self) -> (u64, u64) {
        (self.index.chain_count, self.index.dups)
    }

    /// Walks the index: the chains and dups it holds, and whether every page it names is in
    /// use, within the sharing limit and of the same bytes as the others of its entry.
    pub(crate) fn walk_index(&self) -> (u64, u64, bool) {
        let (mut chains, mut dups, mut sound) = (0, 0, true);
        for &entry in self.index.table.iter() {
            let slots = self.entry_slots(entry);
            if entry & CHAIN != 0 {
                chains += 1;
                dups += slots.len() as u64;
            }
            let first = slots[0];
            for &slot in &slots {
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
    fn a_pinned_page_outlives_its_last_private_copy() {
        let mut store = store();
        // An image's page, shared, then written by its sharer: a private copy over it.
        let slot = publish(&mut store, KEY, 7, 1);
        store.pin(slot);
        store.add_copy(slot);
        store.drop_sharer(slot).expect("pinned: nothing to free");
        store.drop_copy(slot);
        // Nothing maps it now, but the image still needs it.
        assert!(store.node(slot).is_some_and(|node| node.content));
        assert_eq!(store.page(slot), &bytes(7)[..]);
        assert_eq!(store.lookup(KEY, &bytes(7)), Some(slot));
        store.unpin(slot).expect("unpin");
        assert!(
            store.node(slot).is_none_or(|node| !node.content),
            "freed with its pin"
        );
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
    fn a_colliding_key_leaves_the_new_page_unindexed_and_a_twin_is_a_dup() {
        let mut store = store();
        let first = publish(&mut store, KEY, 7, 1);
        // Other bytes under the same key: kept, never found.
        let collision = publish(&mut store, KEY, 9, 1);
        assert!(!store.node(collision).expect("in use").indexed);
        assert_eq!(store.lookup(KEY, &bytes(9)), None);
        // An unindexed page's last sharer leaving does not touch the entry.
        store.drop_sharer(collision).expect("punch");
        assert_eq!(store.lookup(KEY, &bytes(7)), Some(first));
        // The same bytes while the first page has room (one run held them twice): a dup,
        // found once the first is full.
        let twin = publish(&mut store, KEY, 7, 1);
        assert!(store.node(twin).expect("in use").indexed);
        check(&store, 1, 2);
        for _ in 1..LIMIT {
            store.add_sharer(first);
        }
        assert_eq!(store.lookup(KEY, &bytes(7)), Some(twin));
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
