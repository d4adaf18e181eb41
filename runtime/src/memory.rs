//! Linear memories backed by a memfd each, so that the merge engine can share their pages.
//!
//! wasmtime normally backs a linear memory with anonymous memory, which a user-space merge
//! engine cannot share: two anonymous pages can only be merged by the kernel (KSM). A page of a
//! file, by contrast, can be mapped at many places. So samepage gives wasmtime its own
//! [`MemoryCreator`], [`MemfdMemoryCreator`], and every linear memory it creates is a
//! [`MemfdMemory`]:
//!
//! ```text
//!   base                      base + len            base + capacity       base + reservation
//!   |  memfd [0, len), shared  |  PROT_NONE, reserved for growth  |  PROT_NONE guard  |
//! ```
//!
//! * One anonymous `PROT_NONE` mapping reserves the whole address range up front: the
//!   capacity wasmtime asks for (4 GiB for a 32-bit memory on x86_64) plus its guard region.
//!   wasmtime elides bounds checks that this guard makes redundant, so an access past `len`
//!   must fault, never reach memory.
//! * The accessible bytes `[base, base + len)` are a `MAP_SHARED | MAP_FIXED` mapping of the
//!   memfd's bytes `[0, len)` laid over the start of the reservation. Growing extends the
//!   memfd and maps the new range the same way right after the old one, so the base never
//!   moves: the engine registered that address, and wasmtime may have compiled code that
//!   keeps it in a register (the host turns `memory_may_move` off for this reason).
//! * With merging on, each memory is registered with the [`Engine`] as a region of its
//!   owner. The engine may then replace any page of `[base, base + len)` by a private
//!   copy-on-write mapping of a stable page with the same bytes; wasm code cannot tell.
//!
//! The invariants that make this sound:
//!
//! 1. **The memfd is the memory.** Every byte of `[base, base + len)` is the memfd's byte at
//!    the same offset, or a merged page holding the same bytes. The memfd is never shorter
//!    than `len` (truncating a mapped file would turn accesses into `SIGBUS`), and nothing
//!    else maps it for writing.
//! 2. **Only the owner writes, and only with its guard held** (see
//!    [`samepage_dedup::quiesce`]). Wasm code, WASI calls made by it, data segments written at
//!    instantiation and the host's own accesses all run with the owner's guard held; so does
//!    growth, which is why [`RegionHandle::set_len`] may be called from `grow_to`.
//! 3. **The reservation is exclusive.** Nothing but this module maps inside
//!    `[base, base + reservation)`, apart from the engine's remaps of registered pages, so
//!    `MAP_FIXED` over the unused part of the reservation never discards anyone's mapping.
//! 4. **Unregister before unmapping.** A memory drops its [`RegionHandle`] before it unmaps
//!    the reservation: until then the engine may remap pages in it, and after `munmap` the
//!    kernel may hand the addresses to somebody else.
//!
//! wasmtime's own copy-on-write instantiation (`memory_init_cow`) maps a module's initial
//! image over linear memory and assumes that memory is its own mmap; it would replace the
//! memfd mapping. The host turns it off, and wasmtime copies data segments into the memfd.
//!
//! A [`MemoryCreator`] belongs to a wasmtime engine and is told nothing about the store it
//! creates a memory for, so it cannot know the owner. The runtime names the owner in a
//! thread-local [`OwnerScope`] around instantiation, which is when wasmtime creates an
//! instance's memories, on the instantiating thread.

use std::cell::RefCell;
use std::io;
use std::marker::PhantomData;
use std::ptr;
use std::sync::Arc;

use memfd::{Memfd, MemfdOptions};
use rustix::mm::{self, MapFlags, ProtFlags};
use samepage_dedup::{Engine, Owner, PAGE_SIZE, RegionHandle};
use wasmtime::{LinearMemory, MemoryCreator, MemoryType};

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
        "cannot resize linear memory from {len} to {requested} bytes: it only grows, within \
         its {capacity}-byte reservation"
    )]
    OutOfRange {
        len: usize,
        requested: usize,
        capacity: usize,
    },
    #[error("cannot create the memfd: {0}")]
    Memfd(#[source] memfd::Error),
    #[error("cannot reserve {bytes} bytes of address space: {source}")]
    Reserve { bytes: usize, source: io::Error },
    #[error("cannot resize the memfd to {len} bytes: {source}")]
    Resize { len: usize, source: io::Error },
    #[error("cannot map bytes {start}..{end} of the memfd: {source}")]
    Map {
        start: usize,
        end: usize,
        source: io::Error,
    },
    #[error("cannot register the memory with the merge engine: {0}")]
    Register(#[source] samepage_dedup::Error),
}

/// The instantiation running on this thread.
struct Instantiation {
    /// Owner of every memory created on this thread meanwhile.
    owner: Owner,
    /// Why creating a memory failed, if it did. wasmtime flattens the creator's error into a
    /// string; the typed error waits here for the runtime to report.
    failure: Option<MemoryError>,
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
    pub(crate) fn enter(owner: &Owner) -> Self {
        let previous = INSTANTIATING.replace(Some(Instantiation {
            owner: owner.clone(),
            failure: None,
        }));
        Self {
            previous,
            _not_send: PhantomData,
        }
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

/// Keeps `error` for the scope around the failing instantiation, if there is one.
fn record_failure(error: MemoryError) {
    INSTANTIATING.with_borrow_mut(|current| {
        if let Some(instantiation) = current {
            instantiation.failure = Some(error);
        }
    });
}

/// Creates every linear memory of a wasmtime engine as a [`MemfdMemory`].
pub(crate) struct MemfdMemoryCreator {
    /// The engine that merges the memories' pages; `None` keeps them memfd-backed but unmerged.
    dedup: Option<Engine>,
}

impl MemfdMemoryCreator {
    pub(crate) fn new(dedup: Option<Engine>) -> Self {
        Self { dedup }
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
        let registration = match &self.dedup {
            Some(engine) => Some((engine, current_owner().ok_or(MemoryError::NoOwner)?)),
            None => None,
        };
        let capacity = reserved_size_in_bytes.unwrap_or(maximum.unwrap_or(minimum));
        let memfd = MemfdOptions::new()
            .allow_sealing(false)
            .create("samepage-linear-memory")
            .map_err(MemoryError::Memfd)?;
        let mut memory = MemfdMemory::reserve(Arc::new(memfd), capacity, guard_size_in_bytes)?;
        memory.extend(minimum)?;
        if let Some((engine, owner)) = registration {
            // SAFETY: `[base, base + len)` is a page-aligned MAP_SHARED mapping of the memfd from
            // offset 0 (invariant 1) that stays mapped until the handle, kept in `memory.region`,
            // is dropped (invariant 4); it grows in place with `set_len` called under the guard,
            // and the owner writes it only under its guard (invariant 2).
            let region =
                unsafe { engine.register(&owner, memory.memfd.clone(), memory.base, memory.len) }
                    .map_err(MemoryError::Register)?;
            memory.region = Some(region);
        }
        Ok(memory)
    }
}

// SAFETY: every memory handed out is zero-filled (a fresh memfd), never moves within its
// capacity, and keeps its guard region inaccessible; see the invariants of `MemfdMemory`.
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

/// A linear memory: a memfd mapped at the start of an address-space reservation (see the
/// module documentation for the layout and invariants).
pub(crate) struct MemfdMemory {
    /// Start of the reservation and of linear memory; fixed for the memory's life.
    base: *mut u8,
    /// Accessible bytes, mapping the memfd's `[0, len)`; a multiple of [`PAGE_SIZE`].
    len: usize,
    /// Bytes linear memory may grow to in place.
    capacity: usize,
    /// Bytes of the whole reservation, capacity and guard region, unmapped on drop.
    reservation: usize,
    /// Backing file of every byte of linear memory.
    memfd: Arc<Memfd>,
    /// Registration with the merge engine, `None` when merging is off.
    region: Option<RegionHandle>,
}

// SAFETY: `base` is only the address of a mapping this value owns. The bytes behind it are
// accessed through wasmtime, which serialises access within a store, and by the engine, which
// synchronises with the owner through its guard; nothing here reads or writes them.
unsafe impl Send for MemfdMemory {}
// SAFETY: as for `Send`; `&self` methods only read plain fields.
unsafe impl Sync for MemfdMemory {}

impl MemfdMemory {
    /// Reserves `capacity + guard` bytes of address space, none of them accessible yet.
    fn reserve(memfd: Arc<Memfd>, capacity: usize, guard: usize) -> Result<Self, MemoryError> {
        // An overflowing size cannot be mapped anyway: saturate and let mmap refuse it.
        let reservation = capacity.saturating_add(guard);
        // SAFETY: without MAP_FIXED the kernel picks an address range that overlaps no existing
        // mapping, so creating it cannot disturb any memory.
        let base = unsafe {
            mm::mmap_anonymous(
                ptr::null_mut(),
                reservation,
                ProtFlags::empty(),
                MapFlags::PRIVATE | MapFlags::NORESERVE,
            )
        }
        .map_err(|errno| MemoryError::Reserve {
            bytes: reservation,
            source: errno.into(),
        })?;
        Ok(Self {
            base: base.cast(),
            len: 0,
            capacity,
            reservation,
            memfd,
            region: None,
        })
    }

    /// Makes the memory `new_len` bytes long. On failure the accessible memory is unchanged
    /// (the memfd may be left longer than `len`, which costs nothing: the extra bytes are
    /// never mapped, so never touched).
    fn extend(&mut self, new_len: usize) -> Result<(), MemoryError> {
        if new_len < self.len || new_len > self.capacity {
            return Err(MemoryError::OutOfRange {
                len: self.len,
                requested: new_len,
                capacity: self.capacity,
            });
        }
        if new_len == self.len {
            return Ok(());
        }
        rustix::fs::ftruncate(self.memfd.as_file(), new_len as u64).map_err(|errno| {
            MemoryError::Resize {
                len: new_len,
                source: errno.into(),
            }
        })?;
        // SAFETY: `[base + len, base + new_len)` lies inside the reservation (`new_len` is within
        // `capacity`) and past the accessible memory, so it is still PROT_NONE reservation that
        // nobody else maps (invariant 3): MAP_FIXED discards nothing. The memfd was just made
        // `new_len` bytes long, so every page mapped has backing.
        unsafe {
            mm::mmap(
                self.base.wrapping_add(self.len).cast(),
                new_len - self.len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED | MapFlags::FIXED,
                self.memfd.as_file(),
                self.len as u64,
            )
        }
        .map_err(|errno| MemoryError::Map {
            start: self.len,
            end: new_len,
            source: errno.into(),
        })?;
        self.len = new_len;
        if let Some(region) = &self.region {
            region.set_len(new_len);
        }
        Ok(())
    }
}

// SAFETY: `byte_size` bytes at `as_ptr` are mapped readable and writable, growth up to
// `byte_capacity` never moves the base, and the guard region after the capacity stays
// inaccessible for as long as the memory lives.
unsafe impl LinearMemory for MemfdMemory {
    fn byte_size(&self) -> usize {
        self.len
    }

    fn byte_capacity(&self) -> usize {
        self.capacity
    }

    fn grow_to(&mut self, new_size: usize) -> wasmtime::Result<()> {
        Ok(self.extend(new_size)?)
    }

    fn as_ptr(&self) -> *mut u8 {
        self.base
    }
}

impl Drop for MemfdMemory {
    fn drop(&mut self) {
        // Invariant 4: the engine stops remapping pages here before the addresses are freed.
        drop(self.region.take());
        // SAFETY: `[base, base + reservation)` is the reservation made by `reserve`, which this
        // value alone owns; wasmtime is done with the memory (it is dropping it) and the engine
        // has forgotten it, so nothing refers to these addresses any more.
        let unmapped = unsafe { mm::munmap(self.base.cast(), self.reservation) };
        // munmap of a whole mapping we own can only fail on a bug; there is no one to tell in
        // a destructor.
        debug_assert!(
            unmapped.is_ok(),
            "munmap of a linear memory failed: {unmapped:?}"
        );
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use samepage_dedup::EngineConfig;

    use super::*;

    const WASM_PAGE: usize = 64 << 10;

    /// A creator registering with an engine whose passes run only when a test asks.
    fn creator() -> MemfdMemoryCreator {
        let engine = Engine::new(EngineConfig {
            scanner: false,
            ..EngineConfig::default()
        })
        .expect("merge engine");
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
        unsafe { std::slice::from_raw_parts(memory.base, memory.len) }
    }

    fn write(memory: &mut MemfdMemory, offset: usize, value: u8) {
        assert!(offset < memory.len);
        // SAFETY: `offset` is within the accessible, writable bytes, and `&mut` rules out any
        // slice from `bytes` meanwhile.
        unsafe { memory.base.add(offset).write(value) }
    }

    #[test]
    fn growth_keeps_the_base_and_adds_zeros_backed_by_the_memfd() {
        let creator = creator();
        let owner = Owner::new(0);
        let _scope = OwnerScope::enter(&owner);
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
            .memfd
            .as_file()
            .read_at(&mut read, (2 * WASM_PAGE + 5) as u64)
            .expect("read the memfd");
        assert_eq!(read, [9], "the mapping is the memfd itself");
    }

    #[test]
    fn growth_past_the_reservation_leaves_the_memory_as_it_was() {
        let creator = creator();
        let owner = Owner::new(0);
        let _scope = OwnerScope::enter(&owner);
        let _guard = owner.enter();
        let mut memory = memory(&creator, 2).expect("memory");
        write(&mut memory, 0, 1);

        let error = memory.extend(17 * WASM_PAGE).expect_err("beyond 1 MiB");

        assert!(matches!(error, MemoryError::OutOfRange { .. }), "{error}");
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
        let _scope = OwnerScope::enter(&owner);
        let error = memory(&creator, 17).err().expect("beyond 1 MiB");
        assert!(matches!(error, MemoryError::OutOfRange { .. }), "{error}");
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
        let scope = OwnerScope::enter(&owner);
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
            let _outer = OwnerScope::enter(&outer);
            {
                let _inner = OwnerScope::enter(&inner);
                assert_eq!(current_owner().map(|o| o.id()), Some(inner.id()));
            }
            assert_eq!(current_owner().map(|o| o.id()), Some(outer.id()));
        }
        assert!(current_owner().is_none());
    }
}
