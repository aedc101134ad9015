//! Synchronous replication over loopback: a target whose namespace is a replicated block
//! store image, a replica server with its own store, and the crate's initiator as the host.
//! Writes land on both copies before they are acknowledged; a replica that has seen a newer
//! epoch fences the primary, its writes at once and its reads once its read lease ran out;
//! a failed replica holds writes until it is dropped from the in-sync set, and is reported;
//! a snapshot taken while hosts write is the same on both copies.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use evstor_datapath::backend::run_sync;
use evstor_datapath::blockstore::{BlockStore, DeviceSpec};
use evstor_datapath::initiator::Session;
use evstor_datapath::nvme::Status;
use evstor_datapath::replica::{snapshot_members, Member, ReplicaHub, ReplicaServer, SnapshotHook};
use evstor_datapath::{
    start, Acl, Backend, Backing, IoKind, IoQueue, IoRequest, NamespaceSpec, Replication,
    TargetConfig, TargetHandle,
};
use uuid::Uuid;

const NQN: &str = "nqn.2024-01.io.evstor:replication";
const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:0b1e0b1e-0000-4000-8000-00000000abcd";
const BLOCK: usize = 4096;
const NS_BYTES: u64 = 16 << 20;

fn store(dir: &Path, name: &str, volume: Uuid) -> Arc<BlockStore> {
    let dev = DeviceSpec {
        path: dir.join(format!("{name}.dev")),
        size_bytes: 256 << 20,
    };
    let s = BlockStore::open(&dir.join(format!("{name}.meta")), &[dev]).expect("open store");
    s.create_volume(volume).expect("create image");
    s
}

fn spec(volume: Uuid, store: &Arc<BlockStore>, replication: Option<Replication>) -> NamespaceSpec {
    NamespaceSpec {
        nsid: 1,
        uuid: *volume.as_bytes(),
        size_bytes: NS_BYTES,
        backing: Backing::Image {
            store: store.clone(),
            compress: false,
            replication,
        },
        host_acl: Acl::AllowAny,
        ip_acl: Acl::AllowAny,
        qos: Default::default(),
        ana: Default::default(),
    }
}

/// Runs one request of `len` bytes at `offset` on a store's image directly (no network),
/// with `buf`'s first slot as its data.
fn on_image(
    store: &Arc<BlockStore>,
    volume: Uuid,
    kind: IoKind,
    offset: u64,
    buf: &mut evstor_datapath::buffer::SlotBuf,
    len: usize,
) {
    let img = store.image(volume, NS_BYTES, false);
    let mut q = IoQueue::new_sync();
    let req = IoRequest {
        kind,
        offset,
        len: len as u32,
        buf: buf.slot_ptr(0),
        tag: 1,
    };
    // SAFETY: the buffer outlives the request, which completes before this returns.
    let res = unsafe { run_sync(&img, &mut q, &req) }.expect("run");
    assert_eq!(res, len as i32, "{kind:?} on the image");
}

/// Reads `blocks` blocks at `lba` straight from a store's image (no network).
fn read_image(store: &Arc<BlockStore>, volume: Uuid, lba: u64, blocks: usize) -> Vec<u8> {
    const PART: usize = 32;
    let mut buf = evstor_datapath::buffer::SlotBuf::new(1, PART * BLOCK).expect("buffer");
    let mut out = Vec::with_capacity(blocks * BLOCK);
    for first in (0..blocks).step_by(PART) {
        let n = PART.min(blocks - first);
        let offset = (lba + first as u64) * BLOCK as u64;
        on_image(store, volume, IoKind::Read, offset, &mut buf, n * BLOCK);
        out.extend_from_slice(buf.slot(0, n * BLOCK));
    }
    out
}

fn pattern(blocks: usize, seed: u8) -> Vec<u8> {
    (0..blocks * BLOCK)
        .map(|i| ((i / BLOCK) as u8).wrapping_mul(29) ^ (i as u8) ^ seed)
        .collect()
}

struct Pair {
    _dir: tempfile::TempDir,
    volume: Uuid,
    primary: Arc<BlockStore>,
    replica: Arc<BlockStore>,
    server: ReplicaServer,
    hub: ReplicaHub,
    member: Arc<Member>,
    target: TargetHandle,
    /// While set, the replica's snapshot hook fails.
    refuse_snapshots: Arc<AtomicBool>,
}

/// A primary target replicating nsid 1 at `epoch` to a replica server.
fn pair(epoch: u64) -> Pair {
    let dir = tempfile::tempdir().expect("tempdir");
    let volume = Uuid::new_v4();
    let primary = store(dir.path(), "primary", volume);
    let replica = store(dir.path(), "replica", volume);
    let on_replica = replica.clone();
    let refuse_snapshots = Arc::new(AtomicBool::new(false));
    let refuse = refuse_snapshots.clone();
    let hook: SnapshotHook = Arc::new(move |v, s| {
        if refuse.load(Ordering::SeqCst) {
            return Err(std::io::Error::from_raw_os_error(libc::ENOSPC));
        }
        on_replica
            .retake_snapshot(Uuid::from_bytes(v), Uuid::from_bytes(s))
            .map_err(std::io::Error::other)
    });
    let server = ReplicaServer::start_with("127.0.0.1:0".parse().expect("addr"), Some(hook))
        .expect("listen");
    let image: Arc<dyn Backend> = Arc::new(replica.image(volume, NS_BYTES, false));
    server.set_images(vec![(*volume.as_bytes(), Some(image), epoch)]);
    // As `evstor serve` does: the links are driven by the target's reactor.
    let cfg = TargetConfig::new("127.0.0.1:0".parse().expect("addr"), NQN);
    let target = start(cfg, Vec::new()).expect("target");
    let hub = ReplicaHub::hosted(target.link_home());
    let link = hub.link(server.local_addr()).expect("link");
    let member = Arc::new(Member::new(link, NS_BYTES, true));
    let replication = Replication {
        epoch,
        members: vec![member.clone()],
    };
    target.set_namespaces(vec![spec(volume, &primary, Some(replication))]);
    Pair {
        _dir: dir,
        volume,
        primary,
        replica,
        server,
        hub,
        member,
        target,
        refuse_snapshots,
    }
}

/// The failures the hub reports first, waiting up to `limit` for one.
fn reported(hub: &ReplicaHub, limit: Duration) -> Vec<([u8; 16], SocketAddr)> {
    let deadline = Instant::now() + limit;
    loop {
        let f = hub.take_failures();
        if !f.is_empty() {
            return f;
        }
        assert!(Instant::now() < deadline, "the replica was never reported");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_write_is_on_the_replica_before_it_is_acknowledged() -> anyhow::Result<()> {
    let p = pair(3);
    let mut s = Session::connect(p.target.local_addr(), NQN, HOST)?;
    // Small (in-capsule), large (R2T, several backend parts) and FUA writes, then a flush.
    let small = pattern(2, 1);
    let large = pattern(96, 2);
    s.write(1, 0, &small)?;
    s.write(1, 100, &large)?;
    s.write_fua(1, 1000, &pattern(1, 3))?;
    s.flush(1)?;
    s.write_zeroes(1, 110, 4)?;
    let mut want_large = large.clone();
    want_large[10 * BLOCK..14 * BLOCK].fill(0);
    for store in [&p.primary, &p.replica] {
        assert_eq!(read_image(store, p.volume, 0, 2), small);
        assert_eq!(read_image(store, p.volume, 100, 96), want_large);
        assert_eq!(read_image(store, p.volume, 1000, 1), pattern(1, 3));
    }
    assert_eq!(s.read(1, 100, 96)?, want_large);
    assert!(p.hub.take_failures().is_empty(), "no replica failed");
    p.target.shutdown();
    Ok(())
}

#[test]
fn a_replica_that_saw_a_newer_epoch_fences_the_primary() -> anyhow::Result<()> {
    let p = pair(1);
    let mut s = Session::connect(p.target.local_addr(), NQN, HOST)?;
    s.write(1, 0, &pattern(1, 7))?;
    // Another primary was promoted (epoch 2) and reached the replica first.
    let image: Arc<dyn Backend> = Arc::new(p.replica.image(p.volume, NS_BYTES, false));
    p.server
        .set_images(vec![(*p.volume.as_bytes(), Some(image), 2)]);
    let err = s
        .write(1, 0, &pattern(1, 8))
        .expect_err("a fenced write fails");
    assert_eq!(err.status(), Some(Status::ANA_INACCESSIBLE));
    assert_eq!(
        read_image(&p.replica, p.volume, 0, 1),
        pattern(1, 7),
        "replica unchanged"
    );
    assert!(
        p.hub.take_failures().is_empty(),
        "fencing is not a replica failure"
    );
    p.target.shutdown();
    Ok(())
}

/// Reads are served from the primary's copy only while the replica's promise not to serve
/// the volume holds (renewed by every accepted frame); past it, a read asks the replica
/// first. A replica promoted meanwhile answers that a newer primary exists, so the deposed
/// primary fails the read as a path error instead of returning data the new primary may
/// have overwritten; and the promoted replica knows how long it must wait before serving.
#[test]
fn a_deposed_primary_serves_no_read_once_its_lease_ran_out() -> anyhow::Result<()> {
    use evstor_datapath::limits::{REPLICA_LEASE_TRUST_PERCENT, REPLICA_READ_LEASE_MS};
    let trusted = Duration::from_millis(REPLICA_READ_LEASE_MS * REPLICA_LEASE_TRUST_PERCENT / 100);
    let p = pair(1);
    let mut s = Session::connect(p.target.local_addr(), NQN, HOST)?;
    s.write(1, 0, &pattern(1, 5))?;
    // Past the lease, a read asks the replica, which still knows this primary: served.
    std::thread::sleep(trusted);
    assert_eq!(s.read(1, 0, 1)?, pattern(1, 5));
    // The replica is promoted (epoch 2): it now holds the volume as its primary. It still
    // owes the old primary the lease of the frame just accepted, and says for how long.
    let before = Instant::now();
    s.write(1, 1, &pattern(1, 6))?;
    p.server.set_images(vec![(*p.volume.as_bytes(), None, 2)]);
    let asked = Instant::now();
    let owed = p.server.lease_given_for(*p.volume.as_bytes());
    assert!(owed <= Duration::from_millis(REPLICA_READ_LEASE_MS));
    assert!(
        owed + asked.duration_since(before) >= Duration::from_millis(REPLICA_READ_LEASE_MS),
        "the promotion must wait out the lease given at the last write ({owed:?} owed)"
    );
    std::thread::sleep(trusted);
    match s.read(1, 0, 2) {
        Ok(_) => panic!("a deposed primary served a read from its own copy"),
        Err(e) => assert_eq!(e.status(), Some(Status::ANA_INACCESSIBLE), "{e}"),
    }
    assert!(
        p.hub.take_failures().is_empty(),
        "fencing is not a replica failure"
    );
    p.target.shutdown();
    Ok(())
}

#[test]
fn a_failed_replica_holds_writes_until_it_is_dropped_from_the_in_sync_set() -> anyhow::Result<()> {
    let p = pair(1);
    let addr: SocketAddr = p.server.local_addr();
    let mut s = Session::connect(p.target.local_addr(), NQN, HOST)?;
    s.write(1, 0, &pattern(1, 1))?;
    // The replica's server goes away.
    p.server.shutdown();
    drop(p.server);
    let done = Arc::new(AtomicBool::new(false));
    let d = done.clone();
    let writer = std::thread::spawn(move || {
        let r = s.write(1, 5, &pattern(4, 9));
        d.store(true, Ordering::SeqCst);
        (r, s)
    });
    // The primary reports the replica; until the control plane drops it, nothing is
    // acknowledged.
    let failures = reported(&p.hub, Duration::from_secs(20));
    assert_eq!(failures, vec![(*p.volume.as_bytes(), addr)]);
    assert!(
        !done.load(Ordering::SeqCst),
        "acknowledged without its replica"
    );
    p.member.drop_replica();
    let (r, mut s) = writer.join().expect("writer");
    r?;
    assert_eq!(read_image(&p.primary, p.volume, 5, 4), pattern(4, 9));
    // Later writes do not wait for the dropped replica.
    p.target
        .set_namespaces(vec![spec(p.volume, &p.primary, None)]);
    s.write(1, 20, &pattern(1, 4))?;
    p.target.shutdown();
    Ok(())
}

/// A primary that is deposed (another server took the volume over, e.g. a planned
/// hand-over) while a write waits for a failed replica does not acknowledge it: nobody
/// recorded the replica out of sync, so the new primary (or that replica) may lack it. The
/// write fails as a path error and the host retries on the new primary; so does a write
/// that still reaches the old table after the hand-over.
#[test]
fn a_deposed_primary_acknowledges_no_write_a_replica_missed() -> anyhow::Result<()> {
    let p = pair(1);
    let mut s = Session::connect(p.target.local_addr(), NQN, HOST)?;
    s.write(1, 0, &pattern(1, 1))?;
    p.server.shutdown();
    drop(p.server);
    let writer = std::thread::spawn(move || {
        let r = s.write(1, 5, &pattern(4, 9));
        (r, s)
    });
    reported(&p.hub, Duration::from_secs(20));
    // This server's table no longer leads the volume: its members are deposed, not dropped.
    p.member.depose();
    let (r, mut s) = writer.join().expect("writer");
    match r {
        Ok(()) => panic!("a deposed primary acknowledged a write its replica lacks"),
        Err(e) => assert_eq!(e.status(), Some(Status::ANA_INACCESSIBLE), "{e}"),
    }
    // A write through the old table (the namespace is still published with the member).
    match s.write(1, 20, &pattern(1, 4)) {
        Ok(()) => panic!("a write after the hand-over was acknowledged by the old primary"),
        Err(e) => assert_eq!(e.status(), Some(Status::ANA_INACCESSIBLE), "{e}"),
    }
    // Nor does it serve a read from its own copy.
    match s.read(1, 0, 1) {
        Ok(_) => panic!("a deposed primary served a read"),
        Err(e) => assert_eq!(e.status(), Some(Status::ANA_INACCESSIBLE), "{e}"),
    }
    p.target.shutdown();
    Ok(())
}

/// A replica that missed writes is rebuilt while writes go on: only the chunks it missed
/// are copied, and afterwards both copies are identical and writes wait for it again.
#[test]
fn a_rebuild_copies_only_the_missed_chunks_while_writes_go_on() -> anyhow::Result<()> {
    use evstor_datapath::limits::REBUILD_CHUNK_BYTES;
    use evstor_datapath::replica::{rebuild, Mode};
    let p = pair(1);
    let addr = p.server.local_addr();
    let chunk_blocks = REBUILD_CHUNK_BYTES / BLOCK as u64;
    let mut s = Session::connect(p.target.local_addr(), NQN, HOST)?;
    s.write(1, 0, &pattern(4, 1))?;
    // The replica goes away; a write to chunk 3 is held until the replica is dropped, a
    // write to chunk 5 after that skips it.
    p.server.shutdown();
    drop(p.server);
    let writer = std::thread::spawn(move || {
        let r = s.write(1, 3 * chunk_blocks + 2, &pattern(2, 2));
        (r, s)
    });
    reported(&p.hub, Duration::from_secs(20));
    p.member.drop_replica();
    let (r, mut s) = writer.join().expect("writer");
    r?;
    s.write(1, 5 * chunk_blocks, &pattern(8, 3))?;
    assert_eq!(p.member.state.mode(), Mode::Dropped);
    assert_eq!(
        p.member.state.dirty_chunks(),
        2,
        "chunks 3 and 5 were missed"
    );
    // The replica's server is back (same store); the primary rebuilds it while a host
    // keeps writing to chunk 7 (writes before the rebuild starts mark it too).
    // (the old listener closes at its accept loop's next poll)
    let deadline = Instant::now() + Duration::from_secs(5);
    let server = loop {
        match ReplicaServer::start(addr) {
            Ok(s) => break s,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("listen again: {e}"),
        }
    };
    let image: Arc<dyn Backend> = Arc::new(p.replica.image(p.volume, NS_BYTES, false));
    server.set_images(vec![(*p.volume.as_bytes(), Some(image), 1)]);
    let stop = Arc::new(AtomicBool::new(false));
    let (st, target_addr) = (stop.clone(), p.target.local_addr());
    let live = std::thread::spawn(move || -> anyhow::Result<u32> {
        let mut h = Session::connect(target_addr, NQN, HOST)?;
        let mut n = 0u32;
        while !st.load(Ordering::SeqCst) || n < 8 {
            let lba = 7 * chunk_blocks + u64::from(n % 50) * 5;
            h.write(1, lba, &pattern(1, n as u8))?;
            n += 1;
        }
        Ok(n)
    });
    let local = p.primary.image(p.volume, NS_BYTES, false);
    let copied = rebuild(&p.member, &local, *p.volume.as_bytes(), 1, NS_BYTES, || {
        p.target
            .pass_barrier(Duration::from_secs(5))
            .map_err(std::io::Error::other)
    })?;
    stop.store(true, Ordering::SeqCst);
    let written = live.join().expect("live writer")?;
    assert!(written >= 8);
    assert!(
        copied == 2 * REBUILD_CHUNK_BYTES || copied == 3 * REBUILD_CHUNK_BYTES,
        "only the missed chunks (3, 5, maybe 7), not {copied} bytes"
    );
    assert_eq!(p.member.state.mode(), Mode::InSync);
    let blocks = (NS_BYTES / BLOCK as u64) as usize;
    assert!(
        read_image(&p.primary, p.volume, 0, blocks) == read_image(&p.replica, p.volume, 0, blocks),
        "the copies differ after the rebuild"
    );
    // Writes wait for it again: a write lands on both.
    s.write(1, 100, &pattern(1, 9))?;
    assert_eq!(read_image(&p.replica, p.volume, 100, 1), pattern(1, 9));
    p.target.shutdown();
    Ok(())
}

/// A replica that fails to take a snapshot does not hold it, and is reported like a replica
/// that failed any part: the control plane records it out of sync, and its rebuild copies
/// the snapshots it lacks first. Its part is held until then.
#[test]
fn a_replica_that_fails_to_take_a_snapshot_is_reported() -> anyhow::Result<()> {
    let p = pair(1);
    p.refuse_snapshots.store(true, Ordering::SeqCst);
    let took = snapshot_members(
        std::slice::from_ref(&p.member),
        *p.volume.as_bytes(),
        1,
        *Uuid::new_v4().as_bytes(),
        Duration::from_secs(1),
    );
    assert_eq!(took, [false], "the replica does not hold the snapshot");
    let failures = reported(&p.hub, Duration::from_secs(5));
    assert_eq!(
        failures,
        vec![(*p.volume.as_bytes(), p.server.local_addr())]
    );
    p.member.drop_replica();
    p.target.shutdown();
    Ok(())
}

/// Takes snapshot `snap` the way the control plane does: writes held and drained, the
/// replica's, then the primary's.
fn replicated_snapshot(p: &Pair, snap: Uuid) -> bool {
    let hold = p
        .target
        .hold_writes(*p.volume.as_bytes())
        .expect("the namespace is served");
    assert!(hold.drained(Duration::from_secs(10)), "writes drain");
    let took = snapshot_members(
        std::slice::from_ref(&p.member),
        *p.volume.as_bytes(),
        1,
        *snap.as_bytes(),
        Duration::from_secs(10),
    );
    p.primary
        .snapshot(p.volume, snap)
        .expect("primary snapshot");
    drop(hold);
    took == [true]
}

#[test]
fn a_snapshot_under_writes_is_the_same_on_every_copy_and_writes_wait_for_it() -> anyhow::Result<()>
{
    let p = pair(1);
    let blocks = (NS_BYTES / BLOCK as u64) as usize;
    // Two hosts write without pause, each block a new pattern, so a write that one copy's
    // snapshot has and the other's lacks shows.
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..2u64)
        .map(|w| {
            let (st, addr) = (stop.clone(), p.target.local_addr());
            std::thread::spawn(move || -> anyhow::Result<u64> {
                let mut h = Session::connect(addr, NQN, HOST)?;
                let mut n = 0u64;
                while !st.load(Ordering::SeqCst) {
                    let lba = (n * 7919 + w * 131) % (blocks as u64 - 8);
                    h.write(1, lba, &pattern(8, (n ^ w) as u8))?;
                    n += 1;
                }
                Ok(n)
            })
        })
        .collect();
    let snaps: Vec<Uuid> = (0..6).map(|_| Uuid::new_v4()).collect();
    for s in &snaps {
        std::thread::sleep(Duration::from_millis(30));
        assert!(replicated_snapshot(&p, *s), "the replica took snapshot {s}");
    }
    // While the gate is closed, a change parks: it completes only once the gate opens.
    let hold = p.target.hold_writes(*p.volume.as_bytes()).expect("served");
    let addr = p.target.local_addr();
    let parked = std::thread::spawn(move || -> anyhow::Result<()> {
        Session::connect(addr, NQN, HOST)?.write(1, 3, &pattern(1, 0xee))?;
        Ok(())
    });
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !parked.is_finished(),
        "a write completed through a closed gate"
    );
    drop(hold);
    parked.join().expect("parked writer")?;
    stop.store(true, Ordering::SeqCst);
    for w in writers {
        assert!(w.join().expect("writer")? > 0);
    }
    for s in &snaps {
        assert!(
            read_image(&p.primary, *s, 0, blocks) == read_image(&p.replica, *s, 0, blocks),
            "snapshot {s} differs between the copies"
        );
    }
    // A retaken snapshot replaces the one an earlier attempt left on the replica.
    let again = snaps[0];
    assert!(p.primary.delete(again).is_ok());
    assert!(replicated_snapshot(&p, again));
    assert!(read_image(&p.primary, again, 0, blocks) == read_image(&p.replica, again, 0, blocks));
    p.target.shutdown();
    Ok(())
}

/// Collects a raw part's answers (the test playing a primary by hand).
#[derive(Default)]
struct Answers(std::sync::Mutex<Vec<i32>>);

impl evstor_datapath::backend::CompletionSink for Answers {
    fn complete(&self, _tag: u64, result: i32) {
        self.0.lock().expect("answers").push(result);
    }
}

/// Writes `data` at `lba` of a store's image directly (a copy changed locally only).
fn write_image(store: &Arc<BlockStore>, volume: Uuid, lba: u64, data: &[u8]) {
    let mut buf = evstor_datapath::buffer::SlotBuf::new(1, data.len()).expect("buffer");
    buf.slot_mut(0, data.len()).copy_from_slice(data);
    let kind = IoKind::Write { fua: false };
    on_image(
        store,
        volume,
        kind,
        lba * BLOCK as u64,
        &mut buf,
        data.len(),
    );
}

/// A primary (A) replicating to B and C dies with two writes unacknowledged: one reached
/// only C, one only A's own copy. B takes over at a newer epoch having seen the switch:
/// it repairs C where the copies may differ (what either changed just before), then
/// rebuilds A from that and what it wrote since; every copy ends identical, and neither
/// copy moves the whole volume.
#[test]
fn after_a_failover_the_copies_are_made_equal_from_what_changed_around_it() -> anyhow::Result<()> {
    use evstor_datapath::limits::REBUILD_CHUNK_BYTES;
    use evstor_datapath::replica::{rebuild, repair, Frame, Mode, Op};
    let dir = tempfile::tempdir()?;
    let volume = Uuid::new_v4();
    let v = *volume.as_bytes();
    let (a, b, c) = (
        store(dir.path(), "a", volume),
        store(dir.path(), "b", volume),
        store(dir.path(), "c", volume),
    );
    let chunk = REBUILD_CHUNK_BYTES / BLOCK as u64;
    let listen = || ReplicaServer::start("127.0.0.1:0".parse().expect("addr")).expect("listen");
    let image = |s: &Arc<BlockStore>| -> Option<Arc<dyn Backend>> {
        Some(Arc::new(s.image(volume, NS_BYTES, false)))
    };
    let (sa, sb, sc) = (listen(), listen(), listen());
    sb.set_images(vec![(v, image(&b), 1)]);
    sc.set_images(vec![(v, image(&c), 1)]);
    let hub = ReplicaHub::new().expect("hub");
    let member = |s: &ReplicaServer, in_sync| {
        Arc::new(Member::new(
            hub.link(s.local_addr()).expect("link"),
            NS_BYTES,
            in_sync,
        ))
    };
    // Epoch 1: A serves, chunks 0 and 1 are written and acknowledged on every copy.
    let replication = Replication {
        epoch: 1,
        members: vec![member(&sb, true), member(&sc, true)],
    };
    let cfg = TargetConfig::new("127.0.0.1:0".parse()?, NQN);
    let ta = start(cfg, vec![spec(volume, &a, Some(replication))])?;
    let mut h = Session::connect(ta.local_addr(), NQN, HOST)?;
    h.write(1, 0, &pattern(8, 1))?;
    h.write(1, chunk + 3, &pattern(8, 2))?;
    drop(h);
    ta.shutdown();
    // A's last two writes, never acknowledged: chunk 9 reached C only, chunk 12 A only.
    let to_c = member(&sc, true);
    let answers = Arc::new(Answers::default());
    let sink: Arc<dyn evstor_datapath::backend::CompletionSink> = answers.clone();
    let stray = pattern(4, 7);
    let frame = Frame {
        op: Op::Write { fua: false },
        volume: v,
        epoch: 1,
        offset: 9 * REBUILD_CHUNK_BYTES,
        len: stray.len() as u32,
        id: 0,
        session: 0,
    };
    // SAFETY: `stray` outlives the answer, awaited below.
    unsafe {
        to_c.link
            .submit(frame, stray.as_ptr(), &sink, 0, &to_c.state)
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while answers.0.lock().expect("answers").is_empty() {
        assert!(Instant::now() < deadline, "C never answered");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(*answers.0.lock().expect("answers"), vec![0]);
    write_image(&a, volume, 12 * chunk, &pattern(4, 8));
    // Epoch 5: B takes over. What its own copy changed just before (chunks 0 and 1) is
    // marked for both of the others; C is asked what it changed, A once it is back.
    let changed = b
        .last_change_ms(volume)
        .and_then(|at| b.changed_since(volume, at.saturating_sub(60_000)))
        .expect("B keeps a change log");
    assert_eq!(changed, vec![0, 1], "B changed chunks 0 and 1");
    sb.set_images(vec![(v, None, 5)]);
    let current = |s: &ReplicaServer, in_sync| {
        let m = Member::current(hub.link(s.local_addr()).expect("link"), NS_BYTES, in_sync);
        changed
            .iter()
            .for_each(|k| m.state.mark(k * REBUILD_CHUNK_BYTES, 1));
        Arc::new(m)
    };
    let (mc, ma) = (current(&sc, true), current(&sa, false));
    let replication = Replication {
        epoch: 5,
        members: vec![mc.clone(), ma.clone()],
    };
    let cfg = TargetConfig::new("127.0.0.1:0".parse()?, NQN);
    let tb = start(cfg, vec![spec(volume, &b, Some(replication))])?;
    let local = b.image(volume, NS_BYTES, false);
    let barrier = || {
        tb.pass_barrier(Duration::from_secs(5))
            .map_err(std::io::Error::other)
    };
    let repaired = repair(&mc, &local, v, 5, NS_BYTES, barrier)?;
    assert_eq!(
        repaired,
        3 * REBUILD_CHUNK_BYTES,
        "C is repaired in chunks 0, 1 and 9 only"
    );
    assert_eq!(mc.state.mode(), Mode::InSync);
    let blocks = (NS_BYTES / BLOCK as u64) as usize;
    assert!(
        read_image(&b, volume, 0, blocks) == read_image(&c, volume, 0, blocks),
        "C still differs from B after the repair"
    );
    assert_eq!(
        repair(&mc, &local, v, 5, NS_BYTES, barrier)?,
        0,
        "repaired once"
    );
    // B writes chunk 4 while A is away: C takes it, A's copy misses it.
    let mut h = Session::connect(tb.local_addr(), NQN, HOST)?;
    h.write(1, 4 * chunk, &pattern(8, 3))?;
    assert_eq!(read_image(&c, volume, 4 * chunk, 8), pattern(8, 3));
    // A is back as a replica (this process never served it as primary).
    sa.set_images(vec![(v, image(&a), 5)]);
    let rebuilt = rebuild(&ma, &local, v, 5, NS_BYTES, barrier)?;
    assert_eq!(
        rebuilt,
        4 * REBUILD_CHUNK_BYTES,
        "A is rebuilt in chunks 0 and 1 (B's recent), 4 (written since) and 12 (its own)"
    );
    assert_eq!(ma.state.mode(), Mode::InSync);
    let want = read_image(&b, volume, 0, blocks);
    assert!(
        want == read_image(&a, volume, 0, blocks),
        "A differs from B"
    );
    assert!(
        want == read_image(&c, volume, 0, blocks),
        "C differs from B"
    );
    tb.shutdown();
    // A copy whose process served the volume as its primary may have changed it after a
    // pause no window bounds (stopped, then resumed): it cannot tell, and is copied whole.
    let resumed = listen();
    resumed.set_images(vec![(v, None, 5)]);
    resumed.set_images(vec![(v, image(&a), 6)]);
    let ma = current(&resumed, false);
    let rebuilt = rebuild(&ma, &local, v, 6, NS_BYTES, || Ok(()))?;
    assert_eq!(
        rebuilt, NS_BYTES,
        "a copy that served as primary here is copied whole"
    );
    hub.shutdown();
    Ok(())
}

/// A replica server on its own store for `volume`, doing what the control plane's hooks
/// do: roll back to a snapshot, take a copied snapshot.
fn seeding_replica(dir: &Path, name: &str, volume: Uuid) -> (Arc<BlockStore>, ReplicaServer) {
    use evstor_datapath::replica::Hooks;
    let store = store(dir, name, volume);
    let (r, s) = (store.clone(), store.clone());
    let hooks = Hooks {
        rollback: Some(Arc::new(move |v, snap| {
            r.rollback(Uuid::from_bytes(v), Uuid::from_bytes(snap))
                .map_err(std::io::Error::other)
        })),
        seed: Some(Arc::new(move |v, snap| {
            s.retake_snapshot(Uuid::from_bytes(v), Uuid::from_bytes(snap))
                .map_err(std::io::Error::other)
        })),
        ..Hooks::default()
    };
    let server = ReplicaServer::start_with_hooks("127.0.0.1:0".parse().expect("addr"), hooks)
        .expect("listen");
    let image: Arc<dyn Backend> = Arc::new(store.image(volume, NS_BYTES, false));
    server.set_images(vec![(*volume.as_bytes(), Some(image), 1)]);
    (store, server)
}

/// The primary's block store as the seeding reads it.
fn source(primary: &Arc<BlockStore>) -> evstor_datapath::replica::StoreSnapshots<'_> {
    evstor_datapath::replica::StoreSnapshots {
        store: primary,
        size_bytes: NS_BYTES,
    }
}

/// A new copy of a volume with three snapshots (the third taken after a rollback to the
/// first, so the second is not on its chain) receives them oldest first, each as what
/// differs from one it already has, then only the chunk the volume changed since the last:
/// every snapshot and the volume read the same on both copies, and the copy uses no more
/// space than the primary (its snapshots share blocks). A copy that was away holding the
/// first snapshot, its data since changed, receives only the two it lacks, from the first.
#[test]
fn a_new_copy_receives_the_snapshots_it_lacks_sharing_blocks_like_the_primary() -> anyhow::Result<()>
{
    use evstor_datapath::limits::REBUILD_CHUNK_BYTES;
    use evstor_datapath::replica::{rebuild, seed_snapshots, Mode};
    let dir = tempfile::tempdir()?;
    let volume = Uuid::new_v4();
    let primary = store(dir.path(), "primary", volume);
    let chunk = REBUILD_CHUNK_BYTES / BLOCK as u64;
    let (s1, s2, s3) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    write_image(&primary, volume, 0, &pattern(32, 1));
    write_image(&primary, volume, 5 * chunk + 3, &pattern(24, 2));
    primary.snapshot(volume, s1)?;
    write_image(&primary, volume, 2 * chunk, &pattern(16, 3));
    let mut zeroes = evstor_datapath::buffer::SlotBuf::new(1, 8 * BLOCK).expect("buffer");
    on_image(
        &primary,
        volume,
        IoKind::WriteZeroes,
        8 * BLOCK as u64,
        &mut zeroes,
        8 * BLOCK,
    );
    primary.snapshot(volume, s2)?;
    primary.rollback(volume, s1)?;
    write_image(&primary, volume, 7 * chunk, &pattern(8, 4));
    primary.snapshot(volume, s3)?;
    write_image(&primary, volume, 9 * chunk + 1, &pattern(4, 5));
    let blocks = (NS_BYTES / BLOCK as u64) as usize;
    let same = |replica: &Arc<BlockStore>, image: Uuid| {
        read_image(&primary, image, 0, blocks) == read_image(replica, image, 0, blocks)
    };
    let hub = ReplicaHub::new().expect("hub");
    let no_barrier = || Ok(());
    let id = |u: Uuid| *u.as_bytes();

    // A new copy: every snapshot is copied, then the chunk written after the last.
    let (fresh, server) = seeding_replica(dir.path(), "fresh", volume);
    let member = Arc::new(Member::new(hub.link(server.local_addr())?, NS_BYTES, false));
    let plan = [(id(s1), false), (id(s2), false), (id(s3), false)];
    let source = source(&primary);
    let seeded = seed_snapshots(&member, &source, id(volume), 1, NS_BYTES, &plan, no_barrier)?;
    assert_eq!(seeded, [id(s1), id(s2), id(s3)]);
    assert_eq!(
        member.state.dirty_chunks(),
        1,
        "only chunk 9 differs between the last snapshot and the volume"
    );
    let seeded_bytes = member.state.copied_bytes.load(Ordering::Relaxed);
    let local = primary.image(volume, NS_BYTES, false);
    let copied = rebuild(&member, &local, id(volume), 1, NS_BYTES, no_barrier)?;
    assert_eq!(
        copied - seeded_bytes,
        REBUILD_CHUNK_BYTES,
        "one chunk of the volume"
    );
    assert_eq!(member.state.mode(), Mode::InSync);
    for (name, image) in [("S1", s1), ("S2", s2), ("S3", s3), ("the volume", volume)] {
        assert!(same(&fresh, image), "{name} differs on the new copy");
    }
    let (p, f) = (primary.stats().used_bytes, fresh.stats().used_bytes);
    println!("space used: primary {p} bytes, new copy {f} bytes (seeded {seeded_bytes})");
    assert!(f <= p, "the copy's snapshots share blocks: {f} > {p} bytes");

    // A copy that holds S1 and was away since (its own image changed meanwhile).
    let (away, server2) = seeding_replica(dir.path(), "away", volume);
    let member2 = Arc::new(Member::new(
        hub.link(server2.local_addr())?,
        NS_BYTES,
        false,
    ));
    seed_snapshots(
        &member2,
        &source,
        id(volume),
        1,
        NS_BYTES,
        &[(id(s1), false)],
        no_barrier,
    )?;
    write_image(&away, volume, 11 * chunk, &pattern(4, 6));
    let member2 = Arc::new(Member::new(
        hub.link(server2.local_addr())?,
        NS_BYTES,
        false,
    ));
    let plan = [(id(s1), true), (id(s2), false), (id(s3), false)];
    let seeded = seed_snapshots(
        &member2,
        &source,
        id(volume),
        1,
        NS_BYTES,
        &plan,
        no_barrier,
    )?;
    assert_eq!(seeded, [id(s2), id(s3)], "S1 is held already");
    rebuild(&member2, &local, id(volume), 1, NS_BYTES, no_barrier)?;
    for (name, image) in [("S1", s1), ("S2", s2), ("S3", s3), ("the volume", volume)] {
        assert!(same(&away, image), "{name} differs on the returning copy");
    }
    hub.shutdown();
    server.shutdown();
    server2.shutdown();
    Ok(())
}

/// A new copy receives the volume's snapshots and is rebuilt while a host writes without
/// pause all over the volume: writes before the copy's dirty map is reset are in the
/// difference taken after the barrier, writes after it mark themselves, so once the host
/// stops, the volume and each snapshot read the same on both copies.
#[test]
fn snapshots_are_copied_and_the_copy_rebuilt_while_a_host_writes() -> anyhow::Result<()> {
    use evstor_datapath::replica::{rebuild, seed_snapshots, Mode};
    let dir = tempfile::tempdir()?;
    let volume = Uuid::new_v4();
    let primary = store(dir.path(), "primary", volume);
    let (s1, s2) = (Uuid::new_v4(), Uuid::new_v4());
    let blocks = NS_BYTES / BLOCK as u64;
    for k in 0..64u64 {
        write_image(&primary, volume, k * 61 % blocks, &pattern(1, k as u8));
    }
    primary.snapshot(volume, s1)?;
    for k in 0..64u64 {
        write_image(
            &primary,
            volume,
            k * 97 % blocks,
            &pattern(2, 0x40 | k as u8),
        );
    }
    primary.snapshot(volume, s2)?;
    let (replica, server) = seeding_replica(dir.path(), "replica", volume);
    let hub = ReplicaHub::new().expect("hub");
    let member = Arc::new(Member::new(hub.link(server.local_addr())?, NS_BYTES, false));
    let replication = Replication {
        epoch: 1,
        members: vec![member.clone()],
    };
    let cfg = TargetConfig::new("127.0.0.1:0".parse().expect("addr"), NQN);
    let target = start(cfg, vec![spec(volume, &primary, Some(replication))])?;
    let stop = Arc::new(AtomicBool::new(false));
    let (st, addr) = (stop.clone(), target.local_addr());
    let writer = std::thread::spawn(move || -> anyhow::Result<u64> {
        let mut h = Session::connect(addr, NQN, HOST)?;
        let mut n = 0u64;
        while !st.load(Ordering::SeqCst) || n < 64 {
            h.write(1, n * 7919 % blocks, &pattern(1, (n % 251) as u8))?;
            n += 1;
        }
        Ok(n)
    });
    let barrier = || {
        target
            .pass_barrier(Duration::from_secs(5))
            .map_err(std::io::Error::other)
    };
    let id = |u: Uuid| *u.as_bytes();
    let plan = [(id(s1), false), (id(s2), false)];
    let seeded = seed_snapshots(
        &member,
        &source(&primary),
        id(volume),
        1,
        NS_BYTES,
        &plan,
        barrier,
    )?;
    assert_eq!(seeded, [id(s1), id(s2)]);
    let local = primary.image(volume, NS_BYTES, false);
    rebuild(&member, &local, id(volume), 1, NS_BYTES, barrier)?;
    assert_eq!(member.state.mode(), Mode::InSync);
    stop.store(true, Ordering::SeqCst);
    let written = writer.join().expect("writer")?;
    assert!(written >= 64, "{written} writes");
    let all = blocks as usize;
    for (name, image) in [("S1", s1), ("S2", s2), ("the volume", volume)] {
        assert!(
            read_image(&primary, image, 0, all) == read_image(&replica, image, 0, all),
            "{name} differs after {written} concurrent writes"
        );
    }
    target.shutdown();
    hub.shutdown();
    server.shutdown();
    Ok(())
}
