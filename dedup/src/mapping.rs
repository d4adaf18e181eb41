//! `MemfdMapping`: a region the engine can merge, made the one way the engine expects.
//!
//! A memfd mapped `MAP_SHARED` at the start of an address-space reservation (`PROT_NONE`,
//! no memory behind it), so that it can grow in place up to its capacity without moving.
//! Whatever lies past the accessible length stays `PROT_NONE`, and so does a guard region
//! past the capacity: code that relies on faults past the end, as wasm's bounds-check elision
//! does, gets them.
//!
//! ```text
//!   base                    base + len              base + capacity       + guard
//!   |  memfd [0, len), shared  |  PROT_NONE, room to grow  |  PROT_NONE guard  |
//! ```
//!
//! Invariants, which make the mapping fit for [`Engine::register`]:
//! - `[base, base + len)` maps the memfd from offset 0, `MAP_SHARED`, and nothing else maps it;
//! - the base never moves and the reservation outlives the registration (the handle is
//!   dropped before the reservation is unmapped);
//! - nothing else maps inside the reservation, so `MAP_FIXED` over its unused part discards
//!   nobody's memory;
//! - the length grows only by the owner with its guard held, and shrinks only in a reset
//!   ([`MemfdMapping::reset`]), which leaves nothing of what the owner wrote; the memfd is
//!   never shorter than the length (a mapped page past the end of its file raises `SIGBUS`):
//!   it is sealed against shrinking from its creation, and stays as long as the longest the
//!   mapping ever was (its pages past the length are punched, so a later growth maps zeros).

use std::io;
use std::sync::Arc;

use memfd::Memfd;
use rustix::mm::{MapFlags, ProtFlags, mmap, mmap_anonymous, munmap};

use crate::{Engine, Error, MemoryImage, Owner, PAGE_SIZE, RegionHandle};

#[derive(Debug, thiserror::Error)]
pub enum MappingError {
    #[error("cannot create a memfd: {0}")]
    Memfd(#[source] io::Error),
    #[error(
        "cannot create a memfd: the process has all {limit} file descriptors its limit \
         (RLIMIT_NOFILE) allows open, and every linear memory keeps one"
    )]
    OutOfDescriptors { limit: u64 },
    #[error("cannot reserve {bytes} bytes of address space: {source}")]
    Reserve { bytes: usize, source: io::Error },
    #[error("cannot size the memfd to {bytes} bytes: {source}")]
    Resize { bytes: usize, source: io::Error },
    #[error("cannot map the memfd: {0}")]
    Map(#[source] io::Error),
    #[error("cannot grow to {requested} bytes: the capacity is {capacity}")]
    BeyondCapacity { requested: usize, capacity: usize },
    #[error("lengths must be multiples of {PAGE_SIZE} bytes, got {0}")]
    Unaligned(usize),
    #[error(transparent)]
    Register(#[from] Error),
}

/// A growable memfd mapping, registered with an engine when one is given.
pub struct MemfdMapping {
    /// The backing file of every page not merged.
    memfd: Arc<Memfd>,
    /// Start of the reservation and of the accessible range.
    base: *mut u8,
    /// Accessible bytes.
    len: usize,
    /// Bytes of the memfd: the longest `len` has been (the file cannot shrink).
    file_len: usize,
    /// Bytes `len` can grow to in place.
    capacity: usize,
    /// Bytes reserved from `base`: the capacity and the guard region after it.
    reservation: usize,
    /// The registration; `None` when the mapping is not merged.
    handle: Option<RegionHandle>,
}

// SAFETY: the mapping is plain memory owned by this value; who may touch it when is governed
// by the owner's guard (see `crate::quiesce`), not by the thread.
unsafe impl Send for MemfdMapping {}
// SAFETY: as above; `&self` gives out only the base pointer and lengths.
unsafe impl Sync for MemfdMapping {}

/// The soft limit on open file descriptors, if there is one.
fn descriptor_limit() -> Option<u64> {
    rustix::process::getrlimit(rustix::process::Resource::Nofile).current
}

fn aligned(bytes: usize) -> Result<usize, MappingError> {
    if bytes.is_multiple_of(PAGE_SIZE) {
        Ok(bytes)
    } else {
        Err(MappingError::Unaligned(bytes))
    }
}

impl MemfdMapping {
    /// Maps `len` zeroed bytes that can grow to `capacity`, followed by `guard` inaccessible
    /// bytes, and, with `engine`, registers them for merging on behalf of `owner`.
    pub fn new(
        engine: Option<&Engine>,
        owner: &Owner,
        name: &str,
        len: usize,
        capacity: usize,
        guard: usize,
    ) -> Result<Self, MappingError> {
        Self::with_image(
            engine.map(|engine| (engine, None)),
            owner,
            name,
            len,
            capacity,
            guard,
        )
    }

    /// [`MemfdMapping::new`], registered with the engine of `merged`, whose pages start as
    /// `image` says (see [`crate::image`]) rather than zeros.
    pub fn with_image(
        merged: Option<(&Engine, Option<&MemoryImage>)>,
        owner: &Owner,
        name: &str,
        len: usize,
        capacity: usize,
        guard: usize,
    ) -> Result<Self, MappingError> {
        let (len, capacity, guard) = (aligned(len)?, aligned(capacity)?, aligned(guard)?);
        if len > capacity {
            return Err(MappingError::BeyondCapacity {
                requested: len,
                capacity,
            });
        }
        // An overflowing size cannot be mapped anyway: saturate and let mmap refuse it.
        let reservation = capacity.saturating_add(guard).max(PAGE_SIZE);
        let memfd = crate::memfds::create(name).map_err(|error| {
            match (error.raw_os_error(), descriptor_limit()) {
                (Some(code), Some(limit)) if code == rustix::io::Errno::MFILE.raw_os_error() => {
                    MappingError::OutOfDescriptors { limit }
                }
                _ => MappingError::Memfd(error),
            }
        })?;
        // SAFETY: a fresh reservation at an address the kernel picks; nothing refers to it.
        let base = unsafe {
            mmap_anonymous(
                std::ptr::null_mut(),
                reservation,
                ProtFlags::empty(),
                MapFlags::PRIVATE | MapFlags::NORESERVE,
            )
        }
        .map_err(|e| MappingError::Reserve {
            bytes: reservation,
            source: e.into(),
        })?;
        let mut mapping = Self {
            memfd: Arc::new(memfd),
            base: base.cast(),
            len: 0,
            file_len: 0,
            capacity,
            reservation,
            handle: None,
        };
        mapping.extend(len)?;
        if let Some((engine, image)) = merged {
            // SAFETY: the invariants in the module docs hold from here on: the memfd is mapped
            // at `base` for `len` bytes, and `Drop` lets go of the handle before unmapping. The
            // memfd is fresh (all zeros), and nobody has the address yet.
            let handle = unsafe {
                engine.register_with_image(owner, mapping.memfd.clone(), mapping.base, len, image)
            }?;
            mapping.handle = Some(handle);
        }
        Ok(mapping)
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.base
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The registration, to pass to [`Engine::merge_now`] or [`Engine::unmerge_region`].
    pub fn region(&self) -> Option<&RegionHandle> {
        self.handle.as_ref()
    }

    /// The backing memfd (for accounting: its allocated blocks are the unmerged pages).
    pub fn memfd(&self) -> &Memfd {
        &self.memfd
    }

    /// Puts the mapping back to `image` (zeros without one) and `len` bytes, with the owner's
    /// `guard` held: [`Engine::reset_region_to`], which frees what the owner wrote in time
    /// proportional to it, and this mapping's length shortened to match. `len` must not be
    /// shorter than the image. Only for a registered mapping; on an error the mapping is part
    /// reset: drop it (or reset it again) rather than hand it to anyone.
    pub fn reset(
        &mut self,
        guard: &crate::OwnerGuard,
        image: Option<&MemoryImage>,
        len: usize,
    ) -> Result<(), MappingError> {
        let len = aligned(len)?;
        let handle = self.handle.as_ref().ok_or(Error::NotRegistered)?;
        handle.reset_to(guard, image, len)?;
        self.len = self.len.min(len);
        Ok(())
    }

    /// Hands the registered mapping over from the owner whose guard is `from` to `to` (same
    /// domain): [`Engine::reassign_region`].
    pub fn reassign(&mut self, from: &crate::OwnerGuard, to: &Owner) -> Result<(), MappingError> {
        let handle = self.handle.as_mut().ok_or(Error::NotRegistered)?;
        handle.reassign(from, to)?;
        Ok(())
    }

    /// Grows the accessible range to `len` bytes in place; on failure nothing changed. Only
    /// the owner grows its mapping, with its guard held (rule 1 of [`crate::quiesce`]): wasm's
    /// `memory.grow` runs inside the instance, which holds it.
    pub fn grow(&mut self, len: usize) -> Result<(), MappingError> {
        self.extend(aligned(len)?)?;
        if let Some(handle) = &self.handle {
            handle.set_len(self.len);
        }
        Ok(())
    }

    fn extend(&mut self, len: usize) -> Result<(), MappingError> {
        if len <= self.len {
            return Ok(());
        }
        if len > self.capacity {
            return Err(MappingError::BeyondCapacity {
                requested: len,
                capacity: self.capacity,
            });
        }
        if len > self.file_len {
            self.memfd
                .as_file()
                .set_len(len as u64)
                .map_err(|source| MappingError::Resize { bytes: len, source })?;
            self.file_len = len;
        }
        // SAFETY: the new range lies inside our reservation (within the capacity) past the
        // accessible end, so it replaces only `PROT_NONE` reservation that nobody else maps
        // (module invariants), never memory anyone uses; the memfd was just made long enough.
        let mapped = unsafe {
            mmap(
                self.base.add(self.len).cast(),
                len - self.len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED | MapFlags::FIXED,
                self.memfd.as_file(),
                self.len as u64,
            )
        };
        if let Err(error) = mapped {
            // The file stays longer than the mapping (it is sealed against shrinking), which
            // costs nothing: its new pages were never touched, and the next growth maps them.
            return Err(MappingError::Map(error.into()));
        }
        self.len = len;
        Ok(())
    }
}

impl Drop for MemfdMapping {
    fn drop(&mut self) {
        // Unregister first: the engine must not touch the range once it is unmapped.
        self.handle.take();
        // SAFETY: the reservation made in `new`, which only this value refers to; the engine
        // has forgotten the region, and the owner is done with it (it is dropping it).
        unsafe {
            let _ = munmap(self.base.cast(), self.reservation);
        }
    }
}
