//! The replica's side: a listener that applies primaries' frames to this server's images.
//!
//! One thread serves every peer connection (at most [`REPLICA_CONNECTIONS_MAX`]) through
//! one io_uring: accepts, receives into each connection's buffer and sends of answers are
//! ring operations. When a receive completes, the frames it completed (up to
//! [`REPLICA_BATCH_FRAMES`]) are queued on the image backends straight from the buffer,
//! run as one pass (one metadata commit for the batch's writes) and answered together. A
//! frame is applied only to an image the control plane published here as a replica, and
//! only if its epoch is not older than the newest this server has seen for the volume.
//! Accepting one promises the sender its read lease (see the module above): this server
//! does not serve the volume itself until [`ReplicaServer::lease_given_for`] has run out.
//!
//! The pass runs on this thread (as the reactors run theirs): a peer's frames wait while
//! another's batch is applied. The image hooks (a snapshot, which may wait seconds for
//! this server's control plane to learn of it; a rollback; a copied snapshot) go to a
//! thread of their own (`evstor-repl-hooks`): until a hook's answer is back, its
//! connection takes no frame of that volume (whose writes the primary holds meanwhile
//! anyway) nor anything behind one, and the other volumes and connections go on.

use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use io_uring::{opcode, types};

use super::{
    clock_ns, encode_answer, Frame, Op, WireError, ANSWER_BYTES, FENCED, HDR_BYTES, NOT_HELD,
    RECENT_END, RECENT_UNKNOWN,
};
use crate::backend::{Backend, IoKind, IoQueue, IoRequest};
use crate::buffer::{Region, SlotBuf};
use crate::limits::{
    CHANGE_LOG_REFRESH_MS, CHANGE_WINDOW_MS, LBA_BYTES, REPLICA_BATCH_FRAMES,
    REPLICA_CONNECTIONS_MAX, REPLICA_FRAME_DATA_MAX, REPLICA_PARTIAL_FRAME_MS, REPLICA_POLL_MS,
    REPLICA_READ_LEASE_MS,
};
use crate::notify::{Mailbox, WakeRead};
use crate::reactor::tag;

/// [`Op::Recent`]'s answer for a primary: its epoch and session, and the chunks (None: the
/// copy cannot tell).
type RecentAnswer = (u64, u64, Option<Vec<u64>>);

/// One volume this server holds a copy of.
pub struct ReplicaImage {
    /// The image in this server's block store; `None` for a volume this server is the
    /// primary of (known only to fence older primaries' frames).
    pub backend: Option<Arc<dyn Backend>>,
    /// Newest epoch seen for the volume (published, or carried by an accepted frame).
    /// Raised and read with `SeqCst`, like `lease_given`: see [`ReplicaImage::promise`].
    epoch: AtomicU64,
    /// Until when ([`clock_ns`]) this server promised a primary not to serve the volume.
    lease_given: AtomicU64,
    /// While a rebuild runs: one bit per block, set when a live write reached it (a copy
    /// never overwrites those).
    rebuild: Mutex<Option<Vec<u64>>>,
    /// The newest primary (epoch, and the session of its process) whose frames changed
    /// this copy, and when the copy had last changed before its first such frame (Unix ms,
    /// from its change log): where [`Op::Recent`] looks back from.
    anchor: Mutex<(u64, u64, Option<u64>)>,
    anchor_epoch: AtomicU64,
    anchor_session: AtomicU64,
    /// [`Op::Recent`]'s answer for a primary (epoch, session), worked out at its first
    /// question.
    recent: Mutex<Option<RecentAnswer>>,
    /// This process published itself the primary of the volume at some point: it may have
    /// changed its copy after a gap (stopped, then resumed), which no time window bounds,
    /// so it cannot tell what it changed recently.
    was_primary: AtomicBool,
    /// Once deposed (Unix ms; 0: unknown): whatever this copy may hold that its former
    /// replicas do not, it changed after this (see [`ReplicaServer::set_deposed_since`]).
    deposed_since: AtomicU64,
    /// Frames applied through this entry: host writes (with Write Zeroes and
    /// Deallocate), and a rebuild's copies with the blocks they wrote and skipped (for
    /// the log, when the entry is replaced or the server stops).
    writes: AtomicU64,
    copies: AtomicU64,
    copied_blocks: AtomicU64,
    skipped_blocks: AtomicU64,
}

impl ReplicaImage {
    /// A copy known to be at `epoch` at least.
    pub fn new(backend: Option<Arc<dyn Backend>>, epoch: u64) -> ReplicaImage {
        ReplicaImage {
            was_primary: AtomicBool::new(backend.is_none()),
            backend,
            epoch: AtomicU64::new(epoch),
            lease_given: AtomicU64::new(0),
            rebuild: Mutex::new(None),
            anchor: Mutex::new((0, 0, None)),
            anchor_epoch: AtomicU64::new(0),
            anchor_session: AtomicU64::new(0),
            recent: Mutex::new(None),
            deposed_since: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            copies: AtomicU64::new(0),
            copied_blocks: AtomicU64::new(0),
            skipped_blocks: AtomicU64::new(0),
        }
    }

    /// Logs what this entry took (`why`: it is being replaced, or the server stops).
    fn log_taken(&self, volume: &[u8; 16], why: &str) {
        tracing::info!(
            volume = %uuid::Uuid::from_bytes(*volume),
            epoch = self.epoch(),
            holds_copy = self.backend.is_some(),
            was_primary = self.was_primary.load(Ordering::Relaxed),
            writes = self.writes.load(Ordering::Relaxed),
            copies = self.copies.load(Ordering::Relaxed),
            copied_blocks = self.copied_blocks.load(Ordering::Relaxed),
            skipped_blocks = self.skipped_blocks.load(Ordering::Relaxed),
            "replica entry {why}"
        );
    }

    /// Newest epoch seen.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    /// Promises the sender of a frame that arrived `now` its read lease. Made before the
    /// frame's epoch is checked a last time, so a promotion (which raises the epoch first,
    /// then reads the promise, both `SeqCst`) either sees this promise or makes the check
    /// refuse the frame.
    fn promise(&self, now: Instant) {
        let until = clock_ns(now + Duration::from_millis(REPLICA_READ_LEASE_MS));
        self.lease_given.fetch_max(until, Ordering::SeqCst);
    }

    /// Raises the epoch to at least `epoch` (fencing older primaries' frames from now on).
    fn fence(&self, epoch: u64) {
        self.epoch.fetch_max(epoch, Ordering::SeqCst);
    }

    /// A frame of the primary (`epoch`, `session`) is about to change the copy: the first
    /// of a new primary, or of a restarted one, fixes where [`Op::Recent`] looks back from.
    fn note_change(&self, epoch: u64, session: u64, backend: &dyn Backend) {
        if self.anchor_epoch.load(Ordering::Acquire) == epoch
            && self.anchor_session.load(Ordering::Acquire) == session
        {
            return;
        }
        let mut a = self.anchor.lock().unwrap_or_else(|p| p.into_inner());
        if epoch >= a.0 && (a.0, a.1) != (epoch, session) {
            *a = (epoch, session, backend.last_change_ms());
            self.anchor_epoch.store(epoch, Ordering::Release);
            self.anchor_session.store(session, Ordering::Release);
        }
    }

    /// [`Op::Recent`]: the first chunk at or after `cursor` this copy changed in the
    /// [`CHANGE_WINDOW_MS`] before the asking primary (`epoch`, `session`: a new one, or a
    /// restarted one) first changed it, or after.
    fn recent(&self, epoch: u64, session: u64, cursor: u64, backend: &dyn Backend) -> i32 {
        // A copy that served the volume as primary: only what it recorded when it was
        // deposed bounds what it changed (it may have been stopped, then resumed).
        let deposed = self.was_primary.load(Ordering::SeqCst);
        let deposed_since = self.deposed_since.load(Ordering::SeqCst);
        if deposed && deposed_since == 0 {
            return RECENT_UNKNOWN;
        }
        let mut cache = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        let fresh = matches!(&*cache, Some((e, s, _)) if (*e, *s) == (epoch, session));
        if !fresh || cursor == 0 {
            let since = if deposed {
                Some(deposed_since)
            } else {
                let anchor = {
                    let a = self.anchor.lock().unwrap_or_else(|p| p.into_inner());
                    if (a.0, a.1) == (epoch, session) {
                        a.2
                    } else {
                        backend.last_change_ms()
                    }
                };
                anchor.map(|at| at.saturating_sub(CHANGE_WINDOW_MS + CHANGE_LOG_REFRESH_MS))
            };
            *cache = Some((epoch, session, since.and_then(|t| backend.changed_since(t))));
        }
        let Some((_, _, Some(chunks))) = &*cache else {
            return RECENT_UNKNOWN;
        };
        let at = chunks.partition_point(|c| *c < cursor);
        match chunks.get(at) {
            None => RECENT_END,
            Some(&c) => i32::try_from(c).unwrap_or(RECENT_UNKNOWN),
        }
    }

    fn rebuild_map(&self) -> std::sync::MutexGuard<'_, Option<Vec<u64>>> {
        self.rebuild.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A live change reached `[offset, offset + len)`.
    fn mark_live(&self, offset: u64, len: u32) {
        if let Some(map) = self.rebuild_map().as_mut() {
            for b in blocks(offset, len) {
                if let Some(w) = map.get_mut((b / 64) as usize) {
                    *w |= 1 << (b % 64);
                }
            }
        }
    }

    /// The runs (first block, count) of `[offset, offset + len)` no live write reached.
    fn unmarked_runs(&self, offset: u64, len: u32) -> Vec<(u64, u64)> {
        let map = self.rebuild_map();
        let live = |b: u64| {
            map.as_ref()
                .and_then(|m| m.get((b / 64) as usize))
                .is_some_and(|w| w & (1 << (b % 64)) != 0)
        };
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for b in blocks(offset, len).filter(|b| !live(*b)) {
            match runs.last_mut() {
                Some((first, n)) if *first + *n == b => *n += 1,
                _ => runs.push((b, 1)),
            }
        }
        runs
    }
}

/// The blocks `[offset, offset + len)` covers.
fn blocks(offset: u64, len: u32) -> std::ops::Range<u64> {
    let first = offset / LBA_BYTES;
    first..(offset + u64::from(len)).div_ceil(LBA_BYTES)
}

/// Takes snapshot (second id) of this server's copy of volume (first id), replacing one an
/// earlier attempt left: the replica's side of [`Op::Snapshot`].
pub type SnapshotHook = Arc<dyn Fn([u8; 16], [u8; 16]) -> io::Result<()> + Send + Sync>;

/// What a replica does for the image operations a primary asks of it: each hook takes the
/// volume's id and the snapshot's.
#[derive(Clone, Default)]
pub struct Hooks {
    /// [`Op::Snapshot`]: take the snapshot of this copy (replacing one an earlier attempt
    /// left).
    pub snapshot: Option<SnapshotHook>,
    /// [`Op::Rollback`]: replace this copy's data with its copy of the snapshot.
    pub rollback: Option<SnapshotHook>,
    /// [`Op::SeedSnapshot`]: take a snapshot the primary copied to this copy (replacing one
    /// an earlier attempt left).
    pub seed: Option<SnapshotHook>,
}

/// A copy this server holds, as published: volume, image (`None` on its primary), epoch.
pub type HeldCopy = ([u8; 16], Option<Arc<dyn Backend>>, u64);

type Images = RwLock<HashMap<[u8; 16], Arc<ReplicaImage>>>;
/// Open peer connections (to cut at shutdown), by a connection number.
type Peers = Mutex<HashMap<u64, TcpStream>>;

/// The replication listener of this server.
pub struct ReplicaServer {
    addr: SocketAddr,
    images: Arc<Images>,
    peers: Arc<Peers>,
    stop: Arc<AtomicBool>,
}

impl std::fmt::Debug for ReplicaServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaServer")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl ReplicaServer {
    /// Listens on `addr` and serves peers until [`ReplicaServer::shutdown`]; snapshot
    /// frames are refused.
    pub fn start(addr: SocketAddr) -> io::Result<ReplicaServer> {
        Self::start_with(addr, None)
    }

    /// As [`ReplicaServer::start`], taking snapshots of its copies through `snapshots`.
    pub fn start_with(
        addr: SocketAddr,
        snapshots: Option<SnapshotHook>,
    ) -> io::Result<ReplicaServer> {
        let hooks = Hooks {
            snapshot: snapshots,
            ..Hooks::default()
        };
        Self::start_with_hooks(addr, hooks)
    }

    /// As [`ReplicaServer::start`], doing the image operations primaries ask through
    /// `hooks`.
    pub fn start_with_hooks(addr: SocketAddr, hooks: Hooks) -> io::Result<ReplicaServer> {
        // Blocking: the ring's accept waits for a peer (it is never called outside it).
        let listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        let images: Arc<Images> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let peers: Arc<Peers> = Arc::default();
        let (i, p, s) = (images.clone(), peers.clone(), stop.clone());
        let mail = Arc::new(Mailbox::<()>::new(0)?);
        let (jobs_tx, jobs) = std::sync::mpsc::channel();
        let m = mail.clone();
        std::thread::Builder::new()
            .name("evstor-repl-hooks".into())
            .spawn(move || run_hooks(jobs, m))?;
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name("evstor-repl-serve".into())
            .spawn(move || {
                // Made on the thread that uses it: a single-issuer ring refuses others.
                let slots = SlotBuf::new(REPLICA_BATCH_FRAMES, REPLICA_FRAME_DATA_MAX)
                    .ok_or_else(|| io::Error::other("no memory for replication buffers"));
                match IoQueue::reactor(256, 1024).and_then(|ring| Ok((ring, slots?))) {
                    Ok((ring, slots)) => {
                        let _ = tx.send(Ok(()));
                        Serve::new(listener, ring, slots, i, p, s, hooks, jobs_tx, mail).run();
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                    }
                }
            })?;
        match rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(e);
            }
            Err(_) => {
                let _ = thread.join();
                return Err(io::Error::other("the replication listener died at start"));
            }
        }
        Ok(ReplicaServer {
            addr,
            images,
            peers,
            stop,
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Replaces the set of volumes this server holds (volume → image, epoch): an image for
    /// an in-sync replica, `None` for a volume it is the primary of (frames of an older
    /// epoch are then answered [`FENCED`], any other [`NOT_HELD`]). A volume kept keeps the
    /// newest epoch it has seen.
    pub fn set_images(&self, images: Vec<HeldCopy>) {
        let mut cur = self.images.write().unwrap_or_else(|p| p.into_inner());
        let mut next = HashMap::with_capacity(images.len());
        let size = |b: &Option<Arc<dyn Backend>>| b.as_ref().map(|b| b.size_bytes());
        for (uuid, backend, epoch) in images {
            // An unchanged copy keeps its entry: frames being applied hold it, and so does
            // a running rebuild's map of live-written blocks.
            let kept = cur
                .get(&uuid)
                .filter(|i| size(&i.backend) == size(&backend))
                .cloned();
            let image = match kept {
                Some(i) => {
                    i.fence(epoch);
                    i
                }
                None => {
                    // Frames being applied hold the old entry: fence them there first, then
                    // carry its epoch and the promises it made over.
                    let (seen, given, primary, since) =
                        cur.get(&uuid).map_or((0, 0, false, 0), |old| {
                            old.fence(epoch);
                            (
                                old.epoch(),
                                old.lease_given.load(Ordering::SeqCst),
                                old.was_primary.load(Ordering::SeqCst),
                                old.deposed_since.load(Ordering::SeqCst),
                            )
                        });
                    if let Some(old) = cur.get(&uuid) {
                        old.log_taken(&uuid, "replaced");
                    }
                    let i = ReplicaImage::new(backend, epoch.max(seen));
                    tracing::info!(
                        volume = %uuid::Uuid::from_bytes(uuid),
                        epoch = i.epoch(),
                        holds_copy = i.backend.is_some(),
                        "replica entry published"
                    );
                    i.lease_given.store(given, Ordering::SeqCst);
                    i.was_primary.fetch_or(primary, Ordering::SeqCst);
                    i.deposed_since.store(since, Ordering::SeqCst);
                    Arc::new(i)
                }
            };
            next.insert(uuid, image);
        }
        for (uuid, old) in cur.iter().filter(|(u, _)| !next.contains_key(*u)) {
            old.log_taken(uuid, "left");
        }
        *cur = next;
    }

    /// This server was the primary of `volume` and is deposed: every change its copy may
    /// hold that the copies it replicated to lack happened at or after `since_unix_ms`
    /// (by its change log's clock). [`Op::Recent`] then answers from there instead of
    /// "unknown". Call after [`ReplicaServer::set_images`] published it as a replica.
    pub fn set_deposed_since(&self, volume: [u8; 16], since_unix_ms: u64) {
        let images = self.images.read().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = images.get(&volume) {
            i.deposed_since.store(since_unix_ms, Ordering::SeqCst);
        }
    }

    /// Newest epoch this server has seen for `volume`, if it holds a replica of it.
    pub fn epoch_of(&self, volume: [u8; 16]) -> Option<u64> {
        let images = self.images.read().unwrap_or_else(|p| p.into_inner());
        images.get(&volume).map(|i| i.epoch())
    }

    /// How long from now this server still owes `volume`'s former primary its read lease:
    /// a newly promoted primary serves the volume only after that (zero when nothing is
    /// owed). Ask after [`ReplicaServer::set_images`] published the new epoch, so no frame
    /// of the old primary can be accepted (and promised) afterwards.
    pub fn lease_given_for(&self, volume: [u8; 16]) -> Duration {
        let images = self.images.read().unwrap_or_else(|p| p.into_inner());
        let until = images
            .get(&volume)
            .map_or(0, |i| i.lease_given.load(Ordering::SeqCst));
        Duration::from_nanos(until.saturating_sub(clock_ns(Instant::now())))
    }

    /// Stops accepting and cuts every open connection (their primaries see it at once).
    pub fn shutdown(&self) {
        if !self.stop.swap(true, Ordering::AcqRel) {
            let images = self.images.read().unwrap_or_else(|p| p.into_inner());
            for (uuid, i) in images.iter() {
                i.log_taken(uuid, "at shutdown");
            }
        }
        let peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        for s in peers.values() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

impl Drop for ReplicaServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Ring tags of the listener's thread (the reactors' layout: kind, slot, generation).
const T_ACCEPT: u64 = 1;
const T_RECV: u64 = 2;
const T_SEND: u64 = 3;
/// The hook thread's mailbox eventfd.
const T_MAIL: u64 = 4;
/// A hook's answer (in the mailbox's `done`, not from the ring).
const T_HOOK: u64 = 5;

/// A hook to run off the listener's thread, for connection (`idx`, `gen`).
struct HookJob {
    idx: usize,
    gen: u32,
    hook: Deferred,
}

/// The hook thread: runs each job and posts its answer to the listener's mailbox.
fn run_hooks(jobs: std::sync::mpsc::Receiver<HookJob>, mail: Arc<Mailbox<()>>) {
    while let Ok(j) = jobs.recv() {
        let Deferred {
            run,
            volume,
            snapshot,
            what,
        } = j.hook;
        let status = match run(volume, snapshot) {
            Ok(()) => 0,
            Err(e) => {
                tracing::warn!("{what} a replica: {e}");
                -e.raw_os_error().unwrap_or(libc::EIO)
            }
        };
        mail.post(|m| m.done.push((tag::make(T_HOOK, j.idx, j.gen, 0), status)));
    }
}

/// A connection's receive buffer: a whole batch of the largest frames.
const CONN_BUF_BYTES: usize = REPLICA_BATCH_FRAMES * (HDR_BYTES + REPLICA_FRAME_DATA_MAX);
/// Answers waiting to be sent past which the connection stops receiving (its peer is not
/// reading them).
const ANSWERS_PENDING_MAX: usize = 4 * REPLICA_BATCH_FRAMES * ANSWER_BYTES;

/// One peer connection.
struct PeerConn {
    fd: OwnedFd,
    gen: u32,
    /// Its key in the registry of sockets to cut at shutdown.
    key: u64,
    /// Received bytes: `buf[..have]`, whole frames first.
    buf: Region,
    have: usize,
    /// Since when the buffer holds part of a frame (see [`REPLICA_PARTIAL_FRAME_MS`]).
    partial_since: Option<Instant>,
    recv_armed: bool,
    /// Answers not yet handed to the kernel, and the ones being sent (from `sent` on).
    out: Vec<u8>,
    sending: Vec<u8>,
    sent: usize,
    send_in_flight: bool,
    /// Broken or ending: dropped once no operation is in flight.
    closing: bool,
    /// The frame (id, volume) whose hook (snapshot, rollback, copied snapshot) runs on the
    /// hook thread: until it is answered, no frame of that volume (nor another hook's) is
    /// taken, nor anything behind it.
    hook_wait: Option<(u32, [u8; 16])>,
}

/// The listener's thread: every peer connection on one ring.
struct Serve {
    listener: TcpListener,
    ring: IoQueue,
    /// The images' storage operations (a queue of its own: a pass waits for its own
    /// completions only).
    store_q: IoQueue,
    /// The batch's frame data, aligned for the devices (`O_DIRECT`).
    slots: SlotBuf,
    images: Arc<Images>,
    peers: Arc<Peers>,
    stop: Arc<AtomicBool>,
    hooks: Hooks,
    conns: Vec<Option<PeerConn>>,
    gens: Vec<u32>,
    live: usize,
    next_key: u64,
    accept_armed: bool,
    batch: Vec<Pending>,
    cqes: Vec<(u64, i32)>,
    /// Snapshot hooks for the hook thread, and where it answers.
    hook_jobs: std::sync::mpsc::Sender<HookJob>,
    mail: Arc<Mailbox<()>>,
    wake: WakeRead,
    inbox: crate::notify::Mail<()>,
}

impl Serve {
    #[allow(clippy::too_many_arguments)]
    fn new(
        listener: TcpListener,
        ring: IoQueue,
        slots: SlotBuf,
        images: Arc<Images>,
        peers: Arc<Peers>,
        stop: Arc<AtomicBool>,
        hooks: Hooks,
        hook_jobs: std::sync::mpsc::Sender<HookJob>,
        mail: Arc<Mailbox<()>>,
    ) -> Serve {
        Serve {
            listener,
            ring,
            store_q: IoQueue::new(),
            slots,
            images,
            peers,
            stop,
            hooks,
            conns: Vec::new(),
            gens: Vec::new(),
            live: 0,
            next_key: 0,
            accept_armed: false,
            batch: Vec::with_capacity(REPLICA_BATCH_FRAMES),
            cqes: Vec::with_capacity(256),
            hook_jobs,
            mail,
            wake: WakeRead::default(),
            inbox: crate::notify::Mail::default(),
        }
    }

    fn run(mut self) {
        let poll = Duration::from_millis(REPLICA_POLL_MS / 4);
        let mut stopping: Option<Instant> = None;
        loop {
            if stopping.is_none() && self.stop.load(Ordering::Acquire) {
                stopping = Some(Instant::now() + Duration::from_secs(1));
                for c in self.conns.iter_mut().flatten() {
                    close(c);
                }
            }
            if let Some(deadline) = stopping {
                if self.live == 0 || Instant::now() > deadline {
                    break;
                }
            } else {
                self.arm_accept();
            }
            self.arm_mail();
            self.take_mail();
            let Serve { ring, cqes, .. } = &mut self;
            ring.reap(|t, r| cqes.push((t, r)));
            let mut cqes = std::mem::take(&mut self.cqes);
            for &(t, r) in &cqes {
                self.on_cqe(t, r);
            }
            let worked = !cqes.is_empty();
            cqes.clear();
            self.cqes = cqes;
            let stalled = Duration::from_millis(REPLICA_PARTIAL_FRAME_MS);
            for c in self.conns.iter_mut().flatten() {
                if c.hook_wait.is_none() && c.partial_since.is_some_and(|t| t.elapsed() > stalled) {
                    tracing::info!("replication connection closed: a frame stalled half sent");
                    close(c);
                }
            }
            for idx in 0..self.conns.len() {
                self.service(idx);
            }
            if let Err(e) = self.ring.submit() {
                tracing::warn!("replication listener ring submit failed: {e}");
            }
            if !worked && !self.ring.has_ready() && self.mail.about_to_sleep() {
                if let Err(e) = self.ring.wait(poll) {
                    tracing::warn!("replication listener wait failed: {e}");
                    std::thread::sleep(poll);
                }
                self.mail.awake();
            }
        }
        // The ring goes first: nothing of it may write into the connections' buffers after.
        let Serve { ring, conns, .. } = self;
        drop(ring);
        drop(conns);
    }

    fn arm_accept(&mut self) {
        if self.accept_armed || self.live >= REPLICA_CONNECTIONS_MAX {
            return;
        }
        let e = opcode::Accept::new(
            types::Fd(self.listener.as_raw_fd()),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        )
        .flags(libc::SOCK_CLOEXEC)
        .build()
        .user_data(tag::make(T_ACCEPT, 0, 0, 0));
        // SAFETY: the listener lives as long as the ring (both in `self`, the ring dropped
        // first); no memory is referenced.
        if unsafe { self.ring.push_op(&e) }.is_ok() {
            self.accept_armed = true;
        }
    }

    /// Keeps a read pending on the mailbox's eventfd, so a hook's answer wakes the ring.
    fn arm_mail(&mut self) {
        // SAFETY: the eventfd (in `mail`) and `wake` live as long as the ring (all in
        // `self`, the ring dropped first).
        unsafe {
            self.wake
                .arm(&mut self.ring, self.mail.fd(), tag::make(T_MAIL, 0, 0, 0))
        };
    }

    /// Answers the snapshots whose hooks finished, and takes the frames their connections
    /// received meanwhile.
    fn take_mail(&mut self) {
        if !self.mail.has_mail() {
            return;
        }
        self.mail.take(&mut self.inbox);
        let mut done = std::mem::take(&mut self.inbox.done);
        for &(t, status) in &done {
            let (_, idx, gen, _) = tag::split(t);
            let Some(c) = conn_mut(&mut self.conns, idx, gen) else {
                continue;
            };
            let Some((id, _)) = c.hook_wait.take() else {
                continue;
            };
            let mut a = [0u8; ANSWER_BYTES];
            encode_answer(id, status, &mut a);
            c.out.extend_from_slice(&a);
            if !c.closing {
                self.take(idx);
            }
        }
        done.clear();
        self.inbox.done = done;
    }

    /// Takes the whole frames connection `idx` holds; an image hook among them goes to the
    /// hook thread.
    fn take(&mut self, idx: usize) {
        let Serve {
            conns,
            images,
            store_q,
            slots,
            hooks,
            batch,
            hook_jobs,
            ..
        } = self;
        let Some(c) = conns.get_mut(idx).and_then(Option::as_mut) else {
            return;
        };
        match take_frames(c, images, store_q, slots, hooks, batch) {
            Ok(None) => {}
            Ok(Some(hook)) => {
                let job = HookJob {
                    idx,
                    gen: c.gen,
                    hook,
                };
                if hook_jobs.send(job).is_err() {
                    tracing::warn!("replication: the hook thread is gone");
                    close(c);
                }
            }
            Err(e) => {
                tracing::info!("replication connection ended: {e}");
                close(c);
            }
        }
    }

    fn on_cqe(&mut self, t: u64, res: i32) {
        let (kind, idx, gen, _) = tag::split(t);
        if kind == T_MAIL {
            self.wake.completed();
            return;
        }
        if kind == T_ACCEPT {
            self.accept_armed = false;
            if res >= 0 {
                // SAFETY: the accept returned a fresh descriptor owned by nobody else.
                let fd = unsafe { OwnedFd::from_raw_fd(res) };
                self.adopt(fd);
            } else if res != -libc::ECANCELED {
                tracing::warn!("replication accept: {}", io::Error::from_raw_os_error(-res));
                std::thread::sleep(Duration::from_millis(REPLICA_POLL_MS / 4));
            }
            return;
        }
        let Some(c) = conn_mut(&mut self.conns, idx, gen) else {
            return;
        };
        match kind {
            T_RECV => {
                c.recv_armed = false;
                if res > 0 && !c.closing {
                    c.have += res as usize;
                    self.take(idx);
                } else if res <= 0 {
                    if res < 0 && res != -libc::ECANCELED {
                        tracing::info!(
                            "replication connection ended: {}",
                            io::Error::from_raw_os_error(-res)
                        );
                    }
                    close(c);
                }
            }
            T_SEND => {
                c.send_in_flight = false;
                if res < 0 {
                    close(c);
                } else {
                    c.sent += res as usize;
                    if c.sent >= c.sending.len() {
                        c.sending.clear();
                        c.sent = 0;
                    }
                }
            }
            _ => {}
        }
    }

    fn adopt(&mut self, fd: OwnedFd) {
        let stream = TcpStream::from(fd);
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!("replication connection: {e}");
        }
        let (Ok(cut), Ok(buf)) = (stream.try_clone(), Region::new(CONN_BUF_BYTES)) else {
            tracing::warn!("replication connection refused: no memory or descriptor for it");
            return;
        };
        self.next_key += 1;
        let key = self.next_key;
        self.peers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, cut);
        let idx = match self.conns.iter().position(Option::is_none) {
            Some(i) => i,
            None => {
                self.conns.push(None);
                self.gens.push(0);
                self.conns.len() - 1
            }
        };
        self.gens[idx] = tag::next_gen(self.gens[idx]);
        self.conns[idx] = Some(PeerConn {
            fd: OwnedFd::from(stream),
            gen: self.gens[idx],
            key,
            buf,
            have: 0,
            partial_since: None,
            recv_armed: false,
            out: Vec::with_capacity(REPLICA_BATCH_FRAMES * ANSWER_BYTES),
            sending: Vec::with_capacity(REPLICA_BATCH_FRAMES * ANSWER_BYTES),
            sent: 0,
            send_in_flight: false,
            closing: false,
            hook_wait: None,
        });
        self.live += 1;
    }

    /// Sends the connection's answers, keeps its receive armed, drops it once closed.
    fn service(&mut self, idx: usize) {
        let Some(c) = self.conns.get_mut(idx).and_then(Option::as_mut) else {
            return;
        };
        if c.closing {
            if !c.recv_armed && !c.send_in_flight {
                let key = c.key;
                self.conns[idx] = None;
                self.live -= 1;
                self.peers
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&key);
            }
            return;
        }
        let fd = types::Fd(c.fd.as_raw_fd());
        if !c.send_in_flight && (c.sent < c.sending.len() || !c.out.is_empty()) {
            if c.sending.is_empty() {
                std::mem::swap(&mut c.out, &mut c.sending);
            }
            let rest = &c.sending[c.sent..];
            let e = opcode::Send::new(fd, rest.as_ptr(), rest.len() as u32)
                .flags(libc::MSG_NOSIGNAL)
                .build()
                .user_data(tag::make(T_SEND, idx, c.gen, 0));
            // SAFETY: `sending` is neither changed nor dropped until this send completed
            // (the connection is dropped only with nothing in flight).
            match unsafe { self.ring.push_op(&e) } {
                Ok(()) => c.send_in_flight = true,
                Err(_) => close(c),
            }
        }
        if !c.recv_armed && !c.closing && c.out.len() < ANSWERS_PENDING_MAX {
            let room = CONN_BUF_BYTES - c.have;
            if room == 0 && c.hook_wait.is_some() {
                // Full of frames that wait for the snapshot's answer.
                return;
            }
            if room == 0 {
                // Cannot happen: whole frames are always taken out, and one fits.
                close(c);
                return;
            }
            let e = opcode::Recv::new(
                fd,
                // SAFETY: have < CONN_BUF_BYTES, inside the region.
                unsafe { c.buf.as_ptr().add(c.have) },
                room as u32,
            )
            .build()
            .user_data(tag::make(T_RECV, idx, c.gen, 0));
            // SAFETY: the region lives in the connection, dropped only with nothing in
            // flight; frames are taken out of it only between receives.
            match unsafe { self.ring.push_op(&e) } {
                Ok(()) => c.recv_armed = true,
                Err(_) => close(c),
            }
        }
    }
}

/// Connection `idx` if it is still the one of generation `gen`.
fn conn_mut(conns: &mut [Option<PeerConn>], idx: usize, gen: u32) -> Option<&mut PeerConn> {
    conns
        .get_mut(idx)
        .and_then(Option::as_mut)
        .filter(|c| c.gen == gen)
}

/// Ends a connection: its socket is shut down, so its operations end.
fn close(c: &mut PeerConn) {
    if !c.closing {
        c.closing = true;
        // SAFETY: shutdown on a socket we own; an error (already disconnected) is fine.
        unsafe { libc::shutdown(c.fd.as_raw_fd(), libc::SHUT_RDWR) };
    }
}

/// An image hook to run off the listener's thread (a snapshot, a rollback or a copied
/// snapshot): the hook, the volume and the snapshot it names.
struct Deferred {
    run: SnapshotHook,
    volume: [u8; 16],
    snapshot: [u8; 16],
    /// What it does, for the log.
    what: &'static str,
}

/// Applies the whole frames received on `c`, batch after batch (each frame's data copied
/// into its batch slot, aligned as the devices need), queues their answers, and moves what
/// is left of a frame to the front of the buffer. A frame's image hook is returned for the
/// hook thread, not run (see [`PeerConn::hook_wait`]).
fn take_frames(
    c: &mut PeerConn,
    images: &Images,
    q: &mut IoQueue,
    slots: &mut SlotBuf,
    hooks: &Hooks,
    batch: &mut Vec<Pending>,
) -> io::Result<Option<Deferred>> {
    let base = c.buf.as_ptr();
    let mut at = 0usize;
    let mut deferred = None;
    loop {
        while batch.len() < REPLICA_BATCH_FRAMES && c.have - at >= HDR_BYTES {
            // SAFETY: `at + HDR_BYTES <= have`, received bytes inside the region.
            let hdr: &[u8; HDR_BYTES] = unsafe { &*base.add(at).cast() };
            let (frame, crc) = Frame::decode(hdr).map_err(wire)?;
            // While a hook runs, the frames of its volume (and another hook's) wait, with
            // everything behind them.
            if c.hook_wait
                .is_some_and(|(_, v)| v == frame.volume || frame.op.runs_hook())
            {
                break;
            }
            let data_len = if frame.op.has_data() {
                frame.len as usize
            } else {
                0
            };
            if c.have - at - HDR_BYTES < data_len {
                break;
            }
            // SAFETY: the frame's data lies within the received bytes.
            let src = unsafe { std::slice::from_raw_parts(base.add(at + HDR_BYTES), data_len) };
            // A rebuild's copy or a snapshot runs alone, after everything received before
            // it (see `Op::runs_alone`).
            if frame.op.runs_alone() {
                apply(q, batch)?;
            }
            let slot = batch.len();
            let data = slots.slot_mut(slot, data_len);
            data.copy_from_slice(src);
            let p = take_frame(frame, crc, data, slot, images, q, hooks, &mut deferred)?;
            at += HDR_BYTES + data_len;
            if deferred.is_some() && c.hook_wait.is_none() {
                // Everything before it is applied (it runs alone); it is answered when
                // its hook returns.
                c.hook_wait = Some((p.id, frame.volume));
                continue;
            }
            batch.push(p);
            if frame.op.runs_alone() {
                apply(q, batch)?;
            }
        }
        if batch.is_empty() {
            break;
        }
        apply(q, batch)?;
        for p in batch.iter() {
            let mut a = [0u8; ANSWER_BYTES];
            encode_answer(p.id, p.status.unwrap_or(-libc::EIO), &mut a);
            c.out.extend_from_slice(&a);
        }
        batch.clear();
    }
    if at > 0 {
        // SAFETY: both ranges lie within the received bytes of the region.
        unsafe { std::ptr::copy(base.add(at), base, c.have - at) };
        c.have -= at;
    }
    // Bytes came: a frame still incomplete has made progress.
    c.partial_since = (c.have > 0).then(Instant::now);
    Ok(deferred)
}

/// One frame of the batch being applied.
struct Pending {
    id: u32,
    /// The answer, once known (refused frames are answered without storage).
    status: Option<i32>,
    /// Storage operations still running for it.
    parts: u32,
}

fn wire(e: WireError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// Checks the frame's data and queues the frame (batch slot `slot`) on its image: the
/// frame's answer if already known (a refusal), or the storage operations it started.
#[allow(clippy::too_many_arguments)]
fn take_frame(
    frame: Frame,
    data_crc: u32,
    data: &mut [u8],
    slot: usize,
    images: &Images,
    q: &mut IoQueue,
    hooks: &Hooks,
    deferred: &mut Option<Deferred>,
) -> io::Result<Pending> {
    if crc32c::crc32c(data) != data_crc {
        return Err(wire(WireError::DataDigest));
    }
    let snapshot_id = <[u8; 16]>::try_from(&data[..]).ok();
    let answer = |status| Pending {
        id: frame.id,
        status: Some(status),
        parts: 0,
    };
    let image = {
        let images = images.read().unwrap_or_else(|p| p.into_inner());
        images.get(&frame.volume).cloned()
    };
    let Some(image) = image else {
        return Ok(answer(NOT_HELD));
    };
    if image.epoch() > frame.epoch {
        return Ok(answer(FENCED));
    }
    let Some(backend) = image.backend.clone() else {
        return Ok(answer(NOT_HELD));
    };
    if image.epoch.fetch_max(frame.epoch, Ordering::SeqCst) > frame.epoch {
        return Ok(answer(FENCED));
    }
    image.promise(Instant::now());
    if image.epoch() > frame.epoch {
        return Ok(answer(FENCED));
    }
    let base = data.as_mut_ptr();
    let mut p = Pending {
        id: frame.id,
        status: None,
        parts: 0,
    };
    if frame.op.changes_data() {
        image.note_change(frame.epoch, frame.session, &*backend);
    }
    let (hook, what) = match frame.op {
        Op::Snapshot => (hooks.snapshot.as_ref(), "taking a snapshot of"),
        Op::SeedSnapshot => (hooks.seed.as_ref(), "taking a copied snapshot of"),
        Op::Rollback => (hooks.rollback.as_ref(), "rolling back"),
        _ => (None, ""),
    };
    if let (Some(run), Some(snapshot)) = (hook, snapshot_id) {
        *deferred = Some(Deferred {
            run: run.clone(),
            volume: frame.volume,
            snapshot,
            what,
        });
        return Ok(p);
    }
    let mut queue = |kind: IoKind, offset: u64, len: u32, at: usize| {
        let buf = if matches!(kind, IoKind::Write { .. }) {
            // SAFETY: `at + len` lies within the frame's data.
            unsafe { base.add(at) }
        } else {
            std::ptr::null_mut()
        };
        let req = IoRequest {
            kind,
            offset,
            len,
            buf,
            tag: slot as u64,
        };
        // SAFETY: the frame's batch slot is not touched again until `apply` has reaped
        // every completion of this frame (the batch is applied before the slot is reused).
        match unsafe { backend.submit(q, &req) } {
            Ok(()) => p.parts += 1,
            Err(e) => {
                p.status
                    .get_or_insert(-e.raw_os_error().unwrap_or(libc::EIO));
            }
        }
    };
    match frame.op {
        Op::RebuildStart => {
            let n = backend.size_bytes().div_ceil(LBA_BYTES).div_ceil(64) as usize;
            *image.rebuild_map() = Some(vec![0; n]);
        }
        Op::RebuildEnd => *image.rebuild_map() = None,
        Op::Ping => {}
        Op::Recent => {
            let status = image.recent(frame.epoch, frame.session, frame.offset, &*backend);
            p.status = Some(status);
        }
        // With its hook and snapshot id, it went to the hook thread above (everything
        // before it applied, as it runs alone: the copy is at the point of the write stream
        // where the primary takes its own).
        Op::Snapshot | Op::Rollback | Op::SeedSnapshot => {
            p.status = Some(if hook.is_none() {
                -libc::EOPNOTSUPP
            } else {
                -libc::EINVAL
            });
        }
        Op::Flush => queue(IoKind::Flush, 0, 0, 0),
        Op::Write { fua } => {
            image.writes.fetch_add(1, Ordering::Relaxed);
            image.mark_live(frame.offset, frame.len);
            queue(IoKind::Write { fua }, frame.offset, frame.len, 0);
        }
        Op::WriteZeroes | Op::Deallocate => {
            image.writes.fetch_add(1, Ordering::Relaxed);
            image.mark_live(frame.offset, frame.len);
            let kind = if frame.op == Op::WriteZeroes {
                IoKind::WriteZeroes
            } else {
                IoKind::Deallocate
            };
            queue(kind, frame.offset, frame.len, 0);
        }
        // A rebuild's copy (not host I/O): the runs no live write reached.
        Op::Copy | Op::CopyZeroes => {
            image.copies.fetch_add(1, Ordering::Relaxed);
            let mut copied = 0;
            for (first, n) in image.unmarked_runs(frame.offset, frame.len) {
                copied += n;
                let off = first * LBA_BYTES;
                let kind = if frame.op == Op::Copy {
                    IoKind::Write { fua: false }
                } else {
                    IoKind::WriteZeroes
                };
                queue(
                    kind,
                    off,
                    (n * LBA_BYTES) as u32,
                    (off - frame.offset) as usize,
                );
            }
            let all = u64::from(frame.len) / LBA_BYTES;
            image.copied_blocks.fetch_add(copied, Ordering::Relaxed);
            image
                .skipped_blocks
                .fetch_add(all.saturating_sub(copied), Ordering::Relaxed);
        }
    }
    if p.parts == 0 {
        p.status.get_or_insert(0);
    }
    Ok(p)
}

/// Runs what the batch queued and records each frame's answer (idempotent: frames already
/// answered are left alone).
fn apply(q: &mut IoQueue, batch: &mut [Pending]) -> io::Result<()> {
    let mut waiting: u32 = batch.iter().map(|p| p.parts).sum();
    if waiting == 0 {
        return Ok(());
    }
    q.submit()?;
    while waiting > 0 {
        q.reap(|tag, res| {
            if let Some(p) = batch.get_mut(tag as usize).filter(|p| p.parts > 0) {
                p.parts -= 1;
                waiting -= 1;
                if res < 0 {
                    p.status.get_or_insert(res);
                }
                if p.parts == 0 {
                    p.status.get_or_insert(0);
                }
            }
        });
        if waiting > 0 {
            q.wait(Duration::from_millis(REPLICA_POLL_MS))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;

    /// A peer that sends part of a frame and stops holds one of the listener's connections
    /// only until [`REPLICA_PARTIAL_FRAME_MS`] passes; a well-formed peer idle between
    /// frames keeps its connection.
    #[test]
    fn a_peer_that_stalls_mid_frame_is_cut_and_an_idle_one_is_not() {
        let server = ReplicaServer::start("127.0.0.1:0".parse().expect("addr")).expect("listen");
        let mut stalled = TcpStream::connect(server.local_addr()).expect("connect");
        let idle = TcpStream::connect(server.local_addr()).expect("connect");
        stalled
            .write_all(&[0x45; HDR_BYTES / 2])
            .expect("half a header");
        stalled
            .set_read_timeout(Some(Duration::from_millis(
                REPLICA_PARTIAL_FRAME_MS + 5_000,
            )))
            .expect("timeout");
        let start = Instant::now();
        let mut b = [0u8; 1];
        let n = stalled
            .read(&mut b)
            .expect("the listener closes the connection");
        assert_eq!(n, 0, "closed, not answered");
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_millis(REPLICA_PARTIAL_FRAME_MS - 500),
            "cut after {waited:?}, before the deadline"
        );
        idle.set_nonblocking(true).expect("nonblocking");
        let mut b = [0u8; 1];
        match (&idle).read(&mut b) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            other => panic!("the idle connection was closed or answered: {other:?}"),
        }
        server.shutdown();
    }

    /// A listener holding volumes `VA` and `VB` (files in `dir`) whose snapshot hook says
    /// when it is entered and returns only when released.
    struct SlowHook {
        server: ReplicaServer,
        entered: std::sync::mpsc::Receiver<()>,
        release: std::sync::mpsc::Sender<()>,
    }

    const VA: [u8; 16] = [0xa; 16];
    const VB: [u8; 16] = [0xb; 16];

    /// A server whose hook for `op` (a snapshot, a rollback or a copied snapshot) waits
    /// until released.
    fn slow_hook(dir: &std::path::Path, op: Op) -> SlowHook {
        use crate::backend::FileBackend;
        let (entered_tx, entered) = std::sync::mpsc::channel::<()>();
        let (release, released) = std::sync::mpsc::channel::<()>();
        let (entered_tx, released) = (Mutex::new(entered_tx), Mutex::new(released));
        let hook: SnapshotHook = Arc::new(move |_, _| {
            let _ = entered_tx.lock().expect("lock").send(());
            let _ = released.lock().expect("lock").recv();
            Ok(())
        });
        let mut hooks = Hooks::default();
        *match op {
            Op::Snapshot => &mut hooks.snapshot,
            Op::Rollback => &mut hooks.rollback,
            _ => &mut hooks.seed,
        } = Some(hook);
        let server = ReplicaServer::start_with_hooks("127.0.0.1:0".parse().expect("addr"), hooks)
            .expect("listen");
        let backend = |name: &str| -> Option<Arc<dyn Backend>> {
            let f = FileBackend::open(&dir.join(name), 1 << 20).expect("file");
            Some(Arc::new(f))
        };
        server.set_images(vec![(VA, backend("a"), 1), (VB, backend("b"), 1)]);
        SlowHook {
            server,
            entered,
            release,
        }
    }

    /// A frame of epoch 1 with its data, as a primary sends it.
    fn frame_bytes(op: Op, volume: [u8; 16], id: u32, data: &[u8]) -> Vec<u8> {
        let f = Frame {
            op,
            volume,
            epoch: 1,
            offset: 0,
            len: data.len() as u32,
            id,
            session: 1,
        };
        let mut b = [0u8; HDR_BYTES];
        f.encode(data, &mut b);
        [&b[..], data].concat()
    }

    fn write_frame(volume: [u8; 16], id: u32) -> Vec<u8> {
        frame_bytes(
            Op::Write { fua: false },
            volume,
            id,
            &[0x5a; LBA_BYTES as usize],
        )
    }

    /// A frame naming a snapshot: `op` is a snapshot, a rollback or a copied snapshot.
    fn hook_frame(op: Op, volume: [u8; 16], id: u32) -> Vec<u8> {
        frame_bytes(op, volume, id, &[7; 16])
    }

    const HOOK_OPS: [Op; 3] = [Op::Snapshot, Op::Rollback, Op::SeedSnapshot];

    /// The next answer on `s`: (id, status).
    fn answer(s: &mut TcpStream) -> (u32, i32) {
        let mut b = [0u8; ANSWER_BYTES];
        s.read_exact(&mut b).expect("an answer");
        super::super::decode_answer(&b).expect("well formed")
    }

    fn peer(server: &ReplicaServer) -> TcpStream {
        let s = TcpStream::connect(server.local_addr()).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        s
    }

    /// A snapshot whose hook is slow (this server's control plane has not learned of it
    /// yet), or a slow rollback or copied snapshot, holds back only its own volume: another
    /// peer's write is applied and answered meanwhile, while a write of the hook's volume
    /// sent after it on its connection (and what follows that) waits for the hook's answer.
    #[test]
    fn a_slow_hook_holds_back_only_its_volume() {
        for op in HOOK_OPS {
            a_slow_hook_holds_back_only_its_volume_for(op);
        }
    }

    fn a_slow_hook_holds_back_only_its_volume_for(op: Op) {
        let dir = tempfile::tempdir().expect("tempdir");
        let h = slow_hook(dir.path(), op);
        let (mut a, mut b) = (peer(&h.server), peer(&h.server));
        a.write_all(&hook_frame(op, VA, 1)).expect("send");
        h.entered
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("the hook of {op:?} runs: {e}"));
        // Behind the snapshot on its connection: a write of its volume, then one of another.
        a.write_all(&[write_frame(VA, 2), write_frame(VB, 3)].concat())
            .expect("send");
        b.write_all(&write_frame(VB, 4)).expect("send");
        assert_eq!(
            answer(&mut b),
            (4, 0),
            "another peer's write waits for nobody ({op:?})"
        );
        // Frames are taken in order: nothing more is answered on the snapshot's connection.
        a.set_nonblocking(true).expect("nonblocking");
        std::thread::sleep(Duration::from_millis(300));
        match (&a).read(&mut [0u8; 1]) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            other => panic!("answered while the hook of {op:?} runs: {other:?}"),
        }
        a.set_nonblocking(false).expect("blocking");
        h.release.send(()).expect("release");
        let got: Vec<(u32, i32)> = (0..3).map(|_| answer(&mut a)).collect();
        assert_eq!(got, vec![(1, 0), (2, 0), (3, 0)]);
        h.server.shutdown();
    }

    /// Behind a slow hook on the same connection, a write of another volume is applied and
    /// answered before the hook's frame is.
    #[test]
    fn behind_a_slow_hook_another_volumes_write_is_answered() {
        for op in HOOK_OPS {
            let dir = tempfile::tempdir().expect("tempdir");
            let h = slow_hook(dir.path(), op);
            let mut a = peer(&h.server);
            a.write_all(&[hook_frame(op, VA, 1), write_frame(VB, 2)].concat())
                .expect("send");
            assert_eq!(answer(&mut a), (2, 0), "{op:?}");
            h.release.send(()).expect("release");
            assert_eq!(answer(&mut a), (1, 0), "{op:?}");
            h.server.shutdown();
        }
    }
}
