//! The map journal: host writes' new mappings, appended to a file (one `write` per loop pass,
//! synced by FUA and Flush) instead of being written to RocksDB row by row, and checkpointed
//! into RocksDB as whole chunk rows now and then ([`crate::blockstore::BlockStore`]).
//!
//! Files `maplog/<gen>` (16 hex digits) in the metadata directory, written in order. Each
//! record is one loop pass's mappings:
//!
//! ```text
//! len u32 | crc u32 (CRC32C of seq and entries) | seq u64 | entries (len bytes)
//! entry: 1 | layer u64 | first block u64 | n u32 | n extents (15 bytes each)
//!        2 | image uuid (16) | change-log chunk u64 | Unix ms u64
//! ```
//!
//! Every entry sets absolute state (these blocks map to these extents; this change-log row
//! holds this time), so replaying a record over a state that already holds it, or part of
//! it, changes nothing; replaying every record after a point, in order, over the rows as of
//! that point gives the state the records left.
//!
//! RocksDB's `meta` family records the *mark*: (file, offset) from which records are not
//! yet in the chunk rows. A checkpoint notes the journal's end, takes the set of chunks the
//! journal changed since the last mark ([`MapLog::take_dirty`]), writes their current rows,
//! then (synced) the noted end as the new mark; a tree operation does all of that inside its
//! own batch, under the tree lock, so no record from before an operation is ever replayed
//! over it. At open, records from the mark on are replayed; a record that does not check
//! (a torn tail) ends its file.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use uuid::Uuid;

use crate::blockstore::map::CHUNK_BLOCKS;
use crate::blockstore::meta::{decode_extent, encode_extent, MetaError};
use crate::blockstore::tree::{Extent, HashMap, LayerId};
use crate::limits::{MAP_LOG_DIRTY_CHUNKS, MAP_LOG_FILE_BYTES, MAP_LOG_RECORD_BYTES};

/// The journal's directory inside the metadata directory.
pub const DIR: &str = "maplog";

const HEADER: usize = 16;
const WRITE: u8 = 1;
const CHANGE: u8 = 2;
const WRITE_HEAD: usize = 1 + 8 + 8 + 4;
const CHANGE_LEN: usize = 1 + 16 + 8 + 8;
const EXTENT: usize = 15;

/// Where replay starts: records of files before `gen`, and of file `gen` before `offset`,
/// are in the chunk rows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Mark {
    /// File.
    pub gen: u64,
    /// Byte offset in it.
    pub offset: u64,
}

impl Mark {
    /// Its `meta` row value.
    pub fn encode(&self) -> [u8; 16] {
        let mut v = [0u8; 16];
        v[..8].copy_from_slice(&self.gen.to_le_bytes());
        v[8..].copy_from_slice(&self.offset.to_le_bytes());
        v
    }

    /// From its `meta` row value.
    pub fn decode(v: &[u8]) -> Option<Mark> {
        Some(Mark {
            gen: u64::from_le_bytes(v.get(..8)?.try_into().ok()?),
            offset: u64::from_le_bytes(v.get(8..16)?.try_into().ok()?),
        })
    }
}

/// One replayed entry.
#[derive(Debug, PartialEq)]
pub enum Entry<'a> {
    /// Blocks `[first, first + exts.len())` of `layer` map to `exts`.
    Write {
        /// Layer.
        layer: LayerId,
        /// First block.
        first: u64,
        /// Their extents.
        exts: &'a [Extent],
    },
    /// `image`'s change-log row for `chunk` holds `ms`.
    Change {
        /// Image.
        image: Uuid,
        /// Change-log chunk.
        chunk: u64,
        /// Unix ms.
        ms: u64,
    },
}

/// What a replay found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Replayed {
    /// Records applied.
    pub records: u64,
    /// Files whose tail did not check (torn by a crash before it was synced).
    pub torn: u64,
}

/// The chunks the journal changed since the last mark: a bitmap per layer, indexed by chunk
/// number. Every host write marks its chunks; a bit of a bitmap a write keeps touching
/// stays in cache (a 1 GiB volume's is 512 bytes), where a hash set's probe missed it on
/// nearly every random write (4 % of a write's CPU). A layer's bitmap reaches its highest
/// changed chunk: at most 512 KiB per TiB of address space, and only until the next
/// checkpoint takes it (a checkpoint is due after [`MAP_LOG_DIRTY_CHUNKS`] chunks).
#[derive(Debug, Default)]
pub struct Dirty {
    layers: HashMap<LayerId, Vec<u64>>,
    count: usize,
}

impl Dirty {
    /// Marks chunk `idx` of `layer`; true if it was not marked yet.
    pub fn insert(&mut self, layer: LayerId, idx: u64) -> bool {
        let words = self.layers.entry(layer).or_default();
        let (w, bit) = ((idx / 64) as usize, 1u64 << (idx % 64));
        if words.len() <= w {
            words.resize(w + 1, 0);
        }
        let fresh = words[w] & bit == 0;
        words[w] |= bit;
        self.count += fresh as usize;
        fresh
    }

    /// Chunks marked.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether no chunk is marked.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Marks every chunk `other` marks.
    pub fn extend(&mut self, other: Dirty) {
        for (layer, idx) in other.iter() {
            self.insert(layer, idx);
        }
    }

    /// The marked chunks as (layer, chunk), in that order.
    pub fn iter(&self) -> impl Iterator<Item = (LayerId, u64)> + '_ {
        let mut layers: Vec<LayerId> = self.layers.keys().copied().collect();
        layers.sort_unstable();
        layers.into_iter().flat_map(move |layer| {
            self.layers[&layer]
                .iter()
                .enumerate()
                .flat_map(move |(w, &word)| {
                    let mut bits = word;
                    std::iter::from_fn(move || {
                        (bits != 0).then(|| {
                            let b = bits.trailing_zeros() as u64;
                            bits &= bits - 1;
                            (layer, w as u64 * 64 + b)
                        })
                    })
                })
        })
    }
}

/// The journal, used under the block store's tree write lock (which orders its records
/// with the tree's changes) and its own mutex.
pub struct MapLog {
    dir: PathBuf,
    /// Files not yet wholly behind the mark, oldest first; the last is appended to.
    files: Vec<(u64, Arc<File>)>,
    /// Bytes in the last file.
    end: u64,
    /// Bytes appended since the mark.
    since_mark: u64,
    seq: u64,
    /// The record being built: header space, then entries.
    rec: Vec<u8>,
    dirty: Dirty,
}

impl std::fmt::Debug for MapLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MapLog")
            .field("dir", &self.dir)
            .field("gen", &self.gen())
            .field("end", &self.end)
            .field("dirty", &self.dirty.len())
            .finish()
    }
}

fn file_name(gen: u64) -> String {
    format!("{gen:016x}")
}

fn io_err(what: &'static str, e: std::io::Error) -> MetaError {
    MetaError::Journal(what, e)
}

/// The journal's files in `dir`, by generation.
fn list(dir: &Path) -> Result<Vec<u64>, MetaError> {
    let mut gens = Vec::new();
    for e in std::fs::read_dir(dir).map_err(|e| io_err("listing", e))? {
        let e = e.map_err(|e| io_err("listing", e))?;
        let name = e.file_name();
        match name.to_str().and_then(|n| u64::from_str_radix(n, 16).ok()) {
            Some(g) if name.len() == 16 => gens.push(g),
            _ => tracing::warn!(file = ?e.path(), "map journal: ignoring a stray file"),
        }
    }
    gens.sort_unstable();
    Ok(gens)
}

fn sync_dir(dir: &Path) -> Result<(), MetaError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_err("syncing its directory", e))
}

/// Decodes a record's entries into `f`; false if they do not parse.
fn entries(mut b: &[u8], f: &mut impl FnMut(Entry<'_>), exts: &mut Vec<Extent>) -> bool {
    while let Some(&kind) = b.first() {
        match kind {
            WRITE if b.len() >= WRITE_HEAD => {
                let layer = u64::from_le_bytes(b[1..9].try_into().expect("8 bytes"));
                let first = u64::from_le_bytes(b[9..17].try_into().expect("8 bytes"));
                let n = u32::from_le_bytes(b[17..21].try_into().expect("4 bytes")) as usize;
                let Some(body) = b.get(WRITE_HEAD..WRITE_HEAD + n * EXTENT) else {
                    return false;
                };
                exts.clear();
                for e in body.chunks_exact(EXTENT) {
                    match decode_extent(e) {
                        Some(e) => exts.push(e),
                        None => return false,
                    }
                }
                f(Entry::Write { layer, first, exts });
                b = &b[WRITE_HEAD + n * EXTENT..];
            }
            CHANGE if b.len() >= CHANGE_LEN => {
                let image = Uuid::from_slice(&b[1..17]).expect("16 bytes");
                let chunk = u64::from_le_bytes(b[17..25].try_into().expect("8 bytes"));
                let ms = u64::from_le_bytes(b[25..33].try_into().expect("8 bytes"));
                f(Entry::Change { image, chunk, ms });
                b = &b[CHANGE_LEN..];
            }
            _ => return false,
        }
    }
    true
}

impl MapLog {
    /// Opens the journal in `meta_dir`, replaying into `f` every record from `mark` on, in
    /// order, then starts a new file after the last one. Files wholly before the mark are
    /// deleted; the caller writes a mark at [`MapLog::end_mark`] once what was replayed is
    /// in the chunk rows, and then calls [`MapLog::forget_before`].
    pub fn open(
        meta_dir: &Path,
        mark: Mark,
        mut f: impl FnMut(Entry<'_>),
    ) -> Result<(MapLog, Replayed), MetaError> {
        let dir = meta_dir.join(DIR);
        std::fs::create_dir_all(&dir).map_err(|e| io_err("creating its directory", e))?;
        let mut out = Replayed::default();
        let mut exts = Vec::new();
        let mut last = mark.gen;
        let mut seq = 0u64;
        let mut kept = Vec::new();
        for gen in list(&dir)? {
            let path = dir.join(file_name(gen));
            if gen < mark.gen {
                std::fs::remove_file(&path).map_err(|e| io_err("deleting a replayed file", e))?;
                continue;
            }
            last = last.max(gen);
            let mut data = Vec::new();
            File::open(&path)
                .and_then(|mut fl| fl.read_to_end(&mut data))
                .map_err(|e| io_err("reading", e))?;
            let mut at = if gen == mark.gen {
                mark.offset as usize
            } else {
                0
            };
            let mut prev: Option<u64> = None;
            while at < data.len() {
                let Some(h) = data.get(at..at + HEADER) else {
                    break;
                };
                let len = u32::from_le_bytes(h[..4].try_into().expect("4 bytes")) as usize;
                let crc = u32::from_le_bytes(h[4..8].try_into().expect("4 bytes"));
                let s = u64::from_le_bytes(h[8..16].try_into().expect("8 bytes"));
                let Some(body) = data.get(at + 8..at + HEADER + len) else {
                    break;
                };
                if len > MAP_LOG_RECORD_BYTES
                    || crc32c::crc32c(body) != crc
                    || prev.is_some_and(|p| s != p + 1)
                {
                    break;
                }
                // Parse first, apply after: a record is applied whole or not at all.
                if !entries(&body[8..], &mut |_| {}, &mut exts) {
                    break;
                }
                entries(&body[8..], &mut f, &mut exts);
                prev = Some(s);
                seq = seq.max(s);
                out.records += 1;
                at += HEADER + len;
            }
            if at < data.len() {
                out.torn += 1;
                tracing::warn!(
                    file = %path.display(),
                    offset = at,
                    bytes = data.len() - at,
                    "map journal: a record that does not check ends this file (torn by a crash)"
                );
            }
            kept.push(gen);
        }
        let gen = last + 1;
        let file = Self::create(&dir, gen)?;
        let mut files: Vec<(u64, Arc<File>)> = Vec::new();
        for g in kept {
            let fl = File::open(dir.join(file_name(g))).map_err(|e| io_err("reopening", e))?;
            files.push((g, Arc::new(fl)));
        }
        files.push((gen, Arc::new(file)));
        let log = MapLog {
            dir,
            files,
            end: 0,
            since_mark: 0,
            seq,
            rec: Vec::with_capacity(64 << 10),
            dirty: Dirty::default(),
        };
        Ok((log, out))
    }

    fn create(dir: &Path, gen: u64) -> Result<File, MetaError> {
        let f = File::options()
            .create_new(true)
            .append(true)
            .open(dir.join(file_name(gen)))
            .map_err(|e| io_err("creating a file", e))?;
        sync_dir(dir)?;
        Ok(f)
    }

    /// The file appended to.
    pub fn gen(&self) -> u64 {
        self.files.last().map_or(0, |f| f.0)
    }

    /// The journal's end: a mark there covers every record so far.
    pub fn end_mark(&self) -> Mark {
        Mark {
            gen: self.gen(),
            offset: self.end,
        }
    }

    /// Marks the chunks of blocks `[first, first + n)` of `layer` changed (a replayed write;
    /// [`MapLog::add_write`] does it itself).
    pub fn touch(&mut self, layer: LayerId, first: u64, n: u64) {
        if n == 0 {
            return;
        }
        for idx in first / CHUNK_BLOCKS..=(first + n - 1) / CHUNK_BLOCKS {
            self.dirty.insert(layer, idx);
        }
    }

    /// Adds to the pending record: blocks `[first, first + exts.len())` of `layer` map to
    /// `exts`.
    pub fn add_write(&mut self, layer: LayerId, first: u64, exts: &[Extent]) {
        if self.rec.is_empty() {
            self.rec.resize(HEADER, 0);
        }
        self.rec.push(WRITE);
        self.rec.extend_from_slice(&layer.to_le_bytes());
        self.rec.extend_from_slice(&first.to_le_bytes());
        self.rec
            .extend_from_slice(&(exts.len() as u32).to_le_bytes());
        for e in exts {
            self.rec.extend_from_slice(&encode_extent(e));
        }
        self.touch(layer, first, exts.len() as u64);
    }

    /// Adds to the pending record: `image`'s change-log row for `chunk` holds `ms`.
    pub fn add_change(&mut self, image: Uuid, chunk: u64, ms: u64) {
        if self.rec.is_empty() {
            self.rec.resize(HEADER, 0);
        }
        self.rec.push(CHANGE);
        self.rec.extend_from_slice(image.as_bytes());
        self.rec.extend_from_slice(&chunk.to_le_bytes());
        self.rec.extend_from_slice(&ms.to_le_bytes());
    }

    /// Appends the pending record (one `write`), returning the file to sync for it; None if
    /// nothing was added. The record is dropped either way.
    pub fn commit(&mut self) -> Result<Option<Arc<File>>, MetaError> {
        if self.rec.is_empty() {
            return Ok(None);
        }
        let len = self.rec.len() - HEADER;
        self.seq += 1;
        self.rec[8..16].copy_from_slice(&self.seq.to_le_bytes());
        let crc = crc32c::crc32c(&self.rec[8..]);
        self.rec[..4].copy_from_slice(&(len as u32).to_le_bytes());
        self.rec[4..8].copy_from_slice(&crc.to_le_bytes());
        let (_, file) = self.files.last().expect("a file to append to");
        let r = (&**file).write_all(&self.rec);
        let total = self.rec.len() as u64;
        self.rec.clear();
        match r {
            Ok(()) => {
                self.end += total;
                self.since_mark += total;
                Ok(Some(file.clone()))
            }
            Err(e) => {
                // Whatever part reached the file will not check: cut it, so the records
                // after it still replay.
                let _ = file.set_len(self.end);
                self.seq -= 1;
                Err(io_err("appending", e))
            }
        }
    }

    /// Every file with records after the mark: a Flush syncs them all.
    pub fn live_files(&self) -> Vec<Arc<File>> {
        self.files.iter().map(|f| f.1.clone()).collect()
    }

    /// Chunks changed since the mark, to checkpoint (the set starts afresh).
    pub fn take_dirty(&mut self) -> Dirty {
        self.since_mark = 0;
        std::mem::take(&mut self.dirty)
    }

    /// Puts back chunks a failed checkpoint did not write.
    pub fn restore_dirty(&mut self, d: Dirty) {
        self.dirty.extend(d);
    }

    /// Whether a checkpoint is due: many chunks changed, or much was appended.
    pub fn wants_checkpoint(&self) -> bool {
        self.dirty.len() >= MAP_LOG_DIRTY_CHUNKS
            || self.since_mark >= MAP_LOG_FILE_BYTES
            || self.end >= MAP_LOG_FILE_BYTES
    }

    /// Whether checkpoints fall far behind (the writer then runs one itself).
    pub fn overdue(&self) -> bool {
        self.dirty.len() >= 4 * MAP_LOG_DIRTY_CHUNKS || self.since_mark >= 4 * MAP_LOG_FILE_BYTES
    }

    /// Whether the file appended to is full: a checkpoint starts a new one.
    pub fn file_full(&self) -> bool {
        self.end >= MAP_LOG_FILE_BYTES
    }

    /// Creates the file after the current one, to switch to with [`MapLog::switch`] (the
    /// creation and its directory sync happen outside the tree lock).
    pub fn prepare_next(&self) -> Result<(u64, File), MetaError> {
        let gen = self.gen() + 1;
        Ok((gen, Self::create(&self.dir, gen)?))
    }

    /// Appends to `next` from now on.
    pub fn switch(&mut self, next: (u64, File)) {
        debug_assert_eq!(next.0, self.gen() + 1);
        self.files.push((next.0, Arc::new(next.1)));
        self.end = 0;
    }

    /// Deletes the files wholly before `mark` (now durable in RocksDB).
    pub fn forget_before(&mut self, mark: Mark) {
        while self.files.len() > 1 && self.files[0].0 < mark.gen {
            let (gen, _) = self.files.remove(0);
            if let Err(e) = std::fs::remove_file(self.dir.join(file_name(gen))) {
                tracing::warn!("map journal: deleting checkpointed file {gen}: {e}");
            }
        }
    }
}

/// Reads file `gen` of the journal in `meta_dir` whole (tests).
#[cfg(test)]
pub fn read_file(meta_dir: &Path, gen: u64) -> std::io::Result<Vec<u8>> {
    std::fs::read(meta_dir.join(DIR).join(file_name(gen)))
}

/// The journal's file names in `meta_dir` (tests).
#[cfg(test)]
pub fn files(meta_dir: &Path) -> Vec<u64> {
    list(&meta_dir.join(DIR)).unwrap_or_default()
}

#[cfg(test)]
mod tests;
