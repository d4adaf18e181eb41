//! Deterministic page contents, the one generator that tests and benchmarks fill regions
//! with: a page depends only on a seed and its index, so regions filled with the same seed
//! hold the same pages at the same offsets (what real instances of one module look like),
//! and a different seed makes a page unique. No page it makes is all zeros.

use crate::PAGE_SIZE;

/// Writes page `index` of the pattern `seed` into `page`, whose length is a multiple of 8.
pub fn fill_page(page: &mut [u8], seed: u64, index: usize) {
    let tag = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ ((index as u64) << 24);
    for (word, chunk) in page.chunks_exact_mut(8).enumerate() {
        chunk.copy_from_slice(&(tag ^ word as u64).to_le_bytes());
    }
}

/// Page `index` of the pattern `seed`, as a new buffer.
pub fn page(seed: u64, index: usize) -> Vec<u8> {
    let mut page = vec![0; PAGE_SIZE];
    fill_page(&mut page, seed, index);
    page
}

/// Fills `memory` (whole pages) with pages `first..` of the pattern `seed`.
pub fn fill(memory: &mut [u8], seed: u64, first: usize) {
    for (n, page) in memory.chunks_exact_mut(PAGE_SIZE).enumerate() {
        fill_page(page, seed, first + n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_depend_on_seed_and_index_only_and_are_never_zero() {
        assert_eq!(page(3, 7), page(3, 7));
        assert_ne!(page(3, 7), page(4, 7));
        assert_ne!(page(3, 7), page(3, 8));
        assert!(page(0, 0).iter().any(|&b| b != 0));
        let mut memory = vec![0; 3 * PAGE_SIZE];
        fill(&mut memory, 5, 10);
        assert_eq!(&memory[PAGE_SIZE..2 * PAGE_SIZE], page(5, 11).as_slice());
    }
}
