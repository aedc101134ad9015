//! Page-aligned memory that is faulted in lazily: [`Region`] (one anonymous mapping) and
//! [`SlotBuf`] (a region split into fixed-size slots).
//!
//! O_DIRECT needs aligned buffers, and the hot path must not allocate, so buffers are
//! mapped once and reused. An anonymous mapping reads as zeroes and costs no resident
//! memory until a page is first written, so a buffer that is never used costs address
//! space only (`alloc_zeroed` with page alignment writes every page up front, which is
//! what made idle queues expensive). Storage I/O in flight writes through raw pointers,
//! so these types hand out raw pointers and short-lived slices, never long-lived
//! references.

use std::io;
use std::ptr::NonNull;

/// Alignment of every slot (a page: satisfies O_DIRECT on any logical block size up to 4 KiB).
pub const SLOT_ALIGN: usize = 4096;

/// One private anonymous mapping: page-aligned, zero-filled, faulted in on first touch.
#[derive(Debug)]
pub struct Region {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: a Region exclusively owns its mapping; the pointer is never aliased by another
// Region. Who may touch which bytes is decided by the owner (SlotBuf, the buffer pool),
// whose own types enforce exclusive access to each range.
unsafe impl Send for Region {}
// SAFETY: as above; &Region only hands out the base pointer and length.
unsafe impl Sync for Region {}

impl Region {
    /// Maps `len` bytes (rounded up to [`SLOT_ALIGN`]; at least one page).
    pub fn new(len: usize) -> io::Result<Region> {
        let len = len
            .max(1)
            .checked_next_multiple_of(SLOT_ALIGN)
            .ok_or_else(|| io::Error::from(io::ErrorKind::OutOfMemory))?;
        // SAFETY: an anonymous private mapping at an address of the kernel's choosing has
        // no preconditions; the result is checked against MAP_FAILED below.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(raw.cast::<u8>()).ok_or_else(io::Error::last_os_error)?;
        Ok(Region { ptr, len })
    }

    /// Base address (page-aligned).
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: a region has at least one page.
    pub fn is_empty(&self) -> bool {
        false
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: ptr/len describe exactly the mapping created in `new`, unmapped once here.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// One aligned region of `slots * slot_bytes`.
pub struct SlotBuf {
    region: Region,
    slot_bytes: usize,
    slots: usize,
}

impl SlotBuf {
    /// Maps zeroed memory for `slots` slots of `slot_bytes` (rounded up to the alignment).
    /// Pages are faulted in when first written, not here.
    pub fn new(slots: usize, slot_bytes: usize) -> Option<SlotBuf> {
        let slot_bytes = slot_bytes.max(1).next_multiple_of(SLOT_ALIGN);
        let total = slots.max(1).checked_mul(slot_bytes)?;
        let region = Region::new(total).ok()?;
        Some(SlotBuf {
            region,
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
        // SAFETY: i < slots, so the offset stays inside the mapping.
        unsafe { self.region.as_ptr().add(i * self.slot_bytes) }
    }

    /// The first `len` bytes of slot `i`.
    pub fn slot(&self, i: usize, len: usize) -> &[u8] {
        assert!(
            i < self.slots && len <= self.slot_bytes,
            "slot access out of range"
        );
        // SAFETY: bounds checked above; anonymous memory reads as zeroes until written, and
        // the caller holds no in-flight I/O on this slot (callers only read idle slots).
        unsafe { std::slice::from_raw_parts(self.region.as_ptr().add(i * self.slot_bytes), len) }
    }

    /// The first `len` bytes of slot `i`, mutably.
    pub fn slot_mut(&mut self, i: usize, len: usize) -> &mut [u8] {
        assert!(
            i < self.slots && len <= self.slot_bytes,
            "slot access out of range"
        );
        // SAFETY: as in `slot`, and &mut self guarantees no other slice of this buffer lives.
        unsafe {
            std::slice::from_raw_parts_mut(self.region.as_ptr().add(i * self.slot_bytes), len)
        }
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

    #[test]
    fn a_region_is_page_aligned_and_reads_as_zeroes() {
        let r = Region::new(3 * SLOT_ALIGN + 1).expect("map");
        assert_eq!(r.len(), 4 * SLOT_ALIGN);
        assert_eq!(r.as_ptr() as usize % SLOT_ALIGN, 0);
        // SAFETY: the region is live, 4 pages long and nobody else touches it.
        let all = unsafe { std::slice::from_raw_parts(r.as_ptr(), r.len()) };
        assert!(all.iter().all(|&b| b == 0));
    }
}
