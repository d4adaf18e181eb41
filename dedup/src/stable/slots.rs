//! Which slots of the stable memfd are free. A run merged together needs contiguous slots
//! (one `mmap` maps it), so the allocator hands out extents, first fit, and coalesces what
//! comes back; slots never handed out lie past `end`, up to the view's capacity.

use std::collections::BTreeMap;

use super::Slot;

pub(crate) struct SlotAllocator {
    /// Free extents below `end`, start -> length, coalesced: no two touch.
    free: BTreeMap<Slot, Slot>,
    /// Slots handed out at least once; everything from here on is fresh.
    end: Slot,
    /// Slots there are in all (the stable view's size).
    capacity: Slot,
}

impl SlotAllocator {
    pub(crate) fn new(capacity: Slot) -> Self {
        Self {
            free: BTreeMap::new(),
            end: 0,
            capacity,
        }
    }

    /// The first `count` contiguous free slots: the first free extent that fits, else fresh
    /// slots at the end. `None` when neither has room.
    pub(crate) fn allocate(&mut self, count: Slot) -> Option<Slot> {
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
        let start = self.end;
        if start.checked_add(count)? > self.capacity {
            return None;
        }
        self.end = start + count;
        Some(start)
    }

    /// Takes `count` slots from `start` back, joining them with free neighbours.
    pub(crate) fn release(&mut self, start: Slot, count: Slot) {
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

    /// Slots handed out at least once: the length the per-slot records need.
    pub(crate) fn end(&self) -> Slot {
        self.end
    }

    /// Bytes the free list takes.
    pub(crate) fn metadata_bytes(&self) -> usize {
        self.free.len() * 2 * size_of::<Slot>()
    }

    #[cfg(test)]
    fn extents(&self) -> Vec<(Slot, Slot)> {
        self.free
            .iter()
            .map(|(&start, &len)| (start, len))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_slots_come_in_order_until_the_capacity() {
        let mut slots = SlotAllocator::new(10);
        assert_eq!(slots.allocate(4), Some(0));
        assert_eq!(slots.allocate(4), Some(4));
        assert_eq!(slots.allocate(3), None, "only 2 left");
        assert_eq!(slots.allocate(2), Some(8));
        assert_eq!(slots.end(), 10);
        assert_eq!(slots.allocate(1), None);
        assert_eq!(slots.allocate(Slot::MAX), None, "no overflow");
    }

    #[test]
    fn released_extents_coalesce_with_both_neighbours() {
        let mut slots = SlotAllocator::new(100);
        assert_eq!(slots.allocate(10), Some(0));
        slots.release(2, 2);
        slots.release(6, 2);
        assert_eq!(slots.extents(), [(2, 2), (6, 2)]);
        // Joins the extent before and the one after into one.
        slots.release(4, 2);
        assert_eq!(slots.extents(), [(2, 6)]);
        slots.release(0, 2);
        slots.release(8, 2);
        assert_eq!(slots.extents(), [(0, 10)]);
    }

    #[test]
    fn allocation_takes_the_first_fit_and_keeps_the_rest() {
        let mut slots = SlotAllocator::new(100);
        assert_eq!(slots.allocate(20), Some(0));
        slots.release(1, 2);
        slots.release(10, 5);
        // Too big for the first extent, fits the second; its tail stays free.
        assert_eq!(slots.allocate(3), Some(10));
        assert_eq!(slots.extents(), [(1, 2), (13, 2)]);
        // Fits the first exactly.
        assert_eq!(slots.allocate(2), Some(1));
        assert_eq!(slots.extents(), [(13, 2)]);
        // Nothing free fits: fresh slots after the end.
        assert_eq!(slots.allocate(4), Some(20));
        assert_eq!(slots.end(), 24);
    }
}
