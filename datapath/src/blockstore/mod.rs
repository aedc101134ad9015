//! The extent-mapped block store: thin volumes, snapshots, clones and rollback over a pool
//! of devices, with a checksum per block and optional lz4 compression.
//!
//! - Data: 4 KiB blocks written out of place (never over a live block) to sectors the
//!   [`alloc::Allocator`] hands out, through the connection's io_uring ([`pool`]), with
//!   O_DIRECT where the device takes it.
//! - Metadata: the layer tree ([`tree`]) of block maps ([`map`]: 64-block chunks, a CRC32C
//!   and at most a packed location per block) in memory, persisted in RocksDB ([`meta`]) as
//!   chunk rows, with host writes' mappings appended to the map journal ([`maplog`]) and
//!   checkpointed into chunk rows by the store's worker thread. A write is acknowledged
//!   after its data is written and its mapping committed, so a crash leaves every block
//!   either old or new, and the checksum of what a mapping names always matches.
//! - Snapshots freeze the volume's current layer under the tree's write lock: every write
//!   acknowledged before it is in it, none acknowledged after.
//! - Space freed by an overwrite, trim or delete is reused only after (1) the metadata that
//!   freed it is durable, and (2) no read that may have looked it up is still running
//!   (the read gate): a reused block can never show through an old mapping. With syncs
//!   off the reactor ([`BlockStore::set_syncs_off_reactor`]), both waits (a sync of
//!   the map journal, and the gate) happen on the store's worker thread, not on the reactor
//!   whose write crossed [`MAX_PENDING_FREES`] (a writer waits for them only when the pool
//!   has no free space left, or when frees pile up past [`PENDING_FREES_HARD_MAX`]), and so
//!   do the syncs of a Flush issued on a reactor.
//! - I/O ([`io`]): an [`Image`] holds its image's layer through a [`Head`] the tree's writers
//!   keep current; reads and writes of one connection loop pass are done together (one lock
//!   hold, one ring batch, one metadata commit).
//!
//! I/O errors are reported as negative errno to the data path: `-EIO` for a checksum
//! mismatch (a media error, counted and remembered for the control plane), `-ENOSPC` when the
//! pool is full, `-ENXIO` for an image that no longer exists.

pub mod alloc;
pub mod changes;
mod io;
pub mod map;
pub mod maplog;
pub mod meta;
pub mod pool;
pub mod tree;

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak};

use uuid::Uuid;

use crate::backend::CompletionSink;
use crate::limits::{
    BLOCK_BYTES, MAX_MEDIA_ERRORS_KEPT, MAX_PENDING_FREES, MERGE_STEP_ENTRIES,
    PENDING_FREES_HARD_MAX,
};

use alloc::Allocator;
use changes::ChangeLog;
pub use io::Image;
use maplog::{Dirty, Entry, MapLog};
use meta::{Meta, MetaError};
pub use pool::DeviceSpec;
use pool::Pool;
use tree::{Delta, LayerId, Span, Tree};
pub use tree::{Extent, TreeError, Usage};

const BLOCK: usize = BLOCK_BYTES as usize;

/// Entries per merge step; tiny under test, so the model test crosses many step boundaries.
const MERGE_STEP: usize = if cfg!(test) { 3 } else { MERGE_STEP_ENTRIES };

/// Chunk rows a checkpoint encodes per hold of the tree's read lock.
const CHECKPOINT_BATCH: usize = 256;

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

/// An image's current layer (0: no such image; layer ids start at 1). Every [`Image`] of it
/// shares one; tree operations that move the image to another layer (snapshot, rollback) or
/// remove it store the new layer under the tree's write lock, so I/O reads it under the read
/// lock instead of looking the image up by id.
#[derive(Debug)]
pub struct Head {
    uuid: Uuid,
    layer: AtomicU64,
    /// I/O the image received while any handle of it existed.
    io: IoCounters,
    /// When it last changed each chunk (loaded from its rows when the head is made).
    changes: Mutex<ChangeLog>,
}

/// Commands an image received, by kind (relaxed atomics: one add per command, no lock).
#[derive(Debug, Default)]
pub struct IoCounters {
    reads: AtomicU64,
    read_bytes: AtomicU64,
    writes: AtomicU64,
    write_bytes: AtomicU64,
}

/// A snapshot of [`IoCounters`]. The counts start when the image is first opened for I/O
/// (its namespace published) and restart if every handle of it is dropped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoTotals {
    /// Read commands.
    pub reads: u64,
    /// Bytes they asked for.
    pub read_bytes: u64,
    /// Write commands (Write Zeroes and Deallocate excluded).
    pub writes: u64,
    /// Bytes they carried.
    pub write_bytes: u64,
}

impl IoCounters {
    /// Counts one command of `len` bytes.
    fn count(&self, read: bool, len: u32) {
        let (ops, bytes) = if read {
            (&self.reads, &self.read_bytes)
        } else {
            (&self.writes, &self.write_bytes)
        };
        ops.fetch_add(1, Ordering::Relaxed);
        bytes.fetch_add(u64::from(len), Ordering::Relaxed);
    }

    fn totals(&self) -> IoTotals {
        IoTotals {
            reads: self.reads.load(Ordering::Relaxed),
            read_bytes: self.read_bytes.load(Ordering::Relaxed),
            writes: self.writes.load(Ordering::Relaxed),
            write_bytes: self.write_bytes.load(Ordering::Relaxed),
        }
    }
}

impl Head {
    /// The image's layer now (read it under the tree lock).
    fn layer(&self) -> u64 {
        self.layer.load(Ordering::Relaxed)
    }
}

/// Memory of the block maps, for the figures in `benches/RESULTS.md`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapMemory {
    /// Bytes the block maps take (upper bound, see [`map::BlockMap::mem_bytes`]).
    pub map_bytes: u64,
    /// Data blocks they map.
    pub data_blocks: u64,
    /// Bytes of the allocator's page map.
    pub alloc_bytes: u64,
}

/// The block store: one per node.
pub struct BlockStore {
    meta: Meta,
    pool: Pool,
    tree: RwLock<Tree>,
    alloc: Mutex<Allocator>,
    /// Held shared by reads from lookup to completion; taken exclusively to reuse space.
    gate: RwLock<()>,
    pending: Mutex<Vec<Span>>,
    /// Held for the whole of a [`BlockStore::reclaim`]: a writer out of space waits for the
    /// reclaim in progress (which took the pending frees) instead of finding none.
    reclaiming: Mutex<()>,
    worker: Arc<Worker>,
    /// The map journal: host writes' mappings since the last checkpoint. Locked after the
    /// tree (a pass's records are appended under the tree's write lock, so their order is
    /// the tree's).
    maplog: Mutex<MapLog>,
    /// Held for a whole checkpoint and by tree operations (which checkpoint inside their own
    /// batch): one at a time, and none while another is half-written.
    checkpointing: Mutex<()>,
    /// Image → its head, while some [`Image`] holds it.
    heads: Mutex<HashMap<Uuid, Weak<Head>>>,
    trim: AtomicBool,
    /// Syncs (a Flush's, a reclaim's) go to the worker thread instead of blocking the
    /// reactor: only worth it when the worker does not wait for the reactor's own CPU
    /// ([`BlockStore::set_syncs_off_reactor`]).
    syncs_off_reactor: AtomicBool,
    media_errors: AtomicU64,
    recent_errors: Mutex<VecDeque<MediaError>>,
    errors_by_image: Mutex<HashMap<Uuid, u32>>,
    errors_by_device: Mutex<HashMap<std::path::PathBuf, u32>>,
    /// Tree-lock holds of the read path (tests check one per loop pass).
    #[cfg(test)]
    read_holds: AtomicU64,
    /// Reclaims run by the worker thread.
    #[cfg(test)]
    background_reclaims: AtomicU64,
    /// Checkpoints run by the worker thread.
    #[cfg(test)]
    background_checkpoints: AtomicU64,
}

/// The store's worker thread: it checkpoints the map journal (see
/// [`BlockStore::checkpoint`]) and makes freed space reusable (see [`BlockStore::reclaim`])
/// when a writer asks, and runs the syncs of Flush commands issued on reactors, so that no
/// reactor waits for a disk there.
#[derive(Default)]
struct Worker {
    state: Mutex<Asks>,
    wake: Condvar,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// What the worker thread is asked to do.
#[derive(Default)]
struct Asks {
    reclaim: bool,
    checkpoint: bool,
    stop: bool,
    /// Flush commands to complete (where, tag) once everything before them is durable.
    flushes: Vec<(Arc<dyn CompletionSink>, u64)>,
}

/// Completes `flushes` with `res`, each sink's together.
fn complete_flushes(flushes: &[(Arc<dyn CompletionSink>, u64)], res: i32) {
    let mut i = 0;
    while i < flushes.len() {
        let sink = &flushes[i].0;
        let n = flushes[i..]
            .iter()
            .take_while(|(s, _)| Arc::ptr_eq(s, sink))
            .count();
        let done: Vec<(u64, i32)> = flushes[i..i + n].iter().map(|(_, t)| (*t, res)).collect();
        sink.complete_many(&done);
        i += n;
    }
}

/// The store worker thread's name.
const WORKER_THREAD: &str = "evstor-store";

impl Worker {
    /// Starts `store`'s worker thread; it holds the store only while it works.
    fn start(store: &Arc<BlockStore>) -> std::io::Result<()> {
        let (weak, r) = (Arc::downgrade(store), store.worker.clone());
        let h = std::thread::Builder::new()
            .name(WORKER_THREAD.into())
            .spawn(move || loop {
                let (flushes, reclaim, checkpoint) = {
                    let mut s = lock(&r.state);
                    while !s.reclaim && !s.checkpoint && s.flushes.is_empty() && !s.stop {
                        s = r.wake.wait(s).unwrap_or_else(|p| p.into_inner());
                    }
                    if s.stop {
                        // The store is going: no Flush may wait for ever.
                        complete_flushes(&std::mem::take(&mut s.flushes), -libc::ENXIO);
                        return;
                    }
                    (
                        std::mem::take(&mut s.flushes),
                        std::mem::take(&mut s.reclaim),
                        std::mem::take(&mut s.checkpoint),
                    )
                };
                let Some(store) = weak.upgrade() else {
                    complete_flushes(&flushes, -libc::ENXIO);
                    return;
                };
                if checkpoint {
                    #[cfg(test)]
                    store.background_checkpoints.fetch_add(1, Ordering::Relaxed);
                    if let Err(e) = store.checkpoint() {
                        tracing::warn!("block store: checkpointing the map journal failed: {e}");
                    }
                }
                if !flushes.is_empty() {
                    // One sync for every Flush that came meanwhile (it reclaims too).
                    complete_flushes(&flushes, io::errno(store.flush()));
                } else if reclaim {
                    if let Err(e) = store.reclaim() {
                        tracing::warn!("block store: reclaiming freed space failed: {e}");
                    }
                }
            })?;
        *lock(&store.worker.thread) = Some(h);
        Ok(())
    }

    fn running(&self) -> bool {
        lock(&self.thread)
            .as_ref()
            .is_some_and(|h| !h.is_finished())
    }

    /// Asks for a reclaim; false if the thread is not running.
    fn ask(&self) -> bool {
        self.ask_for(|a| a.reclaim = true)
    }

    /// Asks for a checkpoint; false if the thread is not running.
    fn ask_checkpoint(&self) -> bool {
        self.ask_for(|a| a.checkpoint = true)
    }

    fn ask_for(&self, f: impl FnOnce(&mut Asks)) -> bool {
        let running = self.running();
        if running {
            f(&mut lock(&self.state));
            self.wake.notify_one();
        }
        running
    }

    /// Asks for a Flush's syncs, to complete `tag` through `sink`; false if the thread is
    /// not running (the caller then flushes itself).
    fn flush(&self, sink: Arc<dyn CompletionSink>, tag: u64) -> bool {
        let running = self.running();
        if running {
            lock(&self.state).flushes.push((sink, tag));
            self.wake.notify_one();
        }
        running
    }
}

impl Drop for BlockStore {
    fn drop(&mut self) {
        lock(&self.worker.state).stop = true;
        self.worker.wake.notify_one();
        // Joined, so that RocksDB is closed when the store is gone; unless this is the
        // worker thread itself, dropping the last reference after its work.
        if let Some(h) = lock(&self.worker.thread).take() {
            if h.thread().id() != std::thread::current().id() {
                let _ = h.join();
            }
        }
    }
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
    /// appended later, never reordered or removed). A format-1 map (a row per block) is
    /// converted to chunk rows first.
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
        let loaded = meta.load()?;
        let mut tree = Tree::from_parts(loaded.layers);
        let (maplog, changes) = replay(meta_dir, &meta, &mut tree)?;
        let mut alloc = Allocator::new(pool.pages());
        let mut clash = None;
        tree.spans(|s| {
            if !alloc.claim(&s) && clash.is_none() {
                clash = Some(s);
            }
        });
        if let Some(s) = clash {
            return Err(StoreError::Inconsistent(format!(
                "sectors {}+{} are mapped twice or lie beyond the pool",
                s.sector, s.sectors
            )));
        }
        if loaded.legacy_rows > 0 {
            tracing::info!(
                rows = loaded.legacy_rows,
                "block store: converting the format-1 map (a row per block) to chunk rows"
            );
            meta.convert_legacy(&tree)?;
        }
        meta.drop_strays(&loaded.strays)?;
        meta.mark_format()?;
        tracing::info!(
            layers = tree.layers.len(),
            images = tree.images.len(),
            used_bytes = alloc.used_sectors() * 512,
            direct = pool.is_direct(),
            "block store opened"
        );
        let store = Arc::new(BlockStore {
            meta,
            pool,
            tree: RwLock::new(tree),
            alloc: Mutex::new(alloc),
            gate: RwLock::new(()),
            pending: Mutex::new(Vec::with_capacity(MAX_PENDING_FREES)),
            reclaiming: Mutex::new(()),
            worker: Arc::new(Worker::default()),
            maplog: Mutex::new(maplog),
            checkpointing: Mutex::new(()),
            heads: Mutex::new(HashMap::new()),
            trim: AtomicBool::new(true),
            syncs_off_reactor: AtomicBool::new(false),
            media_errors: AtomicU64::new(0),
            recent_errors: Mutex::new(VecDeque::with_capacity(MAX_MEDIA_ERRORS_KEPT)),
            errors_by_image: Mutex::new(HashMap::new()),
            errors_by_device: Mutex::new(HashMap::new()),
            #[cfg(test)]
            read_holds: AtomicU64::new(0),
            #[cfg(test)]
            background_reclaims: AtomicU64::new(0),
            #[cfg(test)]
            background_checkpoints: AtomicU64::new(0),
        });
        // What the journal replayed goes into chunk rows (with the change-log rows it held),
        // and the mark moves to the new file.
        let mut b = rocksdb::WriteBatch::default();
        for (image, chunk, ms) in changes {
            store.meta.put_change_if_newer(&mut b, image, chunk, ms)?;
        }
        store.meta.write(b, false)?;
        store.mutate(|_| Ok(Delta::default()))?;
        store.compact()?;
        Worker::start(&store)?;
        Ok(store)
    }

    fn tree(&self) -> RwLockReadGuard<'_, Tree> {
        self.tree.read().unwrap_or_else(|p| p.into_inner())
    }

    fn tree_mut(&self) -> RwLockWriteGuard<'_, Tree> {
        self.tree.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the syncs of a Flush and of a reclaim run on the store's worker thread
    /// rather than on the reactor that needs them. Off by default: where the worker shares
    /// the reactor's CPU it waits for the reactor's busy poll, and measured slower
    /// (`benches/RESULTS.md`); `evstor serve --datapath-cores` turns it on once the other
    /// threads have left the reactors' CPUs.
    pub fn set_syncs_off_reactor(&self, on: bool) {
        self.syncs_off_reactor.store(on, Ordering::Relaxed);
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

    /// Appends `device` to the pool while serving: its space is usable once this returns.
    /// Nothing happens for a device the pool already has (same path).
    pub fn add_device(&self, device: &DeviceSpec) -> Result<(), StoreError> {
        // The tree lock serializes appends (and holds writes' mappings back meanwhile).
        let _t = self.tree_mut();
        if self.pool.devices().any(|(p, _)| p == device.path) {
            return Ok(());
        }
        let pages = self.pool.append(device)?;
        lock(&self.alloc).grow(self.pool.pages());
        tracing::info!(
            device = %device.path.display(),
            bytes = pages * BLOCK_BYTES,
            "block store: device added to the pool"
        );
        // The device list guards the order at the next open, which appends what the
        // cluster recorded for this node and extends the list the same way if this write
        // is lost.
        let listed: Vec<(String, u64)> = self
            .pool
            .devices()
            .map(|(p, size)| (p.display().to_string(), size))
            .collect();
        self.meta.check_devices(&listed)?;
        Ok(())
    }

    /// Applies a tree operation and persists it durably, in one atomic batch with the rows
    /// of every chunk the map journal changed since its mark and the new mark (so no journal
    /// record from before the operation is replayed over it). The heads of the images it
    /// moved follow before the write lock is let go.
    fn mutate(
        &self,
        f: impl FnOnce(&mut Tree) -> Result<Delta, TreeError>,
    ) -> Result<(), StoreError> {
        let _one = lock(&self.checkpointing);
        let mut t = self.tree_mut();
        let d = f(&mut t)?;
        self.follow(&t, &d.images);
        let mut log = lock(&self.maplog);
        let (dirty, mark) = (log.take_dirty(), log.end_mark());
        let mut b = rocksdb::WriteBatch::default();
        let mut buf = Vec::new();
        for (layer, idx) in dirty.iter() {
            // A chunk the operation removed has its deletes among the operation's rows.
            if let Some(c) = t.layers.get_mut(&layer).and_then(|l| l.map.chunk_mut(idx)) {
                if c.deltas > 0 {
                    tree::consolidate(c);
                }
                self.meta.put_chunk(&mut b, layer, idx, c, &mut buf);
            }
        }
        self.meta.put_mark(&mut b, mark);
        if let Err(e) = self.meta.apply(b, &d.rows, &t) {
            log.restore_dirty(dirty);
            return Err(e.into());
        }
        log.forget_before(mark);
        drop(log);
        drop(t);
        self.defer_free(&d.freed.0);
        Ok(())
    }

    /// Writes the rows of every chunk the map journal changed since its mark, then (synced)
    /// the new mark, and deletes the journal's files wholly before it. Host writes go on
    /// meanwhile: the tree's read lock is held only while a few rows are encoded, and a
    /// chunk written again after the mark was noted is simply written with its newer state
    /// (its records after the mark replay over it to the same result). Runs on the store's
    /// worker thread when a writer finds one due ([`MapLog::wants_checkpoint`]).
    fn checkpoint(&self) -> Result<(), StoreError> {
        let _one = lock(&self.checkpointing);
        // A full file is followed by a new one, made (and its directory synced) before the
        // switch, outside every lock the writers take.
        let full = lock(&self.maplog).file_full();
        let next = if full {
            Some(lock(&self.maplog).prepare_next()?)
        } else {
            None
        };
        let (dirty, mark) = {
            let mut log = lock(&self.maplog);
            if let Some(n) = next {
                log.switch(n);
            }
            (log.take_dirty(), log.end_mark())
        };
        let keys: Vec<(LayerId, u64)> = dirty.iter().collect();
        let mut buf = Vec::new();
        let r = (|| {
            for part in keys.chunks(CHECKPOINT_BATCH) {
                let mut b = rocksdb::WriteBatch::default();
                {
                    let t = self.tree();
                    for &(layer, idx) in part {
                        // Legacy delta rows were consolidated at open; only tree operations
                        // (excluded meanwhile) remove chunks.
                        if let Some(c) = t.layers.get(&layer).and_then(|l| l.map.chunk(idx)) {
                            debug_assert_eq!(c.deltas, 0, "chunk {layer}/{idx} has delta rows");
                            self.meta.put_chunk(&mut b, layer, idx, c, &mut buf);
                        }
                    }
                }
                self.meta.write(b, false)?;
            }
            let mut b = rocksdb::WriteBatch::default();
            self.meta.put_mark(&mut b, mark);
            self.meta.write(b, true)
        })();
        if let Err(e) = r {
            lock(&self.maplog).restore_dirty(dirty);
            return Err(e.into());
        }
        lock(&self.maplog).forget_before(mark);
        Ok(())
    }

    /// After a pass's record: asks the worker thread for a checkpoint when one is due, or
    /// runs it here if the worker is gone or far behind (and no checkpoint is under way).
    fn checkpoint_if_due(&self, due: bool, overdue: bool) {
        if !due || (!overdue && self.worker.ask_checkpoint()) {
            return;
        }
        let busy = self.checkpointing.try_lock().is_err();
        if !busy {
            if let Err(e) = self.checkpoint() {
                tracing::warn!("block store: checkpointing the map journal failed: {e}");
            }
        }
    }

    /// Makes every mapping committed so far durable: the map journal's files not yet
    /// behind the mark. RocksDB needs no sync here: tree operations and a checkpoint's mark
    /// are written synced, and the change-log rows a pass writes there unsynced are in its
    /// journal record too (a replay puts them back).
    fn sync_maps(&self) -> Result<(), StoreError> {
        let files = lock(&self.maplog).live_files();
        for f in files {
            f.sync_data()?;
        }
        Ok(())
    }

    /// Points the heads of `images` at their layers in `t` (called under the write lock).
    fn follow(&self, t: &Tree, images: &[Uuid]) {
        if images.is_empty() {
            return;
        }
        let mut heads = lock(&self.heads);
        for u in images {
            if let Some(h) = heads.get(u).and_then(Weak::upgrade) {
                let layer = t.images.get(u).copied().unwrap_or(0);
                h.layer.store(layer, Ordering::Relaxed);
            }
        }
        heads.retain(|_, w| w.strong_count() > 0);
    }

    /// The shared head of image `uuid` (made on first use).
    fn head(&self, uuid: Uuid) -> Arc<Head> {
        let t = self.tree();
        let mut heads = lock(&self.heads);
        if let Some(h) = heads.get(&uuid).and_then(Weak::upgrade) {
            return h;
        }
        let changes = match self.meta.load_changes(uuid) {
            Ok((rows, forgot_before)) => ChangeLog::from_rows(rows, forgot_before),
            Err(e) => {
                tracing::error!("block store: reading the change log of {uuid}: {e}");
                ChangeLog::lost()
            }
        };
        let h = Arc::new(Head {
            uuid,
            layer: AtomicU64::new(t.images.get(&uuid).copied().unwrap_or(0)),
            io: IoCounters::default(),
            changes: Mutex::new(changes),
        });
        heads.insert(uuid, Arc::downgrade(&h));
        h
    }

    /// The metadata database's RocksDB statistics text, for support bundles.
    pub fn rocksdb_stats(&self) -> String {
        self.meta.rocksdb_stats()
    }

    /// Memory of the block maps and the allocator.
    pub fn map_memory(&self) -> MapMemory {
        let t = self.tree();
        MapMemory {
            map_bytes: t.map_bytes() as u64,
            data_blocks: t.layers.values().map(|l| l.data_blocks).sum(),
            alloc_bytes: lock(&self.alloc).mem_bytes() as u64,
        }
    }

    /// Whether every pool device is used with O_DIRECT.
    pub fn is_direct(&self) -> bool {
        self.pool.is_direct()
    }

    /// Whether the image exists.
    pub fn contains(&self, image: Uuid) -> bool {
        self.tree().contains(image)
    }

    /// The snapshots it holds.
    pub fn snapshots(&self) -> Vec<Uuid> {
        self.tree().snapshots()
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

    /// As [`BlockStore::snapshot`], replacing a snapshot `s` an earlier attempt left: a
    /// replicated snapshot is taken again, whole, until every copy has it at one point.
    pub fn retake_snapshot(&self, v: Uuid, s: Uuid) -> Result<(), StoreError> {
        if self.contains(s) {
            self.delete(s)?;
        }
        self.snapshot(v, s)
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
        self.meta.delete_changes(image)?;
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

    /// Records in `head`'s change log (with a metadata write of its own) that blocks
    /// `[first, first + n)` change now.
    fn log_changes(&self, head: &Head, first: u64, n: u64) -> Result<(), StoreError> {
        let mut batch = rocksdb::WriteBatch::default();
        lock(&head.changes).record(first, n, changes::now_ms(), |chunk, ms| {
            self.meta.put_change(&mut batch, head.uuid, chunk, ms)
        });
        if !batch.is_empty() {
            self.meta.write(batch, false)?;
        }
        Ok(())
    }

    /// When image `uuid` last changed (Unix ms, 0 if never), from its change log; None
    /// if the log could not be read.
    pub fn last_change_ms(&self, uuid: Uuid) -> Option<u64> {
        lock(&self.head(uuid).changes).last_ms()
    }

    /// The chunks ([`CHANGE_CHUNK_BYTES`](crate::limits::CHANGE_CHUNK_BYTES)) of image
    /// `uuid` its change log shows changed at or after `since_ms` (Unix ms), in order; None
    /// if the log could not be read.
    pub fn changed_since(&self, uuid: Uuid, since_ms: u64) -> Option<Vec<u64>> {
        lock(&self.head(uuid).changes).since(since_ms)
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
    /// I/O an image received through its open handles; `None` when none is open (not
    /// published, or not created).
    pub fn io_totals(&self, image: Uuid) -> Option<IoTotals> {
        let heads = lock(&self.heads);
        let head = heads.get(&image).and_then(Weak::upgrade)?;
        Some(head.io.totals())
    }

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
        let pending: u64 = lock(&self.pending).iter().map(|s| s.sectors).sum();
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
        Image::new(self.clone(), self.head(uuid), size_bytes, compress)
    }

    fn defer_free(&self, freed: &[Span]) {
        if freed.is_empty() {
            return;
        }
        let pending = {
            let mut p = lock(&self.pending);
            p.extend_from_slice(freed);
            p.len()
        };
        let off = self.syncs_off_reactor.load(Ordering::Relaxed);
        if pending >= PENDING_FREES_HARD_MAX
            || (pending >= MAX_PENDING_FREES && !(off && self.worker.ask()))
        {
            // Syncs stay on the reactor, or the worker is gone (or far behind): release
            // them here.
            if let Err(e) = self.reclaim() {
                tracing::warn!("block store: reclaiming freed space failed: {e}");
            }
        }
    }

    /// Makes all metadata durable, waits out reads that may still use freed extents, then
    /// returns those extents to the allocator.
    fn reclaim(&self) -> Result<(), StoreError> {
        let _one = lock(&self.reclaiming);
        let freed = std::mem::take(&mut *lock(&self.pending));
        if freed.is_empty() {
            return Ok(());
        }
        #[cfg(test)]
        if std::thread::current().name() == Some(WORKER_THREAD) {
            self.background_reclaims.fetch_add(1, Ordering::Relaxed);
        }
        if let Err(e) = self.sync_maps() {
            lock(&self.pending).extend_from_slice(&freed);
            return Err(e);
        }
        drop(self.gate.write().unwrap_or_else(|p| p.into_inner()));
        let mut a = lock(&self.alloc);
        for s in &freed {
            a.free(s);
        }
        Ok(())
    }

    /// Completes `tag` through `sink` once every write completed before is durable, the
    /// syncs running on the store's worker thread; false if syncs stay on the reactor
    /// ([`BlockStore::set_syncs_off_reactor`]) or the worker is not running (call
    /// [`BlockStore::flush`] then).
    pub(crate) fn flush_later(&self, sink: Arc<dyn CompletionSink>, tag: u64) -> bool {
        self.syncs_off_reactor.load(Ordering::Relaxed) && self.worker.flush(sink, tag)
    }

    /// Makes every acknowledged write durable (NVMe Flush).
    pub fn flush(&self) -> Result<(), StoreError> {
        self.pool.sync()?;
        self.sync_maps()?;
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
}

/// Opens the map journal, replaying its records from the mark over `tree`; returns it with
/// every replayed chunk (and every chunk with format-2 delta rows) marked for the open's
/// checkpoint, and the change-log rows it held.
#[allow(clippy::type_complexity)]
fn replay(
    meta_dir: &Path,
    meta: &Meta,
    tree: &mut Tree,
) -> Result<(MapLog, Vec<(Uuid, u64, u64)>), StoreError> {
    let (mut touched, mut changes, mut strays) = (Vec::new(), Vec::new(), 0u64);
    let mut freed = tree::Spans::default();
    let (mut log, r) = MapLog::open(meta_dir, meta.map_log_mark()?, |e| match e {
        Entry::Write { layer, first, exts } => {
            if tree.layers.contains_key(&layer) {
                tree.write(layer, first, exts, &mut freed);
                freed.0.clear();
                touched.push((layer, first, exts.len() as u64));
            } else {
                strays += 1;
            }
        }
        Entry::Change { image, chunk, ms } => changes.push((image, chunk, ms)),
    })?;
    if strays > 0 {
        // Records after the mark were written after the last tree operation, so their
        // layers exist: this is damage, but the rest of the map is still worth serving.
        tracing::error!(
            entries = strays,
            "block store: map journal entries name layers the map lacks; ignored"
        );
    }
    for (layer, first, n) in touched {
        log.touch(layer, first, n);
    }
    let mut legacy: Dirty = Dirty::default();
    for (&id, l) in &tree.layers {
        for (idx, c) in l.map.chunks() {
            if c.deltas > 0 {
                legacy.insert(id, idx);
            }
        }
    }
    log.restore_dirty(legacy);
    if r.records > 0 || r.torn > 0 {
        tracing::info!(
            records = r.records,
            torn_files = r.torn,
            "block store: replayed the map journal"
        );
    }
    Ok((log, changes))
}

fn idempotent(r: Result<Delta, TreeError>) -> Result<Delta, TreeError> {
    match r {
        Err(TreeError::Exists(_)) => Ok(Delta::default()),
        r => r,
    }
}

/// Asks the CPU to start loading the cache line at `p` (no effect on other targets). The
/// store works in batches (a pass's reads, its writes, the allocator's freed pages):
/// starting a batch's loads first overlaps their cache misses instead of taking them one
/// after another.
pub(crate) fn prefetch(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint: it never faults and does not change memory.
    unsafe {
        std::arch::x86_64::_mm_prefetch(p.cast(), std::arch::x86_64::_MM_HINT_T0)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

#[cfg(test)]
mod tests;
