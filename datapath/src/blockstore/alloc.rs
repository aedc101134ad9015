//! Free space of the pool in 512-byte sectors, grouped in 4 KiB pages.
//!
//! An extent never crosses a page, so every page can be read whole (O_DIRECT-aligned) and a
//! compressed block sliced out of it. Raw blocks take a whole page; compressed ones share
//! pages, filled by a separate cursor so they pack together. Whole pages are handed out in
//! ascending order (a cursor, or freed pages in the order they were freed), so a sequential
//! write gets consecutive pages and its chunks stay runs. The map is one byte per page
//! (bit i: sector i used), in chunks allocated on first use, so memory follows the used part
//! of the pool, not its size. Nothing here is persisted: the allocator is rebuilt from the
//! extent map on open, so a crash can never leak or double-book space.

use std::collections::VecDeque;

use crate::blockstore::map::Span;

/// Pages per chunk of the map (1 GiB of pool per 256 KiB of map).
const CHUNK_PAGES: u64 = 1 << 18;

/// Sector allocator over `pages` 4 KiB pages.
#[derive(Debug)]
pub struct Allocator {
    pages: u64,
    chunks: Vec<Option<Box<[u8]>>>,
    used_sectors: u64,
    full_cursor: u64,
    part_cursor: u64,
    /// Whole pages freed recently, reused first in the order they were freed (bounded): an
    /// overwrite then lands on a page the device (or tmpfs) already holds instead of marching
    /// through the pool, and a sequential overwrite gets its old pages back in order.
    recent: VecDeque<u64>,
}

/// Freed whole pages remembered for reuse.
const RECENT_PAGES_MAX: usize = 1 << 16;

impl Allocator {
    /// Everything free.
    pub fn new(pages: u64) -> Allocator {
        Allocator {
            pages,
            chunks: (0..pages.div_ceil(CHUNK_PAGES)).map(|_| None).collect(),
            used_sectors: 0,
            full_cursor: 0,
            part_cursor: 0,
            recent: VecDeque::new(),
        }
    }

    /// Grows the space to `pages` (a device was appended to the pool).
    pub fn grow(&mut self, pages: u64) {
        if pages <= self.pages {
            return;
        }
        self.pages = pages;
        self.chunks
            .resize_with(pages.div_ceil(CHUNK_PAGES) as usize, || None);
    }

    /// Capacity in sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.pages * 8
    }

    /// Bytes of memory the page map and the freed-page list take.
    pub fn mem_bytes(&self) -> usize {
        let chunks = self.chunks.iter().flatten().count();
        chunks * CHUNK_PAGES as usize + self.chunks.len() * 16 + self.recent.capacity() * 8
    }

    /// Sectors in use.
    pub fn used_sectors(&self) -> u64 {
        self.used_sectors
    }

    fn page(&self, p: u64) -> u8 {
        match &self.chunks[(p / CHUNK_PAGES) as usize] {
            Some(c) => c[(p % CHUNK_PAGES) as usize],
            None => 0,
        }
    }

    fn prefetch_page(&self, p: u64) {
        if let Some(Some(c)) = self.chunks.get((p / CHUNK_PAGES) as usize) {
            if let Some(b) = c.get((p % CHUNK_PAGES) as usize) {
                crate::blockstore::prefetch(std::ptr::from_ref(b));
            }
        }
    }

    fn page_mut(&mut self, p: u64) -> &mut u8 {
        let c = self.chunks[(p / CHUNK_PAGES) as usize]
            .get_or_insert_with(|| vec![0u8; CHUNK_PAGES as usize].into_boxed_slice());
        &mut c[(p % CHUNK_PAGES) as usize]
    }

    fn mask(n: u32, at: u32) -> u8 {
        (((1u16 << n) - 1) << at) as u8
    }

    /// First position in a page's bitmap with `n` free sectors in a row.
    fn fit(bits: u8, n: u32) -> Option<u32> {
        (0..=8 - n).find(|&at| bits & Self::mask(n, at) == 0)
    }

    /// Reserves `n` (1..=8) sectors inside one page; returns the first sector.
    pub fn alloc(&mut self, n: u32) -> Option<u64> {
        debug_assert!((1..=8).contains(&n));
        if self.pages == 0 {
            return None;
        }
        let full = n == 8;
        if full {
            while let Some(p) = self.recent.pop_front() {
                // The next allocation's page: its map byte loads while this one is used
                // (freed pages are scattered, so each lookup would otherwise miss).
                if let Some(&next) = self.recent.front() {
                    self.prefetch_page(next);
                }
                if self.page(p) == 0 {
                    *self.page_mut(p) = 0xff;
                    self.used_sectors += 8;
                    return Some(p * 8);
                }
            }
        }
        let start = if full {
            self.full_cursor
        } else {
            self.part_cursor
        };
        for i in 0..self.pages {
            let p = (start + i) % self.pages;
            let bits = self.page(p);
            if let Some(at) = Self::fit(bits, n) {
                *self.page_mut(p) |= Self::mask(n, at);
                self.used_sectors += n as u64;
                if full {
                    self.full_cursor = (p + 1) % self.pages;
                } else {
                    self.part_cursor = p;
                }
                return Some(p * 8 + at as u64);
            }
        }
        None
    }

    /// Marks a span used (loading); false if any of it was already used or lies beyond the
    /// pool.
    pub fn claim(&mut self, s: &Span) -> bool {
        if s.sectors == 0 {
            return true;
        }
        if s.sector + s.sectors > self.pages * 8 {
            return false;
        }
        if let Some((p, m)) = Self::in_page(s) {
            let b = self.page_mut(p);
            let clash = *b & m != 0;
            *b |= m;
            if !clash {
                self.used_sectors += s.sectors;
            }
            return !clash;
        }
        let mut clash = false;
        let (mut p, end) = (s.sector / 8, (s.sector + s.sectors) / 8);
        while p < end {
            let (off, n) = (
                p % CHUNK_PAGES,
                (end - p).min(CHUNK_PAGES - p % CHUNK_PAGES),
            );
            self.page_mut(p);
            let c = self.chunks[(p / CHUNK_PAGES) as usize]
                .as_mut()
                .expect("chunk made by page_mut");
            let pages = &mut c[off as usize..(off + n) as usize];
            clash |= pages.iter().any(|&b| b != 0);
            pages.fill(0xff);
            p += n;
        }
        if !clash {
            self.used_sectors += s.sectors;
        }
        !clash
    }

    /// Returns a span's sectors.
    pub fn free(&mut self, s: &Span) {
        if let Some((p, m)) = Self::in_page(s) {
            let b = self.page_mut(p);
            debug_assert_eq!(*b & m, m, "freeing sectors that are not in use");
            *b &= !m;
            let now_free = *b == 0;
            self.used_sectors -= s.sectors;
            if now_free && self.recent.len() < RECENT_PAGES_MAX {
                self.recent.push_back(p);
            }
            if s.sectors < 8 && p < self.part_cursor {
                self.part_cursor = p;
            }
            return;
        }
        debug_assert!(
            s.sector.is_multiple_of(8) && s.sectors.is_multiple_of(8),
            "span {s:?}"
        );
        for p in s.sector / 8..(s.sector + s.sectors) / 8 {
            let b = self.page_mut(p);
            debug_assert_eq!(*b, 0xff, "freeing a page that is not in use");
            *b = 0;
            if self.recent.len() < RECENT_PAGES_MAX {
                self.recent.push_back(p);
            }
        }
        self.used_sectors -= s.sectors;
    }

    /// A span inside one page: (page, sector mask); None for whole pages (more than one, or
    /// exactly one: then the mask is 0xff either way).
    fn in_page(s: &Span) -> Option<(u64, u8)> {
        let (p, at) = (s.sector / 8, (s.sector % 8) as u32);
        (s.sectors <= 8 && at as u64 + s.sectors <= 8)
            .then(|| (p, Self::mask(s.sectors as u32, at)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(sector: u64, len: u16) -> Span {
        Span {
            sector,
            sectors: (len as u64).div_ceil(512),
        }
    }

    #[test]
    fn whole_pages_and_packed_fragments_never_overlap() {
        let mut a = Allocator::new(4);
        let p0 = a.alloc(8).expect("page");
        assert_eq!(p0 % 8, 0);
        let s1 = a.alloc(3).expect("3 sectors");
        let s2 = a.alloc(5).expect("5 sectors");
        assert_eq!(s1 / 8, s2 / 8, "fragments pack into one page");
        assert_ne!(s1 / 8, p0 / 8);
        assert_eq!(a.used_sectors(), 16);
        a.alloc(8).expect("third page");
        a.alloc(8).expect("fourth page");
        assert_eq!(a.alloc(1), None, "pool full");
        a.free(&ext(s1, 3 * 512));
        assert_eq!(a.alloc(2), Some(s1), "freed space is reused");
        assert_eq!(a.alloc(8), None);
    }

    #[test]
    fn claim_rebuilds_and_detects_double_booking() {
        let mut a = Allocator::new(1 << 20);
        assert!(a.claim(&ext(800, 4096)));
        assert!(a.claim(&ext(9, 1000)));
        assert!(!a.claim(&ext(808 - 8, 512)), "sector 800 is taken");
        assert_eq!(a.used_sectors(), 8 + 2);
        let next = a.alloc(8).expect("page");
        assert_ne!(next / 8, 100);
    }

    #[test]
    fn runs_of_pages_are_claimed_and_freed_whole_and_come_back_in_order() {
        let mut a = Allocator::new(64);
        let run = Span {
            sector: 8 * 4,
            sectors: 8 * 16,
        };
        assert!(a.claim(&run));
        assert!(
            !a.claim(&ext(8 * 19, 4096)),
            "a page inside the run is taken"
        );
        assert!(
            !a.claim(&ext(8 * 19 + 3, 512)),
            "a sector inside the run is taken"
        );
        assert_eq!(a.used_sectors(), 8 * 16);
        // Fresh pages come from the cursor in order, around the run.
        let got: Vec<u64> = (0..6).map(|_| a.alloc(8).expect("page") / 8).collect();
        assert_eq!(got, vec![0, 1, 2, 3, 20, 21]);
        // Freed pages come back in the order they were freed: a sequential overwrite of the
        // run gets consecutive pages again.
        a.free(&run);
        let got: Vec<u64> = (0..16).map(|_| a.alloc(8).expect("page") / 8).collect();
        assert_eq!(got, (4..20).collect::<Vec<u64>>());
    }
}
