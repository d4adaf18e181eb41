//! Plain memfd regions for driving the engine without wasm, and the shadow copies the tests
//! compare them against.

#![allow(dead_code)] // each test binary uses its own subset

use std::os::unix::fs::MetadataExt;
use std::sync::Arc;

use memfd::{Memfd, MemfdOptions};
use rustix::mm::{MapFlags, ProtFlags, mmap, mmap_anonymous, munmap};
use samepage_dedup::{Engine, EngineConfig, Knobs, Owner, PAGE_SIZE, RegionHandle};

/// An engine without a background scanner: tests step it with `scan_pass`.
pub fn manual_engine(knobs: Knobs) -> Engine {
    Engine::new(EngineConfig {
        scanner: false,
        knobs,
        stable_capacity_bytes: 4 << 30,
    })
    .expect("engine")
}

/// Deterministic content: page `page` of a region filled with `seed`.
pub fn page_content(seed: u64, page: usize) -> Vec<u8> {
    (0..PAGE_SIZE / 8)
        .flat_map(|word| {
            let value =
                seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ ((page as u64) << 24) ^ word as u64;
            value.to_le_bytes()
        })
        .collect()
}

/// A memfd mapped `MAP_SHARED` inside a larger reservation (room to grow), registered with an
/// engine, plus a shadow copy of what its owner wrote.
pub struct TestRegion {
    pub owner: Owner,
    memfd: Arc<Memfd>,
    base: *mut u8,
    reserved: usize,
    len: usize,
    handle: Option<RegionHandle>,
    pub shadow: Vec<u8>,
}

impl TestRegion {
    pub fn new(engine: &Engine, pages: usize) -> Self {
        Self::with_owner(engine, Owner::new(0), pages)
    }

    pub fn with_owner(engine: &Engine, owner: Owner, pages: usize) -> Self {
        let len = pages * PAGE_SIZE;
        let reserved = 4 * len + PAGE_SIZE;
        let memfd = Arc::new(MemfdOptions::new().create("test-region").expect("memfd"));
        memfd.as_file().set_len(len as u64).expect("size");
        // SAFETY: fresh reservation, then the memfd over its start; both owned by this value.
        let base = unsafe {
            let base = mmap_anonymous(
                std::ptr::null_mut(),
                reserved,
                ProtFlags::empty(),
                MapFlags::PRIVATE | MapFlags::NORESERVE,
            )
            .expect("reserve");
            mmap(
                base,
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED | MapFlags::FIXED,
                memfd.as_file(),
                0,
            )
            .expect("map memfd")
        };
        // SAFETY: the mapping was just made as `register` requires and lives until drop,
        // where the handle goes first; the test writes only through `write` (guard held).
        let handle =
            unsafe { engine.register(&owner, memfd.clone(), base.cast(), len) }.expect("register");
        Self {
            owner,
            memfd,
            base: base.cast(),
            reserved,
            len,
            handle: Some(handle),
            shadow: vec![0; len],
        }
    }

    pub fn handle(&self) -> &RegionHandle {
        self.handle.as_ref().expect("registered")
    }

    pub fn pages(&self) -> usize {
        self.len / PAGE_SIZE
    }

    /// Writes `bytes` at `offset` with the owner's guard held, and into the shadow.
    pub fn write(&mut self, offset: usize, bytes: &[u8]) {
        let _guard = self.owner.enter();
        // SAFETY: in bounds (slice indexing of the shadow below checks the same range first).
        self.shadow[offset..offset + bytes.len()].copy_from_slice(bytes);
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.base.add(offset), bytes.len())
        };
    }

    pub fn fill(&mut self, seed: u64, pages: std::ops::Range<usize>) {
        for page in pages {
            self.write(page * PAGE_SIZE, &page_content(seed, page));
        }
    }

    /// Everything the owner sees, read with its guard held.
    pub fn bytes(&self) -> Vec<u8> {
        let _guard = self.owner.enter();
        // SAFETY: the accessible mapping, read under the guard.
        unsafe { std::slice::from_raw_parts(self.base, self.len) }.to_vec()
    }

    /// Asserts the owner sees exactly its shadow copy.
    pub fn assert_matches_shadow(&self) {
        let bytes = self.bytes();
        if let Some(page) = (0..self.pages()).find(|&p| {
            bytes[p * PAGE_SIZE..(p + 1) * PAGE_SIZE]
                != self.shadow[p * PAGE_SIZE..(p + 1) * PAGE_SIZE]
        }) {
            panic!("page {page} differs from the shadow copy");
        }
    }

    /// Grows the region in place to `pages`, as `memory.grow` does.
    pub fn grow(&mut self, pages: usize) {
        let _guard = self.owner.enter();
        let len = pages * PAGE_SIZE;
        assert!(len <= self.reserved - PAGE_SIZE);
        self.memfd
            .as_file()
            .set_len(len as u64)
            .expect("grow memfd");
        // SAFETY: extends the memfd mapping inside our own reservation, under the guard.
        unsafe {
            mmap(
                self.base.add(self.len).cast(),
                len - self.len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED | MapFlags::FIXED,
                self.memfd.as_file(),
                self.len as u64,
            )
            .expect("map grown range");
        }
        self.len = len;
        self.shadow.resize(len, 0);
        self.handle().set_len(len);
    }

    /// Pages of memory the region's own memfd holds.
    pub fn own_resident_pages(&self) -> u64 {
        self.memfd.as_file().metadata().expect("stat").blocks() * 512 / PAGE_SIZE as u64
    }

    /// Mappings in this process that overlap the region's accessible range.
    pub fn mappings(&self) -> usize {
        let (start, end) = (self.base as usize, self.base as usize + self.len);
        std::fs::read_to_string("/proc/self/maps")
            .expect("maps")
            .lines()
            .filter(|line| {
                let range = line.split(' ').next().expect("range");
                let (a, b) = range.split_once('-').expect("dash");
                let a = usize::from_str_radix(a, 16).expect("hex");
                let b = usize::from_str_radix(b, 16).expect("hex");
                a < end && b > start
            })
            .count()
    }
}

impl Drop for TestRegion {
    fn drop(&mut self) {
        self.handle.take();
        // SAFETY: the reservation made in `with_owner`; the handle is gone, nobody uses it.
        unsafe { munmap(self.base.cast(), self.reserved).expect("unmap") };
    }
}
