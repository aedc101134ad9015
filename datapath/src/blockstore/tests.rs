//! The block store against a model: every image is a vector of block versions, and after
//! every operation every block of every image must read back as the model says, through the
//! same `Backend` path the target uses, across reopen (crash-free restart) too. The model runs
//! twice: short writes over one chunk of the map, and long writes over several chunks (runs
//! that grow, split in the middle and join again).

use std::collections::BTreeMap;
use std::path::Path;

use proptest::prelude::*;

use super::*;
use crate::backend::{Backend, IoKind, IoQueue, IoRequest};
use crate::buffer::SlotBuf;
use crate::limits::MAX_BLOCKS_PER_IO;

mod format_io;
mod journal;

const BLOCKS: u64 = 48;

/// The long-run model's volume: several 64-block chunks.
const LONG_BLOCKS: u64 = 200;

/// Block content for a version: compressible for even versions, noisy for odd ones.
fn content(version: u64, block: u64) -> Vec<u8> {
    let mut v = vec![0u8; BLOCK];
    if version.is_multiple_of(2) {
        for (i, c) in v.chunks_mut(64).enumerate() {
            c.fill((version as u8).wrapping_add(i as u8 % 3) | 1);
        }
        v[..8].copy_from_slice(&block.to_le_bytes());
    } else {
        let mut x = version.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ block;
        for c in v.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            c.copy_from_slice(&x.to_le_bytes());
        }
    }
    v
}

#[derive(Debug, Clone)]
enum Op {
    Write { vol: usize, block: u64, n: u64 },
    Zero { vol: usize, block: u64, n: u64 },
    Trim { vol: usize, block: u64, n: u64 },
    Snapshot { vol: usize },
    Clone { snap: usize },
    Rollback { vol: usize, snap: usize },
    DeleteVolume { vol: usize },
    DeleteSnapshot { snap: usize },
    Flush,
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    op_sized(BLOCKS, 8)
}

/// Ops on volumes of `blocks` blocks, writes and trims of up to `run` blocks.
fn op_sized(blocks: u64, run: u64) -> impl Strategy<Value = Op> {
    let range = (0..blocks, 1..=run).prop_map(move |(b, n)| (b, n.min(blocks - b)));
    prop_oneof![
        6 => (0..4usize, range.clone()).prop_map(|(vol, (block, n))| Op::Write { vol, block, n }),
        1 => (0..4usize, range.clone()).prop_map(|(vol, (block, n))| Op::Zero { vol, block, n }),
        2 => (0..4usize, range).prop_map(|(vol, (block, n))| Op::Trim { vol, block, n }),
        2 => (0..4usize).prop_map(|vol| Op::Snapshot { vol }),
        1 => (0..8usize).prop_map(|snap| Op::Clone { snap }),
        1 => (0..4usize, 0..8usize).prop_map(|(vol, snap)| Op::Rollback { vol, snap }),
        1 => (0..4usize).prop_map(|vol| Op::DeleteVolume { vol }),
        1 => (0..8usize).prop_map(|snap| Op::DeleteSnapshot { snap }),
        1 => Just(Op::Flush),
        1 => Just(Op::Reopen),
    ]
}

/// Model: image → per-block version (0 = zeroes), and which images are volumes.
#[derive(Default)]
struct Model {
    images: BTreeMap<Uuid, (bool, Vec<u64>)>,
    next_version: u64,
}

impl Model {
    fn pick(&self, volume: bool, i: usize) -> Option<Uuid> {
        let ids: Vec<Uuid> = self
            .images
            .iter()
            .filter(|(_, (v, _))| *v == volume)
            .map(|(u, _)| *u)
            .collect();
        (!ids.is_empty()).then(|| ids[i % ids.len()])
    }
}

struct Harness {
    dir: tempfile::TempDir,
    store: Option<Arc<BlockStore>>,
    q: IoQueue,
    buf: SlotBuf,
    /// Blocks per image.
    blocks: u64,
}

fn open(dir: &Path) -> Arc<BlockStore> {
    BlockStore::open(
        &dir.join("meta"),
        &[DeviceSpec {
            path: dir.join("dev0"),
            size_bytes: 4 << 20,
        }],
    )
    .expect("open store")
}

impl Harness {
    fn new(q: IoQueue) -> Harness {
        Harness::in_dir(q, tempfile::tempdir().expect("tempdir"))
    }

    /// On a memory-backed pool (reads copied from its mapping), where the machine has one.
    fn in_memory(q: IoQueue) -> Option<Harness> {
        let shm = Path::new("/dev/shm");
        let dir = shm
            .is_dir()
            .then(|| tempfile::tempdir_in(shm).ok())
            .flatten()?;
        Some(Harness::in_dir(q, dir))
    }

    fn in_dir(q: IoQueue, dir: tempfile::TempDir) -> Harness {
        let store = open(dir.path());
        Harness {
            dir,
            store: Some(store),
            q,
            buf: SlotBuf::new(1, MAX_BLOCKS_PER_IO * BLOCK).expect("buf"),
            blocks: BLOCKS,
        }
    }

    fn st(&self) -> &Arc<BlockStore> {
        self.store.as_ref().expect("open")
    }

    fn io(&mut self, image: Uuid, kind: IoKind, block: u64, n: u64, compress: bool) -> i32 {
        let img = self.st().image(image, self.blocks * BLOCK_BYTES, compress);
        self.io_on(&img, kind, block, n)
    }

    /// `io` through a given image handle.
    fn io_on(&mut self, img: &Image, kind: IoKind, block: u64, n: u64) -> i32 {
        let req = IoRequest {
            kind,
            offset: block * BLOCK_BYTES,
            len: (n * BLOCK_BYTES) as u32,
            buf: self.buf.slot_ptr(0),
            tag: 7,
        };
        // SAFETY: the buffer outlives the completion, reaped right here.
        unsafe { img.submit(&mut self.q, &req) }.expect("submit");
        self.q.submit().expect("ring");
        let mut got = None;
        while got.is_none() {
            self.q.reap(|t, r| {
                assert_eq!(t, 7);
                got = Some(r)
            });
        }
        got.expect("completion")
    }

    /// Reads every block of every image (in commands of at most 32 blocks) and compares.
    fn check(&mut self, m: &Model) -> Result<(), TestCaseError> {
        for (&id, (_, blocks)) in &m.images {
            let mut first = 0;
            while first < self.blocks {
                let n = (self.blocks - first).min(MAX_BLOCKS_PER_IO as u64);
                let r = self.io(id, IoKind::Read, first, n, false);
                prop_assert_eq!(r, (n * BLOCK_BYTES) as i32, "read of {}", id);
                for b in first..first + n {
                    let got = &self.buf.slot(0, n as usize * BLOCK)[(b - first) as usize * BLOCK..]
                        [..BLOCK];
                    let want = match blocks[b as usize] {
                        0 => vec![0u8; BLOCK],
                        v => content(v, b),
                    };
                    prop_assert!(
                        got == &want[..],
                        "image {} block {} != version {}",
                        id,
                        b,
                        blocks[b as usize]
                    );
                }
                first += n;
            }
        }
        Ok(())
    }
}

fn run(ops: Vec<Op>, q: IoQueue) -> Result<(), TestCaseError> {
    run_sized(ops, q, BLOCKS)
}

fn run_sized(ops: Vec<Op>, q: IoQueue, size: u64) -> Result<(), TestCaseError> {
    run_on(Harness::new(q), ops, size)
}

fn run_on(mut h: Harness, ops: Vec<Op>, size: u64) -> Result<(), TestCaseError> {
    h.blocks = size;
    let mut m = Model::default();
    let mut wrote_data = false;
    for _ in 0..2 {
        let v = Uuid::new_v4();
        h.st().create_volume(v).expect("create");
        m.images.insert(v, (true, vec![0; size as usize]));
    }
    for op in ops {
        match op {
            Op::Write { vol, block, n } | Op::Zero { vol, block, n } => {
                let Some(v) = m.pick(true, vol) else { continue };
                let zero = matches!(op, Op::Zero { .. });
                wrote_data |= !zero;
                m.next_version += 1;
                let ver = m.next_version;
                for i in 0..n {
                    let data = if zero {
                        vec![0; BLOCK]
                    } else {
                        content(ver, block + i)
                    };
                    h.buf.slot_mut(0, MAX_BLOCKS_PER_IO * BLOCK)[i as usize * BLOCK..][..BLOCK]
                        .copy_from_slice(&data);
                }
                let r = h.io(
                    v,
                    IoKind::Write { fua: ver % 5 == 0 },
                    block,
                    n,
                    vol % 2 == 0,
                );
                prop_assert_eq!(r, (n * BLOCK_BYTES) as i32);
                let blocks = &mut m.images.get_mut(&v).expect("vol").1;
                for i in 0..n {
                    blocks[(block + i) as usize] = if zero { 0 } else { ver };
                }
            }
            Op::Trim { vol, block, n } => {
                let Some(v) = m.pick(true, vol) else { continue };
                let kind = if block % 2 == 0 {
                    IoKind::Deallocate
                } else {
                    IoKind::WriteZeroes
                };
                prop_assert!(h.io(v, kind, block, n, false) >= 0);
                let blocks = &mut m.images.get_mut(&v).expect("vol").1;
                for i in 0..n {
                    blocks[(block + i) as usize] = 0;
                }
            }
            Op::Snapshot { vol } => {
                let Some(v) = m.pick(true, vol) else { continue };
                let s = Uuid::new_v4();
                h.st().snapshot(v, s).expect("snapshot");
                let data = m.images[&v].1.clone();
                m.images.insert(s, (false, data));
            }
            Op::Clone { snap } => {
                let Some(s) = m.pick(false, snap) else {
                    continue;
                };
                let v = Uuid::new_v4();
                h.st().clone_volume(s, v).expect("clone");
                let data = m.images[&s].1.clone();
                m.images.insert(v, (true, data));
            }
            Op::Rollback { vol, snap } => {
                let (Some(v), Some(s)) = (m.pick(true, vol), m.pick(false, snap)) else {
                    continue;
                };
                h.st().rollback(v, s).expect("rollback");
                let data = m.images[&s].1.clone();
                m.images.get_mut(&v).expect("vol").1 = data;
            }
            Op::DeleteVolume { vol } => {
                let Some(v) = m.pick(true, vol) else { continue };
                h.st().delete(v).expect("delete");
                m.images.remove(&v);
            }
            Op::DeleteSnapshot { snap } => {
                let Some(s) = m.pick(false, snap) else {
                    continue;
                };
                h.st().delete(s).expect("delete");
                m.images.remove(&s);
            }
            Op::Flush => {
                h.st().flush().expect("flush");
            }
            Op::Reopen => {
                let before = h.st().tree().clone();
                drop(h.store.take());
                h.store = Some(open(h.dir.path()));
                let after = h.st().tree().clone();
                prop_assert!(before.layers == after.layers, "reopened layers differ");
                prop_assert!(before.images == after.images, "reopened images differ");
            }
        }
        h.check(&m)?;
    }
    // The full map of every image, paged three blocks at a time, lists exactly its data.
    for (&id, (_, blocks)) in &m.images {
        let want: Vec<u64> = (0..h.blocks).filter(|&b| blocks[b as usize] != 0).collect();
        let mut got: Vec<u64> = Vec::new();
        let mut from = 0;
        loop {
            let page = h
                .st()
                .changed_blocks(id, None, from, h.blocks, 3)
                .expect("map");
            got.extend(&page);
            match page.last() {
                Some(&last) if page.len() == 3 => from = last + 1,
                _ => break,
            }
        }
        prop_assert_eq!(got, want, "full map of {}", id);
    }
    // No space leaks: once frees are released, allocated bytes are exactly what layers hold.
    h.st().flush().expect("flush");
    let stored: u64 = h.st().tree().layers.values().map(|l| l.stored_bytes).sum();
    prop_assert_eq!(h.st().stats().used_bytes, stored);
    // On an io_uring queue the reads above went through the ring, not the inline path (a
    // memory-backed TMPDIR would quietly test that instead); a memory-backed pool runs
    // inline on purpose.
    let memory = h.dir.path().starts_with("/dev/shm");
    prop_assert!(
        !(h.q.is_uring() && wrote_data && !memory) || h.q.ring_ops() > 0,
        "data was written but no I/O reached the ring"
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn extent_map_matches_the_model_through_io_uring(ops in proptest::collection::vec(op(), 1..40)) {
        let q = IoQueue::new();
        prop_assert!(q.is_uring(), "io_uring is unavailable: this would test the fallback");
        run(ops, q)?;
    }

    #[test]
    fn extent_map_matches_the_model_on_the_sync_path(ops in proptest::collection::vec(op(), 1..40)) {
        run(ops, IoQueue::new_sync())?;
    }

    #[test]
    fn long_runs_match_the_model_through_io_uring(
        ops in proptest::collection::vec(op_sized(LONG_BLOCKS, MAX_BLOCKS_PER_IO as u64), 1..60)
    ) {
        let q = IoQueue::new();
        prop_assert!(q.is_uring(), "io_uring is unavailable: this would test the fallback");
        run_sized(ops, q, LONG_BLOCKS)?;
    }

    #[test]
    fn extent_map_matches_the_model_on_a_memory_backed_pool(
        ops in proptest::collection::vec(op_sized(LONG_BLOCKS, MAX_BLOCKS_PER_IO as u64), 1..60)
    ) {
        if let Some(h) = Harness::in_memory(IoQueue::new()) {
            prop_assert!(h.st().stats().capacity_bytes > 0);
            run_on(h, ops, LONG_BLOCKS)?;
        }
    }

    #[test]
    fn long_runs_match_the_model_on_the_sync_path(
        ops in proptest::collection::vec(op_sized(LONG_BLOCKS, MAX_BLOCKS_PER_IO as u64), 1..60)
    ) {
        run_sized(ops, IoQueue::new_sync(), LONG_BLOCKS)?;
    }
}

#[test]
fn a_flipped_bit_on_the_device_is_a_media_error_not_bad_data() {
    let mut h = Harness::new(IoQueue::new());
    let v = Uuid::new_v4();
    h.st().create_volume(v).expect("create");
    h.buf.slot_mut(0, BLOCK).copy_from_slice(&content(1, 3));
    assert_eq!(
        h.io(v, IoKind::Write { fua: true }, 3, 1, false),
        BLOCK as i32
    );
    let e = h
        .st()
        .tree()
        .resolve(h.st().tree().layer_of(v).expect("layer"), 3)
        .expect("mapped");
    let dev = std::fs::OpenOptions::new()
        .write(true)
        .open(h.dir.path().join("dev0"))
        .expect("device");
    use std::os::unix::fs::FileExt;
    dev.write_all_at(b"X", e.sector * 512 + 100)
        .expect("corrupt");
    assert_eq!(h.io(v, IoKind::Read, 3, 1, false), -libc::EIO);
    assert_eq!(h.st().media_errors_of(v), 1);
    let seen = h.st().take_media_errors();
    assert_eq!(
        seen,
        vec![MediaError {
            image: v,
            block: 3,
            sector: e.sector
        }]
    );
    // Other blocks still read (as zeroes: never written).
    assert_eq!(h.io(v, IoKind::Read, 4, 1, false), BLOCK as i32);
}

#[test]
fn compressible_data_takes_less_space_and_reads_back() {
    let mut h = Harness::new(IoQueue::new());
    let v = Uuid::new_v4();
    h.st().create_volume(v).expect("create");
    for b in 0..16u64 {
        h.buf.slot_mut(0, BLOCK).copy_from_slice(&content(2, b));
        assert_eq!(
            h.io(v, IoKind::Write { fua: false }, b, 1, true),
            BLOCK as i32
        );
    }
    let u = h.st().usage(v).expect("usage");
    assert_eq!(u.visible_blocks, 16);
    assert!(
        u.owned_bytes * 4 <= u.owned_logical_bytes,
        "ratio > 4 for repetitive data: {u:?}"
    );
    assert!(h.st().stats().compression_ratio() > 4.0);
    let r = h.io(v, IoKind::Read, 0, 16, false);
    assert_eq!(r, 16 * BLOCK as i32);
    for b in 0..16usize {
        assert_eq!(
            &h.buf.slot(0, 16 * BLOCK)[b * BLOCK..][..BLOCK],
            &content(2, b as u64)[..]
        );
    }
}

#[test]
fn a_full_pool_answers_enospc_and_frees_on_delete() {
    let mut h = Harness::new(IoQueue::new_sync());
    let v = Uuid::new_v4();
    h.st().create_volume(v).expect("create");
    let pages = (4u64 << 20) / BLOCK_BYTES;
    let mut written = 0;
    for b in 0..pages + 8 {
        h.buf.slot_mut(0, BLOCK).copy_from_slice(&content(3, b));
        let r = h.io(v, IoKind::Write { fua: false }, b, 1, false);
        if r == -libc::ENOSPC {
            break;
        }
        assert_eq!(r, BLOCK as i32);
        written += 1;
    }
    assert_eq!(written, pages, "every page is usable, then ENOSPC");
    h.st().delete(v).expect("delete");
    h.st().flush().expect("flush");
    assert_eq!(h.st().stats().used_bytes, 0);
}

/// With syncs off the reactor, overwrites that free more than [`MAX_PENDING_FREES`]
/// extents on a pool smaller than what they write: the writer only asks, the store's worker
/// thread makes the metadata durable and releases the space, and the writes go on reusing
/// it; every block reads back its last version.
#[test]
fn freed_space_is_released_by_the_worker_thread_and_reused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pages = (MAX_PENDING_FREES + MAX_PENDING_FREES / 4) as u64;
    let store = BlockStore::open(
        &dir.path().join("meta"),
        &[DeviceSpec {
            path: dir.path().join("dev0"),
            size_bytes: pages * BLOCK_BYTES,
        }],
    )
    .expect("open store");
    store.set_syncs_off_reactor(true);
    let mut h = Harness {
        dir,
        store: Some(store),
        q: IoQueue::new_sync(),
        buf: SlotBuf::new(1, MAX_BLOCKS_PER_IO * BLOCK).expect("buf"),
        blocks: BLOCKS,
    };
    let v = Uuid::new_v4();
    h.st().create_volume(v).expect("create");
    let writes = 2 * pages;
    for i in 0..writes {
        let b = i % BLOCKS;
        h.buf.slot_mut(0, BLOCK).copy_from_slice(&content(i + 1, b));
        let r = h.io(v, IoKind::Write { fua: false }, b, 1, false);
        assert_eq!(r, BLOCK as i32, "write {i} of {writes} on {pages} pages");
    }
    assert!(
        h.st().background_reclaims.load(Ordering::Relaxed) > 0,
        "no reclaim ran on the worker thread"
    );
    for b in 0..BLOCKS {
        let last = (writes - 1 - b) / BLOCKS * BLOCKS + b;
        assert_eq!(h.io(v, IoKind::Read, b, 1, false), BLOCK as i32);
        assert!(
            h.buf.slot(0, BLOCK) == &content(last + 1, b)[..],
            "block {b} is not its last write"
        );
    }
    h.st().flush().expect("flush");
    assert_eq!(h.st().stats().used_bytes, BLOCKS * BLOCK_BYTES);
}

/// With syncs off the reactor, on a queue with a remote completion sink (a reactor's), a
/// Flush's syncs run on the store's worker thread: nothing completes on the queue, and the
/// completion (with the writes before it durable) arrives through the sink, from that
/// thread.
#[test]
fn a_flush_on_a_reactor_completes_from_the_worker_thread() {
    use crate::backend::CompletionSink;
    #[derive(Default)]
    struct Sink(
        std::sync::Mutex<Vec<(u64, i32, Option<String>)>>,
        std::sync::Condvar,
    );
    impl CompletionSink for Sink {
        fn complete(&self, tag: u64, result: i32) {
            let name = std::thread::current().name().map(str::to_string);
            self.0.lock().expect("lock").push((tag, result, name));
            self.1.notify_all();
        }
    }
    let mut h = Harness::new(IoQueue::new_sync());
    let sink = Arc::new(Sink::default());
    h.q.set_remote(sink.clone());
    h.st().set_syncs_off_reactor(true);
    let v = Uuid::new_v4();
    h.st().create_volume(v).expect("create");
    h.buf.slot_mut(0, BLOCK).copy_from_slice(&content(1, 3));
    assert_eq!(
        h.io(v, IoKind::Write { fua: false }, 3, 1, false),
        BLOCK as i32
    );
    let img = h.st().image(v, BLOCKS * BLOCK_BYTES, false);
    let req = IoRequest {
        kind: IoKind::Flush,
        offset: 0,
        len: 0,
        buf: std::ptr::null_mut(),
        tag: 9,
    };
    // SAFETY: a Flush moves no data.
    unsafe { img.submit(&mut h.q, &req) }.expect("submit");
    h.q.submit().expect("ring");
    let mut on_queue = Vec::new();
    h.q.reap(|t, r| on_queue.push((t, r)));
    assert!(on_queue.is_empty(), "completed on the queue: {on_queue:?}");
    let seen = sink.0.lock().expect("lock");
    let (seen, _) = sink
        .1
        .wait_timeout_while(seen, std::time::Duration::from_secs(10), |s| s.is_empty())
        .expect("lock");
    assert_eq!(
        seen.as_slice(),
        &[(9, 0, Some("evstor-store".to_string()))],
        "the Flush's completion"
    );
}

#[test]
fn diff_lists_blocks_written_between_snapshots() {
    let mut h = Harness::new(IoQueue::new_sync());
    let v = Uuid::new_v4();
    let (s1, s2) = (Uuid::new_v4(), Uuid::new_v4());
    h.st().create_volume(v).expect("create");
    for b in [1u64, 2, 40] {
        h.buf.slot_mut(0, BLOCK).copy_from_slice(&content(5, b));
        h.io(v, IoKind::Write { fua: false }, b, 1, false);
    }
    h.st().snapshot(v, s1).expect("s1");
    for b in [2u64, 7] {
        h.buf.slot_mut(0, BLOCK).copy_from_slice(&content(7, b));
        h.io(v, IoKind::Write { fua: false }, b, 1, false);
    }
    h.io(v, IoKind::Deallocate, 40, 1, false);
    h.st().snapshot(v, s2).expect("s2");
    let st = h.st();
    assert_eq!(
        st.changed_blocks(s2, Some(s1), 0, BLOCKS, 100)
            .expect("diff"),
        vec![2, 7, 40]
    );
    assert_eq!(
        st.changed_blocks(s2, None, 0, BLOCKS, 100).expect("full"),
        vec![1, 2, 7]
    );
    assert_eq!(
        st.changed_blocks(s1, None, 0, BLOCKS, 100).expect("full"),
        vec![1, 2, 40]
    );
    assert_eq!(
        st.changed_blocks(s2, Some(s1), 3, BLOCKS, 1)
            .expect("paged"),
        vec![7]
    );
    assert!(matches!(
        st.changed_blocks(s1, Some(s2), 0, BLOCKS, 100),
        Err(StoreError::Tree(TreeError::NotSameChain { .. }))
    ));
}

#[test]
fn truncate_frees_blocks_past_the_end_and_a_grow_reads_zeroes() {
    let mut h = Harness::new(IoQueue::new_sync());
    let v = Uuid::new_v4();
    let s = Uuid::new_v4();
    h.st().create_volume(v).expect("create");
    for b in [2u64, 30, 40] {
        h.buf.slot_mut(0, BLOCK).copy_from_slice(&content(9, b));
        assert_eq!(
            h.io(v, IoKind::Write { fua: false }, b, 1, false),
            BLOCK as i32
        );
    }
    h.st().snapshot(v, s).expect("snapshot");
    h.buf.slot_mut(0, BLOCK).copy_from_slice(&content(11, 35));
    h.io(v, IoKind::Write { fua: false }, 35, 1, false);
    h.st().truncate(v, 32).expect("truncate");
    assert_eq!(
        h.st().changed_blocks(v, None, 0, BLOCKS, 100).expect("map"),
        vec![2, 30]
    );
    for b in [35u64, 40] {
        assert_eq!(h.io(v, IoKind::Read, b, 1, false), BLOCK as i32);
        assert!(
            h.buf.slot(0, BLOCK).iter().all(|&x| x == 0),
            "block {b} after the cut"
        );
    }
    // The snapshot keeps its blocks; truncating again writes nothing.
    assert_eq!(
        h.st().changed_blocks(s, None, 0, BLOCKS, 100).expect("map"),
        vec![2, 30, 40]
    );
    assert!(
        !h.st().tree().maps_beyond(v, 32),
        "nothing left to cut: the next pass writes nothing"
    );
}

#[test]
fn devices_may_be_appended_but_not_reordered_or_dropped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dev = |n: &str| DeviceSpec {
        path: dir.path().join(n),
        size_bytes: 1 << 20,
    };
    let meta = dir.path().join("meta");
    let v = Uuid::new_v4();
    {
        let st = BlockStore::open(&meta, &[dev("a")]).expect("open");
        st.create_volume(v).expect("create");
        assert_eq!(st.stats().capacity_bytes, 1 << 20);
    }
    let st = BlockStore::open(&meta, &[dev("a"), dev("b")]).expect("append");
    assert_eq!(st.stats().capacity_bytes, 2 << 20);
    assert!(st.contains(v));
    drop(st);
    let err = BlockStore::open(&meta, &[dev("b"), dev("a")]).expect_err("reordered");
    assert!(err.to_string().contains("appended"), "{err}");
    BlockStore::open(&meta, &[dev("a")]).expect_err("dropped");
}

#[test]
fn deallocate_is_ignored_when_trim_is_disabled_but_write_zeroes_is_not() {
    let mut h = Harness::new(IoQueue::new_sync());
    let v = Uuid::new_v4();
    h.st().create_volume(v).expect("create");
    h.buf.slot_mut(0, 2 * BLOCK)[..BLOCK].copy_from_slice(&content(1, 0));
    h.buf.slot_mut(0, 2 * BLOCK)[BLOCK..].copy_from_slice(&content(1, 1));
    assert_eq!(
        h.io(v, IoKind::Write { fua: false }, 0, 2, false),
        2 * BLOCK as i32
    );
    h.st().set_trim(false);
    assert_eq!(h.io(v, IoKind::Deallocate, 0, 1, false), BLOCK as i32);
    assert_eq!(
        h.st().usage(v).expect("usage").visible_blocks,
        2,
        "nothing released"
    );
    assert_eq!(h.io(v, IoKind::WriteZeroes, 1, 1, false), BLOCK as i32);
    assert_eq!(h.io(v, IoKind::Read, 0, 2, false), 2 * BLOCK as i32);
    assert_eq!(h.buf.slot(0, BLOCK), &content(1, 0)[..]);
    assert!(h.buf.slot(0, 2 * BLOCK)[BLOCK..].iter().all(|&b| b == 0));
    h.st().set_trim(true);
    assert_eq!(h.io(v, IoKind::Deallocate, 0, 1, false), BLOCK as i32);
    assert_eq!(h.st().usage(v).expect("usage").visible_blocks, 0);
}

/// Reads block `b` of `image` through a fresh handle.
fn read_block(h: &mut Harness, image: Uuid, b: u64) -> Vec<u8> {
    assert_eq!(
        h.io(image, IoKind::Read, b, 1, false),
        BLOCK as i32,
        "read {b}"
    );
    h.buf.slot(0, BLOCK).to_vec()
}

/// Flushes (releasing pending frees), then checks the pool holds exactly the space the
/// layers' extents take.
fn assert_no_space_leaked(h: &Harness) {
    h.st().flush().expect("flush");
    let stored: u64 = h.st().tree().layers.values().map(|l| l.stored_bytes).sum();
    assert_eq!(h.st().stats().used_bytes, stored, "no space leaked");
}

/// Writes `version`'s content to blocks `0..n` of `v`.
fn write_blocks(h: &mut Harness, v: Uuid, version: u64, n: u64) {
    for b in 0..n {
        h.buf
            .slot_mut(0, BLOCK)
            .copy_from_slice(&content(version, b));
        assert_eq!(
            h.io(v, IoKind::Write { fua: false }, b, 1, false),
            BLOCK as i32
        );
    }
}

/// Asserts blocks `0..n` of `v` hold `version`'s content.
fn assert_blocks(h: &mut Harness, v: Uuid, version: u64, n: u64) {
    for b in 0..n {
        assert_eq!(h.io(v, IoKind::Read, b, 1, false), BLOCK as i32);
        assert!(
            h.buf.slot(0, BLOCK) == &content(version, b)[..],
            "block {b} is not version {version}"
        );
    }
}

/// The reconciler repeats a rollback it cannot prove finished (a crash before its completion
/// event): a repeat of a finished rollback, in the same process or after a restart, changes
/// nothing; a rollback after new writes is a new one and does roll back.
#[test]
fn a_repeated_rollback_is_a_no_op_and_a_later_one_rolls_back_again() {
    let mut h = Harness::new(IoQueue::new_sync());
    let (v, s) = (Uuid::new_v4(), Uuid::new_v4());
    h.st().create_volume(v).expect("create");
    write_blocks(&mut h, v, 1, 4);
    h.st().snapshot(v, s).expect("snapshot");
    write_blocks(&mut h, v, 2, 4);
    h.st().rollback(v, s).expect("rollback");
    assert_blocks(&mut h, v, 1, 4);
    let done = h.st().tree().clone();

    h.st().rollback(v, s).expect("repeated rollback");
    assert!(
        *h.st().tree() == done,
        "a repeated rollback changed the tree"
    );
    drop(h.store.take());
    h.store = Some(open(h.dir.path()));
    h.st().rollback(v, s).expect("rollback after a restart");
    assert!(
        h.st().tree().layers == done.layers && h.st().tree().images == done.images,
        "a rollback repeated after a restart changed the tree"
    );
    assert_blocks(&mut h, v, 1, 4);

    write_blocks(&mut h, v, 3, 2);
    h.st().rollback(v, s).expect("a new rollback");
    assert_blocks(&mut h, v, 1, 4);
    assert_no_space_leaked(&h);
}
