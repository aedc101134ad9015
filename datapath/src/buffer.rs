//! Page-aligned slot memory for one queue, allocated once at Connect.
//!
//! O_DIRECT needs aligned buffers, and the hot path must not allocate, so each
//! queue owns one allocation split into fixed-size slots (one per command slot).
//! Storage I/O in flight writes through raw pointers into a slot, so the buffer
//! hands out raw pointers and short-lived slices, never long-lived references.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ptr::NonNull;

/// Alignment of every slot (a page: satisfies O_DIRECT on any logical block size up to 4 KiB).
pub const SLOT_ALIGN: usize = 4096;

/// One aligned allocation of `slots * slot_bytes`.
pub struct SlotBuf {
    ptr: NonNull<u8>,
    layout: Layout,
    slot_bytes: usize,
    slots: usize,
}

// SAFETY: SlotBuf exclusively owns its allocation; moving it between threads moves
// that ownership. Shared access is mediated by &/&mut self like any Vec<u8>.
unsafe impl Send for SlotBuf {}

impl SlotBuf {
    /// Allocates zeroed memory for `slots` slots of `slot_bytes` (rounded up to the alignment).
    pub fn new(slots: usize, slot_bytes: usize) -> Option<SlotBuf> {
        let slot_bytes = slot_bytes.max(1).next_multiple_of(SLOT_ALIGN);
        let total = slots.max(1).checked_mul(slot_bytes)?;
        let layout = Layout::from_size_align(total, SLOT_ALIGN).ok()?;
        // SAFETY: the layout has a non-zero size (slots and slot_bytes are at least 1).
        let raw = unsafe { alloc_zeroed(layout) };
        let ptr = NonNull::new(raw)?;
        Some(SlotBuf {
            ptr,
            layout,
            slot_bytes,
            slots: slots.max(1),
        })
    }

    /// Bytes per slot.
    pub fn slot_bytes(&self) -> usize {
        self.slot_bytes
    }

    /// Raw pointer to the start of slot `i` (for storage I/O that completes later).
    pub fn slot_ptr(&mut self, i: usize) -> *mut u8 {
        assert!(i < self.slots, "slot index {i} out of range");
        // SAFETY: i < slots, so the offset stays inside the allocation.
        unsafe { self.ptr.as_ptr().add(i * self.slot_bytes) }
    }

    /// The first `len` bytes of slot `i`.
    pub fn slot(&self, i: usize, len: usize) -> &[u8] {
        assert!(
            i < self.slots && len <= self.slot_bytes,
            "slot access out of range"
        );
        // SAFETY: bounds checked above; the memory was zero-initialised at allocation and
        // the caller holds no in-flight I/O on this slot (callers only read idle slots).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(i * self.slot_bytes), len) }
    }

    /// The first `len` bytes of slot `i`, mutably.
    pub fn slot_mut(&mut self, i: usize, len: usize) -> &mut [u8] {
        assert!(
            i < self.slots && len <= self.slot_bytes,
            "slot access out of range"
        );
        // SAFETY: as in `slot`, and &mut self guarantees no other slice of this buffer lives.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr().add(i * self.slot_bytes), len) }
    }
}

impl Drop for SlotBuf {
    fn drop(&mut self) {
        // SAFETY: ptr was returned by alloc_zeroed with exactly this layout.
        unsafe { dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_aligned_and_disjoint() {
        let mut b = SlotBuf::new(3, 5000).expect("small allocation");
        assert_eq!(b.slot_bytes(), 8192);
        for i in 0..3 {
            assert_eq!(b.slot_ptr(i) as usize % SLOT_ALIGN, 0);
        }
        b.slot_mut(1, 4).copy_from_slice(&[1, 2, 3, 4]);
        assert_eq!(b.slot(0, 4), &[0, 0, 0, 0]);
        assert_eq!(b.slot(1, 4), &[1, 2, 3, 4]);
    }
}
