//! The on-disk format (format-1 stores converted at open, stray rows, newer formats refused),
//! image handles across tree operations, the per-pass batching of reads and writes, and
//! transfers at device boundaries.

use super::*;
use crate::blockstore::meta::{encode_extent, encode_layer, FORMAT};
use crate::blockstore::tree::{Layer, Owner};

const CFS: [&str; 6] = ["layers", "chunks", "deltas", "extents", "meta", "changes"];

/// The store's RocksDB opened directly (the store must be closed).
fn raw_db(meta: &Path) -> rocksdb::DB {
    let mut o = rocksdb::Options::default();
    o.create_if_missing(true);
    o.create_missing_column_families(true);
    rocksdb::DB::open_cf(&o, meta, CFS).expect("raw db")
}

fn rows(db: &rocksdb::DB, cf: &str) -> usize {
    let cf = db.cf_handle(cf).expect("cf");
    db.iterator_cf(cf, rocksdb::IteratorMode::Start).count()
}

/// A store written by the previous release: layer rows as today, one `extents` row per
/// (layer, block), no format key; the data put on the device by hand.
fn write_format_1(dir: &Path) -> (Uuid, Uuid, Vec<u8>) {
    let (v, s) = (Uuid::new_v4(), Uuid::new_v4());
    let dev = dir.join("dev0");
    let f = std::fs::File::create(&dev).expect("device");
    f.set_len(4 << 20).expect("size");
    use std::os::unix::fs::FileExt;
    let db = {
        let mut o = rocksdb::Options::default();
        o.create_if_missing(true);
        o.create_missing_column_families(true);
        rocksdb::DB::open_cf(&o, dir.join("meta"), ["layers", "extents", "meta"]).expect("db")
    };
    let cf = |n: &str| db.cf_handle(n).expect("cf");
    let devices = format!("{}\t{}\n", dev.display(), 4 << 20);
    db.put_cf(cf("meta"), b"devices", devices.as_bytes())
        .expect("devices");
    let snap = Layer::new(None, Owner::Snapshot(s));
    let vol = Layer::new(Some(1), Owner::Volume(v));
    db.put_cf(cf("layers"), 1u64.to_be_bytes(), encode_layer(&snap))
        .expect("layer");
    db.put_cf(cf("layers"), 2u64.to_be_bytes(), encode_layer(&vol))
        .expect("layer");
    let key = |layer: u64, block: u64| {
        let mut k = [0u8; 16];
        k[..8].copy_from_slice(&layer.to_be_bytes());
        k[8..].copy_from_slice(&block.to_be_bytes());
        k
    };
    let put = |layer: u64, block: u64, sector: u64, stored: &[u8], compressed: bool| {
        let e = Extent {
            sector,
            len: stored.len() as u16,
            compressed,
            crc: crc32c::crc32c(stored),
        };
        if !stored.is_empty() {
            f.write_all_at(stored, sector * 512).expect("data");
        }
        db.put_cf(cf("extents"), key(layer, block), encode_extent(&e))
            .expect("extent row");
    };
    // The snapshot: 100 raw blocks on pages 10.., one compressed block packed mid-page.
    for b in 0..100 {
        put(1, b, (10 + b) * 8, &content(1, b), false);
    }
    let packed = lz4_flex::block::compress(&content(2, 100));
    put(1, 100, 300 * 8 + 3, &packed, true);
    // The volume over it: block 5 rewritten, block 7 a tombstone.
    put(2, 5, 400 * 8, &content(3, 5), false);
    put(2, 7, 0, &[], false);
    (v, s, packed)
}

fn check_format_1_content(h: &mut Harness, v: Uuid, s: Uuid) {
    for b in 0..101 {
        let want = match b {
            100 => content(2, 100),
            _ => content(1, b),
        };
        assert!(read_block(h, s, b) == want, "snapshot block {b}");
        let want = match b {
            5 => content(3, 5),
            7 => vec![0; BLOCK],
            _ => want,
        };
        assert!(read_block(h, v, b) == want, "volume block {b}");
    }
    assert!(read_block(h, v, 101).iter().all(|&x| x == 0));
}

#[test]
fn a_format_1_store_is_converted_at_open_and_reads_the_same() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (v, s, packed) = write_format_1(dir.path());
    let mut h = Harness {
        store: Some(open(dir.path())),
        dir,
        q: IoQueue::new_sync(),
        buf: SlotBuf::new(1, MAX_BLOCKS_PER_IO * BLOCK).expect("buf"),
        blocks: BLOCKS * 4,
    };
    check_format_1_content(&mut h, v, s);
    h.st().flush().expect("flush");
    let stored = 101 * 4096 + packed.len().div_ceil(512) as u64 * 512;
    assert_eq!(
        h.st().stats().used_bytes,
        stored,
        "every old extent is claimed"
    );
    // The rows are chunk rows now, and the format is recorded.
    drop(h.store.take());
    {
        let db = raw_db(&h.dir.path().join("meta"));
        assert_eq!(rows(&db, "extents"), 0, "format-1 rows are gone");
        assert_eq!(
            rows(&db, "chunks"),
            3,
            "chunks 0 and 1 of the snapshot, 0 of the volume"
        );
        let meta = db.cf_handle("meta").expect("cf");
        let f = db
            .get_cf(meta, b"format")
            .expect("get")
            .expect("format key");
        assert_eq!(f, FORMAT.to_le_bytes());
    }
    // Reopened (no conversion this time) and written to, it still reads the same.
    h.store = Some(open(h.dir.path()));
    check_format_1_content(&mut h, v, s);
    h.buf.slot_mut(0, BLOCK).copy_from_slice(&content(5, 9));
    assert_eq!(
        h.io(v, IoKind::Write { fua: true }, 9, 1, false),
        BLOCK as i32
    );
    drop(h.store.take());
    h.store = Some(open(h.dir.path()));
    assert!(read_block(&mut h, v, 9) == content(5, 9));
    assert!(read_block(&mut h, s, 9) == content(1, 9));
}

#[test]
fn a_newer_format_is_refused_and_stray_delta_rows_are_dropped() {
    let mut h = Harness::new(IoQueue::new_sync());
    let v = Uuid::new_v4();
    h.st().create_volume(v).expect("create");
    write_blocks(&mut h, v, 1, 3);
    drop(h.store.take());
    let meta = h.dir.path().join("meta");
    {
        let db = raw_db(&meta);
        let deltas = db.cf_handle("deltas").expect("cf");
        // A delta row of generation 9 for a chunk nobody has: stale, left by a failed write.
        let mut k = [0u8; 17];
        k[..8].copy_from_slice(&1u64.to_be_bytes());
        k[8..16].copy_from_slice(&5u64.to_be_bytes());
        let mut val = 9u32.to_le_bytes().to_vec();
        val.extend_from_slice(&[0, 1]);
        val.extend_from_slice(&encode_extent(&Extent {
            sector: 8,
            len: 4096,
            compressed: false,
            crc: 0,
        }));
        db.put_cf(deltas, k, val).expect("stray");
    }
    h.store = Some(open(h.dir.path()));
    assert_blocks(&mut h, v, 1, 3);
    assert!(h.st().tree().resolve(1, 5 * 64).is_none());
    drop(h.store.take());
    {
        let db = raw_db(&meta);
        assert_eq!(
            rows(&db, "deltas"),
            0,
            "the stray is gone (and writes went to the map journal, not to delta rows)"
        );
        let m = db.cf_handle("meta").expect("cf");
        db.put_cf(m, b"format", (FORMAT + 1).to_le_bytes())
            .expect("future format");
    }
    let err = BlockStore::open(
        &meta,
        &[DeviceSpec {
            path: h.dir.path().join("dev0"),
            size_bytes: 4 << 20,
        }],
    )
    .expect_err("a newer format");
    assert!(err.to_string().contains("newer evstor"), "{err}");
}

#[test]
fn an_image_handle_follows_its_volume_through_snapshot_rollback_and_delete() {
    let mut h = Harness::new(IoQueue::new());
    let v = Uuid::new_v4();
    h.st().create_volume(v).expect("create");
    let img = h.st().image(v, BLOCKS * BLOCK_BYTES, false);
    let write = |h: &mut Harness, img: &Image, version: u64| {
        for b in 0..4 {
            h.buf
                .slot_mut(0, BLOCK)
                .copy_from_slice(&content(version, b));
            let r = h.io_on(img, IoKind::Write { fua: false }, b, 1);
            assert_eq!(r, BLOCK as i32, "write {b}");
        }
    };
    let reads = |h: &mut Harness, img: &Image, version: u64| {
        for b in 0..4 {
            assert_eq!(h.io_on(img, IoKind::Read, b, 1), BLOCK as i32);
            assert!(
                h.buf.slot(0, BLOCK) == &content(version, b)[..],
                "block {b} is not version {version}"
            );
        }
    };
    write(&mut h, &img, 1);
    let s = Uuid::new_v4();
    h.st().snapshot(v, s).expect("snapshot");
    // Through the same handle, after the volume moved to a new layer.
    write(&mut h, &img, 2);
    reads(&mut h, &img, 2);
    assert_blocks(&mut h, s, 1, 4);
    h.st().rollback(v, s).expect("rollback");
    reads(&mut h, &img, 1);
    write(&mut h, &img, 3);
    assert_blocks(&mut h, v, 3, 4);
    assert_blocks(&mut h, s, 1, 4);
    h.st().delete(v).expect("delete");
    assert_eq!(h.io_on(&img, IoKind::Read, 0, 1), -libc::ENXIO);
    assert_eq!(
        h.io_on(&img, IoKind::Write { fua: false }, 0, 1),
        -libc::ENXIO
    );
    h.st().flush().expect("flush");
    let stored: u64 = h.st().tree().layers.values().map(|l| l.stored_bytes).sum();
    assert_eq!(h.st().stats().used_bytes, stored, "nothing leaked");
}

/// Submits `cmds` (kind, first block, blocks) on one image in one loop pass (one
/// `IoQueue::submit`), each with its own buffer slot; returns the results by command.
fn one_pass(
    h: &mut Harness,
    img: &Image,
    bufs: &mut SlotBuf,
    cmds: &[(IoKind, u64, u64)],
) -> Vec<i32> {
    for (i, &(kind, first, n)) in cmds.iter().enumerate() {
        let req = IoRequest {
            kind,
            offset: first * BLOCK_BYTES,
            len: (n * BLOCK_BYTES) as u32,
            buf: bufs.slot_ptr(i),
            tag: i as u64,
        };
        // SAFETY: the slots outlive the completions, reaped below.
        unsafe { img.submit(&mut h.q, &req) }.expect("submit");
    }
    let mut early = 0;
    h.q.reap(|_, _| early += 1);
    assert_eq!(early, 0, "reads and writes wait for the end of the pass");
    h.q.submit().expect("ring");
    let mut got = vec![None; cmds.len()];
    while got.iter().any(Option::is_none) {
        h.q.reap(|t, r| got[t as usize] = Some(r));
    }
    got.into_iter().map(|r| r.expect("completion")).collect()
}

#[test]
fn the_reads_and_writes_of_one_pass_are_done_together() {
    let mut h = Harness::new(IoQueue::new());
    h.blocks = 256;
    let v = Uuid::new_v4();
    h.st().create_volume(v).expect("create");
    let img = h.st().image(v, 256 * BLOCK_BYTES, true);
    let mut bufs = SlotBuf::new(8, MAX_BLOCKS_PER_IO * BLOCK).expect("bufs");
    // Eight 32-block writes, incompressible and a quarter compressible (7 sectors stored),
    // one with FUA: more compressed data than the staging area holds, so its transfers run
    // early, still before the one commit.
    let data = |i: u64, b: u64| {
        let mut d = content(3, b);
        if !i.is_multiple_of(3) {
            d[3 * BLOCK / 4..].fill(i as u8);
        }
        d
    };
    for i in 0..8u64 {
        let slot = bufs.slot_mut(i as usize, MAX_BLOCKS_PER_IO * BLOCK);
        for k in 0..32u64 {
            let b = i * 32 + k;
            slot[k as usize * BLOCK..][..BLOCK].copy_from_slice(&data(i, b));
        }
    }
    let writes: Vec<_> = (0..8u64)
        .map(|i| (IoKind::Write { fua: i == 5 }, i * 32, 32))
        .collect();
    let r = one_pass(&mut h, &img, &mut bufs, &writes);
    assert!(r.iter().all(|&r| r == 32 * BLOCK as i32), "{r:?}");
    // Eight reads of the same: one tree-lock hold for all of them, more compressed blocks
    // than the read pages hold (so several transfer groups).
    for i in 0..8 {
        bufs.slot_mut(i, MAX_BLOCKS_PER_IO * BLOCK).fill(0xee);
    }
    let holds = h.st().read_holds.load(Ordering::Relaxed);
    let reads: Vec<_> = (0..8u64).map(|i| (IoKind::Read, i * 32, 32)).collect();
    let r = one_pass(&mut h, &img, &mut bufs, &reads);
    assert!(r.iter().all(|&r| r == 32 * BLOCK as i32), "{r:?}");
    assert_eq!(h.st().read_holds.load(Ordering::Relaxed), holds + 1);
    for i in 0..8u64 {
        let slot = bufs.slot(i as usize, MAX_BLOCKS_PER_IO * BLOCK);
        for k in 0..32u64 {
            let b = i * 32 + k;
            assert!(
                slot[k as usize * BLOCK..][..BLOCK] == data(i, b)[..],
                "block {b}"
            );
        }
    }
    assert!(h.st().usage(v).expect("usage").owned_bytes < 256 * BLOCK_BYTES);
    h.st().flush().expect("flush");
    let stored: u64 = h.st().tree().layers.values().map(|l| l.stored_bytes).sum();
    assert_eq!(h.st().stats().used_bytes, stored);
}

#[test]
fn a_transfer_never_runs_across_a_device_boundary() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let st = BlockStore::open(
        &dir.path().join("meta"),
        &[
            DeviceSpec {
                path: a.clone(),
                size_bytes: 64 * BLOCK_BYTES,
            },
            DeviceSpec {
                path: b.clone(),
                size_bytes: 64 * BLOCK_BYTES,
            },
        ],
    )
    .expect("open");
    let mut h = Harness {
        dir,
        store: Some(st),
        q: IoQueue::new(),
        buf: SlotBuf::new(1, MAX_BLOCKS_PER_IO * BLOCK).expect("buf"),
        blocks: 112,
    };
    let v = Uuid::new_v4();
    h.st().create_volume(v).expect("create");
    // Pages are handed out in order: 16, then 32 at a time, so the third write's pages are
    // 48..80, across the end of device a at page 64.
    for (first, n) in [(0u64, 16u64), (16, 32), (48, 32), (80, 32)] {
        for k in 0..n {
            h.buf.slot_mut(0, MAX_BLOCKS_PER_IO * BLOCK)[k as usize * BLOCK..][..BLOCK]
                .copy_from_slice(&content(3, first + k));
        }
        assert_eq!(
            h.io(v, IoKind::Write { fua: false }, first, n, false),
            (n * BLOCK_BYTES) as i32
        );
    }
    h.st().flush().expect("flush");
    assert_eq!(
        std::fs::metadata(&a).expect("a").len(),
        64 * BLOCK_BYTES,
        "nothing was written past the end of device a"
    );
    let mut first_of_b = vec![0u8; BLOCK];
    use std::os::unix::fs::FileExt;
    std::fs::File::open(&b)
        .expect("b")
        .read_exact_at(&mut first_of_b, 0)
        .expect("read b");
    assert!(
        first_of_b == content(3, 64),
        "block 64 is at the start of b"
    );
    for blk in 0..112 {
        assert!(read_block(&mut h, v, blk) == content(3, blk), "block {blk}");
    }
}

#[test]
fn pool_devices_on_disk_are_used_with_o_direct() {
    let h = Harness::new(IoQueue::new());
    let f = std::fs::File::open(h.dir.path().join("dev0")).expect("device");
    assert!(
        !crate::backend::memory_backed(&f),
        "TMPDIR is memory-backed: O_DIRECT cannot be tested here"
    );
    assert!(
        h.st().is_direct(),
        "the pool device is not opened with O_DIRECT"
    );
}

/// Every write and trim records its chunk in the image's change log, in the same or an
/// earlier metadata write than its mapping: the log reads back whole after a reopen, and
/// leaves with the image.
#[test]
fn the_change_log_records_writes_and_trims_and_survives_a_reopen() {
    use crate::limits::CHANGE_CHUNK_BYTES;
    let mut h = Harness::new(IoQueue::new_sync());
    h.blocks = 1024;
    let v = Uuid::new_v4();
    h.st().create_volume(v).expect("volume");
    let per_chunk = CHANGE_CHUNK_BYTES / BLOCK_BYTES;
    let before = crate::blockstore::changes::now_ms();
    assert_eq!(
        h.st().changed_since(v, 0),
        Some(vec![]),
        "nothing written yet"
    );
    assert_eq!(
        h.io(v, IoKind::Write { fua: false }, 1, 1, false),
        BLOCK as i32
    );
    assert_eq!(
        h.io(v, IoKind::Write { fua: true }, 2 * per_chunk + 7, 2, false),
        2 * BLOCK as i32
    );
    assert_eq!(
        h.io(v, IoKind::WriteZeroes, per_chunk + 3, 1, false),
        BLOCK as i32
    );
    let last = h.st().last_change_ms(v).expect("a log");
    assert!(last >= before);
    assert_eq!(h.st().changed_since(v, before), Some(vec![0, 1, 2]));
    assert_eq!(h.st().changed_since(v, last + 1), Some(vec![]));
    h.store = None;
    h.store = Some(open(h.dir.path()));
    assert_eq!(
        h.st().changed_since(v, before),
        Some(vec![0, 1, 2]),
        "read back after a reopen"
    );
    assert_eq!(h.st().last_change_ms(v), Some(last));
    h.st().delete(v).expect("delete");
    h.store = None;
    h.store = Some(open(h.dir.path()));
    assert_eq!(
        h.st().changed_since(v, 0),
        Some(vec![]),
        "its rows left with it"
    );
}

/// A device appended while serving adds its space at once; the pool opens with it after a
/// restart, and data on both devices reads back.
#[test]
fn a_device_added_while_serving_extends_the_pool_and_stays_after_a_reopen() {
    let mut h = Harness::new(IoQueue::new_sync());
    h.blocks = 2048;
    let v = Uuid::new_v4();
    h.st().create_volume(v).expect("volume");
    // The 4 MiB device holds 1024 blocks: fill it (with data: zeroes take no space).
    h.buf.slot_mut(0, BLOCK).fill(0x5a);
    let mut b = 0;
    while h.io(v, IoKind::Write { fua: false }, b, 1, false) == BLOCK as i32 {
        b += 1;
        assert!(b < 2048, "a 4 MiB device cannot hold 8 MiB");
    }
    assert_eq!(
        h.io(v, IoKind::Write { fua: false }, b, 1, false),
        -libc::ENOSPC
    );
    let extra = DeviceSpec {
        path: h.dir.path().join("dev1"),
        size_bytes: 4 << 20,
    };
    h.st().add_device(&extra).expect("add a device");
    h.st()
        .add_device(&extra)
        .expect("adding it again does nothing");
    assert_eq!(h.st().devices().len(), 2);
    for n in b..b + 100 {
        assert_eq!(
            h.io(v, IoKind::Write { fua: false }, n, 1, false),
            BLOCK as i32,
            "block {n}"
        );
    }
    let last = read_block(&mut h, v, b + 99);
    h.store = None;
    let devices = [
        DeviceSpec {
            path: h.dir.path().join("dev0"),
            size_bytes: 4 << 20,
        },
        extra,
    ];
    h.store = Some(BlockStore::open(&h.dir.path().join("meta"), &devices).expect("reopen"));
    assert_eq!(read_block(&mut h, v, b + 99), last);
    h.store = None;
    assert!(
        BlockStore::open(&h.dir.path().join("meta"), &devices[..1]).is_err(),
        "the pool was extended: opening it without the added device is refused"
    );
}
