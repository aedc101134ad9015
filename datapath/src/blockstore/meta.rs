//! The block maps on RocksDB: the block store's own database (not the control plane's
//! journal). Column families:
//!
//! - `layers`: layer id → parent, owner.
//! - `chunks`: (layer, chunk) → the chunk's full row ([`Chunk::encode`]: generation, bitmaps,
//!   and a CRC per data block (a run) or a CRC and location per data block).
//! - `deltas`: (layer, chunk, slot) → a host write's blocks in that chunk (generation, first
//!   block, extents), applied at load over the full row of the same generation, in slot
//!   order; rows of other generations are stale and ignored. A chunk has at most
//!   [`CHUNK_DELTA_ROWS_MAX`] slots; then a write rewrites the full row (a new generation).
//!   A write covering a quarter of a chunk or more writes the full row at once, so a
//!   sequentially written volume is one row per 64 blocks.
//! - `extents`: format 1 (one row per (layer, block)), read only to convert it at open.
//! - `meta`: the device list the pool was formatted with, the format version, and the map
//!   journal's mark ([`crate::blockstore::maplog`]: where its records not yet in the chunk
//!   rows start).
//!
//! A chunk that leaves a layer takes its rows with it (its delta slots are deleted too), so a
//! chunk the tree lacks has no row of any generation on disk, and a new one starts at
//! generation 0.
//!
//! Host writes' mappings go to the map journal, not here (format 3; format 2 wrote a delta
//! row per write, which are still read); checkpoints write the chunk rows they changed.
//! Every tree operation (snapshot, clone, rollback, delete, trim) is one synced batch,
//! together with the rows of every chunk the journal changed since its mark and the new mark.

use std::path::Path;

use rocksdb::{ColumnFamilyDescriptor, Options, ReadOptions, WriteBatch, WriteOptions, DB};
use uuid::Uuid;

use crate::blockstore::map::{Chunk, CHUNK_BLOCKS};
use crate::blockstore::maplog::Mark;
use crate::blockstore::tree::{Extent, HashMap, Layer, LayerId, Owner, Row, Tree};
use crate::limits::{
    CHANGE_LOG_KEEP_MS, CHUNK_DELTA_ROWS_MAX, LEGACY_CONVERT_CHUNKS, MAP_MEMTABLE_BYTES,
};

const CF_LAYERS: &str = "layers";
const CF_CHUNKS: &str = "chunks";
const CF_DELTAS: &str = "deltas";
const CF_EXTENTS: &str = "extents";
const CF_META: &str = "meta";
/// Image change logs: (image, chunk) → Unix ms of its last recorded change.
const CF_CHANGES: &str = "changes";
const KEY_DEVICES: &[u8] = b"devices";
const KEY_FORMAT: &[u8] = b"format";
const KEY_MAPLOG_MARK: &[u8] = b"maplog-mark";

/// The row layout this build writes. 1: a row per (layer, block) in `extents` (no format
/// key); 2: chunk and delta rows; 3: chunk rows and the map journal (a build that reads
/// up to 2 would ignore the journal, so it must refuse the store).
pub const FORMAT: u32 = 3;

/// Why the metadata store failed.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    /// RocksDB said no.
    #[error("block store metadata: {0}")]
    Db(#[from] rocksdb::Error),
    /// A row that does not decode.
    #[error("block store metadata is corrupt: {0}")]
    Corrupt(String),
    /// The map journal's file I/O failed (what was being done, and why).
    #[error("block store map journal: {0}: {1}")]
    Journal(&'static str, std::io::Error),
}

/// The metadata database.
pub struct Meta {
    db: DB,
    sync: WriteOptions,
    nosync: WriteOptions,
}

impl Meta {
    /// RocksDB's own statistics text (`rocksdb.stats`), for support bundles.
    pub fn rocksdb_stats(&self) -> String {
        self.db
            .property_value("rocksdb.stats")
            .ok()
            .flatten()
            .unwrap_or_default()
    }
}

impl std::fmt::Debug for Meta {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Meta")
            .field("path", &self.db.path())
            .finish()
    }
}

/// What [`Meta::load`] found.
#[derive(Debug, Default)]
pub struct Loaded {
    /// Every layer with its block map.
    pub layers: HashMap<LayerId, Layer>,
    /// Format-1 rows read (converted by [`Meta::convert_legacy`]).
    pub legacy_rows: u64,
    /// Chunks left empty by stale delta rows only (their rows are deleted at open).
    pub strays: Vec<(LayerId, u64, u8)>,
}

/// A change-log row's key: image, then chunk (big-endian, so an image's rows are adjacent).
fn change_key(image: Uuid, chunk: u64) -> [u8; 24] {
    let mut k = [0u8; 24];
    k[..16].copy_from_slice(image.as_bytes());
    k[16..].copy_from_slice(&chunk.to_be_bytes());
    k
}

/// `(layer, block)` of format 1, and `(layer, chunk)` of format 2.
fn pair_key(layer: LayerId, n: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&layer.to_be_bytes());
    k[8..].copy_from_slice(&n.to_be_bytes());
    k
}

fn delta_key(layer: LayerId, idx: u64, slot: u8) -> [u8; 17] {
    let mut k = [0u8; 17];
    k[..16].copy_from_slice(&pair_key(layer, idx));
    k[16] = slot;
    k
}

fn split_key(k: &[u8], what: &str) -> Result<(u64, u64), MetaError> {
    if k.len() < 16 {
        return Err(MetaError::Corrupt(format!("{what} key")));
    }
    let a = u64::from_be_bytes(k[..8].try_into().expect("8 bytes"));
    let b = u64::from_be_bytes(k[8..16].try_into().expect("8 bytes"));
    Ok((a, b))
}

/// One extent in 15 bytes (format 1's value, and each entry of a delta row).
pub fn encode_extent(e: &Extent) -> [u8; 15] {
    let mut v = [0u8; 15];
    v[..8].copy_from_slice(&e.sector.to_le_bytes());
    v[8..10].copy_from_slice(&e.len.to_le_bytes());
    v[10] = e.compressed as u8;
    v[11..].copy_from_slice(&e.crc.to_le_bytes());
    v
}

/// The extent of [`encode_extent`]; None if it does not decode.
pub fn decode_extent(v: &[u8]) -> Option<Extent> {
    if v.len() != 15 {
        return None;
    }
    let e = Extent {
        sector: u64::from_le_bytes(v[..8].try_into().ok()?),
        len: u16::from_le_bytes(v[8..10].try_into().ok()?),
        compressed: v[10] != 0,
        crc: u32::from_le_bytes(v[11..].try_into().ok()?),
    };
    (e.len <= 4096).then_some(e)
}

/// A delta row's value: generation, first block in the chunk, count, extents.
fn encode_delta(gen: u32, first: u32, exts: &[Extent], out: &mut Vec<u8>) {
    out.extend_from_slice(&gen.to_le_bytes());
    out.push(first as u8);
    out.push(exts.len() as u8);
    for e in exts {
        out.extend_from_slice(&encode_extent(e));
    }
}

fn decode_delta(v: &[u8]) -> Option<(u32, u32, Vec<Extent>)> {
    let gen = u32::from_le_bytes(v.get(..4)?.try_into().ok()?);
    let (first, n) = (*v.get(4)? as u32, *v.get(5)? as usize);
    let rest = v.get(6..)?;
    if rest.len() != 15 * n || first as u64 + n as u64 > CHUNK_BLOCKS {
        return None;
    }
    let exts = rest
        .chunks_exact(15)
        .map(decode_extent)
        .collect::<Option<_>>()?;
    Some((gen, first, exts))
}

/// The layer row (format 1 and 2 alike): parent, owner kind, image id.
pub fn encode_layer(l: &Layer) -> [u8; 25] {
    let mut v = [0u8; 25];
    v[..8].copy_from_slice(&l.parent.unwrap_or(0).to_le_bytes());
    let (kind, id) = match l.owner {
        Owner::Shared => (0, Uuid::nil()),
        Owner::Volume(u) => (1, u),
        Owner::Snapshot(u) => (2, u),
    };
    v[8] = kind;
    v[9..].copy_from_slice(id.as_bytes());
    v
}

fn decode_layer(v: &[u8]) -> Option<Layer> {
    if v.len() != 25 {
        return None;
    }
    let parent = u64::from_le_bytes(v[..8].try_into().ok()?);
    let id = Uuid::from_slice(&v[9..]).ok()?;
    let owner = match v[8] {
        0 => Owner::Shared,
        1 => Owner::Volume(id),
        2 => Owner::Snapshot(id),
        _ => return None,
    };
    Some(Layer::new((parent != 0).then_some(parent), owner))
}

fn layer_mut(layers: &mut HashMap<LayerId, Layer>, id: LayerId) -> Result<&mut Layer, MetaError> {
    layers
        .get_mut(&id)
        .ok_or_else(|| MetaError::Corrupt(format!("map row of missing layer {id}")))
}

fn scan_opts() -> ReadOptions {
    let mut o = ReadOptions::default();
    o.fill_cache(false);
    o.set_readahead_size(4 << 20);
    o
}

impl Meta {
    /// Opens (creating) the database in `dir`; refuses a format newer than this build's.
    pub fn open(dir: &Path) -> Result<Meta, MetaError> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_max_background_jobs(2);
        // Every write already happens under the block store's tree lock, and the vector
        // memtables below need single-writer inserts.
        opts.set_allow_concurrent_memtable_write(false);
        // Map rows are written with host writes and only ever read back whole (at open): an
        // append-only vector memtable makes the insert O(1) instead of a skip-list insert
        // (measured: half of the write path's CPU went to RocksDB, most of it there).
        let vector = || {
            let mut o = Options::default();
            o.set_memtable_factory(rocksdb::MemtableFactory::Vector);
            // A flush sorts the whole vector; small enough to sort in cache (see the limit).
            o.set_write_buffer_size(MAP_MEMTABLE_BYTES);
            o
        };
        // Full chunk rows are mostly CRCs: nothing to compress.
        let mut chunks = vector();
        chunks.set_compression_type(rocksdb::DBCompressionType::None);
        let cfs = [
            ColumnFamilyDescriptor::new(CF_LAYERS, Options::default()),
            ColumnFamilyDescriptor::new(CF_CHUNKS, chunks),
            ColumnFamilyDescriptor::new(CF_DELTAS, vector()),
            ColumnFamilyDescriptor::new(CF_EXTENTS, vector()),
            ColumnFamilyDescriptor::new(CF_META, Options::default()),
            ColumnFamilyDescriptor::new(CF_CHANGES, Options::default()),
        ];
        let db = DB::open_cf_descriptors(&opts, dir, cfs)?;
        let mut sync = WriteOptions::default();
        sync.set_sync(true);
        let m = Meta {
            db,
            sync,
            nosync: WriteOptions::default(),
        };
        if let Some(f) = m.format()? {
            if f > FORMAT {
                return Err(MetaError::Corrupt(format!(
                    "block store format {f} was written by a newer evstor (this one reads up to {FORMAT})"
                )));
            }
        }
        Ok(m)
    }

    fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        self.db
            .cf_handle(name)
            .expect("column family created at open")
    }

    /// The recorded format (None: format 1, or a new store).
    pub fn format(&self) -> Result<Option<u32>, MetaError> {
        match self.db.get_cf(self.cf(CF_META), KEY_FORMAT)? {
            None => Ok(None),
            Some(v) => {
                let b: [u8; 4] = v
                    .as_slice()
                    .try_into()
                    .map_err(|_| MetaError::Corrupt("format key".into()))?;
                Ok(Some(u32::from_le_bytes(b)))
            }
        }
    }

    /// Records that every row is in this build's format.
    pub fn mark_format(&self) -> Result<(), MetaError> {
        if self.format()? == Some(FORMAT) {
            return Ok(());
        }
        self.db.put_cf_opt(
            self.cf(CF_META),
            KEY_FORMAT,
            FORMAT.to_le_bytes(),
            &self.sync,
        )?;
        Ok(())
    }

    /// Checks the pool's device list against the one it was formatted with (recording it the
    /// first time): reordering or dropping devices would scramble every extent address.
    pub fn check_devices(&self, devices: &[(String, u64)]) -> Result<(), MetaError> {
        let mut now = String::new();
        for (p, size) in devices {
            now.push_str(&format!("{p}\t{size}\n"));
        }
        match self.db.get_cf(self.cf(CF_META), KEY_DEVICES)? {
            None => {
                self.db
                    .put_cf_opt(self.cf(CF_META), KEY_DEVICES, now.as_bytes(), &self.sync)?;
                Ok(())
            }
            Some(old) if old.len() <= now.len() && now.as_bytes().starts_with(&old) => {
                if old.len() < now.len() {
                    self.db
                        .put_cf_opt(self.cf(CF_META), KEY_DEVICES, now.as_bytes(), &self.sync)?;
                }
                Ok(())
            }
            Some(old) => Err(MetaError::Corrupt(format!(
                "the pool was formatted with devices\n{}but is opened with\n{now}(devices may only be appended)",
                String::from_utf8_lossy(&old)
            ))),
        }
    }

    /// Every layer with its block map: full chunk rows, then the delta rows of their
    /// generation, then format-1 rows.
    pub fn load(&self) -> Result<Loaded, MetaError> {
        let mut out = Loaded::default();
        for kv in self
            .db
            .iterator_cf(self.cf(CF_LAYERS), rocksdb::IteratorMode::Start)
        {
            let (k, v) = kv?;
            let id = u64::from_be_bytes(
                k.as_ref()
                    .try_into()
                    .map_err(|_| MetaError::Corrupt("layer key".into()))?,
            );
            let l = decode_layer(&v).ok_or_else(|| MetaError::Corrupt(format!("layer {id}")))?;
            out.layers.insert(id, l);
        }
        let chunks = self.cf(CF_CHUNKS);
        for kv in self
            .db
            .iterator_cf_opt(chunks, scan_opts(), rocksdb::IteratorMode::Start)
        {
            let (k, v) = kv?;
            let (layer, idx) = split_key(&k, "chunk")?;
            let c = Chunk::decode(&v)
                .ok_or_else(|| MetaError::Corrupt(format!("chunk {layer}/{idx}")))?;
            layer_mut(&mut out.layers, layer)?.map.insert_chunk(idx, c);
        }
        let mut touched = Vec::new();
        let deltas = self.cf(CF_DELTAS);
        for kv in self
            .db
            .iterator_cf_opt(deltas, scan_opts(), rocksdb::IteratorMode::Start)
        {
            let (k, v) = kv?;
            let (layer, idx) = split_key(&k, "delta")?;
            let slot = *k
                .get(16)
                .ok_or_else(|| MetaError::Corrupt("delta key".into()))?;
            let (gen, first, exts) = decode_delta(&v)
                .ok_or_else(|| MetaError::Corrupt(format!("delta {layer}/{idx}/{slot}")))?;
            let c = layer_mut(&mut out.layers, layer)?.map.chunk_or_default(idx);
            c.slots_used = c.slots_used.max(slot + 1);
            if gen == c.gen {
                for (j, e) in exts.iter().enumerate() {
                    c.put(first + j as u32, *e);
                }
                c.deltas = c.deltas.max(slot + 1);
            }
            touched.push((layer, idx));
        }
        for (layer, idx) in touched {
            let map = &mut layer_mut(&mut out.layers, layer)?.map;
            if let Some(c) = map.chunk(idx).filter(|c| c.is_empty()) {
                out.strays.push((layer, idx, c.slots_used));
                map.take_chunk(idx);
            }
        }
        let legacy = self.cf(CF_EXTENTS);
        for kv in self
            .db
            .iterator_cf_opt(legacy, scan_opts(), rocksdb::IteratorMode::Start)
        {
            let (k, v) = kv?;
            let (layer, block) = split_key(&k, "extent")?;
            let e = decode_extent(&v)
                .ok_or_else(|| MetaError::Corrupt(format!("extent {layer}/{block}")))?;
            layer_mut(&mut out.layers, layer)?.map.put(block, e);
            out.legacy_rows += 1;
        }
        Ok(out)
    }

    /// Rewrites a format-1 map as chunk rows: every chunk's full row, with the format-1 rows
    /// it replaces deleted in the same batch ([`LEGACY_CONVERT_CHUNKS`] chunks a batch), so
    /// a crash part way leaves each chunk in one format or the other and the next open
    /// finishes. Then records the format.
    pub fn convert_legacy(&self, tree: &Tree) -> Result<(), MetaError> {
        let (chunks, legacy) = (self.cf(CF_CHUNKS), self.cf(CF_EXTENTS));
        let mut ids: Vec<LayerId> = tree.layers.keys().copied().collect();
        ids.sort_unstable();
        let mut buf = Vec::new();
        let mut b = WriteBatch::default();
        let mut in_batch = 0usize;
        for id in ids {
            let mut seg: Option<(u64, u64)> = None;
            let flush_seg = |b: &mut WriteBatch, seg: Option<(u64, u64)>| {
                if let Some((from, to)) = seg {
                    b.delete_range_cf(
                        legacy,
                        pair_key(id, from * CHUNK_BLOCKS),
                        pair_key(id, to * CHUNK_BLOCKS),
                    );
                }
            };
            for (idx, c) in tree.layers[&id].map.chunks() {
                buf.clear();
                c.encode(&mut buf);
                b.put_cf(chunks, pair_key(id, idx), &buf);
                seg = Some((seg.map_or(idx, |s| s.0), idx + 1));
                in_batch += 1;
                if in_batch == LEGACY_CONVERT_CHUNKS {
                    flush_seg(&mut b, seg.take());
                    self.db.write_opt(std::mem::take(&mut b), &self.sync)?;
                    in_batch = 0;
                }
            }
            flush_seg(&mut b, seg);
        }
        // Anything left in format 1 names no loaded chunk (loading refused rows of missing
        // layers), so the whole family goes.
        b.delete_range_cf(legacy, [0u8; 16], [0xffu8; 16]);
        b.put_cf(self.cf(CF_META), KEY_FORMAT, FORMAT.to_le_bytes());
        self.db.write_opt(b, &self.sync)?;
        self.db
            .compact_range_cf(legacy, None::<&[u8]>, None::<&[u8]>);
        Ok(())
    }

    /// Deletes the delta rows of chunks that [`Meta::load`] found holding stale rows only (a
    /// failed write can leave them), so a chunk the tree lacks has no rows.
    pub fn drop_strays(&self, strays: &[(LayerId, u64, u8)]) -> Result<(), MetaError> {
        if strays.is_empty() {
            return Ok(());
        }
        let mut b = WriteBatch::default();
        for &(layer, idx, slots) in strays {
            for s in 0..slots {
                b.delete_cf(self.cf(CF_DELTAS), delta_key(layer, idx, s));
            }
        }
        self.db.write_opt(b, &self.sync)?;
        Ok(())
    }

    /// Writes the rows of a volume whose blocks `0..blocks` were written sequentially onto
    /// pool pages `0..blocks` (layer `layer`, made-up CRCs), then flushes them to SST files:
    /// the metadata of a large volume without writing its data, for `benches/blockstore_open.rs`.
    #[doc(hidden)]
    pub fn write_sequential_volume(
        &self,
        layer: LayerId,
        volume: Uuid,
        blocks: u64,
    ) -> Result<(), MetaError> {
        let l = Layer::new(None, Owner::Volume(volume));
        self.db
            .put_cf(self.cf(CF_LAYERS), layer.to_be_bytes(), encode_layer(&l))?;
        let mut b = WriteBatch::default();
        let mut buf = Vec::new();
        for idx in 0..blocks.div_ceil(CHUNK_BLOCKS) {
            let mut c = Chunk::default();
            for i in 0..CHUNK_BLOCKS.min(blocks - idx * CHUNK_BLOCKS) {
                let block = idx * CHUNK_BLOCKS + i;
                c.put(
                    i as u32,
                    Extent {
                        sector: block * 8,
                        len: 4096,
                        compressed: false,
                        crc: (block as u32).wrapping_mul(0x9e37_79b9),
                    },
                );
            }
            buf.clear();
            c.encode(&mut buf);
            b.put_cf(self.cf(CF_CHUNKS), pair_key(layer, idx), &buf);
            if b.len() == LEGACY_CONVERT_CHUNKS {
                self.db.write_opt(std::mem::take(&mut b), &self.nosync)?;
            }
        }
        self.db.write_opt(b, &self.nosync)?;
        self.db.flush_cf(self.cf(CF_CHUNKS))?;
        self.db.flush_cf(self.cf(CF_LAYERS))?;
        self.mark_format()
    }

    /// Adds chunk `idx` of `layer`'s full row to `batch` (`buf` is scratch).
    pub fn put_chunk(
        &self,
        batch: &mut WriteBatch,
        layer: LayerId,
        idx: u64,
        chunk: &Chunk,
        buf: &mut Vec<u8>,
    ) {
        buf.clear();
        chunk.encode(buf);
        batch.put_cf(self.cf(CF_CHUNKS), pair_key(layer, idx), &buf[..]);
    }

    /// Writes a format-2 delta row (this build only reads them): for the tests of stores
    /// written by older builds.
    #[doc(hidden)]
    #[allow(clippy::too_many_arguments)]
    pub fn put_legacy_delta(
        &self,
        layer: LayerId,
        idx: u64,
        slot: u8,
        gen: u32,
        first: u32,
        exts: &[Extent],
    ) -> Result<(), MetaError> {
        debug_assert!((slot as usize) < CHUNK_DELTA_ROWS_MAX);
        let mut v = Vec::new();
        encode_delta(gen, first, exts, &mut v);
        self.db.put_cf_opt(
            self.cf(CF_DELTAS),
            delta_key(layer, idx, slot),
            v,
            &self.sync,
        )?;
        Ok(())
    }

    /// The map journal's mark (the start, for a store without one).
    pub fn map_log_mark(&self) -> Result<Mark, MetaError> {
        match self.db.get_cf(self.cf(CF_META), KEY_MAPLOG_MARK)? {
            None => Ok(Mark::default()),
            Some(v) => {
                Mark::decode(&v).ok_or_else(|| MetaError::Corrupt("map journal mark".into()))
            }
        }
    }

    /// Adds the map journal's new mark to `batch`.
    pub fn put_mark(&self, batch: &mut WriteBatch, mark: Mark) {
        batch.put_cf(self.cf(CF_META), KEY_MAPLOG_MARK, mark.encode());
    }

    /// Adds to `batch` the change-log row of `image`'s `chunk`, changed at `ms`.
    pub fn put_change(&self, batch: &mut WriteBatch, image: Uuid, chunk: u64, ms: u64) {
        batch.put_cf(
            self.cf(CF_CHANGES),
            change_key(image, chunk),
            ms.to_le_bytes(),
        );
    }

    /// As [`Meta::put_change`], unless the row already holds a later time (a replayed
    /// journal record the row may have outlived).
    pub fn put_change_if_newer(
        &self,
        batch: &mut WriteBatch,
        image: Uuid,
        chunk: u64,
        ms: u64,
    ) -> Result<(), MetaError> {
        let now = self
            .db
            .get_cf(self.cf(CF_CHANGES), change_key(image, chunk))?
            .and_then(|v| <[u8; 8]>::try_from(&v[..]).ok())
            .map(u64::from_le_bytes);
        if now.is_none_or(|now| now < ms) {
            self.put_change(batch, image, chunk, ms);
        }
        Ok(())
    }

    /// `image`'s change-log rows (chunk, Unix ms), and the time before which rows were
    /// dropped: rows older than [`CHANGE_LOG_KEEP_MS`] before its newest are deleted.
    pub fn load_changes(&self, image: Uuid) -> Result<(Vec<(u64, u64)>, u64), MetaError> {
        let cf = self.cf(CF_CHANGES);
        let mut rows = Vec::new();
        let it = self.db.prefix_iterator_cf(cf, image.as_bytes());
        for kv in it {
            let (k, v) = kv?;
            if !k.starts_with(image.as_bytes()) {
                break;
            }
            let (Ok(chunk), Ok(ms)) = (<[u8; 8]>::try_from(&k[16..]), <[u8; 8]>::try_from(&v[..]))
            else {
                return Err(MetaError::Corrupt(format!("change-log row of {image}")));
            };
            rows.push((u64::from_be_bytes(chunk), u64::from_le_bytes(ms)));
        }
        let newest = rows.iter().map(|r| r.1).max().unwrap_or(0);
        let keep_from = newest.saturating_sub(CHANGE_LOG_KEEP_MS);
        let mut b = WriteBatch::default();
        for (chunk, _) in rows.iter().filter(|r| r.1 < keep_from) {
            b.delete_cf(cf, change_key(image, *chunk));
        }
        if !b.is_empty() {
            self.db.write_opt(b, &self.nosync)?;
        }
        rows.retain(|r| r.1 >= keep_from);
        Ok((rows, keep_from))
    }

    /// Deletes `image`'s change log.
    pub fn delete_changes(&self, image: Uuid) -> Result<(), MetaError> {
        let cf = self.cf(CF_CHANGES);
        let mut b = WriteBatch::default();
        let last = change_key(image, u64::MAX);
        b.delete_range_cf(cf, change_key(image, 0), last);
        b.delete_cf(cf, last);
        self.db.write_opt(b, &self.nosync)?;
        Ok(())
    }

    /// Writes a batch (a checkpoint's rows, change-log rows); `durable` syncs the WAL.
    pub fn write(&self, batch: WriteBatch, durable: bool) -> Result<(), MetaError> {
        let o = if durable { &self.sync } else { &self.nosync };
        self.db.write_opt(batch, o)?;
        Ok(())
    }

    /// Persists a tree mutation atomically and durably, after what `b` holds already (a
    /// checkpoint's rows). `tree` is the state after it.
    pub fn apply(&self, mut b: WriteBatch, rows: &[Row], tree: &Tree) -> Result<(), MetaError> {
        let (layers, chunks, deltas) = (self.cf(CF_LAYERS), self.cf(CF_CHUNKS), self.cf(CF_DELTAS));
        let mut buf = Vec::new();
        for r in rows {
            match *r {
                Row::Layer(id) => {
                    if let Some(l) = tree.layers.get(&id) {
                        b.put_cf(layers, id.to_be_bytes(), encode_layer(l));
                    }
                }
                Row::DropLayer(id) => {
                    b.delete_cf(layers, id.to_be_bytes());
                    b.delete_range_cf(chunks, pair_key(id, 0), pair_key(id + 1, 0));
                    b.delete_range_cf(deltas, delta_key(id, 0, 0), delta_key(id + 1, 0, 0));
                }
                Row::Chunk(id, idx) => match tree.layers.get(&id).and_then(|l| l.map.chunk(idx)) {
                    Some(c) => {
                        buf.clear();
                        c.encode(&mut buf);
                        b.put_cf(chunks, pair_key(id, idx), &buf);
                    }
                    None => {
                        debug_assert!(false, "row for chunk {id}/{idx} the tree lacks");
                        b.delete_cf(chunks, pair_key(id, idx));
                        b.delete_range_cf(deltas, delta_key(id, idx, 0), delta_key(id, idx + 1, 0));
                    }
                },
                Row::Unchunk(id, idx, slots) => {
                    b.delete_cf(chunks, pair_key(id, idx));
                    for s in 0..slots {
                        b.delete_cf(deltas, delta_key(id, idx, s));
                    }
                }
                Row::DropChunks(id, from, to) => {
                    b.delete_range_cf(chunks, pair_key(id, from), pair_key(id, to));
                    b.delete_range_cf(deltas, delta_key(id, from, 0), delta_key(id, to, 0));
                }
            }
        }
        self.db.write_opt(b, &self.sync)?;
        Ok(())
    }
}
