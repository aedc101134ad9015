//! The extent map as a tree of layers, in memory and free of I/O.
//!
//! Every volume and every snapshot is an *image*; an image names one *layer*. A layer maps
//! logical blocks to physical extents ([`BlockMap`]: chunks of 64 blocks) and may have a
//! parent: a block missing from a layer is looked up in its parent, then the parent's parent.
//! A layer is an epoch of writes: taking a snapshot freezes the volume's current layer (the
//! snapshot now names it) and gives the volume a fresh empty layer on top; a clone is a new
//! layer over a snapshot's layer; rollback puts a fresh empty layer over the snapshot's.
//!
//! Each physical extent belongs to exactly one (layer, block) entry, so freeing needs no
//! reference counts: a layer no image names is either freed (no children), merged into its
//! only child, or kept as a shared ancestor (two or more children).
//!
//! Every mutation returns a [`Delta`]: the metadata rows to write and the space that became
//! free. The caller persists the rows in one atomic batch and frees the space only after
//! that batch is durable and no reader can still hold it. Host writes go through
//! [`Tree::write`] instead, which hands each chunk's row to the caller's batch as it goes.

use std::collections::BTreeSet;
use std::hash::{BuildHasherDefault, Hasher};

use uuid::Uuid;

use crate::blockstore::map::{mask, BlockMap, Chunk, CHUNK_BLOCKS};
pub use crate::blockstore::map::{Extent, Span, Spans};

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
    pub map: BlockMap,
    /// Layers whose parent this is (derived).
    pub children: u32,
    /// Data (non-tombstone) entries (derived).
    pub data_blocks: u64,
    /// Pool bytes its extents occupy, in whole sectors (derived).
    pub stored_bytes: u64,
}

impl Layer {
    /// An empty layer.
    pub fn new(parent: Option<LayerId>, owner: Owner) -> Layer {
        Layer {
            parent,
            owner,
            map: BlockMap::default(),
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

    fn account_chunk(&mut self, c: &Chunk, sign: i64) {
        self.data_blocks = self
            .data_blocks
            .wrapping_add_signed(sign * c.data_count() as i64);
        self.stored_bytes = self
            .stored_bytes
            .wrapping_add_signed(sign * 512 * c.stored_sectors() as i64);
    }
}

/// A metadata row change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Row {
    /// Write the layer record (parent, owner).
    Layer(LayerId),
    /// Delete the layer record and every chunk and delta row of that layer.
    DropLayer(LayerId),
    /// Write chunk `.1`'s full row from the tree (whose generation was just bumped, so its
    /// delta rows on disk are stale).
    Chunk(LayerId, u64),
    /// Delete chunk `.1`'s row and its delta rows in slots `0...2` (it left the layer).
    Unchunk(LayerId, u64, u8),
    /// Delete the rows of chunks `[.1, .2)`, delta rows included.
    DropChunks(LayerId, u64, u64),
}

/// The outcome of a mutation: rows to persist atomically, and space now free.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Delta {
    /// In order.
    pub rows: Vec<Row>,
    /// Free once `rows` are durable and no reader can hold them.
    pub freed: Spans,
    /// Images whose layer changed (their [`crate::blockstore::Image`] handles follow).
    pub images: Vec<Uuid>,
}

impl Delta {
    fn free(&mut self, e: &Extent) {
        if !e.is_zero() {
            self.freed.push(e.span());
        }
    }

    fn free_chunk(&mut self, c: &Chunk) {
        c.spans(&mut self.freed);
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

/// Starts a new generation of a chunk's full row: delta rows written so far become stale.
pub(crate) fn consolidate(c: &mut Chunk) {
    c.gen = c.gen.wrapping_add(1);
    c.deltas = 0;
}

/// Bits set in `m`, lowest first.
fn bits(mut m: u64) -> impl Iterator<Item = u32> {
    std::iter::from_fn(move || {
        (m != 0).then(|| {
            let i = m.trailing_zeros();
            m &= m - 1;
            i
        })
    })
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
            let (mut blocks, mut sectors) = (0u64, 0u64);
            for (_, c) in l.map.chunks() {
                blocks += c.data_count() as u64;
                sectors += c.stored_sectors();
            }
            l.data_blocks = blocks;
            l.stored_bytes = sectors * 512;
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

    /// The snapshots it holds.
    pub fn snapshots(&self) -> Vec<Uuid> {
        self.layers
            .values()
            .filter_map(|l| match l.owner {
                Owner::Snapshot(s) => Some(s),
                _ => None,
            })
            .collect()
    }

    /// A new empty volume.
    pub fn create_volume(&mut self, v: Uuid) -> Result<Delta, TreeError> {
        if self.contains(v) {
            return Err(TreeError::Exists(v));
        }
        let id = self.alloc_layer(None, Owner::Volume(v));
        Ok(Delta {
            rows: vec![Row::Layer(id)],
            images: vec![v],
            ..Delta::default()
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
            images: vec![v],
            ..Delta::default()
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
            images: vec![v, s],
            ..Delta::default()
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
            images: vec![v],
            ..Delta::default()
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
        let mut d = Delta {
            images: vec![image],
            ..Delta::default()
        };
        self.collect(id, &mut d);
        Ok(d)
    }

    /// Frees or merges a layer nobody names, then its ancestors as they become unneeded.
    fn collect(&mut self, mut id: LayerId, d: &mut Delta) {
        loop {
            let l = &self.layers[&id];
            if l.owner != Owner::Shared || l.children > 0 {
                // Named, or still read through: with one child, `merge_step` folds it into
                // that child in bounded batches; with two or more it stays shared.
                d.rows.push(Row::Layer(id));
                return;
            }
            let l = self.layers.remove(&id).expect("layer");
            for (_, c) in l.map.chunks() {
                d.free_chunk(c);
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
    }

    /// A shared layer with a single child: the next merge to do, if any.
    pub fn next_merge(&self) -> Option<LayerId> {
        self.layers
            .iter()
            .find(|(_, l)| l.owner == Owner::Shared && l.children == 1)
            .map(|(&id, _)| id)
    }

    /// Moves whole chunks of shared layer `id` (at least one, about `max` entries) into its
    /// only child (freeing the blocks the child overrides); once it is empty the child takes
    /// its parent and it goes. Every step leaves a correct tree, so a crash or a write
    /// between steps changes nothing visible.
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
        let mut moved = 0usize;
        while moved < max.max(1) {
            let Some(ci) = l.map.first_chunk() else { break };
            let mut pc = l.map.take_chunk(ci).expect("first chunk");
            l.account_chunk(&pc, -1);
            moved += pc.len() as usize;
            d.rows.push(Row::Unchunk(id, ci, pc.slots_used));
            match c.map.chunk_mut(ci) {
                None => {
                    // The child has no rows for this chunk: it starts fresh there.
                    (pc.gen, pc.deltas, pc.slots_used) = (0, 0, 0);
                    consolidate(&mut pc);
                    c.account_chunk(&pc, 1);
                    c.map.insert_chunk(ci, pc);
                }
                Some(cc) => {
                    let (mut blocks, mut sectors) = (0u64, 0u64);
                    for (i, e) in pc.entries() {
                        if cc.get(i).is_some() {
                            d.free(&e);
                        } else {
                            cc.put(i, e);
                            if !e.is_zero() {
                                blocks += 1;
                                sectors += e.sectors() as u64;
                            }
                        }
                    }
                    consolidate(cc);
                    c.data_blocks += blocks;
                    c.stored_bytes += sectors * 512;
                }
            }
            d.rows.push(Row::Chunk(child, ci));
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
            if let Some(e) = l.map.get(b) {
                return (!e.is_zero()).then_some(e);
            }
            id = l.parent?;
        }
    }

    /// Starts loading what [`Tree::resolve_range`] will read first for block `b` of layer
    /// `head`: its chunk (`stage` 0), then the block's entry in it (`stage` 1, once the chunk
    /// has arrived). Only the head layer: most reads end there.
    pub fn prefetch(&self, head: LayerId, b: u64, stage: u8) {
        let Some(c) = self
            .layers
            .get(&head)
            .and_then(|l| l.map.chunk(b / CHUNK_BLOCKS))
        else {
            return;
        };
        match stage {
            0 => crate::blockstore::prefetch(std::ptr::from_ref(c).cast()),
            _ => c.prefetch_entry((b % CHUNK_BLOCKS) as u32),
        }
    }

    /// [`Tree::resolve`] for blocks `first..first + out.len()`: one chunk lookup per layer
    /// per chunk the range touches, not per block. `None` if the layer is gone.
    pub fn resolve_range(&self, head: LayerId, first: u64, out: &mut [Option<Extent>]) -> bool {
        if !self.layers.contains_key(&head) {
            return false;
        }
        let end = first + out.len() as u64;
        let mut b = first;
        while b < end {
            let idx = b / CHUNK_BLOCKS;
            let seg_end = end.min((idx + 1) * CHUNK_BLOCKS);
            let base = idx * CHUNK_BLOCKS;
            let mut todo = mask((b - base) as u32, (seg_end - base) as u32);
            let mut at = Some(head);
            while let (true, Some(id)) = (todo != 0, at) {
                let l = &self.layers[&id];
                if let Some(c) = l.map.chunk(idx) {
                    let hits = (c.data_bits() | c.zero_bits()) & todo;
                    for i in bits(hits) {
                        out[(base + i as u64 - first) as usize] = c.get(i).filter(|e| !e.is_zero());
                    }
                    todo &= !hits;
                }
                at = l.parent;
            }
            for i in bits(todo) {
                out[(base + i as u64 - first) as usize] = None;
            }
            b = seg_end;
        }
        true
    }

    /// Maps blocks `first..` of volume layer `head` to `exts` (a host write, or its replay
    /// from the map journal: the same blocks and extents give the same result however often
    /// it runs). Extents they replace in that layer go to `freed`. Ancestors keep their
    /// blocks.
    pub fn write(&mut self, head: LayerId, first: u64, exts: &[Extent], freed: &mut Spans) {
        let Layer {
            map,
            data_blocks,
            stored_bytes,
            ..
        } = self.layers.get_mut(&head).expect("head layer");
        let mut k = 0usize;
        while k < exts.len() {
            let b = first + k as u64;
            let (idx, i) = (b / CHUNK_BLOCKS, (b % CHUNK_BLOCKS) as u32);
            let n = (exts.len() - k).min((CHUNK_BLOCKS - i as u64) as usize);
            let seg = &exts[k..k + n];
            let c = map.chunk_or_default(idx);
            for (j, e) in seg.iter().enumerate() {
                if let Some(old) = c.put(i + j as u32, *e).filter(|o| !o.is_zero()) {
                    freed.push(old.span());
                    *data_blocks -= 1;
                    *stored_bytes -= 512 * old.sectors() as u64;
                }
                if !e.is_zero() {
                    *data_blocks += 1;
                    *stored_bytes += 512 * e.sectors() as u64;
                }
            }
            k += n;
        }
    }

    /// The ancestors of layer `id`, nearest first.
    fn ancestors(&self, id: LayerId) -> Vec<LayerId> {
        let mut out = Vec::new();
        let mut at = self.layers[&id].parent;
        while let Some(p) = at {
            out.push(p);
            at = self.layers[&p].parent;
        }
        out
    }

    /// The lowest chunk number at or after `from` that any of `ids` maps.
    fn next_chunk_in(&self, ids: &[LayerId], from: u64) -> Option<u64> {
        ids.iter()
            .filter_map(|id| self.layers[id].map.next_chunk(from))
            .min()
    }

    /// Blocks of chunk `idx` that read as data through `ids` (top first).
    fn visible_data(&self, ids: &[LayerId], idx: u64) -> u64 {
        let (mut data, mut decided) = (0u64, 0u64);
        for id in ids {
            if let Some(c) = self.layers[id].map.chunk(idx) {
                data |= c.data_bits() & !decided;
                decided |= c.data_bits() | c.zero_bits();
            }
        }
        data
    }

    /// Makes blocks `[start, end)` of volume `v` read as zeroes, releasing their space.
    /// Whole chunks go with one range delete; blocks an ancestor would show through get
    /// tombstones.
    pub fn trim(&mut self, v: Uuid, start: u64, end: u64) -> Result<Delta, TreeError> {
        let head = self.volume_layer(v)?;
        let mut d = Delta::default();
        if start >= end {
            return Ok(d);
        }
        let up = self.ancestors(head);
        let mut all = vec![head];
        all.extend_from_slice(&up);
        let (full_from, full_to) = (start.div_ceil(CHUNK_BLOCKS), end / CHUNK_BLOCKS);
        if full_from < full_to {
            d.rows.push(Row::DropChunks(head, full_from, full_to));
        }
        let last = (end - 1) / CHUNK_BLOCKS;
        let mut cursor = start / CHUNK_BLOCKS;
        while let Some(idx) = self.next_chunk_in(&all, cursor).filter(|&i| i <= last) {
            cursor = idx + 1;
            let base = idx * CHUNK_BLOCKS;
            let m = mask(
                start.saturating_sub(base).min(CHUNK_BLOCKS) as u32,
                (end - base).min(CHUNK_BLOCKS) as u32,
            );
            let full = (full_from..full_to).contains(&idx);
            let shadow = self.visible_data(&up, idx) & m;
            let l = self.layers.get_mut(&head).expect("head");
            let slots = l.map.chunk(idx).map(|c| c.slots_used);
            if let Some(mut c) = l.map.take_chunk(idx) {
                for i in bits(m & (c.data_bits() | c.zero_bits())) {
                    if let Some(e) = c.remove(i) {
                        l.account(&e, -1);
                        d.free(&e);
                    }
                }
                if full {
                    // Its rows went with the range delete: it starts afresh.
                    (c.gen, c.deltas, c.slots_used) = (0, 0, 0);
                }
                l.map.insert_chunk(idx, c);
            }
            for i in bits(shadow) {
                l.map.put(base + i as u64, Extent::ZERO);
            }
            l.map.prune(idx);
            match l.map.chunk_mut(idx) {
                Some(c) => {
                    consolidate(c);
                    d.rows.push(Row::Chunk(head, idx));
                }
                None => match slots {
                    Some(slots) if !full => d.rows.push(Row::Unchunk(head, idx, slots)),
                    _ => {}
                },
            }
        }
        Ok(d)
    }

    /// Whether volume `v` reads data (not zeroes) at any block at or past `end`.
    pub fn maps_beyond(&self, v: Uuid, end: u64) -> bool {
        let Some(&head) = self.images.get(&v) else {
            return false;
        };
        let mut all = vec![head];
        all.extend(self.ancestors(head));
        let mut cursor = end / CHUNK_BLOCKS;
        while let Some(idx) = self.next_chunk_in(&all, cursor) {
            let base = idx * CHUNK_BLOCKS;
            let m = mask(end.saturating_sub(base).min(CHUNK_BLOCKS) as u32, 64);
            if self.visible_data(&all, idx) & m != 0 {
                return true;
            }
            cursor = idx + 1;
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
                for (n, (b, _)) in l.map.range(cursor, to).enumerate() {
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

    /// The pool space of every extent the tree references (to rebuild the allocator), whole
    /// pages of a run joined.
    pub fn spans(&self, mut f: impl FnMut(Span)) {
        for l in self.layers.values() {
            let mut s = Spans::default();
            for (_, c) in l.map.chunks() {
                c.spans(&mut s);
                if s.0.len() > 1024 {
                    // Keep the last one: the next chunk may continue it.
                    let last = s.0.pop();
                    s.0.drain(..).for_each(&mut f);
                    s.0.extend(last);
                }
            }
            s.0.into_iter().for_each(&mut f);
        }
    }

    /// Memory the block maps take (see [`BlockMap::mem_bytes`]).
    pub fn map_bytes(&self) -> usize {
        self.layers.values().map(|l| l.map.mem_bytes()).sum()
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
        let mut all = vec![top];
        all.extend(self.ancestors(top));
        for id in &all {
            let l = &self.layers[id];
            u.referenced_bytes += l.stored_bytes;
            u.referenced_logical_bytes += l.data_blocks * 4096;
        }
        let mut cursor = 0;
        while let Some(idx) = self.next_chunk_in(&all, cursor) {
            u.visible_blocks += self.visible_data(&all, idx).count_ones() as u64;
            cursor = idx + 1;
        }
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
