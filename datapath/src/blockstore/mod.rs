//! The extent-mapped block store: thin volumes, snapshots, clones and rollback over a pool
//! of devices, with a checksum per block and optional lz4 compression.
//!
//! - Data: 4 KiB blocks written out of place (never over a live block) to sectors the
//!   [`alloc::Allocator`] hands out, through the connection's io_uring ([`pool`]).
//! - Metadata: the layer tree ([`tree`]) in memory, persisted in RocksDB ([`meta`]). A write
//!   is acknowledged after its data is written and its mapping committed, so a crash leaves
//!   every block either old or new, and the checksum of what a mapping names always matches.
//! - Snapshots freeze the volume's current layer under the tree's write lock: every write
//!   acknowledged before it is in it, none acknowledged after.
//! - Space freed by an overwrite, trim or delete is reused only after (1) the metadata that
//!   freed it is durable, and (2) no read that may have looked it up is still running
//!   (the read gate): a reused block can never show through an old mapping.
//!
//! I/O errors are reported as negative errno to the data path: `-EIO` for a checksum
//! mismatch (a media error, counted and remembered for the control plane), `-ENOSPC` when the
//! pool is full, `-ENXIO` for an image that no longer exists.

pub mod alloc;
pub mod meta;
pub mod pool;
pub mod tree;

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

use uuid::Uuid;

use crate::backend::{Backend, Deferred, IoKind, IoQueue, IoRequest};
use crate::buffer::SlotBuf;
use crate::limits::{
    BLOCK_BYTES, MAX_BLOCKS_PER_IO, MAX_COMPRESSED_BYTES, MAX_MEDIA_ERRORS_KEPT, MAX_PENDING_FREES,
    MAX_QUEUE_DEPTH, MERGE_STEP_ENTRIES,
};

use alloc::Allocator;
use meta::{Meta, MetaError};
pub use pool::DeviceSpec;
use pool::{Pool, RawOp};
use tree::{Delta, Tree};
pub use tree::{Extent, TreeError, Usage};

const BLOCK: usize = BLOCK_BYTES as usize;

/// Entries per merge step; tiny under test, so the model test crosses many step boundaries.
const MERGE_STEP: usize = if cfg!(test) { 3 } else { MERGE_STEP_ENTRIES };

/// Why a block store call failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Metadata I/O.
    #[error(transparent)]
    Meta(#[from] MetaError),
    /// Device I/O.
    #[error("block store device: {0}")]
    Io(#[from] std::io::Error),
    /// The operation does not apply to these images.
    #[error(transparent)]
    Tree(#[from] TreeError),
    /// The extent map references space twice or beyond the pool.
    #[error("block store metadata is inconsistent: {0}")]
    Inconsistent(String),
}

/// A checksum mismatch seen by a read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MediaError {
    /// The image read.
    pub image: Uuid,
    /// Its block.
    pub block: u64,
    /// Where the bad copy lives.
    pub sector: u64,
}

/// Pool-wide space accounting.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PoolStats {
    /// Bytes of all devices.
    pub capacity_bytes: u64,
    /// Bytes allocated to extents.
    pub used_bytes: u64,
    /// Logical bytes those extents hold (4 KiB per mapped block).
    pub logical_bytes: u64,
    /// Checksum mismatches seen since start.
    pub media_errors: u64,
}

impl PoolStats {
    /// Logical bytes per stored byte (1.0 when empty).
    pub fn compression_ratio(&self) -> f64 {
        ratio(self.logical_bytes, self.used_bytes)
    }
}

/// `logical / physical`, 1.0 when nothing is stored.
pub fn ratio(logical: u64, physical: u64) -> f64 {
    if physical == 0 {
        1.0
    } else {
        logical as f64 / physical as f64
    }
}

/// Per-thread scratch space, allocated once per reactor thread: I/O never allocates.
struct Scratch {
    /// Compressed data to write, or whole pool pages read to decompress from.
    pages: SlotBuf,
    ext: [Option<Extent>; MAX_BLOCKS_PER_IO],
    ops: [RawOp; MAX_BLOCKS_PER_IO],
    res: [i32; MAX_BLOCKS_PER_IO],
    /// Writes whose data is on the device, waiting for the pass's one metadata commit.
    pending: PendingWrites,
}

/// The writes of one loop pass of a connection, committed together ([`Deferred`]).
struct PendingWrites {
    /// (image, block, extent, index into `cmds`).
    blocks: Vec<(Uuid, u64, Extent, usize)>,
    /// (tag, bytes, result): one per command.
    cmds: Vec<(u64, u32, i32)>,
    /// Some command asked for FUA: the commit syncs the WAL.
    durable: bool,
    /// Extents the commit replaced (freed after it) or could not map (freed at once).
    replaced: Vec<Extent>,
    unmapped: Vec<Extent>,
}

/// Commands one connection can have outstanding, so one pass can postpone at most this many.
const PENDING_CMDS_MAX: usize = MAX_QUEUE_DEPTH as usize;
const PENDING_BLOCKS_MAX: usize = PENDING_CMDS_MAX * MAX_BLOCKS_PER_IO;

/// Bytes per scratch slot: lz4's worst case for one block, rounded up to a page multiple.
const SCRATCH_SLOT: usize = 2 * BLOCK;

impl Scratch {
    fn new() -> Scratch {
        Scratch {
            pages: SlotBuf::new(MAX_BLOCKS_PER_IO, SCRATCH_SLOT).expect("block store scratch"),
            ext: [None; MAX_BLOCKS_PER_IO],
            ops: [RawOp {
                write: false,
                sector: 0,
                len: 0,
                buf: std::ptr::null_mut(),
            }; MAX_BLOCKS_PER_IO],
            res: [0; MAX_BLOCKS_PER_IO],
            pending: PendingWrites {
                blocks: Vec::with_capacity(PENDING_BLOCKS_MAX),
                cmds: Vec::with_capacity(PENDING_CMDS_MAX),
                durable: false,
                replaced: Vec::with_capacity(PENDING_BLOCKS_MAX),
                unmapped: Vec::with_capacity(PENDING_BLOCKS_MAX),
            },
        }
    }
}

thread_local! {
    static SCRATCH: RefCell<Option<Scratch>> = const { RefCell::new(None) };
}

fn with_scratch<R>(f: impl FnOnce(&mut Scratch) -> R) -> R {
    SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        f(s.get_or_insert_with(Scratch::new))
    })
}

/// The block store: one per node.
pub struct BlockStore {
    meta: Meta,
    pool: Pool,
    tree: RwLock<Tree>,
    alloc: Mutex<Allocator>,
    /// Held shared by reads from lookup to completion; taken exclusively to reuse space.
    gate: RwLock<()>,
    pending: Mutex<Vec<Extent>>,
    trim: AtomicBool,
    media_errors: AtomicU64,
    recent_errors: Mutex<VecDeque<MediaError>>,
    errors_by_image: Mutex<HashMap<Uuid, u32>>,
    errors_by_device: Mutex<HashMap<std::path::PathBuf, u32>>,
}

impl std::fmt::Debug for BlockStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockStore")
            .field("meta", &self.meta)
            .field("pool", &self.pool)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl BlockStore {
    /// Opens the store: metadata in `meta_dir`, data on `devices` (in order; devices may be
    /// appended later, never reordered or removed).
    pub fn open(meta_dir: &Path, devices: &[DeviceSpec]) -> Result<Arc<BlockStore>, StoreError> {
        if devices.is_empty() {
            return Err(StoreError::Inconsistent("no devices".into()));
        }
        std::fs::create_dir_all(meta_dir)?;
        let meta = Meta::open(meta_dir)?;
        let pool = Pool::open(devices)?;
        let listed: Vec<(String, u64)> = pool
            .devices()
            .map(|(p, size)| (p.display().to_string(), size))
            .collect();
        meta.check_devices(&listed)?;
        let tree = Tree::from_parts(meta.load()?);
        let mut alloc = Allocator::new(pool.pages());
        for e in tree.extents() {
            if !alloc.claim(e) {
                return Err(StoreError::Inconsistent(format!(
                    "sectors {}+{} are mapped twice or lie beyond the pool",
                    e.sector,
                    e.sectors()
                )));
            }
        }
        tracing::info!(
            layers = tree.layers.len(),
            images = tree.images.len(),
            used_bytes = alloc.used_sectors() * 512,
            "block store opened"
        );
        let store = Arc::new(BlockStore {
            meta,
            pool,
            tree: RwLock::new(tree),
            alloc: Mutex::new(alloc),
            gate: RwLock::new(()),
            pending: Mutex::new(Vec::with_capacity(MAX_PENDING_FREES)),
            trim: AtomicBool::new(true),
            media_errors: AtomicU64::new(0),
            recent_errors: Mutex::new(VecDeque::with_capacity(MAX_MEDIA_ERRORS_KEPT)),
            errors_by_image: Mutex::new(HashMap::new()),
            errors_by_device: Mutex::new(HashMap::new()),
        });
        store.compact()?;
        Ok(store)
    }

    fn tree(&self) -> RwLockReadGuard<'_, Tree> {
        self.tree.read().unwrap_or_else(|p| p.into_inner())
    }

    fn tree_mut(&self) -> RwLockWriteGuard<'_, Tree> {
        self.tree.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether Dataset Management deallocate releases space (the cluster's `EnableTrim`).
    pub fn set_trim(&self, enabled: bool) {
        self.trim.store(enabled, Ordering::Relaxed);
    }

    /// The pool's devices and their sizes.
    pub fn devices(&self) -> Vec<(std::path::PathBuf, u64)> {
        self.pool
            .devices()
            .map(|(p, s)| (p.to_path_buf(), s))
            .collect()
    }

    /// Applies a tree operation and persists it durably (one atomic batch).
    fn mutate(
        &self,
        f: impl FnOnce(&mut Tree) -> Result<Delta, TreeError>,
    ) -> Result<(), StoreError> {
        let mut t = self.tree_mut();
        let d = f(&mut t)?;
        self.meta.apply(&d.rows, &t)?;
        drop(t);
        self.defer_free(&d.freed);
        Ok(())
    }

    /// Whether the image exists.
    pub fn contains(&self, image: Uuid) -> bool {
        self.tree().contains(image)
    }

    /// A new empty thin volume (nothing to do if it exists).
    pub fn create_volume(&self, v: Uuid) -> Result<(), StoreError> {
        self.mutate(|t| idempotent(t.create_volume(v)))
    }

    /// A new volume holding snapshot `s`'s data, sharing its blocks until written.
    pub fn clone_volume(&self, s: Uuid, v: Uuid) -> Result<(), StoreError> {
        self.mutate(|t| idempotent(t.clone_volume(s, v)))
    }

    /// Snapshot `s` of volume `v`, instantly and crash-consistently.
    pub fn snapshot(&self, v: Uuid, s: Uuid) -> Result<(), StoreError> {
        self.mutate(|t| idempotent(t.snapshot(v, s)))
    }

    /// Returns volume `v`'s content to snapshot `s`'s. Idempotent, as the reconciler needs:
    /// a repeat after it finished (nothing written since) changes nothing.
    pub fn rollback(&self, v: Uuid, s: Uuid) -> Result<(), StoreError> {
        self.mutate(|t| t.rollback(v, s))?;
        self.compact()
    }

    /// Deletes a volume or snapshot (nothing to do if it is gone).
    pub fn delete(&self, image: Uuid) -> Result<(), StoreError> {
        self.mutate(|t| match t.delete(image) {
            Err(TreeError::NoImage(_)) => Ok(Delta::default()),
            r => r,
        })?;
        self.compact()
    }

    /// Folds shared layers with a single child into it, [`MERGE_STEP_ENTRIES`] entries per
    /// atomic step; the tree lock is free between steps, so I/O goes on. Also run at open, to
    /// finish merges a crash interrupted.
    fn compact(&self) -> Result<(), StoreError> {
        let mut moved = 0u64;
        loop {
            // (A `while let` would hold the read guard through the body, and mutate deadlock.)
            let next = self.tree().next_merge();
            let Some(id) = next else { break };
            let mut stuck = false;
            self.mutate(|t| {
                let d = t.merge_step(id, MERGE_STEP);
                stuck = d.rows.is_empty();
                Ok(d)
            })?;
            if stuck {
                return Err(StoreError::Inconsistent(format!(
                    "shared layer {id} has no child to merge into"
                )));
            }
            moved += MERGE_STEP as u64;
            if moved.is_multiple_of(64 * MERGE_STEP as u64) {
                tracing::info!(layer = id, moved, "block store: merging a freed layer");
            }
        }
        Ok(())
    }

    /// Makes blocks `[start, end)` of volume `v` read as zeroes and frees their space.
    pub fn trim(&self, v: Uuid, start: u64, end: u64) -> Result<(), StoreError> {
        self.mutate(|t| t.trim(v, start, end))
    }

    /// Cuts volume `v` to `blocks`: everything past it reads as zeroes and its space is freed,
    /// so a later grow never shows old data. Nothing is written when nothing is mapped there.
    pub fn truncate(&self, v: Uuid, blocks: u64) -> Result<(), StoreError> {
        if !self.tree().maps_beyond(v, blocks) {
            return Ok(());
        }
        self.trim(v, blocks, u64::MAX)
    }

    /// Space accounting of an image.
    pub fn usage(&self, image: Uuid) -> Result<Usage, StoreError> {
        Ok(self.tree().usage(image)?)
    }

    /// Blocks of `target` in `[from, to)` that differ from `base` (or that hold data, without
    /// a base), ascending, at most `max`.
    pub fn changed_blocks(
        &self,
        target: Uuid,
        base: Option<Uuid>,
        from: u64,
        to: u64,
        max: usize,
    ) -> Result<Vec<u64>, StoreError> {
        Ok(self.tree().changed_blocks(target, base, from, to, max)?)
    }

    /// Pool-wide accounting. Extents freed but not yet reusable (waiting for the next
    /// metadata sync) count as free: no image holds them any more.
    pub fn stats(&self) -> PoolStats {
        let logical_blocks: u64 = self.tree().layers.values().map(|l| l.data_blocks).sum();
        let pending: u64 = lock(&self.pending)
            .iter()
            .map(|e| u64::from(e.sectors()))
            .sum();
        let a = lock(&self.alloc);
        PoolStats {
            capacity_bytes: a.capacity_sectors() * 512,
            used_bytes: a.used_sectors().saturating_sub(pending) * 512,
            logical_bytes: logical_blocks * BLOCK_BYTES,
            media_errors: self.media_errors.load(Ordering::Relaxed),
        }
    }

    /// Checksum mismatches seen on an image's reads since start.
    pub fn media_errors_of(&self, image: Uuid) -> u32 {
        lock(&self.errors_by_image)
            .get(&image)
            .copied()
            .unwrap_or(0)
    }

    /// Checksum mismatches seen on a device since start.
    pub fn media_errors_on(&self, device: &Path) -> u32 {
        lock(&self.errors_by_device)
            .get(device)
            .copied()
            .unwrap_or(0)
    }

    /// Media errors since the last call (bounded; the oldest are dropped first).
    pub fn take_media_errors(&self) -> Vec<MediaError> {
        lock(&self.recent_errors).drain(..).collect()
    }

    /// A handle that serves an image as a namespace.
    pub fn image(self: &Arc<Self>, uuid: Uuid, size_bytes: u64, compress: bool) -> Image {
        Image {
            store: self.clone(),
            deferred: self.clone(),
            uuid,
            size_bytes,
            compress,
        }
    }

    fn defer_free(&self, freed: &[Extent]) {
        if freed.is_empty() {
            return;
        }
        let over = {
            let mut p = lock(&self.pending);
            p.extend_from_slice(freed);
            p.len() >= MAX_PENDING_FREES
        };
        if over {
            if let Err(e) = self.reclaim() {
                tracing::warn!("block store: reclaiming freed space failed: {e}");
            }
        }
    }

    /// Makes all metadata durable, waits out reads that may still use freed extents, then
    /// returns those extents to the allocator.
    fn reclaim(&self) -> Result<(), StoreError> {
        let freed = std::mem::take(&mut *lock(&self.pending));
        if freed.is_empty() {
            return Ok(());
        }
        if let Err(e) = self.meta.sync() {
            lock(&self.pending).extend_from_slice(&freed);
            return Err(e.into());
        }
        drop(self.gate.write().unwrap_or_else(|p| p.into_inner()));
        let mut a = lock(&self.alloc);
        for e in &freed {
            a.free(e);
        }
        Ok(())
    }

    /// Makes every acknowledged write durable (NVMe Flush).
    pub fn flush(&self) -> Result<(), StoreError> {
        self.pool.sync()?;
        self.meta.sync()?;
        self.reclaim()
    }

    fn media_error(&self, image: Uuid, block: u64, sector: u64) {
        self.media_errors.fetch_add(1, Ordering::Relaxed);
        *lock(&self.errors_by_image).entry(image).or_insert(0) += 1;
        *lock(&self.errors_by_device)
            .entry(self.pool.device_of(sector).to_path_buf())
            .or_insert(0) += 1;
        let mut r = lock(&self.recent_errors);
        if r.len() >= MAX_MEDIA_ERRORS_KEPT {
            r.pop_front();
        }
        r.push_back(MediaError {
            image,
            block,
            sector,
        });
        tracing::error!(%image, block, sector, "block checksum mismatch: unrecovered read error");
    }

    /// Reads `n` blocks from `first` into `buf`; 0 or -errno.
    ///
    /// # Safety
    /// `buf` is valid and exclusively ours for `n` blocks.
    unsafe fn read(&self, q: &mut IoQueue, image: Uuid, first: u64, n: usize, buf: *mut u8) -> i32 {
        with_scratch(|s| {
            let _gate = self.gate.read().unwrap_or_else(|p| p.into_inner());
            {
                let t = self.tree();
                let Some(&head) = t.images.get(&image) else {
                    return -libc::ENXIO;
                };
                for i in 0..n {
                    s.ext[i] = t.resolve(head, first + i as u64);
                }
            }
            let mut nops = 0usize;
            for i in 0..n {
                // SAFETY: block i of the caller's buffer.
                let dst = unsafe { buf.add(i * BLOCK) };
                match s.ext[i] {
                    None => {
                        // SAFETY: as above; BLOCK bytes in bounds.
                        unsafe { std::ptr::write_bytes(dst, 0, BLOCK) };
                    }
                    Some(e) if !e.compressed => {
                        if nops > 0 {
                            let last = &mut s.ops[nops - 1];
                            let last_end = last.sector + last.len as u64 / 512;
                            // SAFETY: pointer arithmetic within the caller's buffer.
                            let contiguous = unsafe { last.buf.add(last.len as usize) } == dst;
                            if contiguous && last_end == e.sector {
                                last.len += BLOCK as u32;
                                continue;
                            }
                        }
                        s.ops[nops] = RawOp {
                            write: false,
                            sector: e.sector,
                            len: BLOCK as u32,
                            buf: dst,
                        };
                        nops += 1;
                    }
                    Some(e) => {
                        s.ops[nops] = RawOp {
                            write: false,
                            sector: e.sector & !7,
                            len: BLOCK as u32,
                            buf: s.pages.slot_ptr(i),
                        };
                        nops += 1;
                    }
                }
            }
            // SAFETY: every op targets the caller's buffer or this thread's scratch.
            let r = unsafe { self.pool.run(q, &s.ops[..nops], &mut s.res) };
            if r < 0 {
                return r;
            }
            for i in 0..n {
                let Some(e) = s.ext[i] else { continue };
                // SAFETY: block i of the caller's buffer, now filled.
                let dst = unsafe { std::slice::from_raw_parts_mut(buf.add(i * BLOCK), BLOCK) };
                let ok = if e.compressed {
                    let at = (e.sector % 8) as usize * 512;
                    let stored = &s.pages.slot(i, BLOCK)[at..at + e.len as usize];
                    crc32c::crc32c(stored) == e.crc
                        && matches!(lz4_flex::block::decompress_into(stored, dst), Ok(BLOCK))
                } else {
                    crc32c::crc32c(dst) == e.crc
                };
                if !ok {
                    self.media_error(image, first + i as u64, e.sector);
                    return -libc::EIO;
                }
            }
            0
        })
    }

    /// Writes `n` blocks at `first` from `buf`. The data goes to the device now; the mapping
    /// joins the pass's pending commit, which completes `tag` (None). An error before that
    /// is returned at once (Some(-errno)).
    ///
    /// # Safety
    /// `buf` is valid for `n` blocks and not written by anyone until this returns.
    #[allow(clippy::too_many_arguments)]
    unsafe fn write(
        &self,
        q: &mut IoQueue,
        image: Uuid,
        first: u64,
        n: usize,
        buf: *mut u8,
        fua: bool,
        compress: bool,
        tag: u64,
    ) -> Option<i32> {
        with_scratch(|s| {
            // Shape each block: zeroes (no space), compressed, or raw.
            for i in 0..n {
                // SAFETY: block i of the caller's buffer.
                let data = unsafe { std::slice::from_raw_parts(buf.add(i * BLOCK), BLOCK) };
                if data.iter().all(|&b| b == 0) {
                    s.ext[i] = Some(Extent::ZERO);
                    continue;
                }
                let mut e = Extent {
                    sector: 0,
                    len: BLOCK as u16,
                    compressed: false,
                    crc: 0,
                };
                if compress {
                    let out = s.pages.slot_mut(i, SCRATCH_SLOT);
                    if let Ok(c) = lz4_flex::block::compress_into(data, out) {
                        if c <= MAX_COMPRESSED_BYTES {
                            let padded = c.div_ceil(512) * 512;
                            out[c..padded].fill(0);
                            e.len = c as u16;
                            e.compressed = true;
                            e.crc = crc32c::crc32c(&out[..c]);
                        }
                    }
                }
                if !e.compressed {
                    e.crc = crc32c::crc32c(data);
                }
                s.ext[i] = Some(e);
            }
            if let Err(r) = self.allocate(&mut s.ext[..n]) {
                return Some(r);
            }
            let mut nops = 0usize;
            for i in 0..n {
                let e = s.ext[i].expect("shaped above");
                if e.is_zero() {
                    continue;
                }
                let (src, len) = if e.compressed {
                    (s.pages.slot_ptr(i), e.sectors() * 512)
                } else {
                    // SAFETY: block i of the caller's buffer.
                    (unsafe { buf.add(i * BLOCK) }, BLOCK as u32)
                };
                if nops > 0 && !e.compressed {
                    let last = &mut s.ops[nops - 1];
                    // Raw ops are whole pages; a compressed op's buffer is scratch, never
                    // contiguous with the caller's.
                    // SAFETY: one past the end of the op's own buffer (caller's or a scratch
                    // slot), which is in bounds.
                    let contiguous = unsafe { last.buf.add(last.len as usize) } == src;
                    if contiguous && last.sector + last.len as u64 / 512 == e.sector {
                        last.len += BLOCK as u32;
                        continue;
                    }
                }
                s.ops[nops] = RawOp {
                    write: true,
                    sector: e.sector,
                    len,
                    buf: src,
                };
                nops += 1;
            }
            // SAFETY: every op reads the caller's buffer or this thread's scratch.
            let mut r = unsafe { self.pool.run(q, &s.ops[..nops], &mut s.res) };
            if r == 0 && fua {
                if let Err(e) = self.pool.sync() {
                    r = -e.raw_os_error().unwrap_or(libc::EIO);
                }
            }
            if r < 0 {
                self.release_unmapped(&s.ext[..n]);
                return Some(r);
            }
            let p = &mut s.pending;
            if p.cmds.len() == PENDING_CMDS_MAX {
                self.commit_pending(q, p); // more than a queue's worth: cannot happen, but bounded
            }
            let cmd = p.cmds.len();
            p.cmds.push((tag, (n * BLOCK) as u32, (n * BLOCK) as i32));
            for (i, e) in s.ext[..n].iter().enumerate() {
                p.blocks
                    .push((image, first + i as u64, e.expect("shaped"), cmd));
            }
            p.durable |= fua;
            None
        })
    }

    /// Reserves space for every non-zero extent; on failure nothing stays reserved.
    fn allocate(&self, ext: &mut [Option<Extent>]) -> Result<(), i32> {
        for attempt in 0..2 {
            let mut a = lock(&self.alloc);
            let mut done = 0;
            for e in ext.iter_mut().flatten() {
                if e.is_zero() {
                    done += 1;
                    continue;
                }
                match a.alloc(e.sectors()) {
                    Some(sector) => e.sector = sector,
                    None => break,
                }
                done += 1;
            }
            if done == ext.len() {
                return Ok(());
            }
            for e in ext.iter().take(done).flatten().filter(|e| !e.is_zero()) {
                a.free(e);
            }
            drop(a);
            if attempt == 0 && self.reclaim().is_err() {
                break;
            }
        }
        Err(-libc::ENOSPC)
    }

    fn release_unmapped(&self, ext: &[Option<Extent>]) {
        let mut a = lock(&self.alloc);
        for e in ext.iter().flatten().filter(|e| !e.is_zero()) {
            a.free(e);
        }
    }

    /// Maps the pass's written blocks into their images' head layers with one metadata write,
    /// then completes their commands. Replaced extents are freed later (deferred frees).
    fn commit_pending(&self, q: &mut IoQueue, p: &mut PendingWrites) {
        if p.cmds.is_empty() {
            return;
        }
        let mut batch = rocksdb::WriteBatch::default();
        let mut t = self.tree_mut();
        let mut last: Option<(Uuid, Option<u64>)> = None;
        for &(image, block, e, cmd) in &p.blocks {
            let head = match last {
                Some((i, h)) if i == image => h,
                _ => {
                    let h = t.images.get(&image).copied();
                    last = Some((image, h));
                    h
                }
            };
            let Some(head) = head else {
                // Deleted while its data was being written.
                p.cmds[cmd].2 = -libc::ENXIO;
                if !e.is_zero() {
                    p.unmapped.push(e);
                }
                continue;
            };
            self.meta.put_extent(&mut batch, head, block, &e);
            if let Some(old) = t.write(head, block, e) {
                p.replaced.push(old);
            }
        }
        let r = self.meta.write(batch, p.durable);
        drop(t);
        if let Err(e) = r {
            // The in-memory map is ahead of the disk now; refuse these writes loudly rather
            // than acknowledge what a restart would lose.
            tracing::error!("block store: metadata write failed: {e}");
            for c in p.cmds.iter_mut() {
                c.2 = -libc::EIO;
            }
        }
        if !p.unmapped.is_empty() {
            let mut a = lock(&self.alloc);
            for e in &p.unmapped {
                a.free(e);
            }
        }
        self.defer_free(&p.replaced);
        for &(tag, _, res) in &p.cmds {
            q.complete_now(tag, res);
        }
        p.blocks.clear();
        p.cmds.clear();
        p.replaced.clear();
        p.unmapped.clear();
        p.durable = false;
    }
}

impl Deferred for BlockStore {
    fn run_deferred(&self, q: &mut IoQueue) {
        with_scratch(|s| self.commit_pending(q, &mut s.pending));
    }
}

fn idempotent(r: Result<Delta, TreeError>) -> Result<Delta, TreeError> {
    match r {
        Err(TreeError::Exists(_)) => Ok(Delta::default()),
        r => r,
    }
}

/// One image served as a namespace.
#[derive(Clone)]
pub struct Image {
    store: Arc<BlockStore>,
    /// The same store, as the queue's postponed work.
    deferred: Arc<dyn Deferred>,
    uuid: Uuid,
    size_bytes: u64,
    compress: bool,
}

impl std::fmt::Debug for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Image")
            .field("uuid", &self.uuid)
            .field("size_bytes", &self.size_bytes)
            .field("compress", &self.compress)
            .finish_non_exhaustive()
    }
}

impl Image {
    /// Which image.
    pub fn uuid(&self) -> Uuid {
        self.uuid
    }

    /// Whether new writes are compressed.
    pub fn compresses(&self) -> bool {
        self.compress
    }

    /// Runs a request; None when its completion was postponed to the pass's commit.
    fn run(&self, q: &mut IoQueue, req: &IoRequest) -> Option<i32> {
        let first = req.offset / BLOCK_BYTES;
        let blocks = (req.len as u64).div_ceil(BLOCK_BYTES);
        let s = &self.store;
        Some(match req.kind {
            IoKind::Read | IoKind::Write { .. } if blocks as usize > MAX_BLOCKS_PER_IO => {
                -libc::EINVAL
            }
            // SAFETY: the Backend contract: buf is valid for len bytes and ours.
            IoKind::Read => unsafe { s.read(q, self.uuid, first, blocks as usize, req.buf) },
            IoKind::Write { fua } => {
                // SAFETY: as above.
                let r = unsafe {
                    s.write(
                        q,
                        self.uuid,
                        first,
                        blocks as usize,
                        req.buf,
                        fua,
                        self.compress,
                        req.tag,
                    )
                };
                if r.is_none() {
                    q.defer(&self.deferred);
                }
                return r;
            }
            // Flush covers every completed write; this pass's writes are committed first so
            // the flush also covers them. Trims are ordered after them the same way.
            IoKind::Flush => {
                s.run_deferred(q);
                errno(s.flush())
            }
            IoKind::Deallocate if !s.trim.load(Ordering::Relaxed) => 0,
            IoKind::Deallocate | IoKind::WriteZeroes => {
                s.run_deferred(q);
                errno(s.trim(self.uuid, first, first + blocks))
            }
        })
    }
}

fn errno(r: Result<(), StoreError>) -> i32 {
    match r {
        Ok(()) => 0,
        Err(StoreError::Io(e)) => -e.raw_os_error().unwrap_or(libc::EIO),
        Err(StoreError::Tree(TreeError::NoImage(_))) => -libc::ENXIO,
        Err(e) => {
            tracing::warn!("block store: {e}");
            -libc::EIO
        }
    }
}

impl Backend for Image {
    fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    unsafe fn submit(&self, q: &mut IoQueue, req: &IoRequest) -> std::io::Result<()> {
        if let Some(r) = self.run(q, req) {
            q.complete_now(req.tag, if r < 0 { r } else { req.len as i32 });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
