//! The chunk map on its own and through the layer tree: runs and how writes split and join
//! them, trims and tombstones inside runs, snapshots layered over runs, row encodings, and
//! the memory a block costs.

use std::collections::BTreeSet;

use super::*;
use crate::blockstore::tree::HashMap;
use crate::blockstore::tree::{Delta, Layer, LayerId, Owner, Row, Tree};
use uuid::Uuid;

/// A raw block at page `page` with a CRC derived from it.
fn raw(page: u64) -> Extent {
    Extent {
        sector: page * 8,
        len: 4096,
        compressed: false,
        crc: page as u32 ^ 0xabcd_0000,
    }
}

fn packed(sector: u64, len: u16) -> Extent {
    Extent {
        sector,
        len,
        compressed: true,
        crc: sector as u32 ^ len as u32,
    }
}

/// Blocks `first..first + n` mapped to consecutive pages from `page`.
fn seq(m: &mut BlockMap, first: u64, n: u64, page: u64) {
    for i in 0..n {
        m.put(first + i, raw(page + i));
    }
}

fn shapes(m: &BlockMap) -> Vec<(u64, bool)> {
    m.chunks().map(|(c, ch)| (c, ch.is_run())).collect()
}

#[test]
fn sequential_blocks_form_runs_and_read_back() {
    let mut m = BlockMap::default();
    seq(&mut m, 10, 200, 1000);
    assert_eq!(m.chunk_count(), 4, "blocks 10..210 touch chunks 0..=3");
    assert!(shapes(&m).iter().all(|&(_, run)| run), "{:?}", shapes(&m));
    for b in 10..210 {
        assert_eq!(m.get(b), Some(raw(1000 + b - 10)), "block {b}");
    }
    assert_eq!(m.get(9), None);
    assert_eq!(m.get(210), None);
    let got: Vec<u64> = m.range(60, 70).map(|(b, _)| b).collect();
    assert_eq!(got, (60..70).collect::<Vec<_>>());
    // A run holds a CRC per block and nothing else.
    let c = m.chunk(1).expect("chunk 1");
    assert_eq!(c.heap_bytes(), 64 * 4);
}

#[test]
fn an_overwrite_inside_a_run_splits_it_and_a_contiguous_rewrite_joins_it_again() {
    let mut m = BlockMap::default();
    seq(&mut m, 0, 64, 100);
    assert!(m.chunk(0).expect("chunk").is_run());
    // One block in the middle goes elsewhere: the chunk keeps every other block.
    assert_eq!(
        m.put(30, raw(5000)),
        Some(raw(130)),
        "the old extent comes back"
    );
    let c = m.chunk(0).expect("chunk");
    assert!(!c.is_run(), "block 30 no longer continues the run");
    assert_eq!(c.data_count(), 64);
    for b in 0..64 {
        let want = if b == 30 { raw(5000) } else { raw(100 + b) };
        assert_eq!(m.get(b), Some(want), "block {b}");
    }
    // Putting block 30 back where the run expects it makes the chunk a run again.
    m.put(30, raw(130));
    assert!(m.chunk(0).expect("chunk").is_run());
    // A whole new contiguous rewrite (what a sequential overwrite gets from the allocator)
    // ends as a run too, at its new place.
    seq(&mut m, 0, 64, 9000);
    let c = m.chunk(0).expect("chunk");
    assert!(c.is_run());
    assert_eq!(m.get(63), Some(raw(9063)));
    // A compressed block never joins a run.
    m.put(5, packed(77, 900));
    assert!(!m.chunk(0).expect("chunk").is_run());
    assert_eq!(m.get(5), Some(packed(77, 900)));
    assert_eq!(m.get(6), Some(raw(9006)));
}

#[test]
fn removing_and_tombstoning_inside_a_run_keeps_the_rest() {
    let mut m = BlockMap::default();
    seq(&mut m, 0, 64, 200);
    assert_eq!(m.remove(10), Some(raw(210)));
    assert_eq!(m.put(11, Extent::ZERO), Some(raw(211)));
    let c = m.chunk(0).expect("chunk");
    assert!(c.is_run(), "holes and tombstones do not break a run");
    assert_eq!(c.data_count(), 62);
    assert_eq!(c.len(), 63);
    assert_eq!(m.get(10), None);
    assert_eq!(m.get(11), Some(Extent::ZERO));
    assert_eq!(m.get(12), Some(raw(212)));
    // Filling the hole at its run position keeps the run; elsewhere it does not.
    m.put(10, raw(210));
    assert!(m.chunk(0).expect("chunk").is_run());
    m.remove(10);
    m.put(10, raw(7));
    assert!(!m.chunk(0).expect("chunk").is_run());
    // Emptying a chunk drops it.
    for b in 0..64 {
        m.remove(b);
    }
    assert!(m.is_empty());
}

#[test]
fn chunk_rows_round_trip_in_both_shapes() {
    let mut m = BlockMap::default();
    seq(&mut m, 0, 40, 300);
    m.put(50, Extent::ZERO);
    let run = m.chunk(0).expect("chunk").clone();
    assert!(run.is_run());
    m.put(64 + 3, packed(8 * 9 + 2, 1000));
    m.put(64 + 4, raw(12));
    m.put(64 + 9, raw(4));
    m.put(64 + 10, Extent::ZERO);
    let blocks = m.chunk(1).expect("chunk").clone();
    assert!(!blocks.is_run());
    for mut c in [run, blocks] {
        c.gen = 7;
        let mut row = Vec::new();
        c.encode(&mut row);
        let back = Chunk::decode(&row).expect("decodes");
        assert_eq!(back, c);
        assert_eq!(back.gen, 7);
        assert_eq!(back.is_run(), c.is_run());
        assert!(
            Chunk::decode(&row[..row.len() - 1]).is_none(),
            "a short row is corrupt"
        );
    }
}

#[test]
fn spans_join_whole_pages_of_runs() {
    let mut m = BlockMap::default();
    seq(&mut m, 0, 128, 64);
    m.put(200, packed(8 * 500 + 3, 700));
    let mut s = Spans::default();
    m.spans(&mut s);
    assert_eq!(
        s.0,
        vec![
            Span {
                sector: 64 * 8,
                sectors: 128 * 8
            },
            Span {
                sector: 8 * 500 + 3,
                sectors: 2
            }
        ]
    );
}

/// The memory bound of the issue: a sequentially written volume costs at most 8 bytes of map
/// per 4 KiB block (the CRC32C included), counting the B-tree's nodes at their worst fill.
#[test]
fn the_map_answers_as_a_plain_ordered_map_of_blocks_across_groups() {
    // Random puts, tombstones, removals and whole-chunk takes over blocks spanning several
    // groups of chunks (a group is 4096 blocks), checked against a BTreeMap of blocks.
    let mut m = BlockMap::default();
    let mut model: BTreeMap<u64, Extent> = BTreeMap::new();
    let span = 5 * GROUP_CHUNKS * CHUNK_BLOCKS;
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for step in 0..20_000u64 {
        let r = next();
        // Clustered: most operations near a few hot spots, so chunks and groups fill and
        // empty again.
        let b = (r >> 8) % 6 * (span / 6) + (r >> 24) % 700;
        match r % 10 {
            0..=5 => {
                let e = raw(step + 1);
                assert_eq!(m.put(b, e), model.insert(b, e), "put {b}");
            }
            6 => {
                assert_eq!(m.put(b, Extent::ZERO), model.insert(b, Extent::ZERO));
            }
            7 | 8 => assert_eq!(m.remove(b), model.remove(&b), "remove {b}"),
            _ => {
                let c = b / CHUNK_BLOCKS;
                let taken: Vec<(u64, Extent)> = m
                    .take_chunk(c)
                    .map(|ch| {
                        ch.entries()
                            .map(|(i, e)| (c * CHUNK_BLOCKS + i as u64, e))
                            .collect()
                    })
                    .unwrap_or_default();
                let expect: Vec<(u64, Extent)> = model
                    .range(c * CHUNK_BLOCKS..(c + 1) * CHUNK_BLOCKS)
                    .map(|(&k, &e)| (k, e))
                    .collect();
                expect.iter().for_each(|(k, _)| {
                    model.remove(k);
                });
                assert_eq!(taken, expect, "take chunk {c}");
            }
        }
        if step % 1000 == 0 || step == 19_999 {
            assert!(
                m.iter().eq(model.iter().map(|(&k, &e)| (k, e))),
                "walk at {step}"
            );
            let chunks: BTreeSet<u64> = model.keys().map(|k| k / CHUNK_BLOCKS).collect();
            assert_eq!(m.chunk_count(), chunks.len());
            assert_eq!(m.first_chunk(), chunks.first().copied());
            assert_eq!(m.is_empty(), chunks.is_empty());
            for probe in [0, 63, 64, 65, 127, 128, 300, 4095, 4096, 9000] {
                let c = probe % (span / CHUNK_BLOCKS);
                assert_eq!(
                    m.next_chunk(c),
                    chunks.range(c..).next().copied(),
                    "next {c}"
                );
                let to = c + 70;
                assert!(
                    m.chunk_keys(c, to).eq(chunks.range(c..to).copied()),
                    "keys {c}..{to}"
                );
                let (from, to) = (c * CHUNK_BLOCKS + 17, c * CHUNK_BLOCKS + 5000);
                assert!(
                    m.range(from, to)
                        .eq(model.range(from..to).map(|(&k, &e)| (k, e))),
                    "range {from}..{to}"
                );
            }
        }
    }
}

#[test]
fn sequential_volumes_cost_at_most_8_bytes_a_block() {
    let blocks = 1u64 << 20; // 4 GiB
    let mut m = BlockMap::default();
    for b in (0..blocks).step_by(32) {
        // 128 KiB writes, as a sequential fill arrives.
        seq(&mut m, b, 32, 4096 + b);
    }
    let per_block = m.mem_bytes() as f64 / blocks as f64;
    println!("sequential: {per_block:.2} bytes of map per block");
    assert!(per_block <= 8.0, "{per_block} bytes a block");
    // For the report: a randomly written volume (every block once, in random order, so no
    // two neighbours sit on consecutive pages) and a sparse one (one block in 64).
    let mut r = BlockMap::default();
    let n = 1u64 << 18;
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for i in 0..n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        r.put((i * 0x9e37_79b9) % n, raw(x % (1 << 40)));
    }
    println!(
        "random: {:.2} bytes of map per block",
        r.mem_bytes() as f64 / n as f64
    );
    let mut sparse = BlockMap::default();
    for i in 0..n / 64 {
        sparse.put(i * 64 + i % 64, raw(i * 3));
    }
    let b = sparse.mem_bytes() as f64 / (n / 64) as f64;
    println!("sparse (1 block in 64): {b:.2} bytes of map per block");
}

fn volume_tree() -> (Tree, Uuid, LayerId) {
    let mut t = Tree::default();
    let v = Uuid::new_v4();
    t.create_volume(v).expect("create");
    let head = t.layer_of(v).expect("layer");
    (t, v, head)
}

/// A host write through `Tree::write`, returning what it freed.
fn write(t: &mut Tree, layer: LayerId, first: u64, exts: &[Extent]) -> Spans {
    let mut freed = Spans::default();
    t.write(layer, first, exts, &mut freed);
    freed
}

fn raws(page: u64, n: u64) -> Vec<Extent> {
    (0..n).map(|i| raw(page + i)).collect()
}

#[test]
fn overwrites_free_exactly_what_they_replace_and_counters_follow() {
    let (mut t, _, head) = volume_tree();
    write(&mut t, head, 0, &raws(100, 64));
    let freed = write(&mut t, head, 10, &raws(7000, 4));
    assert_eq!(
        freed.0,
        vec![Span {
            sector: 110 * 8,
            sectors: 32
        }],
        "one span for four consecutive pages"
    );
    let freed = write(&mut t, head, 20, &[Extent::ZERO, packed(8 * 3000 + 1, 600)]);
    assert_eq!(freed.0.len(), 1, "pages 120 and 121 are consecutive");
    let l = &t.layers[&head];
    assert_eq!(l.data_blocks, 63);
    assert_eq!(l.stored_bytes, 62 * 4096 + 1024);
}

#[test]
fn snapshots_layer_over_runs_block_by_block() {
    let (mut t, v, head) = volume_tree();
    write(&mut t, head, 0, &raws(100, 128));
    let s = Uuid::new_v4();
    t.snapshot(v, s).expect("snapshot");
    let top = t.layer_of(v).expect("layer");
    let frozen = t.layer_of(s).expect("snapshot layer");
    assert_eq!(frozen, head);
    // An overwrite in the middle of the frozen run lands in the new layer only.
    let freed = write(&mut t, top, 60, &raws(4000, 8));
    assert!(freed.0.is_empty(), "the snapshot keeps the old blocks");
    let mut out = vec![None; 128];
    assert!(t.resolve_range(top, 0, &mut out));
    for (b, e) in out.iter().enumerate() {
        let b = b as u64;
        let want = if (60..68).contains(&b) {
            raw(4000 + b - 60)
        } else {
            raw(100 + b)
        };
        assert_eq!(*e, Some(want), "volume block {b}");
        assert_eq!(
            t.resolve(frozen, b),
            Some(raw(100 + b)),
            "snapshot block {b}"
        );
    }
    // A trim inside the run: tombstones hide the snapshot's blocks, the volume's own go.
    let d = t.trim(v, 62, 100).expect("trim");
    assert_eq!(
        d.freed.0,
        vec![Span {
            sector: 4002 * 8,
            sectors: 6 * 8
        }]
    );
    assert!(d.rows.contains(&Row::Chunk(top, 0)) && d.rows.contains(&Row::Chunk(top, 1)));
    for b in 62..100 {
        assert_eq!(t.resolve(top, b), None, "block {b} reads zeroes");
        assert_eq!(t.resolve(frozen, b), Some(raw(100 + b)));
    }
    assert_eq!(t.resolve(top, 61), Some(raw(4001)));
    assert_eq!(t.resolve(top, 100), Some(raw(200)));
    let u = t.usage(v).expect("usage");
    assert_eq!(u.visible_blocks, 128 - 38);
    assert_eq!(
        t.changed_blocks(v, Some(s), 0, 128, 1000).expect("diff"),
        (60..100).collect::<Vec<u64>>()
    );
}

#[test]
fn a_trim_of_whole_chunks_is_one_range_delete_and_keeps_the_edges() {
    let (mut t, v, head) = volume_tree();
    write(&mut t, head, 0, &raws(100, 32));
    write(&mut t, head, 32, &raws(132, 32));
    write(&mut t, head, 64, &raws(164, 32));
    write(&mut t, head, 96, &raws(196, 32));
    write(&mut t, head, 128, &raws(228, 32));
    let d: Delta = t.trim(v, 40, 150).expect("trim");
    assert_eq!(d.rows[0], Row::DropChunks(head, 1, 2));
    assert!(d.rows.contains(&Row::Chunk(head, 0)));
    assert!(d.rows.contains(&Row::Chunk(head, 2)));
    let l = &t.layers[&head];
    assert_eq!(l.map.chunk_count(), 2);
    assert_eq!(l.data_blocks, 40 + 10);
    let back: Vec<u64> = l.map.iter().map(|(b, _)| b).collect();
    assert_eq!(back, (0..40).chain(150..160).collect::<Vec<_>>());
}

#[test]
fn merging_a_freed_snapshot_moves_whole_chunks_and_frees_what_the_child_overrides() {
    let (mut t, v, head) = volume_tree();
    write(&mut t, head, 0, &raws(100, 64));
    write(&mut t, head, 64, &raws(164, 64));
    let s = Uuid::new_v4();
    t.snapshot(v, s).expect("snapshot");
    let top = t.layer_of(v).expect("layer");
    write(&mut t, top, 10, &raws(900, 2));
    t.delete(s).expect("delete snapshot");
    assert_eq!(t.next_merge(), Some(head));
    let d = t.merge_step(head, 1);
    assert_eq!(
        d.freed.0,
        vec![Span {
            sector: 110 * 8,
            sectors: 16
        }]
    );
    assert!(d.rows.contains(&Row::Unchunk(head, 0, 0)));
    let d = t.merge_step(head, 1);
    assert!(d.rows.contains(&Row::DropLayer(head)));
    assert_eq!(t.layers.len(), 1);
    let l = &t.layers[&top];
    assert_eq!(l.parent, None);
    assert_eq!(l.data_blocks, 128);
    assert!(l.map.chunk(1).expect("moved whole").is_run());
    for b in 0..128 {
        let want = if (10..12).contains(&b) {
            raw(900 + b - 10)
        } else {
            raw(100 + b)
        };
        assert_eq!(t.resolve(top, b), Some(want));
    }
}

#[test]
fn tree_counters_rebuild_from_chunks() {
    let (mut t, _, head) = volume_tree();
    write(&mut t, head, 0, &raws(100, 100));
    write(&mut t, head, 5, &[packed(8 * 999, 1500)]);
    let mut layers: HashMap<LayerId, Layer> = HashMap::default();
    let mut l = Layer::new(None, Owner::Volume(Uuid::nil()));
    l.map = t.layers[&head].map.clone();
    layers.insert(head, l);
    let rebuilt = Tree::from_parts(layers);
    assert_eq!(rebuilt.layers[&head].data_blocks, 100);
    assert_eq!(rebuilt.layers[&head].stored_bytes, 99 * 4096 + 1536);
}
