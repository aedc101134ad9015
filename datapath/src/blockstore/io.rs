//! The block store's I/O path: [`Image`] (a namespace's [`Backend`]) and the work of one
//! connection loop pass.
//!
//! A read or write command only queues itself (a write also checks for zeroes, compresses,
//! checksums and allocates its blocks, and stages their transfers); [`Deferred::run_deferred`],
//! once per loop pass before the ring is submitted, then does the pass's work together:
//!
//! 1. writes: their data transfers in one ring batch, one device sync if one asked for FUA,
//!    then one tree-lock hold and one map journal record (one `write`, synced if one asked
//!    for FUA) for every mapping, then completions;
//! 2. reads: one read-gate and tree-lock hold to resolve every block of every read through
//!    the image's [`Head`] (no lookup by image id), one ring batch for their transfers, then
//!    CRC32C checks (the `crc32c` crate uses the SSE 4.2 instruction when the CPU has it) and
//!    lz4 decompression.
//!
//! Flush, Write Zeroes and Dataset Management run the pass's work first, so they cover (and
//! are ordered after) every write before them. Nothing here allocates per I/O (the scratch
//! area is allocated once per thread, the journal's record buffer once per store) but the
//! RocksDB batch of a pass that refreshes a change-log row (a chunk's, every few seconds).

use std::cell::RefCell;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use uuid::Uuid;

use crate::backend::{Backend, Deferred, IoKind, IoQueue, IoRequest};
use crate::blockstore::changes::now_ms;
use crate::blockstore::map::Spans;
use crate::blockstore::pool::{op_result, RawOp};
use crate::blockstore::{BlockStore, Extent, Head, StoreError, TreeError, BLOCK};
use crate::buffer::SlotBuf;
use crate::limits::{BLOCK_BYTES, MAX_BLOCKS_PER_IO, MAX_COMPRESSED_BYTES, MAX_QUEUE_DEPTH};

/// Commands one connection can have outstanding, so one pass can postpone at most this many.
const PENDING_CMDS_MAX: usize = MAX_QUEUE_DEPTH as usize;
const PENDING_BLOCKS_MAX: usize = PENDING_CMDS_MAX * MAX_BLOCKS_PER_IO;

/// Room a block may need in the staging area: lz4's worst case for one block, rounded up.
const STAGE_SLOT: usize = 2 * BLOCK;

/// Compressed write data a pass stages before its transfers must run.
const STAGE_BYTES: usize = 64 * STAGE_SLOT;

/// Pool pages a pass's compressed reads read at once (whole pages, sliced afterwards).
const READ_PAGES: usize = 2 * MAX_BLOCKS_PER_IO;

/// Blocks of a read batch whose first data lines are prefetched from a mapped pool before
/// the batch's copies start.
const PREFETCH_BLOCKS: usize = 32;

/// A read waiting for the pass's batch.
struct PendingRead {
    head: Arc<Head>,
    first: u64,
    n: usize,
    buf: *mut u8,
    tag: u64,
    /// Its blocks' extents start here in `Scratch::ext`.
    at: usize,
    /// Its transfers in `Scratch::ops`, and its first page slot.
    ops: (usize, usize),
    slot: usize,
    res: i32,
}

/// A write whose data is staged, waiting for the pass's commit.
struct WriteCmd {
    head: Arc<Head>,
    tag: u64,
    first: u64,
    n: usize,
    /// Its blocks' extents start here in `PendingWrites::blocks`.
    at: usize,
    res: i32,
}

/// The writes of one loop pass of a connection, committed together ([`Deferred`]).
struct PendingWrites {
    blocks: Vec<Extent>,
    cmds: Vec<WriteCmd>,
    /// Staged data transfers (run before the commit, or earlier when staging fills up), and
    /// the command each belongs to.
    ops: Vec<RawOp>,
    op_cmd: Vec<usize>,
    res: Vec<i32>,
    /// Bytes of the staging area in use.
    staged: usize,
    /// Some command asked for FUA: the commit syncs the device and the map journal.
    durable: bool,
    /// Space the commit replaced (freed after it) or could not map (freed at once).
    replaced: Spans,
    unmapped: Spans,
}

/// Per-thread scratch space, allocated once per reactor thread: I/O never allocates.
struct Scratch {
    /// Compressed data of the pass's writes.
    stage: SlotBuf,
    /// Whole pool pages read for compressed reads.
    pages: SlotBuf,
    ext: Vec<Option<Extent>>,
    ops: Vec<RawOp>,
    res: Vec<i32>,
    reads: Vec<PendingRead>,
    read_blocks: usize,
    writes: PendingWrites,
    /// A panic left the pending work half-done: it is dropped, never replayed (its buffers
    /// may be gone by the time the queue is dropped).
    poisoned: bool,
}

const NO_OP: RawOp = RawOp {
    write: false,
    sector: 0,
    len: 0,
    buf: std::ptr::null_mut(),
};

impl Scratch {
    fn new() -> Scratch {
        Scratch {
            stage: SlotBuf::new(1, STAGE_BYTES).expect("block store staging area"),
            pages: SlotBuf::new(READ_PAGES, BLOCK).expect("block store read pages"),
            ext: vec![None; PENDING_BLOCKS_MAX],
            ops: vec![NO_OP; PENDING_BLOCKS_MAX],
            res: vec![0; PENDING_BLOCKS_MAX],
            reads: Vec::with_capacity(PENDING_CMDS_MAX),
            read_blocks: 0,
            poisoned: false,
            writes: PendingWrites {
                blocks: Vec::with_capacity(PENDING_BLOCKS_MAX),
                cmds: Vec::with_capacity(PENDING_CMDS_MAX),
                ops: Vec::with_capacity(PENDING_BLOCKS_MAX),
                op_cmd: Vec::with_capacity(PENDING_BLOCKS_MAX),
                res: vec![0; PENDING_BLOCKS_MAX],
                staged: 0,
                durable: false,
                replaced: Spans(Vec::with_capacity(PENDING_BLOCKS_MAX)),
                unmapped: Spans(Vec::with_capacity(PENDING_BLOCKS_MAX)),
            },
        }
    }
}

thread_local! {
    static SCRATCH: RefCell<Option<Scratch>> = const { RefCell::new(None) };
}

impl Scratch {
    /// Drops every queued command without completing it (after a panic mid-pass).
    fn forget_pending(&mut self) {
        self.reads.clear();
        self.read_blocks = 0;
        let p = &mut self.writes;
        p.blocks.clear();
        p.cmds.clear();
        p.ops.clear();
        p.op_cmd.clear();
        p.staged = 0;
        p.durable = false;
        p.replaced.0.clear();
        p.unmapped.0.clear();
        self.poisoned = false;
    }
}

/// Marks the scratch poisoned if a panic unwinds through the store's work.
struct Poison<'a>(&'a mut Scratch, bool);

impl Drop for Poison<'_> {
    fn drop(&mut self) {
        if !self.1 && std::thread::panicking() {
            self.0.poisoned = true;
        }
    }
}

fn with_scratch<R>(f: impl FnOnce(&mut Scratch) -> R) -> R {
    SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        let s = s.get_or_insert_with(Scratch::new);
        if s.poisoned {
            tracing::error!("block store: dropping I/O left half-done by a panic");
            s.forget_pending();
        }
        let g = Poison(s, std::thread::panicking());
        f(g.0)
    })
}

/// Appends a transfer, joined to the previous one when both continue each other in memory
/// and on the pool (and the pool does not change devices in between).
fn push_op(store: &BlockStore, ops: &mut [RawOp], nops: &mut usize, from: usize, op: RawOp) {
    if *nops > from {
        let last = &mut ops[*nops - 1];
        let end = last.sector + last.len as u64 / 512;
        // SAFETY: one past the end of the previous op's own buffer, which is in bounds.
        let contiguous = unsafe { last.buf.add(last.len as usize) } == op.buf;
        if contiguous && end == op.sector && !store.pool.starts_device(op.sector) {
            last.len += op.len;
            return;
        }
    }
    ops[*nops] = op;
    *nops += 1;
}

impl BlockStore {
    /// Queues a read of `n` blocks at `first` into `buf`, for the pass's batch.
    fn queue_read(
        &self,
        q: &mut IoQueue,
        head: &Arc<Head>,
        first: u64,
        n: usize,
        buf: *mut u8,
        tag: u64,
    ) {
        with_scratch(|s| {
            if s.reads.len() == PENDING_CMDS_MAX || s.read_blocks + n > PENDING_BLOCKS_MAX {
                self.run_reads(q, s);
            }
            s.read_blocks += n;
            s.reads.push(PendingRead {
                head: head.clone(),
                first,
                n,
                buf,
                tag,
                at: 0,
                ops: (0, 0),
                slot: 0,
                res: 0,
            });
        })
    }

    /// Runs the pass's reads: every block resolved under one gate and tree-lock hold, then
    /// the transfers (in groups as large as the page slots for compressed blocks allow), the
    /// checks, and the completions. The gate is held until every check is done.
    fn run_reads(&self, q: &mut IoQueue, s: &mut Scratch) {
        if s.reads.is_empty() {
            return;
        }
        let gate = self.gate.read().unwrap_or_else(|p| p.into_inner());
        {
            let t = self.tree();
            #[cfg(test)]
            self.read_holds.fetch_add(1, Ordering::Relaxed);
            if s.reads.len() > 1 {
                // The chunks, then their entries: a batch's cache misses overlap.
                for stage in 0..2 {
                    for r in &s.reads {
                        t.prefetch(r.head.layer(), r.first, stage);
                    }
                }
            }
            let mut at = 0;
            for r in s.reads.iter_mut() {
                r.at = at;
                let out = &mut s.ext[at..at + r.n];
                if !t.resolve_range(r.head.layer(), r.first, out) {
                    r.res = -libc::ENXIO;
                }
                at += r.n;
            }
        }
        if s.reads.len() > 1 && self.pool.is_mapped() {
            // The first blocks of the batch: enough to overlap its misses, not so many that
            // the first are evicted before their copy.
            let blocks = s
                .reads
                .iter()
                .map(|r| r.n)
                .sum::<usize>()
                .min(PREFETCH_BLOCKS);
            for e in s.ext[..blocks].iter().flatten() {
                self.pool.prefetch(e.sector);
            }
        }
        let mut i = 0;
        while i < s.reads.len() {
            i = self.read_group(q, s, i);
        }
        drop(gate);
        s.reads.clear();
        s.read_blocks = 0;
    }

    /// Transfers and checks reads `i..` (as many as the page slots allow); returns where the
    /// next group starts.
    fn read_group(&self, q: &mut IoQueue, s: &mut Scratch, i: usize) -> usize {
        let (mut nops, mut slot, mut j) = (0usize, 0usize, i);
        while j < s.reads.len() {
            let r = &mut s.reads[j];
            let exts = &s.ext[r.at..r.at + r.n];
            let packed = exts.iter().flatten().filter(|e| e.compressed).count();
            if j > i && slot + packed > READ_PAGES {
                break;
            }
            (r.ops.0, r.slot) = (nops, slot);
            let live = if r.res == 0 { exts } else { &[] };
            for (k, e) in live.iter().enumerate() {
                // SAFETY: block k of the command's buffer.
                let dst = unsafe { r.buf.add(k * BLOCK) };
                let Some(e) = e else {
                    // SAFETY: as above; BLOCK bytes in bounds.
                    unsafe { std::ptr::write_bytes(dst, 0, BLOCK) };
                    continue;
                };
                let (sector, buf) = if e.compressed {
                    slot += 1;
                    (e.sector & !7, s.pages.slot_ptr(slot - 1))
                } else {
                    (e.sector, dst)
                };
                let op = RawOp {
                    write: false,
                    sector,
                    len: BLOCK as u32,
                    buf,
                };
                push_op(self, &mut s.ops, &mut nops, r.ops.0, op);
            }
            r.ops.1 = nops;
            j += 1;
        }
        // SAFETY: every op targets a pending read's buffer or this thread's page slots.
        unsafe { self.pool.run(q, &s.ops[..nops], &mut s.res) };
        for r in &mut s.reads[i..j] {
            if r.res == 0 {
                r.res = (r.ops.0..r.ops.1)
                    .map(|k| op_result(&s.ops[k], s.res[k]))
                    .find(|&x| x < 0)
                    .unwrap_or(0);
            }
            if r.res == 0 {
                r.res = self.check_read(r, &s.ext[r.at..r.at + r.n], &s.pages);
            }
            let bytes = (r.n * BLOCK) as i32;
            q.complete_now(r.tag, if r.res < 0 { r.res } else { bytes });
        }
        j
    }

    /// Checks (and decompresses) a read's blocks: 0, or -EIO for a checksum mismatch.
    fn check_read(&self, r: &PendingRead, exts: &[Option<Extent>], pages: &SlotBuf) -> i32 {
        let mut slot = r.slot;
        for (k, e) in exts.iter().enumerate() {
            let Some(e) = e else { continue };
            // SAFETY: block k of the command's buffer, now filled; nobody else touches it.
            let dst = unsafe { std::slice::from_raw_parts_mut(r.buf.add(k * BLOCK), BLOCK) };
            let ok = if e.compressed {
                let at = (e.sector % 8) as usize * 512;
                let stored = &pages.slot(slot, BLOCK)[at..at + e.len as usize];
                slot += 1;
                crc32c::crc32c(stored) == e.crc
                    && matches!(lz4_flex::block::decompress_into(stored, dst), Ok(BLOCK))
            } else {
                crc32c::crc32c(dst) == e.crc
            };
            if !ok {
                self.media_error(r.head.uuid, r.first + k as u64, e.sector);
                return -libc::EIO;
            }
        }
        0
    }

    /// Queues a write of `n` blocks at `first` from `buf`: its blocks are shaped (zeroes,
    /// compressed or raw), checksummed and allocated, and their transfers staged; the pass's
    /// commit writes them, maps them and completes `tag` (None). An error before that is
    /// returned at once (Some(-errno)).
    ///
    /// # Safety
    /// `buf` is valid for `n` blocks and not written by anyone until the completion.
    #[allow(clippy::too_many_arguments)]
    unsafe fn write(
        &self,
        q: &mut IoQueue,
        head: &Arc<Head>,
        first: u64,
        n: usize,
        buf: *mut u8,
        fua: bool,
        compress: bool,
        tag: u64,
    ) -> Option<i32> {
        with_scratch(|s| {
            let p = &mut s.writes;
            if p.cmds.len() == PENDING_CMDS_MAX || p.blocks.len() + n > PENDING_BLOCKS_MAX {
                self.commit_pending(q, p);
            }
            if compress && p.staged + n * STAGE_SLOT > STAGE_BYTES {
                self.run_staged(q, p);
            }
            let (at, staged) = (p.blocks.len(), p.staged);
            for i in 0..n {
                // SAFETY: block i of the caller's buffer.
                let data = unsafe { std::slice::from_raw_parts(buf.add(i * BLOCK), BLOCK) };
                let area = s.stage.slot_mut(0, STAGE_BYTES);
                p.blocks.push(shape(data, compress, area, &mut p.staged));
            }
            if let Err(r) = self.allocate(&mut p.blocks[at..]) {
                p.blocks.truncate(at);
                p.staged = staged;
                return Some(r);
            }
            let cmd = p.cmds.len();
            let (from, mut nops, mut off) = (p.ops.len(), p.ops.len(), staged);
            p.ops.resize(from + n, NO_OP);
            for (i, e) in p.blocks[at..]
                .iter()
                .enumerate()
                .filter(|(_, e)| !e.is_zero())
            {
                let (src, len) = if e.compressed {
                    off += e.sectors() as usize * 512;
                    // SAFETY: inside the staging area (staged above).
                    let src = unsafe { s.stage.slot_ptr(0).add(off - e.sectors() as usize * 512) };
                    (src, e.sectors() * 512)
                } else {
                    // SAFETY: block i of the caller's buffer.
                    (unsafe { buf.add(i * BLOCK) }, BLOCK as u32)
                };
                let op = RawOp {
                    write: true,
                    sector: e.sector,
                    len,
                    buf: src,
                };
                push_op(self, &mut p.ops, &mut nops, from, op);
            }
            p.ops.truncate(nops);
            p.op_cmd.resize(nops, cmd);
            p.cmds.push(WriteCmd {
                head: head.clone(),
                tag,
                first,
                n,
                at,
                res: 0,
            });
            p.durable |= fua;
            None
        })
    }

    /// Reserves space for every non-zero extent; on failure nothing stays reserved.
    fn allocate(&self, ext: &mut [Extent]) -> Result<(), i32> {
        for attempt in 0..2 {
            let mut a = super::lock(&self.alloc);
            let mut done = 0;
            for e in ext.iter_mut() {
                if !e.is_zero() {
                    match a.alloc(e.sectors()) {
                        Some(sector) => e.sector = sector,
                        None => break,
                    }
                }
                done += 1;
            }
            if done == ext.len() {
                return Ok(());
            }
            for e in ext[..done].iter().filter(|e| !e.is_zero()) {
                a.free(&e.span());
            }
            drop(a);
            if attempt == 0 && self.reclaim().is_err() {
                break;
            }
        }
        Err(-libc::ENOSPC)
    }

    /// Runs the staged data transfers; a command whose transfer failed gets its error.
    fn run_staged(&self, q: &mut IoQueue, p: &mut PendingWrites) {
        if p.ops.is_empty() {
            return;
        }
        // SAFETY: every op reads a pending command's buffer or this thread's staging area.
        unsafe { self.pool.run(q, &p.ops, &mut p.res) };
        for (k, op) in p.ops.iter().enumerate() {
            let r = op_result(op, p.res[k]);
            let c = &mut p.cmds[p.op_cmd[k]];
            if r < 0 && c.res == 0 {
                c.res = r;
            }
        }
        p.ops.clear();
        p.op_cmd.clear();
        p.staged = 0;
    }

    /// Writes the pass's staged data, syncs the device if a write asked for FUA, maps every
    /// written block into its image's head layer with one metadata write, then completes the
    /// commands. Replaced extents are freed later (deferred frees).
    fn commit_pending(&self, q: &mut IoQueue, p: &mut PendingWrites) {
        if p.cmds.is_empty() {
            return;
        }
        let batch = p.cmds.len() > 1;
        if batch {
            // The chunks the writes will update load while the data is copied, and their
            // entries together once the map is locked (as for reads).
            let t = self.tree();
            for c in &p.cmds {
                t.prefetch(c.head.layer(), c.first, 0);
            }
        }
        self.run_staged(q, p);
        if p.durable && p.cmds.iter().any(|c| c.res == 0) {
            if let Err(e) = self.pool.sync() {
                let r = -e.raw_os_error().unwrap_or(libc::EIO);
                p.cmds.iter_mut().for_each(|c| c.res = c.res.min(r));
            }
        }
        // Change-log rows go to RocksDB as well (rarely: a chunk's row is refreshed at most
        // every few seconds), so its batch is made only when one does.
        let mut changes: Option<rocksdb::WriteBatch> = None;
        let now = now_ms();
        let mut t = self.tree_mut();
        if batch {
            for c in &p.cmds {
                t.prefetch(c.head.layer(), c.first, 1);
            }
        }
        let mut log = super::lock(&self.maplog);
        for c in p.cmds.iter_mut() {
            let exts = &p.blocks[c.at..c.at + c.n];
            let layer = c.head.layer();
            if c.res == 0 && t.layers.contains_key(&layer) {
                t.write(layer, c.first, exts, &mut p.replaced);
                log.add_write(layer, c.first, exts);
                let image = c.head.uuid;
                super::lock(&c.head.changes).record(c.first, c.n as u64, now, |chunk, ms| {
                    log.add_change(image, chunk, ms);
                    let b = changes.get_or_insert_with(rocksdb::WriteBatch::default);
                    self.meta.put_change(b, image, chunk, ms);
                });
                continue;
            }
            if c.res == 0 {
                // Deleted while its data was being written.
                c.res = -libc::ENXIO;
            }
            for e in exts.iter().filter(|e| !e.is_zero()) {
                p.unmapped.push(e.span());
            }
        }
        let appended = log.commit();
        let (due, overdue) = (log.wants_checkpoint(), log.overdue());
        drop(log);
        let r = changes.map_or(Ok(()), |b| self.meta.write(b, false));
        drop(t);
        let r = match (appended, r) {
            (Err(e), _) => Err(StoreError::Meta(e)),
            (Ok(_), Err(e)) => Err(StoreError::Meta(e)),
            (Ok(Some(file)), Ok(())) if p.durable => file.sync_data().map_err(StoreError::Io),
            (Ok(_), Ok(())) => Ok(()),
        };
        if let Err(e) = r {
            // The in-memory map is ahead of the disk now; refuse these writes loudly rather
            // than acknowledge what a restart would lose.
            tracing::error!("block store: metadata write failed: {e}");
            p.cmds
                .iter_mut()
                .for_each(|c| c.res = c.res.min(-libc::EIO));
        }
        if !p.unmapped.0.is_empty() {
            let mut a = super::lock(&self.alloc);
            p.unmapped.0.iter().for_each(|s| a.free(s));
        }
        self.defer_free(&p.replaced.0);
        for c in &p.cmds {
            let bytes = (c.n * BLOCK) as i32;
            q.complete_now(c.tag, if c.res < 0 { c.res } else { bytes });
        }
        p.blocks.clear();
        p.cmds.clear();
        p.replaced.0.clear();
        p.unmapped.0.clear();
        p.durable = false;
        self.checkpoint_if_due(due, overdue);
    }
}

/// A block as it will be stored: zeroes (no space), lz4-compressed into the staging area at
/// `*staged` (when asked for and it saves a sector), or raw; with its CRC32C.
fn shape(data: &[u8], compress: bool, area: &mut [u8], staged: &mut usize) -> Extent {
    if data.iter().all(|&b| b == 0) {
        return Extent::ZERO;
    }
    if compress {
        let out = &mut area[*staged..*staged + STAGE_SLOT];
        if let Ok(c) = lz4_flex::block::compress_into(data, out) {
            if c <= MAX_COMPRESSED_BYTES {
                let padded = c.div_ceil(512) * 512;
                out[c..padded].fill(0);
                *staged += padded;
                return Extent {
                    sector: 0,
                    len: c as u16,
                    compressed: true,
                    crc: crc32c::crc32c(&out[..c]),
                };
            }
        }
    }
    Extent {
        sector: 0,
        len: BLOCK as u16,
        compressed: false,
        crc: crc32c::crc32c(data),
    }
}

impl Deferred for BlockStore {
    fn run_deferred(&self, q: &mut IoQueue) {
        with_scratch(|s| {
            self.commit_pending(q, &mut s.writes);
            self.run_reads(q, s);
        });
    }
}

/// One image served as a namespace.
#[derive(Clone)]
pub struct Image {
    store: Arc<BlockStore>,
    /// The same store, as the queue's postponed work.
    deferred: Arc<dyn Deferred>,
    head: Arc<Head>,
    size_bytes: u64,
    compress: bool,
}

impl std::fmt::Debug for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Image")
            .field("uuid", &self.head.uuid)
            .field("size_bytes", &self.size_bytes)
            .field("compress", &self.compress)
            .finish_non_exhaustive()
    }
}

impl Image {
    pub(super) fn new(
        store: Arc<BlockStore>,
        head: Arc<Head>,
        size_bytes: u64,
        compress: bool,
    ) -> Image {
        Image {
            deferred: store.clone(),
            store,
            head,
            size_bytes,
            compress,
        }
    }

    /// Which image.
    pub fn uuid(&self) -> Uuid {
        self.head.uuid
    }

    /// Whether new writes are compressed.
    pub fn compresses(&self) -> bool {
        self.compress
    }

    /// Runs a request; None when its completion was postponed to the pass's work.
    fn run(&self, q: &mut IoQueue, req: &IoRequest) -> Option<i32> {
        let first = req.offset / BLOCK_BYTES;
        let blocks = (req.len as u64).div_ceil(BLOCK_BYTES) as usize;
        let s = &self.store;
        Some(match req.kind {
            IoKind::Read | IoKind::Write { .. } if blocks > MAX_BLOCKS_PER_IO => -libc::EINVAL,
            IoKind::Read => {
                s.queue_read(q, &self.head, first, blocks, req.buf, req.tag);
                q.defer(&self.deferred);
                return None;
            }
            IoKind::Write { fua } => {
                // SAFETY: the Backend contract: buf is valid for len bytes and ours.
                let r = unsafe {
                    s.write(
                        q,
                        &self.head,
                        first,
                        blocks,
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
                // On a reactor whose syncs are off it (dedicated cores), they run on the
                // store's worker thread and the command completes through the reactor's
                // mailbox: one volume's Flush stalls no other I/O, and Flushes that come
                // together share one sync.
                if let Some(sink) = q.remote() {
                    if s.flush_later(sink.clone(), req.tag) {
                        return None;
                    }
                }
                errno(s.flush())
            }
            IoKind::Deallocate if !s.trim.load(Ordering::Relaxed) => 0,
            IoKind::Deallocate | IoKind::WriteZeroes => {
                s.run_deferred(q);
                // Logged before the trim's own (durable) batch: a trim that survives a
                // crash has its rows.
                if let Err(e) = s.log_changes(&self.head, first, blocks as u64) {
                    return Some(errno(Err(e)));
                }
                errno(s.trim(self.head.uuid, first, first + blocks as u64))
            }
        })
    }
}

pub(super) fn errno(r: Result<(), StoreError>) -> i32 {
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

    fn last_change_ms(&self) -> Option<u64> {
        super::lock(&self.head.changes).last_ms()
    }

    fn changed_since(&self, since_ms: u64) -> Option<Vec<u64>> {
        super::lock(&self.head.changes).since(since_ms)
    }

    unsafe fn submit(&self, q: &mut IoQueue, req: &IoRequest) -> std::io::Result<()> {
        match req.kind {
            IoKind::Read => self.head.io.count(true, req.len),
            IoKind::Write { .. } => self.head.io.count(false, req.len),
            IoKind::Flush | IoKind::Deallocate | IoKind::WriteZeroes => {}
        }
        if let Some(r) = self.run(q, req) {
            q.complete_now(req.tag, if r < 0 { r } else { req.len as i32 });
        }
        Ok(())
    }
}
