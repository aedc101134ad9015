//! The map journal inside the store: host writes come back from it after a restart, tree
//! operations are never undone by its replay, checkpoints run on the worker thread and keep
//! it bounded, and format-2 delta rows stay right through the switch to it.

use super::*;
use crate::blockstore::maplog;
use crate::limits::{MAP_LOG_DIRTY_CHUNKS, MAP_LOG_FILE_BYTES};

fn reopen(h: &mut Harness) {
    drop(h.store.take());
    h.store = Some(open(h.dir.path()));
}

/// Writes `version`'s content to blocks `[first, first + n)` of `v`, one command each.
fn write_range(h: &mut Harness, v: Uuid, version: u64, first: u64, n: u64) {
    for b in first..first + n {
        h.buf
            .slot_mut(0, BLOCK)
            .copy_from_slice(&content(version, b));
        assert_eq!(
            h.io(v, IoKind::Write { fua: false }, b, 1, false),
            BLOCK as i32,
            "write {b}"
        );
    }
}

/// Writes after the last checkpoint live only in the journal (RocksDB has no row for
/// them); a restart replays them.
#[test]
fn writes_since_the_last_checkpoint_come_back_from_the_journal() {
    let mut h = Harness::new(IoQueue::new_sync());
    let v = Uuid::new_v4();
    h.st().create_volume(v).expect("create");
    write_blocks(&mut h, v, 1, 8);
    write_blocks(&mut h, v, 2, 3);
    let meta = h.dir.path().join("meta");
    let gen = *maplog::files(&meta).last().expect("a journal file");
    assert!(
        maplog::read_file(&meta, gen).expect("read").len() > 11 * 15,
        "the writes are in the journal"
    );
    reopen(&mut h);
    assert_blocks(&mut h, v, 2, 3);
    for b in 3..8 {
        assert!(read_block(&mut h, v, b) == content(1, b), "block {b}");
    }
    assert_eq!(
        maplog::files(&meta),
        vec![gen + 1],
        "the open checkpointed what it replayed and dropped the old file"
    );
    // And once more, now from the chunk rows the open wrote.
    reopen(&mut h);
    assert_blocks(&mut h, v, 2, 3);
    assert_no_space_leaked(&h);
}

/// A trim (a tree operation) after writes: its batch carries the written chunks' rows and
/// moves the mark past their records, so a restart does not replay the writes over it.
#[test]
fn a_trim_after_writes_is_not_undone_by_a_replay() {
    let mut h = Harness::new(IoQueue::new_sync());
    h.blocks = 192;
    let v = Uuid::new_v4();
    h.st().create_volume(v).expect("create");
    write_range(&mut h, v, 1, 0, 130);
    // Chunk 1 whole, and part of chunk 0.
    assert_eq!(
        h.io(v, IoKind::Deallocate, 64, 64, false),
        64 * BLOCK as i32
    );
    assert_eq!(h.io(v, IoKind::Deallocate, 2, 3, false), 3 * BLOCK as i32);
    write_range(&mut h, v, 2, 100, 2);
    reopen(&mut h);
    let zero = vec![0u8; BLOCK];
    for b in [2, 3, 4, 64, 99, 127] {
        assert!(
            read_block(&mut h, v, b) == zero,
            "trimmed block {b} came back"
        );
    }
    for b in [0, 1, 5, 63, 128, 129] {
        assert!(read_block(&mut h, v, b) == content(1, b), "block {b}");
    }
    for b in [100, 101] {
        assert!(
            read_block(&mut h, v, b) == content(2, b),
            "block {b} written after the trim"
        );
    }
    assert_no_space_leaked(&h);
}

/// Snapshot, write, delete the snapshot: the writes before the snapshot belong to it, and
/// a replay must neither put them back into the volume's new layer nor bring the deleted
/// layer's blocks back.
#[test]
fn writes_around_a_snapshot_and_its_delete_replay_into_the_right_layer() {
    let mut h = Harness::new(IoQueue::new_sync());
    let (v, s) = (Uuid::new_v4(), Uuid::new_v4());
    h.st().create_volume(v).expect("create");
    write_blocks(&mut h, v, 1, 6);
    h.st().snapshot(v, s).expect("snapshot");
    write_blocks(&mut h, v, 2, 3);
    reopen(&mut h);
    assert_blocks(&mut h, s, 1, 6);
    assert_blocks(&mut h, v, 2, 3);
    for b in 3..6 {
        assert!(
            read_block(&mut h, v, b) == content(1, b),
            "block {b} from the snapshot"
        );
    }
    h.st().delete(s).expect("delete snapshot");
    write_blocks(&mut h, v, 3, 1);
    reopen(&mut h);
    assert!(!h.st().contains(s));
    assert_blocks(&mut h, v, 3, 1);
    assert_blocks_from(&mut h, v, 2, 1, 3);
    for b in 3..6 {
        assert!(read_block(&mut h, v, b) == content(1, b), "block {b}");
    }
    assert_no_space_leaked(&h);
}

fn assert_blocks_from(h: &mut Harness, v: Uuid, version: u64, first: u64, to: u64) {
    for b in first..to {
        assert!(
            read_block(h, v, b) == content(version, b),
            "block {b} is not version {version}"
        );
    }
}

/// Writes over more chunks than a checkpoint waits for: the worker thread checkpoints,
/// the journal's files stay few, and everything reads back after a restart.
#[test]
fn checkpoints_run_on_the_worker_thread_and_keep_the_journal_small() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut h = Harness::in_dir(IoQueue::new_sync(), dir);
    let chunks = 4 * MAP_LOG_DIRTY_CHUNKS as u64;
    h.blocks = chunks * 64;
    let v = Uuid::new_v4();
    h.st().create_volume(v).expect("create");
    let meta = h.dir.path().join("meta");
    // The first block of every chunk, round after round (the pool holds a few rounds):
    // each round dirties `chunks` chunks, and the journal grows past a file's bound.
    let rounds = MAP_LOG_FILE_BYTES / (chunks * 52) + 2;
    for round in 1..=rounds {
        for c in 0..chunks {
            write_range(&mut h, v, round, c * 64, 1);
        }
        assert!(
            maplog::files(&meta).len() <= 3,
            "journal files pile up: {:?}",
            maplog::files(&meta)
        );
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while h.st().background_checkpoints.load(Ordering::Relaxed) < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "no checkpoint on the worker thread"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    reopen(&mut h);
    for c in 0..chunks {
        assert!(
            read_block(&mut h, v, c * 64) == content(rounds, c * 64),
            "chunk {c}"
        );
    }
}

/// A store written before the journal has delta rows; they load, and the chunks that have
/// them get a new generation at the open, so a later checkpoint's full row is not
/// overlaid with them again at the next load.
#[test]
fn format_2_delta_rows_load_and_never_overlay_a_later_checkpoint() {
    let mut h = Harness::new(IoQueue::new_sync());
    let v = Uuid::new_v4();
    h.st().create_volume(v).expect("create");
    write_blocks(&mut h, v, 1, 8);
    // A tree operation checkpoints chunk 0: the store is all rows, as format 2 left it.
    h.st()
        .create_volume(Uuid::new_v4())
        .expect("another volume");
    let layer = h.st().tree().layer_of(v).expect("layer");
    let gen = h.st().tree().layers[&layer]
        .map
        .chunk(0)
        .expect("chunk")
        .gen;
    drop(h.store.take());
    {
        // A format-2 delta row: block 3 reads as zeroes.
        let meta = Meta::open(&h.dir.path().join("meta")).expect("meta");
        meta.put_legacy_delta(layer, 0, 0, gen, 3, &[Extent::ZERO])
            .expect("delta");
    }
    h.store = Some(open(h.dir.path()));
    assert!(
        read_block(&mut h, v, 3) == vec![0u8; BLOCK],
        "the delta row applies"
    );
    assert!(read_block(&mut h, v, 4) == content(1, 4));
    let c = h.st().tree().layers[&layer]
        .map
        .chunk(0)
        .expect("chunk")
        .clone();
    assert_eq!(
        (c.gen, c.deltas),
        (gen + 1, 0),
        "a new generation at the open"
    );
    write_blocks(&mut h, v, 2, 4);
    // A tree operation checkpoints chunk 0 (with block 3 written again).
    h.st()
        .create_volume(Uuid::new_v4())
        .expect("another volume");
    reopen(&mut h);
    assert_blocks(&mut h, v, 2, 4);
}

/// Writes after a restart that replayed the journal go to the new file and come back after
/// the next restart too (a server killed, restarted, then written to and stopped again).
#[test]
fn writes_after_a_replaying_open_come_back_after_the_next_one() {
    let mut h = Harness::new(IoQueue::new_sync());
    let v = Uuid::new_v4();
    h.st().create_volume(v).expect("create");
    write_range(&mut h, v, 1, 0, 8);
    reopen(&mut h);
    write_range(&mut h, v, 2, 4, 8);
    reopen(&mut h);
    assert_blocks_from(&mut h, v, 1, 0, 4);
    assert_blocks_from(&mut h, v, 2, 4, 12);
    write_range(&mut h, v, 3, 10, 8);
    reopen(&mut h);
    assert_blocks_from(&mut h, v, 1, 0, 4);
    assert_blocks_from(&mut h, v, 2, 4, 10);
    assert_blocks_from(&mut h, v, 3, 10, 18);
}
