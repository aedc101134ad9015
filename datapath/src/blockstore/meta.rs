//! The extent map on RocksDB: the block store's own database (not the control plane's
//! journal), with column families `layers` (id → parent, owner), `extents` ((layer, block)
//! → extent) and `meta` (the device list the pool was formatted with).
//!
//! Writes of host data go with the WAL unsynced (an NVMe write without FUA is volatile until
//! Flush); FUA, Flush and every tree operation (snapshot, clone, rollback, delete) sync it.

use std::path::Path;

use rocksdb::{ColumnFamilyDescriptor, Options, WriteBatch, WriteOptions, DB};
use uuid::Uuid;

use crate::blockstore::tree::{Extent, HashMap, Layer, LayerId, Owner, Row, Tree};

const CF_LAYERS: &str = "layers";
const CF_EXTENTS: &str = "extents";
const CF_META: &str = "meta";
const KEY_DEVICES: &[u8] = b"devices";

/// Why the metadata store failed.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    /// RocksDB said no.
    #[error("block store metadata: {0}")]
    Db(#[from] rocksdb::Error),
    /// A row that does not decode.
    #[error("block store metadata is corrupt: {0}")]
    Corrupt(String),
}

/// The metadata database.
pub struct Meta {
    db: DB,
    sync: WriteOptions,
    nosync: WriteOptions,
}

impl std::fmt::Debug for Meta {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Meta")
            .field("path", &self.db.path())
            .finish()
    }
}

fn extent_key(layer: LayerId, block: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&layer.to_be_bytes());
    k[8..].copy_from_slice(&block.to_be_bytes());
    k
}

fn encode_extent(e: &Extent) -> [u8; 15] {
    let mut v = [0u8; 15];
    v[..8].copy_from_slice(&e.sector.to_le_bytes());
    v[8..10].copy_from_slice(&e.len.to_le_bytes());
    v[10] = e.compressed as u8;
    v[11..].copy_from_slice(&e.crc.to_le_bytes());
    v
}

fn decode_extent(v: &[u8]) -> Option<Extent> {
    if v.len() != 15 {
        return None;
    }
    Some(Extent {
        sector: u64::from_le_bytes(v[..8].try_into().ok()?),
        len: u16::from_le_bytes(v[8..10].try_into().ok()?),
        compressed: v[10] != 0,
        crc: u32::from_le_bytes(v[11..].try_into().ok()?),
    })
}

fn encode_layer(l: &Layer) -> [u8; 25] {
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
    Some(Layer {
        parent: (parent != 0).then_some(parent),
        owner,
        map: Default::default(),
        children: 0,
        data_blocks: 0,
        stored_bytes: 0,
    })
}

impl Meta {
    /// Opens (creating) the database in `dir`.
    pub fn open(dir: &Path) -> Result<Meta, MetaError> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_max_background_jobs(2);
        // Every write already happens under the block store's tree lock, and the vector
        // memtable below needs single-writer inserts.
        opts.set_allow_concurrent_memtable_write(false);
        // Extent rows are written one per host write and only ever read back whole (at open):
        // an append-only vector memtable makes the insert O(1) instead of a skip-list insert
        // (measured: half of the write path's CPU went to RocksDB, most of it there).
        let mut extents = Options::default();
        extents.set_memtable_factory(rocksdb::MemtableFactory::Vector);
        let cfs = [
            ColumnFamilyDescriptor::new(CF_LAYERS, Options::default()),
            ColumnFamilyDescriptor::new(CF_EXTENTS, extents),
            ColumnFamilyDescriptor::new(CF_META, Options::default()),
        ];
        let db = DB::open_cf_descriptors(&opts, dir, cfs)?;
        let mut sync = WriteOptions::default();
        sync.set_sync(true);
        Ok(Meta {
            db,
            sync,
            nosync: WriteOptions::default(),
        })
    }

    fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        self.db
            .cf_handle(name)
            .expect("column family created at open")
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

    /// Every layer with its extents.
    pub fn load(&self) -> Result<HashMap<LayerId, Layer>, MetaError> {
        let mut layers = HashMap::default();
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
            layers.insert(id, l);
        }
        for kv in self
            .db
            .iterator_cf(self.cf(CF_EXTENTS), rocksdb::IteratorMode::Start)
        {
            let (k, v) = kv?;
            if k.len() != 16 {
                return Err(MetaError::Corrupt("extent key".into()));
            }
            let layer = u64::from_be_bytes(k[..8].try_into().expect("8 bytes"));
            let block = u64::from_be_bytes(k[8..].try_into().expect("8 bytes"));
            let e = decode_extent(&v)
                .ok_or_else(|| MetaError::Corrupt(format!("extent {layer}/{block}")))?;
            let l = layers
                .get_mut(&layer)
                .ok_or_else(|| MetaError::Corrupt(format!("extent of missing layer {layer}")))?;
            l.map.insert(block, e);
        }
        Ok(layers)
    }

    /// Adds one extent row to `batch`.
    pub fn put_extent(&self, batch: &mut WriteBatch, layer: LayerId, block: u64, e: &Extent) {
        batch.put_cf(
            self.cf(CF_EXTENTS),
            extent_key(layer, block),
            encode_extent(e),
        );
    }

    /// Writes a batch of host-data rows; `durable` syncs the WAL first.
    pub fn write(&self, batch: WriteBatch, durable: bool) -> Result<(), MetaError> {
        let o = if durable { &self.sync } else { &self.nosync };
        self.db.write_opt(batch, o)?;
        Ok(())
    }

    /// Makes every earlier write durable.
    pub fn sync(&self) -> Result<(), MetaError> {
        self.db.flush_wal(true)?;
        Ok(())
    }

    /// Persists a tree mutation atomically and durably. `tree` is the state after it.
    pub fn apply(&self, rows: &[Row], tree: &Tree) -> Result<(), MetaError> {
        let mut b = WriteBatch::default();
        let (layers, extents) = (self.cf(CF_LAYERS), self.cf(CF_EXTENTS));
        for r in rows {
            match *r {
                Row::Layer(id) => {
                    if let Some(l) = tree.layers.get(&id) {
                        b.put_cf(layers, id.to_be_bytes(), encode_layer(l));
                    }
                }
                Row::DropLayer(id) => {
                    b.delete_cf(layers, id.to_be_bytes());
                    b.delete_range_cf(extents, extent_key(id, 0), extent_key(id + 1, 0));
                }
                Row::Extent(id, block, e) => {
                    b.put_cf(extents, extent_key(id, block), encode_extent(&e))
                }
                Row::Unmap(id, block) => b.delete_cf(extents, extent_key(id, block)),
                Row::UnmapRange(id, s, e) => {
                    b.delete_range_cf(extents, extent_key(id, s), extent_key(id, e))
                }
            }
        }
        self.db.write_opt(b, &self.sync)?;
        Ok(())
    }
}
