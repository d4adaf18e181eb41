//! Linear memories backed by a memfd each, so that the merge engine can share their pages.
//!
//! wasmtime normally backs a linear memory with anonymous memory, which a user-space merge
//! engine cannot share: two anonymous pages can only be merged by the kernel (KSM). A page of a
//! file, by contrast, can be mapped at many places. So samepage gives wasmtime its own
//! [`MemoryCreator`], [`MemfdMemoryCreator`], and every linear memory it creates is a
//! [`MemfdMemory`]: a [`MemfdMapping`] (a memfd mapped `MAP_SHARED` at the start of an
//! address-space reservation, followed by the guard region wasmtime asks for, registered with
//! the engine under the instance's owner). Its documentation states the layout and the
//! invariants; what this module adds is who upholds them:
//!
//! * **The base never moves.** The engine registered the address, and wasmtime may keep it in
//!   a register in compiled code; the host turns `memory_may_move` off, and growth maps the
//!   new range right after the old one inside the reservation.
//! * **Only the owner writes, and only with its guard held** (see
//!   [`samepage_dedup::quiesce`]). Wasm code, WASI calls made by it, data segments written at
//!   instantiation and the host's own accesses all run with the owner's guard held; so does
//!   `memory.grow`, which is why `grow_to` may grow the registered region.
//! * **Unregister before unmapping**: dropping a [`MemfdMapping`] drops its registration
//!   first.
//!
//! wasmtime's own copy-on-write instantiation (`memory_init_cow`) maps a module's initial
//! image over linear memory and assumes that memory is its own mmap; it would replace the
//! memfd mapping. The host turns it off. A [`crate::Module`]'s data segments are lifted into
//! the merge engine's images instead ([`crate::image`]): the instantiation's plan names each
//! memory's image, and the creator maps it as the memory is made. A plain `wasmtime::Module`
//! gets its data segments copied into the memfd by wasmtime.
//!
//! A [`MemoryCreator`] belongs to a wasmtime engine and is told nothing about the store it
//! creates a memory for, so it cannot know the owner. The runtime names the owner in a
//! thread-local [`OwnerScope`] around instantiation, which is when wasmtime creates an
//! instance's memories, on the instantiating thread; the scope also collects the memories
//! created, each a [`MemoryRegion`], which become the store owner's regions
//! ([`crate::StoreOwner`]).
//!
//! A merged memory is not made from nothing when a ready one fits: the creator takes it from
//! its [`SlotPool`] (`crate::slots` states how and why that is sound), and a dropped memory
//! goes back there, reset to its image.

use std::cell::RefCell;
use std::marker::PhantomData;

use std::sync::Arc;

use samepage_dedup::{Engine, MappingError, MemfdMapping, Owner, PAGE_SIZE, RegionId};
use wasmtime::{LinearMemory, MemoryCreator, MemoryType};

use crate::image::ImagePlan;
use crate::slots::{IDLE_SLOTS, SlotKey, SlotPool};

/// Why a linear memory could not be created or grown.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error(
        "linear memory created outside samepage's instantiate: there is no owner to register \
         it under"
    )]
    NoOwner,
    #[error(
        "shared linear memories are not supported: threads would write them without the \
         owner's guard"
    )]
    Shared,
    #[error("wasm pages of {0} bytes are smaller than the {PAGE_SIZE}-byte pages samepage maps")]
    PageSize(u64),
    #[error(
        "memory {index} of the instantiation is {minimum} bytes, but its module image was made \
         for a memory of {planned:?} bytes: samepage does not know this component's order of \
         memories"
    )]
    ImageOrder {
        index: usize,
        minimum: u64,
        planned: Option<u64>,
    },
    #[error(transparent)]
    Mapping(#[from] MappingError),
}

/// A linear memory of a store, registered with the merge engine: what the creator records
/// for the scope's owner as it makes each merged memory, and what the store owner keeps as its
/// regions ([`crate::StoreOwner::regions`]). A GC heap or an unmerged memory has none.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryRegion {
    /// Where the memory starts; it never moves.
    pub base: usize,
    /// The engine's name for it.
    pub id: RegionId,
}

/// The instantiation running on this thread.
struct Instantiation {
    /// Owner of every memory created on this thread meanwhile.
    owner: Owner,
    /// The memories created so far, registered under `owner`, in order.
    created: Vec<MemoryRegion>,
    /// Why creating a memory failed, if it did. wasmtime flattens the creator's error into a
    /// string; the typed error waits here for the runtime to report.
    failure: Option<MemoryError>,
    /// The images of the memories this instantiation creates, in order, if it has any.
    plan: Option<ImagePlan>,
}

thread_local! {
    static INSTANTIATING: RefCell<Option<Instantiation>> = const { RefCell::new(None) };
}

/// While it lives, memories created on this thread belong to its owner. Scopes nest: dropping
/// one restores whatever the thread had before.
pub(crate) struct OwnerScope {
    /// The enclosing scope's state, put back on drop.
    previous: Option<Instantiation>,
    /// Thread-local state must be restored on the thread that set it.
    _not_send: PhantomData<*const ()>,
}

impl OwnerScope {
    pub(crate) fn enter(owner: &Owner, plan: Option<ImagePlan>) -> Self {
        let previous = INSTANTIATING.replace(Some(Instantiation {
            owner: owner.clone(),
            created: Vec::new(),
            failure: None,
            plan,
        }));
        Self {
            previous,
            _not_send: PhantomData,
        }
    }

    /// The merged memories created inside this scope so far, in order.
    pub(crate) fn take_created(&self) -> Vec<MemoryRegion> {
        INSTANTIATING.with_borrow_mut(|current| {
            current
                .as_mut()
                .map(|instantiation| std::mem::take(&mut instantiation.created))
                .unwrap_or_default()
        })
    }

    /// Why memory creation failed inside this scope, if it did.
    pub(crate) fn take_failure(&self) -> Option<MemoryError> {
        INSTANTIATING.with_borrow_mut(|current| current.as_mut()?.failure.take())
    }
}

impl Drop for OwnerScope {
    fn drop(&mut self) {
        INSTANTIATING.set(self.previous.take());
    }
}

pub(crate) fn current_owner() -> Option<Owner> {
    INSTANTIATING.with_borrow(|current| Some(current.as_ref()?.owner.clone()))
}

/// The plan of the instantiation on this thread and the index of the memory being created
/// (the number created so far), if it has a plan.
fn current_plan() -> Option<(ImagePlan, usize)> {
    INSTANTIATING.with_borrow(|current| {
        let instantiation = current.as_ref()?;
        Some((instantiation.plan.clone()?, instantiation.created.len()))
    })
}

/// Records a memory created for the scope's owner.
fn record_created(region: MemoryRegion) {
    INSTANTIATING.with_borrow_mut(|current| {
        if let Some(instantiation) = current {
            instantiation.created.push(region);
        }
    });
}

/// Keeps `error` for the scope around the failing instantiation, if there is one.
fn record_failure(error: MemoryError) {
    INSTANTIATING.with_borrow_mut(|current| {
        if let Some(instantiation) = current {
            instantiation.failure = Some(error);
        }
    });
}

/// The guard size [`crate::Samepage::configure`] gives GC heaps, and no linear memory: how
/// the creator tells a store's GC heap (which wasmtime also makes through it, when a module
/// uses GC or exceptions) from the instance's linear memories. A GC heap is a memfd memory
/// too, but not registered: wasmtime's collector owns it, and no module image is for it.
pub(crate) const GC_HEAP_GUARD_BYTES: usize = (32 << 20) + (64 << 10);

/// Most address space reserved for a 64-bit memory beyond its minimum. wasmtime's
/// reservation (4 GiB) is made for 32-bit memories; a 64-bit one may start or grow larger,
/// and a memory here can never move to grow. 16 GiB each lets thousands of instances fit in
/// a 47-bit address space; growth past it fails as `memory.grow` does (it returns -1).
const MEMORY64_RESERVATION: usize = 16 << 30;

/// Bytes a memory of type `ty` may grow to in place: wasmtime's reservation for 32-bit
/// memories (or the maximum, when there is no reservation); for 64-bit ones their maximum up
/// to [`MEMORY64_RESERVATION`], and never less than the minimum or than wasmtime's
/// reservation. A minimum the address space cannot hold is refused when the reservation is
/// made, naming its size.
fn capacity_of(
    ty: &MemoryType,
    minimum: usize,
    maximum: Option<usize>,
    reserved: Option<usize>,
) -> usize {
    if !ty.is_64() {
        return reserved.unwrap_or(maximum.unwrap_or(minimum));
    }
    maximum
        .unwrap_or(usize::MAX)
        .min(MEMORY64_RESERVATION.max(minimum))
        .max(minimum)
        .max(reserved.unwrap_or(0))
        .checked_next_multiple_of(PAGE_SIZE)
        .unwrap_or(usize::MAX - PAGE_SIZE + 1)
}

/// Creates every linear memory of a wasmtime engine as a [`MemfdMemory`].
pub(crate) struct MemfdMemoryCreator {
    /// The engine that merges the memories' pages; `None` keeps them memfd-backed but unmerged.
    dedup: Option<Engine>,
    /// Ready memories to reuse, when merging (`crate::slots`).
    slots: Option<Arc<SlotPool>>,
}

impl MemfdMemoryCreator {
    /// A creator keeping up to [`IDLE_SLOTS`] ready memories when it merges.
    pub(crate) fn new(dedup: Option<Engine>) -> Self {
        Self::with_idle_slots(dedup, IDLE_SLOTS)
    }

    /// A creator keeping up to `idle_slots` ready memories when it merges (none with 0).
    pub(crate) fn with_idle_slots(dedup: Option<Engine>, idle_slots: usize) -> Self {
        let slots = dedup
            .as_ref()
            .filter(|_| idle_slots > 0)
            .map(|_| SlotPool::new(idle_slots));
        Self { dedup, slots }
    }

    /// Its pool of ready memories, when it keeps one.
    pub(crate) fn slots(&self) -> Option<Arc<SlotPool>> {
        self.slots.clone()
    }

    fn create(
        &self,
        ty: &MemoryType,
        minimum: usize,
        maximum: Option<usize>,
        reserved_size_in_bytes: Option<usize>,
        guard_size_in_bytes: usize,
    ) -> Result<MemfdMemory, MemoryError> {
        if ty.is_shared() {
            return Err(MemoryError::Shared);
        }
        // Every size is then a whole number of OS pages, which is what mmap and the engine
        // work in.
        if ty.page_size() < PAGE_SIZE as u64 {
            return Err(MemoryError::PageSize(ty.page_size()));
        }
        let capacity = capacity_of(ty, minimum, maximum, reserved_size_in_bytes);
        if guard_size_in_bytes == GC_HEAP_GUARD_BYTES {
            let mapping = MemfdMapping::new(
                None,
                &Owner::new(0),
                "samepage-gc-heap",
                minimum,
                capacity,
                guard_size_in_bytes,
            )?;
            return Ok(MemfdMemory {
                mapping: Some(mapping),
                release: None,
            });
        }
        let owner = match (&self.dedup, current_owner()) {
            (Some(_), None) => return Err(MemoryError::NoOwner),
            (_, Some(owner)) => owner,
            // Not merged: the owner is never consulted, any will do.
            (None, None) => Owner::new(0),
        };
        let plan = current_plan();
        let image = match &plan {
            Some((plan, index)) => {
                // A memory the plan does not foresee, or of another size, is not the one the
                // image is for: refuse it rather than map the wrong bytes.
                if plan.minimum(*index) != Some(minimum as u64) {
                    return Err(MemoryError::ImageOrder {
                        index: *index,
                        minimum: minimum as u64,
                        planned: plan.minimum(*index),
                    });
                }
                plan.image_of(*index)
            }
            None => None,
        };
        let key = SlotKey {
            domain: owner.domain(),
            image: image.map(|image| image.id()),
            len: minimum,
            capacity,
            guard: guard_size_in_bytes,
        };
        let reused = self.slots.as_ref().and_then(|pool| pool.take(&key, &owner));
        let mapping = match reused {
            Some(mapping) => mapping,
            None => MemfdMapping::with_image(
                self.dedup.as_ref().map(|engine| (engine, image)),
                &owner,
                "samepage-linear-memory",
                minimum,
                capacity,
                guard_size_in_bytes,
            )?,
        };
        if let Some(handle) = mapping.region() {
            record_created(MemoryRegion {
                base: mapping.as_ptr() as usize,
                id: handle.id(),
            });
        }
        let release = self.slots.as_ref().map(|pool| Release {
            pool: pool.clone(),
            key,
            owner,
            image: plan,
        });
        Ok(MemfdMemory {
            mapping: Some(mapping),
            release,
        })
    }
}

// SAFETY: every memory handed out is zero-filled (a fresh memfd) or its module image, as a
// fresh one made with that image is (a slot reset to it, `crate::slots` invariant 1), never
// moves within its capacity, and keeps its guard region inaccessible; see the invariants of
// `MemfdMemory`.
unsafe impl MemoryCreator for MemfdMemoryCreator {
    fn new_memory(
        &self,
        ty: MemoryType,
        minimum: usize,
        maximum: Option<usize>,
        reserved_size_in_bytes: Option<usize>,
        guard_size_in_bytes: usize,
    ) -> Result<Box<dyn LinearMemory>, String> {
        match self.create(
            &ty,
            minimum,
            maximum,
            reserved_size_in_bytes,
            guard_size_in_bytes,
        ) {
            Ok(memory) => Ok(Box::new(memory)),
            Err(error) => {
                let message = error.to_string();
                record_failure(error);
                Err(message)
            }
        }
    }
}

/// A linear memory: a [`MemfdMapping`] that wasmtime drives, given back to its slot pool
/// when dropped.
pub(crate) struct MemfdMemory {
    /// Always `Some` but while being dropped.
    mapping: Option<MemfdMapping>,
    /// Where the memory goes when dropped, if to a pool.
    release: Option<Release>,
}

/// What a pooled memory needs to go back to its pool.
struct Release {
    pool: Arc<SlotPool>,
    key: SlotKey,
    /// The owner it was made for, whose guard the reset takes.
    owner: Owner,
    /// The plan it was made under and its index there: its image, kept alive to reset to.
    image: Option<(ImagePlan, usize)>,
}

impl MemfdMemory {
    fn mapping(&self) -> &MemfdMapping {
        self.mapping.as_ref().expect("taken only in drop")
    }

    fn mapping_mut(&mut self) -> &mut MemfdMapping {
        self.mapping.as_mut().expect("taken only in drop")
    }
}

impl Drop for MemfdMemory {
    fn drop(&mut self) {
        if let (Some(mapping), Some(release)) = (self.mapping.take(), self.release.take()) {
            let image = release
                .image
                .as_ref()
                .and_then(|(plan, index)| plan.image_of(*index));
            release
                .pool
                .give_back(release.key, mapping, &release.owner, image);
        }
    }
}

// SAFETY: `byte_size` bytes at `as_ptr` are mapped readable and writable, growth up to
// `byte_capacity` never moves the base, and the guard region after the capacity stays
// inaccessible for as long as the memory lives (invariants of `MemfdMapping`).
unsafe impl LinearMemory for MemfdMemory {
    fn byte_size(&self) -> usize {
        self.mapping().len()
    }

    fn byte_capacity(&self) -> usize {
        self.mapping().capacity()
    }

    fn grow_to(&mut self, new_size: usize) -> wasmtime::Result<()> {
        self.mapping_mut()
            .grow(new_size)
            .map_err(MemoryError::from)?;
        Ok(())
    }

    fn as_ptr(&self) -> *mut u8 {
        self.mapping().as_ptr()
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use samepage_dedup::{EngineConfig, Knobs};

    use super::*;

    const WASM_PAGE: usize = 64 << 10;

    /// A creator registering with an engine whose passes run only when a test asks.
    fn creator() -> MemfdMemoryCreator {
        let engine = Engine::new(EngineConfig::manual(Knobs::default())).expect("merge engine");
        MemfdMemoryCreator::new(Some(engine))
    }

    /// A memory of `pages` wasm pages in a 1 MiB (16-page) reservation.
    fn memory(creator: &MemfdMemoryCreator, pages: u32) -> Result<MemfdMemory, MemoryError> {
        let ty = MemoryType::new(pages, None);
        creator.create(
            &ty,
            pages as usize * WASM_PAGE,
            None,
            Some(1 << 20),
            WASM_PAGE,
        )
    }

    fn bytes(memory: &MemfdMemory) -> &[u8] {
        // SAFETY: `[base, base + len)` is mapped readable, and the tests write it only through
        // `write` below, never while this slice lives.
        unsafe { std::slice::from_raw_parts(memory.as_ptr(), memory.byte_size()) }
    }

    fn write(memory: &mut MemfdMemory, offset: usize, value: u8) {
        assert!(offset < memory.byte_size());
        // SAFETY: `offset` is within the accessible, writable bytes, and `&mut` rules out any
        // slice from `bytes` meanwhile.
        unsafe { memory.as_ptr().add(offset).write(value) }
    }

    #[test]
    fn growth_keeps_the_base_and_adds_zeros_backed_by_the_memfd() {
        let creator = creator();
        let owner = Owner::new(0);
        let _scope = OwnerScope::enter(&owner, None);
        let _guard = owner.enter();
        let mut memory = memory(&creator, 1).expect("memory");
        let base = memory.as_ptr();
        write(&mut memory, 100, 7);

        memory.grow_to(3 * WASM_PAGE).expect("growth");

        assert_eq!(memory.as_ptr(), base);
        assert_eq!(memory.byte_size(), 3 * WASM_PAGE);
        assert_eq!(bytes(&memory)[100], 7);
        assert!(bytes(&memory)[WASM_PAGE..].iter().all(|&b| b == 0));
        write(&mut memory, 2 * WASM_PAGE + 5, 9);
        let mut read = [0; 1];
        memory
            .mapping()
            .memfd()
            .as_file()
            .read_at(&mut read, (2 * WASM_PAGE + 5) as u64)
            .expect("read the memfd");
        assert_eq!(read, [9], "the mapping is the memfd itself");
    }

    #[test]
    fn growth_past_the_reservation_leaves_the_memory_as_it_was() {
        let creator = creator();
        let owner = Owner::new(0);
        let _scope = OwnerScope::enter(&owner, None);
        let _guard = owner.enter();
        let mut memory = memory(&creator, 2).expect("memory");
        write(&mut memory, 0, 1);

        let error = memory
            .mapping_mut()
            .grow(17 * WASM_PAGE)
            .expect_err("beyond 1 MiB");

        assert!(
            matches!(error, MappingError::BeyondCapacity { .. }),
            "{error}"
        );
        assert_eq!(memory.byte_size(), 2 * WASM_PAGE);
        assert_eq!(bytes(&memory)[0], 1);
        memory
            .grow_to(4 * WASM_PAGE)
            .expect("growth within the reservation");
    }

    #[test]
    fn a_minimum_past_the_reservation_is_refused() {
        let creator = creator();
        let owner = Owner::new(0);
        let _scope = OwnerScope::enter(&owner, None);
        let error = memory(&creator, 17).err().expect("beyond 1 MiB");
        assert!(
            matches!(
                error,
                MemoryError::Mapping(MappingError::BeyondCapacity { .. })
            ),
            "{error}"
        );
    }

    #[test]
    fn a_merged_memory_needs_an_owner() {
        let error = creator()
            .new_memory(MemoryType::new(1, None), WASM_PAGE, None, Some(1 << 20), 0)
            .err()
            .expect("no owner");
        assert!(error.contains("outside samepage's instantiate"), "{error}");
    }

    #[test]
    fn an_unmerged_memory_needs_no_owner() {
        let memory = MemfdMemoryCreator::new(None)
            .new_memory(MemoryType::new(1, None), WASM_PAGE, None, Some(1 << 20), 0)
            .expect("memory");
        assert_eq!(memory.byte_size(), WASM_PAGE);
    }

    #[test]
    fn shared_memories_are_refused() {
        let owner = Owner::new(0);
        let scope = OwnerScope::enter(&owner, None);
        let error = creator()
            .new_memory(
                MemoryType::shared(1, 1),
                WASM_PAGE,
                Some(WASM_PAGE),
                Some(1 << 20),
                0,
            )
            .err()
            .expect("shared");
        assert!(error.contains("shared"), "{error}");
        assert!(matches!(scope.take_failure(), Some(MemoryError::Shared)));
    }

    #[test]
    fn scopes_nest_and_restore_the_thread_state() {
        let outer = Owner::new(0);
        let inner = Owner::new(0);
        {
            let _outer = OwnerScope::enter(&outer, None);
            {
                let _inner = OwnerScope::enter(&inner, None);
                assert_eq!(current_owner().map(|o| o.id()), Some(inner.id()));
            }
            assert_eq!(current_owner().map(|o| o.id()), Some(outer.id()));
        }
        assert!(current_owner().is_none());
    }
}
