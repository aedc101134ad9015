//! The extent map as a tree of layers, in memory and free of I/O.
//!
//! Every volume and every snapshot is an *image*; an image names one *layer*. A layer maps
//! logical blocks to physical extents and may have a parent: a block missing from a layer is
//! looked up in its parent, then the parent's parent. A layer is an epoch of writes: taking a
//! snapshot freezes the volume's current layer (the snapshot now names it) and gives the
//! volume a fresh empty layer on top; a clone is a new layer over a snapshot's layer;
//! rollback puts a fresh empty layer over the snapshot's.
//!
//! Each physical extent belongs to exactly one (layer, block) entry, so freeing needs no
//! reference counts: a layer no image names is either freed (no children), merged into its
//! only child, or kept as a shared ancestor (two or more children).
//!
//! Every mutation returns a [`Delta`]: the metadata rows to write and the extents that became
//! free. The caller persists the rows in one atomic batch and frees the extents only after
//! that batch is durable and no reader can still hold them.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{BuildHasherDefault, Hasher};

use uuid::Uuid;

/// A layer's id (never reused).
pub type LayerId = u64;

/// A multiply-rotate hasher for the tree's maps: their keys are sequential layer ids and
/// random UUIDs, which need no flooding resistance, and every I/O looks up both (SipHash
/// showed up at the top of the read path's profile).
#[derive(Default, Clone, Copy)]
pub struct FastHasher(u64);

impl Hasher for FastHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(b));
        }
    }

    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(5) ^ v).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// A hash map keyed by layer id or image UUID.
pub type HashMap<K, V> = std::collections::HashMap<K, V, BuildHasherDefault<FastHasher>>;

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
}

/// What a layer is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    /// A volume's writable head.
    Volume(Uuid),
    /// A snapshot's frozen epoch.
    Snapshot(Uuid),
    /// No image names it: a shared ancestor of two or more layers.
    Shared,
}

/// One epoch of writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    /// The layer below, if any.
    pub parent: Option<LayerId>,
    /// Who names it.
    pub owner: Owner,
    /// Block → extent.
    pub map: BTreeMap<u64, Extent>,
    /// Layers whose parent this is (derived).
    pub children: u32,
    /// Data (non-tombstone) entries (derived).
    pub data_blocks: u64,
    /// Pool bytes its extents occupy, in whole sectors (derived).
    pub stored_bytes: u64,
}

impl Layer {
    fn new(parent: Option<LayerId>, owner: Owner) -> Layer {
        Layer {
            parent,
            owner,
            map: BTreeMap::new(),
            children: 0,
            data_blocks: 0,
            stored_bytes: 0,
        }
    }

    fn account(&mut self, e: &Extent, sign: i64) {
        if !e.is_zero() {
            self.data_blocks = self.data_blocks.wrapping_add_signed(sign);
            self.stored_bytes = self
                .stored_bytes
                .wrapping_add_signed(sign * 512 * e.sectors() as i64);
        }
    }

    fn put(&mut self, block: u64, e: Extent) -> Option<Extent> {
        self.account(&e, 1);
        let old = self.map.insert(block, e);
        if let Some(o) = &old {
            self.account(o, -1);
        }
        old
    }

    fn remove(&mut self, block: u64) -> Option<Extent> {
        let old = self.map.remove(&block);
        if let Some(o) = &old {
            self.account(o, -1);
        }
        old
    }
}

/// A metadata row change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Row {
    /// Write the layer record (parent, owner).
    Layer(LayerId),
    /// Delete the layer record and every extent row of that layer.
    DropLayer(LayerId),
    /// Write one extent row.
    Extent(LayerId, u64, Extent),
    /// Delete one extent row.
    Unmap(LayerId, u64),
    /// Delete extent rows of the layer in `[start, end)`.
    UnmapRange(LayerId, u64, u64),
}

/// The outcome of a mutation: rows to persist atomically, and extents now free.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Delta {
    /// In order.
    pub rows: Vec<Row>,
    /// Free once `rows` are durable and no reader can hold them.
    pub freed: Vec<Extent>,
}

impl Delta {
    fn free(&mut self, e: Extent) {
        if !e.is_zero() {
            self.freed.push(e);
        }
    }
}

/// Why a tree operation was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TreeError {
    /// No image with this id.
    #[error("no image {0}")]
    NoImage(Uuid),
    /// The id is taken.
    #[error("image {0} already exists")]
    Exists(Uuid),
    /// The image is a snapshot where a volume is needed, or the reverse.
    #[error("image {0} is not a {1}")]
    WrongKind(Uuid, &'static str),
    /// Diff between snapshots that are not one chain.
    #[error("snapshot {base} is not an ancestor of {target}")]
    NotSameChain {
        /// The older snapshot.
        base: Uuid,
        /// The newer one.
        target: Uuid,
    },
}

/// Every layer and which image names which.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Tree {
    /// All layers.
    pub layers: HashMap<LayerId, Layer>,
    /// Image → its layer.
    pub images: HashMap<Uuid, LayerId>,
    /// Next id to hand out (persisted through the layer rows: max + 1 on load).
    pub next_layer: LayerId,
}

impl Tree {
    /// Rebuilds derived fields (children, counters, images, next id) after loading rows.
    pub fn from_parts(layers: HashMap<LayerId, Layer>) -> Tree {
        let mut t = Tree {
            next_layer: layers.keys().max().map_or(1, |m| m + 1),
            layers,
            images: HashMap::default(),
        };
        let parents: Vec<LayerId> = t.layers.values().filter_map(|l| l.parent).collect();
        for l in t.layers.values_mut() {
            l.children = 0;
            l.data_blocks = 0;
            l.stored_bytes = 0;
            let entries: Vec<Extent> = l.map.values().copied().collect();
            for e in &entries {
                l.account(e, 1);
            }
        }
        for p in parents {
            if let Some(l) = t.layers.get_mut(&p) {
                l.children += 1;
            }
        }
        for (&id, l) in &t.layers {
            match l.owner {
                Owner::Volume(u) | Owner::Snapshot(u) => {
                    t.images.insert(u, id);
                }
                Owner::Shared => {}
            }
        }
        t
    }

    fn alloc_layer(&mut self, parent: Option<LayerId>, owner: Owner) -> LayerId {
        let id = self.next_layer;
        self.next_layer += 1;
        if let Some(p) = parent {
            if let Some(pl) = self.layers.get_mut(&p) {
                pl.children += 1;
            }
        }
        self.layers.insert(id, Layer::new(parent, owner));
        if let Owner::Volume(u) | Owner::Snapshot(u) = owner {
            self.images.insert(u, id);
        }
        id
    }

    /// The layer an image names.
    pub fn layer_of(&self, image: Uuid) -> Result<LayerId, TreeError> {
        self.images
            .get(&image)
            .copied()
            .ok_or(TreeError::NoImage(image))
    }

    fn volume_layer(&self, image: Uuid) -> Result<LayerId, TreeError> {
        let id = self.layer_of(image)?;
        match self.layers[&id].owner {
            Owner::Volume(_) => Ok(id),
            _ => Err(TreeError::WrongKind(image, "volume")),
        }
    }

    fn snapshot_layer(&self, image: Uuid) -> Result<LayerId, TreeError> {
        let id = self.layer_of(image)?;
        match self.layers[&id].owner {
            Owner::Snapshot(_) => Ok(id),
            _ => Err(TreeError::WrongKind(image, "snapshot")),
        }
    }

    /// Whether an image exists.
    pub fn contains(&self, image: Uuid) -> bool {
        self.images.contains_key(&image)
    }

    /// A new empty volume.
    pub fn create_volume(&mut self, v: Uuid) -> Result<Delta, TreeError> {
        if self.contains(v) {
            return Err(TreeError::Exists(v));
        }
        let id = self.alloc_layer(None, Owner::Volume(v));
        Ok(Delta {
            rows: vec![Row::Layer(id)],
            freed: Vec::new(),
        })
    }

    /// A new volume sharing every block of snapshot `s` until written.
    pub fn clone_volume(&mut self, s: Uuid, v: Uuid) -> Result<Delta, TreeError> {
        if self.contains(v) {
            return Err(TreeError::Exists(v));
        }
        let base = self.snapshot_layer(s)?;
        let id = self.alloc_layer(Some(base), Owner::Volume(v));
        Ok(Delta {
            rows: vec![Row::Layer(id)],
            freed: Vec::new(),
        })
    }

    /// Freezes volume `v`'s current epoch as snapshot `s`; `v` continues on a new layer.
    pub fn snapshot(&mut self, v: Uuid, s: Uuid) -> Result<Delta, TreeError> {
        if self.contains(s) {
            return Err(TreeError::Exists(s));
        }
        let head = self.volume_layer(v)?;
        self.layers.get_mut(&head).expect("head").owner = Owner::Snapshot(s);
        self.images.insert(s, head);
        let id = self.alloc_layer(Some(head), Owner::Volume(v));
        Ok(Delta {
            rows: vec![Row::Layer(head), Row::Layer(id)],
            freed: Vec::new(),
        })
    }

    /// Points volume `v` back at snapshot `s`: a new empty layer over the snapshot's.
    /// Idempotent: when `v` already is an empty layer right over `s` (the rollback ran and
    /// nothing was written since), there is nothing to do, so a repeat after a crash or a
    /// retry neither churns layers nor fails.
    pub fn rollback(&mut self, v: Uuid, s: Uuid) -> Result<Delta, TreeError> {
        let old = self.volume_layer(v)?;
        let base = self.snapshot_layer(s)?;
        let head = &self.layers[&old];
        if head.parent == Some(base) && head.map.is_empty() {
            return Ok(Delta::default());
        }
        let id = self.alloc_layer(Some(base), Owner::Volume(v));
        let mut d = Delta {
            rows: vec![Row::Layer(id)],
            freed: Vec::new(),
        };
        self.layers.get_mut(&old).expect("old head").owner = Owner::Shared;
        self.collect(old, &mut d);
        Ok(d)
    }

    /// Removes an image (volume or snapshot); blocks only it used become free.
    pub fn delete(&mut self, image: Uuid) -> Result<Delta, TreeError> {
        let id = self.layer_of(image)?;
        self.images.remove(&image);
        self.layers.get_mut(&id).expect("layer").owner = Owner::Shared;
        let mut d = Delta::default();
        self.collect(id, &mut d);
        Ok(d)
    }

    /// Frees or merges a layer nobody names, then its ancestors as they become unneeded.
    fn collect(&mut self, mut id: LayerId, d: &mut Delta) {
        loop {
            let l = &self.layers[&id];
            if l.owner != Owner::Shared {
                d.rows.push(Row::Layer(id));
                return;
            }
            match l.children {
                0 => {
                    let l = self.layers.remove(&id).expect("layer");
                    for e in l.map.values() {
                        d.free(*e);
                    }
                    d.rows.push(Row::DropLayer(id));
                    match l.parent {
                        Some(p) => {
                            self.layers.get_mut(&p).expect("parent").children -= 1;
                            id = p;
                        }
                        None => return,
                    }
                }
                // Still correct as it stands (reads look through it); `merge_step` folds it
                // into its child in bounded batches.
                1 => {
                    d.rows.push(Row::Layer(id));
                    return;
                }
                _ => {
                    d.rows.push(Row::Layer(id));
                    return;
                }
            }
        }
    }

    /// A shared layer with a single child: the next merge to do, if any.
    pub fn next_merge(&self) -> Option<LayerId> {
        self.layers
            .iter()
            .find(|(_, l)| l.owner == Owner::Shared && l.children == 1)
            .map(|(&id, _)| id)
    }

    /// Moves up to `max` entries of shared layer `id` into its only child (freeing those the
    /// child overrides); once it is empty the child takes its parent and it goes. Every step
    /// leaves a correct tree, so a crash or a write between steps changes nothing visible.
    pub fn merge_step(&mut self, id: LayerId, max: usize) -> Delta {
        let mut d = Delta::default();
        let Some(child) = self
            .layers
            .iter()
            .find(|(_, l)| l.parent == Some(id))
            .map(|(&c, _)| c)
        else {
            debug_assert!(false, "shared layer {id} counts one child but has none");
            return d;
        };
        let mut l = self.layers.remove(&id).expect("layer");
        let c = self.layers.get_mut(&child).expect("child");
        let keys: Vec<u64> = l.map.keys().take(max).copied().collect();
        for b in keys {
            let e = l.remove(b).expect("key just listed");
            d.rows.push(Row::Unmap(id, b));
            if c.map.contains_key(&b) {
                d.free(e);
            } else {
                c.put(b, e);
                d.rows.push(Row::Extent(child, b, e));
            }
        }
        if l.map.is_empty() {
            c.parent = l.parent;
            d.rows.push(Row::DropLayer(id));
            d.rows.push(Row::Layer(child));
        } else {
            self.layers.insert(id, l);
        }
        d
    }

    /// What block `b` of the layer reads as: `None` when never written (zeroes).
    pub fn resolve(&self, mut id: LayerId, b: u64) -> Option<Extent> {
        loop {
            let l = &self.layers[&id];
            if let Some(e) = l.map.get(&b) {
                return (!e.is_zero()).then_some(*e);
            }
            id = l.parent?;
        }
    }

    /// Maps block `b` of volume layer `head` to `e`; returns the extent it replaced in that
    /// same layer (now free), if any. Blocks of ancestors stay with their snapshots.
    pub fn write(&mut self, head: LayerId, b: u64, e: Extent) -> Option<Extent> {
        let l = self.layers.get_mut(&head).expect("head layer");
        l.put(b, e).filter(|o| !o.is_zero())
    }

    /// Makes blocks `[start, end)` of volume `v` read as zeroes, releasing their space.
    pub fn trim(&mut self, v: Uuid, start: u64, end: u64) -> Result<Delta, TreeError> {
        let head = self.volume_layer(v)?;
        let mut d = Delta::default();
        // Blocks an ancestor would show through need a tombstone; the rest just go.
        let mut shadowed = BTreeSet::new();
        let mut up = self.layers[&head].parent;
        while let Some(id) = up {
            let l = &self.layers[&id];
            shadowed.extend(l.map.range(start..end).map(|(&b, _)| b));
            up = l.parent;
        }
        if let Some(p) = self.layers[&head].parent {
            shadowed.retain(|&b| self.resolve(p, b).is_some());
        }
        let l = self.layers.get_mut(&head).expect("head");
        let owned: Vec<u64> = l.map.range(start..end).map(|(&b, _)| b).collect();
        for b in owned {
            if let Some(e) = l.remove(b) {
                d.free(e);
            }
        }
        d.rows.push(Row::UnmapRange(head, start, end));
        for b in shadowed {
            l.put(b, Extent::ZERO);
            d.rows.push(Row::Extent(head, b, Extent::ZERO));
        }
        Ok(d)
    }

    /// Whether volume `v` reads data (not zeroes) at any block at or past `end`.
    pub fn maps_beyond(&self, v: Uuid, end: u64) -> bool {
        let Some(&head) = self.images.get(&v) else {
            return false;
        };
        let mut at = Some(head);
        while let Some(id) = at {
            let l = &self.layers[&id];
            if l.map
                .range(end..)
                .any(|(&b, _)| self.resolve(head, b).is_some())
            {
                return true;
            }
            at = l.parent;
        }
        false
    }

    /// Blocks in `[from, to)` that differ between snapshot `base` and image `target` (every
    /// block written in the layers between them), or, without a base, every block `target`
    /// maps to data. Ascending; at most `max` of them.
    pub fn changed_blocks(
        &self,
        target: Uuid,
        base: Option<Uuid>,
        from: u64,
        to: u64,
        max: usize,
    ) -> Result<Vec<u64>, TreeError> {
        let top = self.layer_of(target)?;
        let stop = match base {
            Some(b) => {
                let stop = self.snapshot_layer(b)?;
                if !self.is_ancestor(stop, top) {
                    return Err(TreeError::NotSameChain { base: b, target });
                }
                Some(stop)
            }
            None => None,
        };
        // Page through the chain: each layer gives at most `max` keys per round, so a round
        // costs O(layers × max) whatever the volume's size; keys up to the smallest last key
        // of a cut-off layer are complete, the rest wait for the next round.
        let keep_zero = stop.is_some();
        let mut out = Vec::new();
        let mut cursor = from;
        while cursor < to {
            let mut set = BTreeSet::new();
            let mut complete_to = u64::MAX;
            let mut at = Some(top);
            while let Some(id) = at {
                if Some(id) == stop {
                    break;
                }
                let l = &self.layers[&id];
                for (n, (&b, _)) in l.map.range(cursor..to).enumerate() {
                    set.insert(b);
                    if n + 1 == max {
                        complete_to = complete_to.min(b);
                        break;
                    }
                }
                at = l.parent;
            }
            for &b in set.range(..=complete_to) {
                if keep_zero || self.resolve(top, b).is_some() {
                    out.push(b);
                    if out.len() == max {
                        return Ok(out);
                    }
                }
            }
            match complete_to {
                u64::MAX => break,
                last => cursor = last + 1,
            }
        }
        Ok(out)
    }

    /// Whether `a` is a strict ancestor of `b`.
    pub fn is_ancestor(&self, a: LayerId, b: LayerId) -> bool {
        let mut at = self.layers[&b].parent;
        while let Some(id) = at {
            if id == a {
                return true;
            }
            at = self.layers[&id].parent;
        }
        false
    }

    /// Every extent the tree references (to rebuild the allocator).
    pub fn extents(&self) -> impl Iterator<Item = &Extent> {
        self.layers
            .values()
            .flat_map(|l| l.map.values())
            .filter(|e| !e.is_zero())
    }

    /// Usage of one image's view: (data blocks visible, stored bytes it owns, stored bytes
    /// of every layer it reads through, logical bytes of those layers).
    pub fn usage(&self, image: Uuid) -> Result<Usage, TreeError> {
        let top = self.layer_of(image)?;
        let head = &self.layers[&top];
        let mut u = Usage {
            owned_bytes: head.stored_bytes,
            owned_logical_bytes: head.data_blocks * 4096,
            ..Usage::default()
        };
        if head.parent.is_none() {
            u.visible_blocks = head.data_blocks;
            u.referenced_bytes = head.stored_bytes;
            u.referenced_logical_bytes = u.owned_logical_bytes;
            return Ok(u);
        }
        let mut seen: BTreeMap<u64, bool> = BTreeMap::new();
        let mut at = Some(top);
        while let Some(id) = at {
            let l = &self.layers[&id];
            u.referenced_bytes += l.stored_bytes;
            u.referenced_logical_bytes += l.data_blocks * 4096;
            for (&b, e) in &l.map {
                seen.entry(b).or_insert(!e.is_zero());
            }
            at = l.parent;
        }
        u.visible_blocks = seen.values().filter(|&&d| d).count() as u64;
        Ok(u)
    }
}

/// Space accounting of one image.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// Blocks that read as data.
    pub visible_blocks: u64,
    /// Pool bytes of its own layer.
    pub owned_bytes: u64,
    /// Logical bytes of its own layer's data blocks.
    pub owned_logical_bytes: u64,
    /// Pool bytes of every layer it reads through.
    pub referenced_bytes: u64,
    /// Logical bytes of every layer it reads through.
    pub referenced_logical_bytes: u64,
}
