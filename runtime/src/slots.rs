//! Ready memory slots: linear memories kept, reset, for the next instance of the same module.
//!
//! Making a linear memory from nothing costs a `memfd_create`, its seals, an `ftruncate`, an
//! address-space reservation, a mapping, and a registration with the merge engine that maps
//! the module image run by run and records every image page; dropping it costs the unmapping,
//! the unregistration and the memfd's eviction. wasmtime's pooling allocator pays none of that
//! per instance: its slots are made once and reset on release. A [`SlotPool`] does the same
//! for samepage's memories, with the merge engine in the loop:
//!
//! - **Release.** When a memory is dropped (its store went), the memory's owner's guard is
//!   taken (without waiting: a guard held elsewhere, by the scanner for a batch or by the
//!   dropping thread itself, makes the memory go the ordinary way, unmapped), and the memory
//!   is reset with [`MemfdMapping::reset`], in time proportional to what the instance
//!   touched, as `StoreOwner::reset_memories` does. If nothing moved its mappings since the
//!   image was mapped (no merge, no growth: an instance that served one request, say), the
//!   reset is in place, as wasmtime resets a pooled slot: what the instance wrote over image
//!   pages is dropped with one `madvise(MADV_DONTNEED)`, and what it wrote into the memfd is
//!   punched. Otherwise every page leaves its stable slot, what the instance wrote is
//!   punched out of the memfd, the length goes back to the memory's minimum (pages past it
//!   become reserved address space again), and the module image is mapped again. The region
//!   is then handed to an *idle owner* of its own ([`MemfdMapping::reassign`]), in the same
//!   domain, and kept, keyed by what it was made for ([`SlotKey`]: domain, image, minimum,
//!   capacity, guard).
//! - **Reuse.** A memory the creator is asked for whose key has an idle slot takes it: the
//!   idle owner's guard is taken and the region handed to the new instance's owner. No system
//!   call is made: the slot reads exactly what a new memory made with the same image reads.
//! - **Bound.** At most [`IDLE_SLOTS`] slots are kept idle per engine; a release beyond it
//!   drops the oldest idle slot. Each idle slot holds its memfd (a descriptor), its
//!   reservation and the mappings of its image's runs (counted in the engine's map-count
//!   budget as any region's), and no memory of its own: its written pages were punched.
//!   It shares its image's stable pages, which therefore stay while it does, even once the
//!   module is gone: its key then matches no new memory, and it goes once it is the oldest
//!   idle slot of a full pool. When the map-count budget is short, mapping an image into a
//!   slot writes the image's bytes into the slot's memfd instead, as for any new region.
//!
//! Invariants, which keep merging sound across reuse:
//!
//! 1. **An idle slot is exactly its key's image** (zeros past it) and its key's minimum long:
//!    it is pooled only after a reset that succeeded completely; a reset that failed, or a
//!    slot whose length or key does not match, is dropped (unregistered, then unmapped).
//! 2. **A slot belongs to one owner at a time.** While idle, to its idle owner, which nobody
//!    but the pool enters; in use, to the instance's. Handing it over takes the current
//!    owner's guard and swaps the region's owner under the engine's state lock, so the
//!    scanner, which remaps a region only with its owner's guard, never works on a slot
//!    with the guard of an owner that no longer has it. The next instance reaches the memory
//!    only after the handover, inside its own instantiation.
//! 3. **Nothing of an instance outlives its release.** The reset runs before the handover to
//!    the idle owner: the previous instance's pages are punched or were never its own (image
//!    pages, shared and immutable), so the next instance cannot read a byte it wrote.
//! 4. **Domains never mix**: the key holds the domain, and the engine refuses to hand a
//!    region to an owner of another domain.
//!
//! Memories that nothing merges (a creator without an engine) and GC heaps are not pooled.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use samepage_dedup::{DomainId, MemfdMapping, MemoryImage, Owner};

/// Idle slots kept per engine, at most: a host holding this many ready instances, or
/// creating as many between releases, makes none of their memories from nothing. An idle
/// slot costs a descriptor, address space (its reservation: 4 GiB and a guard for a 32-bit
/// memory) and a few mappings per image run, and no memory.
pub const IDLE_SLOTS: usize = 256;

/// What a slot was made for: a memory is taken from a slot only with the same key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct SlotKey {
    /// The domain of its owners.
    pub(crate) domain: DomainId,
    /// Its module image ([`MemoryImage::id`]), or `None` for zeros.
    pub(crate) image: Option<u64>,
    /// Its length when made and after every reset: the memory's minimum.
    pub(crate) len: usize,
    /// The bytes it may grow to in place.
    pub(crate) capacity: usize,
    /// The inaccessible bytes after the capacity.
    pub(crate) guard: usize,
}

/// A slot nobody uses, reset, and owned by an owner of its own.
struct IdleSlot {
    mapping: MemfdMapping,
    /// Its owner while idle: entered only by the pool.
    owner: Owner,
    /// When it went idle (the pool's count of releases), to drop the oldest first.
    since: u64,
}

/// The idle slots of one engine's memories; see the module docs.
pub(crate) struct SlotPool {
    /// Idle slots kept, at most.
    limit: usize,
    idle: Mutex<Idle>,
}

#[derive(Default)]
struct Idle {
    by_key: HashMap<SlotKey, Vec<IdleSlot>>,
    /// Slots in `by_key`, added up.
    count: usize,
    /// Releases so far.
    releases: u64,
}

impl SlotPool {
    pub(crate) fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            limit,
            idle: Mutex::new(Idle::default()),
        })
    }

    /// An idle slot for `key`, handed over to `owner`; `None` when there is none.
    pub(crate) fn take(&self, key: &SlotKey, owner: &Owner) -> Option<MemfdMapping> {
        loop {
            let slot = {
                let mut idle = self.idle.lock();
                let slots = idle.by_key.get_mut(key)?;
                let slot = slots.pop()?;
                if slots.is_empty() {
                    idle.by_key.remove(key);
                }
                idle.count -= 1;
                slot
            };
            let IdleSlot {
                mut mapping,
                owner: idle,
                ..
            } = slot;
            // The scanner may hold the idle owner's gate for a batch: wait for it, as an
            // instance waits to run.
            let guard = idle.enter();
            if mapping.reassign(&guard, owner).is_ok() {
                return Some(mapping);
            }
            // A slot that cannot be handed over goes (unregistered, unmapped); try another.
            drop(guard);
            drop(mapping);
        }
    }

    /// Takes back `mapping`, `owner`'s memory made for `key`, whose image is `image`: reset
    /// and kept when it can be (see the module docs), dropped otherwise.
    pub(crate) fn give_back(
        &self,
        key: SlotKey,
        mut mapping: MemfdMapping,
        owner: &Owner,
        image: Option<&MemoryImage>,
    ) {
        if self.limit == 0 {
            return;
        }
        // Never wait: the thread dropping the store may hold the gate itself.
        let Some(guard) = owner.try_enter() else {
            return;
        };
        let idle = Owner::new(key.domain);
        let ready = mapping.reset(&guard, image, key.len).is_ok()
            && mapping.len() == key.len
            && mapping.reassign(&guard, &idle).is_ok();
        drop(guard);
        if !ready {
            return;
        }
        let evicted = {
            let mut pool = self.idle.lock();
            pool.releases += 1;
            let since = pool.releases;
            let evicted = if pool.count >= self.limit {
                pool.oldest()
            } else {
                None
            };
            pool.by_key.entry(key).or_default().push(IdleSlot {
                mapping,
                owner: idle,
                since,
            });
            pool.count += 1;
            evicted
        };
        // Unregistered and unmapped outside the pool's lock.
        drop(evicted);
    }

    /// Drops every idle slot (unregistered, then unmapped); how many there were.
    pub(crate) fn release_all(&self) -> usize {
        let released: Vec<IdleSlot> = {
            let mut pool = self.idle.lock();
            pool.count = 0;
            pool.by_key.drain().flat_map(|(_, slots)| slots).collect()
        };
        let count = released.len();
        // Unregistered and unmapped outside the pool's lock.
        drop(released);
        count
    }

    /// Idle slots kept now.
    #[cfg(test)]
    pub(crate) fn idle(&self) -> usize {
        self.idle.lock().count
    }
}

impl Idle {
    /// Takes out the slot that has been idle longest.
    fn oldest(&mut self) -> Option<IdleSlot> {
        let key = *self
            .by_key
            .iter()
            .filter_map(|(key, slots)| Some((key, slots.first()?.since)))
            .min_by_key(|&(_, since)| since)?
            .0;
        let slots = self.by_key.get_mut(&key)?;
        let slot = slots.remove(0);
        if slots.is_empty() {
            self.by_key.remove(&key);
        }
        self.count -= 1;
        Some(slot)
    }
}

#[cfg(test)]
mod tests {
    use samepage_dedup::{Engine, EngineConfig, Knobs, PAGE_SIZE};

    use super::*;

    #[test]
    fn the_pool_keeps_at_most_its_limit_and_hands_slots_to_their_new_owner() {
        let engine = Engine::new(EngineConfig::manual(Knobs::default())).expect("engine");
        let pool = SlotPool::new(2);
        let key = SlotKey {
            domain: 0,
            image: None,
            len: 4 * PAGE_SIZE,
            capacity: 16 * PAGE_SIZE,
            guard: PAGE_SIZE,
        };
        for _ in 0..3 {
            let owner = Owner::new(0);
            let mapping = MemfdMapping::new(
                Some(&engine),
                &owner,
                "test",
                key.len,
                key.capacity,
                key.guard,
            )
            .expect("mapping");
            pool.give_back(key, mapping, &owner, None);
        }
        assert_eq!(pool.idle(), 2, "the oldest idle slot went");
        let owner = Owner::new(0);
        let mapping = pool.take(&key, &owner).expect("an idle slot");
        assert_eq!(pool.idle(), 1);
        let region = mapping.region().expect("registered").id();
        // The region is the new owner's: its guard is the one the engine takes.
        let guard = owner.enter();
        engine
            .reset_region(&guard, region, None)
            .expect("the new owner's guard");
        drop(guard);
        let stranger = Owner::new(0);
        let error = engine
            .reset_region(&stranger.enter(), region, None)
            .expect_err("not the stranger's");
        assert!(
            matches!(error, samepage_dedup::Error::WrongOwner(_)),
            "{error}"
        );
        // Another domain never gets it.
        let other = SlotKey { domain: 1, ..key };
        assert!(pool.take(&other, &Owner::new(1)).is_none());
    }
}
