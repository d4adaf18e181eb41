//! Plain memfd regions for driving the engine without wasm, and the shadow copies every
//! check compares them against.

use crate::page_content;
use samepage_dedup::{
    Engine, EngineConfig, Knobs, MemfdMapping, MemoryImage, Owner, PAGE_SIZE, RegionHandle,
};
use std::os::unix::fs::MetadataExt;

/// An engine without a background scanner: tests step it with `scan_pass`.
pub fn manual_engine(knobs: Knobs) -> Engine {
    Engine::new(EngineConfig {
        stable_capacity_bytes: 4 << 30,
        ..EngineConfig::manual(knobs)
    })
    .expect("engine")
}

/// A manual engine whose pages merge only where their owners advised it (KSM's classic
/// `MADV_MERGEABLE`).
pub fn advised_only_engine() -> Engine {
    Engine::new(EngineConfig {
        stable_capacity_bytes: 4 << 30,
        merge_scope: samepage_dedup::MergeScope::Advised,
        ..EngineConfig::manual(Knobs::default())
    })
    .expect("engine")
}

/// A [`MemfdMapping`] registered with an engine, plus a shadow copy of what its owner wrote.
pub struct TestRegion {
    pub owner: Owner,
    mapping: MemfdMapping,
    pub shadow: Vec<u8>,
}

impl TestRegion {
    pub fn new(engine: &Engine, pages: usize) -> Self {
        Self::with_owner(engine, Owner::new(0), pages)
    }

    pub fn with_owner(engine: &Engine, owner: Owner, pages: usize) -> Self {
        let len = pages * PAGE_SIZE;
        let mapping = MemfdMapping::new(Some(engine), &owner, "test-region", len, 4 * len, 0)
            .expect("mapping");
        Self {
            owner,
            mapping,
            shadow: vec![0; len],
        }
    }

    /// A region of `pages` pages that starts as `image`, whose bytes are `bytes`.
    pub fn with_image(
        engine: &Engine,
        owner: Owner,
        pages: usize,
        image: &MemoryImage,
        bytes: &[u8],
    ) -> Self {
        let len = pages * PAGE_SIZE;
        let mapping = MemfdMapping::with_image(
            Some((engine, Some(image))),
            &owner,
            "test-region",
            len,
            4 * len,
            0,
        )
        .expect("mapping with an image");
        let mut shadow = vec![0; len];
        shadow[..bytes.len()].copy_from_slice(bytes);
        Self {
            owner,
            mapping,
            shadow,
        }
    }

    /// Resets the region to `image` (whose bytes are the second item), or to zeros.
    pub fn reset(&mut self, engine: &Engine, image: Option<(&MemoryImage, &[u8])>) {
        let guard = self.owner.enter();
        engine
            .reset_region(&guard, self.handle().id(), image.map(|(image, _)| image))
            .expect("reset");
        self.shadow.fill(0);
        if let Some((_, bytes)) = image {
            self.shadow[..bytes.len()].copy_from_slice(bytes);
        }
    }

    pub fn handle(&self) -> &RegionHandle {
        self.mapping.region().expect("registered")
    }

    pub fn pages(&self) -> usize {
        self.mapping.len() / PAGE_SIZE
    }

    /// Writes `bytes` at `offset` with the owner's guard held, and into the shadow.
    pub fn write(&mut self, offset: usize, bytes: &[u8]) {
        let _guard = self.owner.enter();
        self.write_running(offset, bytes);
    }

    /// Writes `bytes` at `offset`, and into the shadow, while the caller holds the owner's
    /// gate lent (as guest code writes while the engine may merge it in windows).
    pub fn write_running(&mut self, offset: usize, bytes: &[u8]) {
        self.shadow[offset..offset + bytes.len()].copy_from_slice(bytes);
        // SAFETY: in bounds (indexing the shadow, as long as the mapping, checked the range),
        // with the gate held or lent by the caller, who is the only writer.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                self.mapping.as_ptr().add(offset),
                bytes.len(),
            )
        };
    }

    pub fn fill(&mut self, seed: u64, pages: std::ops::Range<usize>) {
        for page in pages {
            self.write(page * PAGE_SIZE, &page_content(seed, page));
        }
    }

    /// Advises pages `pages` of the region, with its owner's guard held.
    pub fn advise(
        &self,
        engine: &Engine,
        pages: std::ops::Range<usize>,
        advice: samepage_dedup::Advice,
    ) -> Result<(), samepage_dedup::Error> {
        let guard = self.owner.enter();
        engine.advise(
            &guard,
            self.handle(),
            pages.start * PAGE_SIZE..pages.end * PAGE_SIZE,
            advice,
        )
    }

    /// Everything the owner sees, read with its guard held.
    pub fn bytes(&self) -> Vec<u8> {
        let _guard = self.owner.enter();
        // SAFETY: the accessible mapping, read under the guard.
        unsafe { std::slice::from_raw_parts(self.mapping.as_ptr(), self.mapping.len()) }.to_vec()
    }

    /// Whether page `page`, read with the owner's guard held, is its shadow copy.
    pub fn page_matches_shadow(&self, page: usize) -> bool {
        let _guard = self.owner.enter();
        self.page_matches_shadow_running(page)
    }

    /// Whether page `page` is its shadow copy, read while the caller holds the owner's gate
    /// lent: the engine may be merging it meanwhile.
    pub fn page_matches_shadow_running(&self, page: usize) -> bool {
        let range = page * PAGE_SIZE..(page + 1) * PAGE_SIZE;
        // SAFETY: the page lies inside the accessible mapping (the shadow, as long, is indexed
        // by the same range below) and is read under the guard.
        let bytes = unsafe {
            std::slice::from_raw_parts(self.mapping.as_ptr().add(range.start), PAGE_SIZE)
        };
        bytes == &self.shadow[range]
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
        self.mapping.grow(pages * PAGE_SIZE).expect("grow");
        self.shadow.resize(pages * PAGE_SIZE, 0);
    }

    /// The owner discards pages `pages` (`MADV_DONTNEED`): their page-table entries go, and
    /// the next access finds what the mapping's file holds there. The quiescence contract
    /// forbids this in general (a discarded private copy would read its stable slot); tests
    /// use it only on pages that share a stable page or are the region's own, which read
    /// back the same bytes.
    pub fn discard(&mut self, pages: std::ops::Range<usize>) {
        let _guard = self.owner.enter();
        // SAFETY: the range is inside the accessible mapping, under the guard; callers
        // discard only shared or own pages, which read back the same bytes from their files.
        unsafe {
            rustix::mm::madvise(
                self.mapping.as_ptr().add(pages.start * PAGE_SIZE).cast(),
                pages.len() * PAGE_SIZE,
                rustix::mm::Advice::LinuxDontNeed,
            )
            .expect("madvise");
        }
    }

    /// Pages of memory the region's own memfd holds.
    pub fn own_resident_pages(&self) -> u64 {
        self.mapping
            .memfd()
            .as_file()
            .metadata()
            .expect("stat")
            .blocks()
            * 512
            / PAGE_SIZE as u64
    }

    /// The inode of the region's own memfd, as `/proc/self/maps` names it.
    pub fn memfd_inode(&self) -> u64 {
        self.mapping
            .memfd()
            .as_file()
            .metadata()
            .expect("stat")
            .ino()
    }

    /// The addresses of the region's accessible range.
    pub fn addresses(&self) -> std::ops::Range<usize> {
        let start = self.mapping.as_ptr() as usize;
        start..start + self.mapping.len()
    }

    /// Mappings in this process that overlap the region's accessible range.
    pub fn mappings(&self) -> usize {
        let start = self.mapping.as_ptr() as usize;
        let end = start + self.mapping.len();
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
