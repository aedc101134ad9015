//! The block map of one layer: 4 KiB blocks in chunks of [`CHUNK_BLOCKS`], each chunk a pair
//! of bitmaps and one packed array, the chunks in groups of 64 (a bitmap and an array again)
//! in an ordered map keyed by group number.
//!
//! A chunk holds, for each of its blocks, nothing (read through to the parent layer), a
//! tombstone (reads as zeroes) or data. Data lives in one of two shapes:
//!
//! - *run*: every data block is raw (4096 bytes, uncompressed) and block `i` sits at pool
//!   sector `base + 8 i`: the array holds only the CRC32C of each data block (4 bytes). A
//!   sequentially written volume is all runs (the allocator hands out consecutive pages).
//! - *per block*: the array holds (CRC32C, packed location) per data block (12 bytes), for
//!   compressed blocks and for raw ones scattered by overwrites. A chunk goes back to a run
//!   when an overwrite makes it contiguous again.
//!
//! Memory for a sequentially written volume: the CRC array (4 bytes a block) plus a chunk's
//! share of its group and of the tree (about 1 byte a block: 5.2 in all, against 6.8 with
//! a tree keyed by chunk); see `tests::sequential_volumes_cost_at_most_8_bytes_a_block`.
//!
//! Each chunk also carries the bookkeeping of its rows on disk ([`crate::blockstore::meta`]):
//! a generation (its full row's), the next delta row slot, and the highest slot ever used.

use std::collections::BTreeMap;

/// Blocks per chunk: the bitmaps are one `u64` each.
pub const CHUNK_BLOCKS: u64 = 64;

/// Sectors per 4 KiB block.
const BLOCK_SECTORS: u64 = 8;

/// `base` of a chunk in the per-block shape (odd, so never a raw block's base: those are
/// multiples of 8).
const PER_BLOCK: u64 = u64::MAX;

/// Location bits: sector in 48 (128 PiB of pool), stored length in 13, compressed flag on top.
const SECTOR_BITS: u32 = 48;
const SECTOR_MASK: u64 = (1 << SECTOR_BITS) - 1;
const LEN_MASK: u64 = 0x1fff;
const COMPRESSED_BIT: u64 = 1 << 63;

/// Where one logical block lives. `len == 0` is a tombstone: the block reads as zeroes even
/// if an ancestor maps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// First 512-byte sector on the pool.
    pub sector: u64,
    /// Stored bytes (4096 raw, fewer when compressed, 0 for a tombstone).
    pub len: u16,
    /// Whether the stored bytes are lz4-compressed.
    pub compressed: bool,
    /// CRC32C of the stored bytes.
    pub crc: u32,
}

impl Extent {
    /// A block that reads as zeroes.
    pub const ZERO: Extent = Extent {
        sector: 0,
        len: 0,
        compressed: false,
        crc: 0,
    };

    /// Whether this entry hides ancestors with zeroes.
    pub fn is_zero(&self) -> bool {
        self.len == 0
    }

    /// Sectors it occupies on the pool.
    pub fn sectors(&self) -> u32 {
        (self.len as u32).div_ceil(512)
    }

    /// A whole uncompressed block (the only kind a run holds).
    fn is_raw(&self) -> bool {
        !self.compressed && self.len as u64 == BLOCK_SECTORS * 512
    }

    /// Its pool space.
    pub fn span(&self) -> Span {
        Span {
            sector: self.sector,
            sectors: self.sectors() as u64,
        }
    }
}

/// Pool space: either sectors inside one 4 KiB page, or whole consecutive pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    /// First sector.
    pub sector: u64,
    /// Length in sectors.
    pub sectors: u64,
}

impl Span {
    fn whole_pages(&self) -> bool {
        self.sector.is_multiple_of(BLOCK_SECTORS) && self.sectors.is_multiple_of(BLOCK_SECTORS)
    }
}

/// Collects spans, joining consecutive whole pages into one.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Spans(pub Vec<Span>);

impl Spans {
    /// Adds `s` (joined to the last span when both are whole pages and touch).
    pub fn push(&mut self, s: Span) {
        if s.sectors == 0 {
            return;
        }
        if let Some(last) = self.0.last_mut() {
            if last.whole_pages() && s.whole_pages() && last.sector + last.sectors == s.sector {
                last.sectors += s.sectors;
                return;
            }
        }
        self.0.push(s);
    }
}

fn pack(e: &Extent) -> u64 {
    debug_assert!(e.sector <= SECTOR_MASK, "sector beyond 48 bits");
    (e.sector & SECTOR_MASK) | (e.len as u64 & LEN_MASK) << SECTOR_BITS | {
        if e.compressed {
            COMPRESSED_BIT
        } else {
            0
        }
    }
}

fn unpack(loc: u64, crc: u32) -> Extent {
    Extent {
        sector: loc & SECTOR_MASK,
        len: ((loc >> SECTOR_BITS) & LEN_MASK) as u16,
        compressed: loc & COMPRESSED_BIT != 0,
        crc,
    }
}

/// The blocks of one chunk in one layer (empty: a run with no base yet).
#[derive(Debug, Clone, Default)]
pub struct Chunk {
    /// Bit i: block i maps data.
    data: u64,
    /// Bit i: block i is a tombstone.
    zero: u64,
    /// Run shape: the sector block 0 would have; [`PER_BLOCK`] otherwise.
    base: u64,
    /// Generation of the chunk's full row on disk (delta rows of other generations are stale).
    pub gen: u32,
    /// Next delta row slot (rows `0..deltas` of this generation are live).
    pub deltas: u8,
    /// One past the highest delta slot that may hold a row on disk (live or stale).
    pub slots_used: u8,
    /// Per data block in block order: run shape `[crc]`, per-block shape `[crc, loc lo, loc hi]`.
    ents: Vec<u32>,
}

/// Same blocks, same extents: the shape and the row bookkeeping do not count.
impl PartialEq for Chunk {
    fn eq(&self, o: &Chunk) -> bool {
        self.data == o.data && self.zero == o.zero && self.entries().eq(o.entries())
    }
}

impl Eq for Chunk {}

fn bit(i: u32) -> u64 {
    1u64 << i
}

/// Bits `[from, to)` of a chunk (`to` ≤ 64).
pub fn mask(from: u32, to: u32) -> u64 {
    if from >= to {
        return 0;
    }
    let hi = if to >= 64 { u64::MAX } else { bit(to) - 1 };
    hi & !(bit(from) - 1)
}

impl Chunk {
    fn per_block(&self) -> bool {
        self.base == PER_BLOCK
    }

    fn stride(&self) -> usize {
        if self.per_block() {
            3
        } else {
            1
        }
    }

    fn rank(&self, i: u32) -> usize {
        (self.data & (bit(i) - 1)).count_ones() as usize
    }

    /// Bit i: block i maps data.
    pub fn data_bits(&self) -> u64 {
        self.data
    }

    /// Bit i: block i is a tombstone.
    pub fn zero_bits(&self) -> u64 {
        self.zero
    }

    /// Whether no block is mapped (data or tombstone).
    pub fn is_empty(&self) -> bool {
        self.data | self.zero == 0
    }

    /// Whether the data blocks form one run (4 bytes a block).
    pub fn is_run(&self) -> bool {
        !self.per_block()
    }

    /// Data blocks.
    pub fn data_count(&self) -> u32 {
        self.data.count_ones()
    }

    /// Mapped blocks (data and tombstones).
    pub fn len(&self) -> u32 {
        (self.data | self.zero).count_ones()
    }

    /// Sectors its data occupies on the pool.
    pub fn stored_sectors(&self) -> u64 {
        if self.is_run() {
            return self.data_count() as u64 * BLOCK_SECTORS;
        }
        self.data_extents().map(|(_, e)| e.sectors() as u64).sum()
    }

    fn extent_at(&self, i: u32, r: usize) -> Extent {
        if self.per_block() {
            let k = 3 * r;
            let loc = self.ents[k + 1] as u64 | (self.ents[k + 2] as u64) << 32;
            unpack(loc, self.ents[k])
        } else {
            Extent {
                sector: self.base.wrapping_add(BLOCK_SECTORS * i as u64),
                len: (BLOCK_SECTORS * 512) as u16,
                compressed: false,
                crc: self.ents[r],
            }
        }
    }

    /// Asks the CPU to start loading block i's array entry (a read about to resolve it).
    pub fn prefetch_entry(&self, i: u32) {
        if self.data & bit(i) != 0 {
            let k = self.stride() * self.rank(i);
            if let Some(e) = self.ents.get(k) {
                super::prefetch(std::ptr::from_ref(e).cast());
            }
        }
    }

    /// Block i: `None` when unmapped, [`Extent::ZERO`] for a tombstone.
    pub fn get(&self, i: u32) -> Option<Extent> {
        if self.zero & bit(i) != 0 {
            return Some(Extent::ZERO);
        }
        if self.data & bit(i) == 0 {
            return None;
        }
        Some(self.extent_at(i, self.rank(i)))
    }

    /// Every mapped block in order, tombstones as [`Extent::ZERO`].
    pub fn entries(&self) -> impl Iterator<Item = (u32, Extent)> + '_ {
        let mut bits = self.data | self.zero;
        let mut r = 0usize;
        std::iter::from_fn(move || {
            if bits == 0 {
                return None;
            }
            let i = bits.trailing_zeros();
            bits &= bits - 1;
            if self.zero & bit(i) != 0 {
                return Some((i, Extent::ZERO));
            }
            let e = self.extent_at(i, r);
            r += 1;
            Some((i, e))
        })
    }

    /// Every data block in order.
    pub fn data_extents(&self) -> impl Iterator<Item = (u32, Extent)> + '_ {
        self.entries().filter(|(_, e)| !e.is_zero())
    }

    /// The pool space of its data, whole-page runs joined.
    pub fn spans(&self, out: &mut Spans) {
        if !self.is_run() {
            for (_, e) in self.data_extents() {
                out.push(e.span());
            }
            return;
        }
        // A run: one span per stretch of consecutive data blocks.
        let mut bits = self.data;
        while bits != 0 {
            let start = bits.trailing_zeros();
            let len = (!(bits >> start)).trailing_zeros().min(64 - start);
            out.push(Span {
                sector: self.base.wrapping_add(BLOCK_SECTORS * start as u64),
                sectors: BLOCK_SECTORS * len as u64,
            });
            bits &= !mask(start, start + len);
        }
    }

    /// Unmaps block i; returns what it held.
    pub fn remove(&mut self, i: u32) -> Option<Extent> {
        if self.zero & bit(i) != 0 {
            self.zero &= !bit(i);
            return Some(Extent::ZERO);
        }
        if self.data & bit(i) == 0 {
            return None;
        }
        let r = self.rank(i);
        let e = self.extent_at(i, r);
        let s = self.stride();
        self.ents.drain(r * s..(r + 1) * s);
        self.data &= !bit(i);
        if self.data == 0 {
            // No data left: the next data block starts a run wherever it lands.
            self.base = 0;
            self.ents = Vec::new();
        }
        Some(e)
    }

    /// Maps block i to `e` (a tombstone when `e.is_zero()`); returns what it held.
    pub fn put(&mut self, i: u32, e: Extent) -> Option<Extent> {
        if !e.is_zero() && self.data & bit(i) != 0 {
            if let Some(old) = self.overwrite(i, e) {
                return Some(old);
            }
        }
        let old = self.remove(i);
        if e.is_zero() {
            self.zero |= bit(i);
            return old;
        }
        let fits_run = e.is_raw()
            && (self.data == 0 || self.base.wrapping_add(BLOCK_SECTORS * i as u64) == e.sector);
        if self.is_run() && fits_run {
            if self.data == 0 {
                self.base = e.sector.wrapping_sub(BLOCK_SECTORS * i as u64);
            }
            let r = self.rank(i);
            self.ents.insert(r, e.crc);
            self.data |= bit(i);
            return old;
        }
        if self.is_run() {
            self.split_run();
        }
        let r = self.rank(i);
        let loc = pack(&e);
        self.ents
            .splice(3 * r..3 * r, [e.crc, loc as u32, (loc >> 32) as u32]);
        self.data |= bit(i);
        if e.is_raw() && self.joins_neighbours(i, e.sector) {
            self.try_join();
        }
        old
    }

    /// Replaces data block i's extent in place when the shape allows (the common overwrite:
    /// no array shift); None when the general path must run.
    fn overwrite(&mut self, i: u32, e: Extent) -> Option<Extent> {
        let r = self.rank(i);
        let old = self.extent_at(i, r);
        if self.is_run() {
            if !e.is_raw() || self.base.wrapping_add(BLOCK_SECTORS * i as u64) != e.sector {
                return None;
            }
            self.ents[r] = e.crc;
            return Some(old);
        }
        let loc = pack(&e);
        self.ents[3 * r..3 * r + 3].copy_from_slice(&[e.crc, loc as u32, (loc >> 32) as u32]);
        if e.is_raw() && self.joins_neighbours(i, e.sector) {
            self.try_join();
        }
        Some(old)
    }

    /// Run → per block.
    fn split_run(&mut self) {
        let mut ents = Vec::with_capacity(3 * self.data_count() as usize + 3);
        for (_, e) in self.data_extents() {
            let loc = pack(&e);
            ents.extend_from_slice(&[e.crc, loc as u32, (loc >> 32) as u32]);
        }
        self.ents = ents;
        self.base = PER_BLOCK;
    }

    /// Whether raw block i at `sector` continues its data neighbours on both sides: only then
    /// can the chunk have become one run again (cheap test before the full one).
    fn joins_neighbours(&self, i: u32, sector: u64) -> bool {
        let below = self.data & (bit(i) - 1);
        let above = self.data & !mask(0, i + 1);
        let fits = |j: u32| {
            let e = self.extent_at(j, self.rank(j));
            e.is_raw()
                && e.sector
                    == sector
                        .wrapping_add(BLOCK_SECTORS * j as u64)
                        .wrapping_sub(BLOCK_SECTORS * i as u64)
        };
        (below == 0 || fits(63 - below.leading_zeros()))
            && (above == 0 || fits(above.trailing_zeros()))
    }

    /// Per block → run, when every data block is raw and they are consecutive on the pool.
    fn try_join(&mut self) {
        let first = self.data.trailing_zeros();
        let base = self
            .extent_at(first, 0)
            .sector
            .wrapping_sub(BLOCK_SECTORS * first as u64);
        let ok = self
            .data_extents()
            .all(|(i, e)| e.is_raw() && e.sector == base.wrapping_add(BLOCK_SECTORS * i as u64));
        if ok {
            self.ents = self.data_extents().map(|(_, e)| e.crc).collect();
            self.base = base;
        }
    }

    /// Heap bytes of its array (capacity, not length).
    pub fn heap_bytes(&self) -> usize {
        self.ents.capacity() * 4
    }

    /// Appends the chunk's full row: shape, generation, bitmaps, then the array.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.push(if self.is_run() { 1 } else { 2 });
        out.extend_from_slice(&self.gen.to_le_bytes());
        out.extend_from_slice(&self.data.to_le_bytes());
        out.extend_from_slice(&self.zero.to_le_bytes());
        if self.is_run() {
            out.extend_from_slice(&self.base.to_le_bytes());
        }
        for v in &self.ents {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }

    /// A chunk from its full row (no delta rows applied yet).
    pub fn decode(v: &[u8]) -> Option<Chunk> {
        let u64_at = |at: usize| Some(u64::from_le_bytes(v.get(at..at + 8)?.try_into().ok()?));
        let (run, gen) = (
            *v.first()? == 1,
            u32::from_le_bytes(v.get(1..5)?.try_into().ok()?),
        );
        if !matches!(v[0], 1 | 2) {
            return None;
        }
        let (data, zero) = (u64_at(5)?, u64_at(13)?);
        let (base, rest) = if run {
            (u64_at(21)?, &v[29..])
        } else {
            (PER_BLOCK, &v[21..])
        };
        let stride = if run { 1 } else { 3 };
        if data & zero != 0 || rest.len() != 4 * stride * data.count_ones() as usize {
            return None;
        }
        let ents = rest
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let c = Chunk {
            data,
            zero,
            base,
            gen,
            deltas: 0,
            slots_used: 0,
            ents,
        };
        let bad = c.data_extents().any(|(_, e)| e.len == 0 || e.len > 4096);
        (!bad).then_some(c)
    }
}

/// Chunks per group of a [`BlockMap`]: the group's bitmap is one `u64` (a group covers
/// 4096 blocks, 16 MiB).
const GROUP_CHUNKS: u64 = 64;

/// The present chunks of one group, in order: a bitmap and a packed array, as a chunk holds
/// its blocks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Group {
    /// Bit j: chunk j of the group is present.
    present: u64,
    chunks: Vec<Chunk>,
}

impl Group {
    fn rank(&self, j: u32) -> usize {
        (self.present & (bit(j) - 1)).count_ones() as usize
    }

    fn get(&self, j: u32) -> Option<&Chunk> {
        (self.present & bit(j) != 0).then(|| &self.chunks[self.rank(j)])
    }

    fn get_mut(&mut self, j: u32) -> Option<&mut Chunk> {
        let r = self.rank(j);
        (self.present & bit(j) != 0).then(|| &mut self.chunks[r])
    }

    fn get_or_default(&mut self, j: u32) -> &mut Chunk {
        let r = self.rank(j);
        if self.present & bit(j) == 0 {
            self.chunks.insert(r, Chunk::default());
            self.present |= bit(j);
        }
        &mut self.chunks[r]
    }

    fn take(&mut self, j: u32) -> Option<Chunk> {
        if self.present & bit(j) == 0 {
            return None;
        }
        self.present &= !bit(j);
        Some(self.chunks.remove(self.rank(j)))
    }

    /// Present chunks from chunk `j` on, in order, as (index in the group, chunk).
    fn from(&self, j: u32) -> impl Iterator<Item = (u32, &Chunk)> + '_ {
        let mut bits = self.present & !(bit(j) - 1);
        let mut r = self.rank(j);
        std::iter::from_fn(move || {
            if bits == 0 {
                return None;
            }
            let k = bits.trailing_zeros();
            bits &= bits - 1;
            r += 1;
            Some((k, &self.chunks[r - 1]))
        })
    }
}

/// Block → extent for one layer: chunks in groups of [`GROUP_CHUNKS`], the groups in an
/// ordered map. A lookup searches a tree 64 times smaller than one keyed by chunk (a 1 GiB
/// volume: 64 keys instead of 4096, so its nodes stay in cache under random I/O), then ranks
/// a bitmap; the ordered walks (merges, trims, rows) stay in chunk order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlockMap {
    /// Never holds an empty group.
    groups: BTreeMap<u64, Group>,
}

fn split(b: u64) -> (u64, u32) {
    (b / CHUNK_BLOCKS, (b % CHUNK_BLOCKS) as u32)
}

fn group_of(c: u64) -> (u64, u32) {
    (c / GROUP_CHUNKS, (c % GROUP_CHUNKS) as u32)
}

impl BlockMap {
    /// Whether nothing is mapped (chunks are never kept empty).
    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    /// Number of chunks.
    pub fn chunk_count(&self) -> usize {
        self.groups
            .values()
            .map(|g| g.present.count_ones() as usize)
            .sum()
    }

    /// Block `b`: `None` when unmapped, [`Extent::ZERO`] for a tombstone.
    pub fn get(&self, b: u64) -> Option<Extent> {
        let (c, i) = split(b);
        self.chunk(c)?.get(i)
    }

    /// Maps block `b`; returns what it held.
    pub fn put(&mut self, b: u64, e: Extent) -> Option<Extent> {
        let (c, i) = split(b);
        self.chunk_or_default(c).put(i, e)
    }

    /// Unmaps block `b`; returns what it held.
    pub fn remove(&mut self, b: u64) -> Option<Extent> {
        let (c, i) = split(b);
        let ch = self.chunk_mut(c)?;
        let old = ch.remove(i);
        if ch.is_empty() {
            self.take_chunk(c);
        }
        old
    }

    /// Chunk `c`.
    pub fn chunk(&self, c: u64) -> Option<&Chunk> {
        let (g, j) = group_of(c);
        self.groups.get(&g)?.get(j)
    }

    /// Chunk `c`, mutable.
    pub fn chunk_mut(&mut self, c: u64) -> Option<&mut Chunk> {
        let (g, j) = group_of(c);
        self.groups.get_mut(&g)?.get_mut(j)
    }

    /// Chunk `c`, created empty if missing.
    pub fn chunk_or_default(&mut self, c: u64) -> &mut Chunk {
        let (g, j) = group_of(c);
        self.groups.entry(g).or_default().get_or_default(j)
    }

    /// Puts a whole chunk in place (replacing any).
    pub fn insert_chunk(&mut self, c: u64, ch: Chunk) {
        *self.chunk_or_default(c) = ch;
    }

    /// Takes chunk `c` out.
    pub fn take_chunk(&mut self, c: u64) -> Option<Chunk> {
        let (g, j) = group_of(c);
        let group = self.groups.get_mut(&g)?;
        let ch = group.take(j);
        if group.present == 0 {
            self.groups.remove(&g);
        }
        ch
    }

    /// Drops chunk `c` if nothing is mapped in it any more.
    pub fn prune(&mut self, c: u64) {
        if self.chunk(c).is_some_and(Chunk::is_empty) {
            self.take_chunk(c);
        }
    }

    /// The lowest chunk number.
    pub fn first_chunk(&self) -> Option<u64> {
        self.next_chunk(0)
    }

    /// The first chunk number at or after `c`.
    pub fn next_chunk(&self, c: u64) -> Option<u64> {
        self.chunks_from(c).next().map(|(k, _)| k)
    }

    /// Chunks numbered `c` and up, in order.
    fn chunks_from(&self, c: u64) -> impl Iterator<Item = (u64, &Chunk)> + '_ {
        let (g0, j0) = group_of(c);
        self.groups.range(g0..).flat_map(move |(&g, group)| {
            let j = if g == g0 { j0 } else { 0 };
            group
                .from(j)
                .map(move |(k, ch)| (g * GROUP_CHUNKS + k as u64, ch))
        })
    }

    /// Chunks in order, with their numbers.
    pub fn chunks(&self) -> impl Iterator<Item = (u64, &Chunk)> + '_ {
        self.chunks_from(0)
    }

    /// Chunk numbers in `[from, to)`.
    pub fn chunk_keys(&self, from: u64, to: u64) -> impl Iterator<Item = u64> + '_ {
        self.chunks_from(from)
            .map(|(k, _)| k)
            .take_while(move |&k| k < to)
    }

    /// Mapped blocks in `[from, to)` in order, tombstones as [`Extent::ZERO`].
    pub fn range(&self, from: u64, to: u64) -> impl Iterator<Item = (u64, Extent)> + '_ {
        let last = to.div_ceil(CHUNK_BLOCKS);
        self.chunks_from(from / CHUNK_BLOCKS)
            .take_while(move |&(c, _)| c < last)
            .flat_map(|(c, ch)| {
                ch.entries()
                    .map(move |(i, e)| (c * CHUNK_BLOCKS + i as u64, e))
            })
            .filter(move |&(b, _)| b >= from && b < to)
    }

    /// Every mapped block in order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, Extent)> + '_ {
        self.range(0, u64::MAX)
    }

    /// The pool space of every data block, whole-page runs joined.
    pub fn spans(&self, out: &mut Spans) {
        for (_, ch) in self.chunks() {
            ch.spans(out);
        }
    }

    /// Bytes of memory it takes: the tree's nodes (bounded from above: every node as large
    /// as an internal one and as empty as a B-tree node may be), the groups' chunk arrays
    /// (capacity) and the chunks' own arrays.
    pub fn mem_bytes(&self) -> usize {
        // Rust's BTreeMap: B = 6, so 11 slots a node and at least 5 used outside the root;
        // a node holds its keys, values, a parent pointer, two u16 and (internal) 12 edges.
        const SLOTS: usize = 11;
        const MIN_USED: usize = 5;
        const MALLOC_OVERHEAD: usize = 16;
        let heap = |bytes: usize| {
            if bytes > 0 {
                bytes + MALLOC_OVERHEAD
            } else {
                0
            }
        };
        let node = SLOTS * (8 + std::mem::size_of::<Group>()) + 8 + 4 + 12 * 8 + MALLOC_OVERHEAD;
        let nodes = self.groups.len().div_ceil(MIN_USED);
        let arrays: usize = self
            .groups
            .values()
            .map(|g| {
                heap(g.chunks.capacity() * std::mem::size_of::<Chunk>())
                    + g.chunks.iter().map(|c| heap(c.heap_bytes())).sum::<usize>()
            })
            .sum();
        nodes * node + arrays
    }
}

#[cfg(test)]
mod tests;
