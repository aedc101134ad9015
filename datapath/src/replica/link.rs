//! The primary's side: one [`Link`] per replica server, shared by every volume replicated
//! there, and the [`ReplicaHub`] that holds them.
//!
//! A link is one TCP connection driven by a [`LinkEngine`] on the link's home: a data-path
//! reactor (the target's first, for a hub made with [`ReplicaHub::hosted`]) or the hub's
//! own link reactor. Either way its socket is a ring's operations, not a thread per link
//! or per I/O: a part queued here is sent in the home's next loop pass, batched with every
//! part queued meanwhile into one vectored send; the answers are read by the same loop and
//! handed to the reactors that issued the parts ([`CompletionSink`]). When the home is the
//! issuing reactor itself (one data-path core), a replicated write wakes no thread on the
//! primary.
//!
//! Every part a link accepts completes within bounded time: answered; failed at once when
//! the link is full; or, when the replica failed, held until the control plane drops the
//! replica from the volume's in-sync set (then it completes with success: the copy is no
//! longer owed, and its chunks are marked for the rebuild) or until [`REPLICA_HOLD_MAX_MS`]
//! passes (then with an error the host retries). A part for a replica that is not in sync
//! (being rebuilt) never waits: it completes as soon as it fails, marked dirty; a
//! rebuild's own frames fail instead (`submit_owed`).
//!
//! [`LinkEngine`]: super::LinkEngine

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::engine::{self, LinkHome};
use super::{
    Frame, MemberState, Mode, Op, FENCED, HDR_BYTES, NOT_HELD, RECENT_END, RECENT_UNKNOWN,
};
use crate::backend::CompletionSink;
use crate::limits::{
    REPLICA_HOLD_MAX_MS, REPLICA_LINK_PARTS_MAX, REPLICA_NOT_READY_PAUSE_MS,
    REPLICA_NOT_READY_RETRY_MS,
};

/// Parts one vectored send carries at most.
pub(super) const SEND_BATCH: usize = 32;

/// A data pointer the issuing command keeps valid until the part completes.
#[derive(Clone, Copy)]
pub(super) struct DataPtr(pub(super) *const u8);
// SAFETY: the pointee is a command's data buffer that its queue neither frees nor reuses
// until every part of the command (this one included) has completed; the link only reads it.
unsafe impl Send for DataPtr {}

/// One replica part: a frame, its data, and whom to tell.
pub(super) struct Part {
    frame: Frame,
    data: DataPtr,
    sink: Arc<dyn CompletionSink>,
    tag: u64,
    /// The replica's mode and missed chunks.
    member: Arc<MemberState>,
    /// A rebuild's own frame: it must reach the replica (a held one fails, it is never
    /// completed as "no longer owed").
    must_deliver: bool,
    phase: Phase,
    /// When it entered the link's queue (in that order its frame is sent, retries aside).
    queued: Instant,
    first_sent: Option<Instant>,
    /// Connection generation it was (or is being) sent on, and when its send began: its
    /// answer may arrive before the sender has finished the write that carried it.
    sent: Option<(u64, Instant)>,
    retry_at: Option<Instant>,
    /// Unique on the link: an id is reused once its part completed, and the sender must not
    /// mistake the new part for the one it wrote.
    seq: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Queued,
    Sending,
    Sent,
    Held(Instant),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Conn {
    /// Not connected yet: parts queue.
    Connecting,
    /// Connected (generation): parts are sent.
    Up(u64),
    /// Failed: new parts are held (in-sync replicas) or complete marked dirty (others)
    /// until a new connection is up.
    Down,
}

struct State {
    conn: Conn,
    gen: u64,
    parts: Vec<Option<Part>>,
    free: Vec<u32>,
    outq: VecDeque<u32>,
    /// Volumes whose parts failed here, not yet taken by the control plane.
    failures: BTreeSet<[u8; 16]>,
    next_seq: u64,
}

/// A connection to one replica server, shared by the volumes replicated there.
pub struct Link {
    addr: SocketAddr,
    /// This process's incarnation, carried by every frame (see [`super::Frame::session`]).
    session: u64,
    st: Mutex<State>,
    cv: Condvar,
    stop: Arc<AtomicBool>,
    /// Its number on its home (unique in the hub).
    pub(super) idx: usize,
    /// Where its connection is driven.
    home: Arc<dyn LinkHome>,
    /// Set when the home was asked to look at the link and has not yet: at most one
    /// request waits per link.
    poked: AtomicBool,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link").field("addr", &self.addr).finish()
    }
}

impl Link {
    fn new(
        addr: SocketAddr,
        stop: Arc<AtomicBool>,
        session: u64,
        idx: usize,
        home: Arc<dyn LinkHome>,
    ) -> Link {
        Link {
            addr,
            session,
            st: Mutex::new(State {
                conn: Conn::Connecting,
                gen: 0,
                parts: Vec::new(),
                free: Vec::new(),
                outq: VecDeque::new(),
                failures: BTreeSet::new(),
                next_seq: 0,
            }),
            cv: Condvar::new(),
            stop,
            idx,
            home,
            poked: AtomicBool::new(false),
        }
    }

    /// Asks the home to look at the link (a part to send).
    fn poke(&self) {
        if !self.poked.swap(true, Ordering::AcqRel) {
            self.home.poke_link(self.idx);
        }
    }

    /// The home is about to look at the link: a poke after this asks again.
    pub(super) fn clear_poke(&self) {
        self.poked.store(false, Ordering::Release);
    }

    /// Whether the hub has stopped.
    pub(super) fn stopped(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// The replica server's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Waits up to `timeout` for the connection to be up; whether it is.
    pub fn wait_up(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = self.lock();
        loop {
            if matches!(st.conn, Conn::Up(_)) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            st = self
                .cv
                .wait_timeout(st, deadline - now)
                .map(|r| r.0)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes one part of a host command; its completion reaches `sink` with `tag` (0 or
    /// -errno).
    ///
    /// # Safety
    /// For a write, `data` must point to `frame.len` bytes that stay valid and unchanged
    /// until that completion has been delivered.
    pub unsafe fn submit(
        &self,
        frame: Frame,
        data: *const u8,
        sink: &Arc<dyn CompletionSink>,
        tag: u64,
        member: &Arc<MemberState>,
    ) {
        // SAFETY: forwarded caller contract.
        unsafe { self.submit_part(frame, data, sink, tag, member, false) }
    }

    /// As [`Link::submit`], for a rebuild's own frame: a frame the replica did not answer
    /// completes with -ECANCELED.
    ///
    /// # Safety
    /// As [`Link::submit`].
    pub unsafe fn submit_owed(
        &self,
        frame: Frame,
        data: *const u8,
        sink: &Arc<dyn CompletionSink>,
        tag: u64,
        member: &Arc<MemberState>,
    ) {
        // SAFETY: forwarded caller contract.
        unsafe { self.submit_part(frame, data, sink, tag, member, true) }
    }

    /// # Safety
    /// As [`Link::submit`].
    unsafe fn submit_part(
        &self,
        frame: Frame,
        data: *const u8,
        sink: &Arc<dyn CompletionSink>,
        tag: u64,
        member: &Arc<MemberState>,
        must_deliver: bool,
    ) {
        if member.mode() == Mode::Deposed {
            // This server no longer leads the volume: the part cannot be owed to anyone.
            sink.complete(tag, FENCED);
            return;
        }
        let mut st = self.lock();
        let id = match st.free.pop() {
            Some(id) => id,
            None if st.parts.len() < REPLICA_LINK_PARTS_MAX => {
                st.parts.push(None);
                (st.parts.len() - 1) as u32
            }
            None => {
                drop(st);
                tracing::warn!(peer = %self.addr, "replica link full; the host will retry");
                sink.complete(tag, -libc::EAGAIN);
                return;
            }
        };
        let mut frame = frame;
        frame.id = id;
        frame.session = self.session;
        st.next_seq += 1;
        let seq = st.next_seq;
        let now = Instant::now();
        let phase = match st.conn {
            Conn::Down => {
                if member.mode() == Mode::InSync {
                    st.failures.insert(frame.volume);
                } else {
                    member.set_dropped();
                }
                Phase::Held(now)
            }
            _ => Phase::Queued,
        };
        st.parts[id as usize] = Some(Part {
            frame,
            data: DataPtr(data),
            sink: sink.clone(),
            tag,
            member: member.clone(),
            must_deliver,
            phase,
            queued: now,
            first_sent: None,
            sent: None,
            retry_at: None,
            seq,
        });
        if phase == Phase::Queued {
            st.outq.push_back(id);
            drop(st);
            self.poke();
        } else {
            drop(st);
            self.sweep();
        }
    }

    /// Completes held parts whose replica no longer holds writes up (dropped, or being
    /// rebuilt: success, their chunks marked dirty), whose primary was deposed (fenced) or
    /// that waited too long (error).
    pub fn sweep(&self) {
        let now = Instant::now();
        let hold_max = Duration::from_millis(REPLICA_HOLD_MAX_MS);
        let mut done = Vec::new();
        {
            let mut st = self.lock();
            for id in 0..st.parts.len() {
                let res = match &st.parts[id] {
                    Some(p) => match p.phase {
                        Phase::Held(_) if p.member.mode() == Mode::Deposed => FENCED,
                        Phase::Held(_) if p.must_deliver => -libc::ECANCELED,
                        Phase::Held(_) if p.member.mode() != Mode::InSync => {
                            p.member.set_dropped();
                            if p.frame.op.changes_data() {
                                p.member.mark(p.frame.offset, u64::from(p.frame.len));
                            }
                            0
                        }
                        Phase::Held(since) if now.duration_since(since) >= hold_max => -libc::EIO,
                        _ => continue,
                    },
                    None => continue,
                };
                if let Some(p) = st.parts[id].take() {
                    st.free.push(id as u32);
                    done.push((p.sink, p.tag, res));
                }
            }
        }
        for (sink, tag, res) in done {
            sink.complete(tag, res);
        }
    }

    /// Volumes whose parts failed on this link since the last call.
    fn take_failures(&self) -> Vec<[u8; 16]> {
        std::mem::take(&mut self.lock().failures)
            .into_iter()
            .collect()
    }

    /// Ends connection `gen` (if still current): everything queued or in flight is held.
    pub(super) fn fail(&self, gen: u64, why: &str) {
        let mut st = self.lock();
        if st.conn != Conn::Up(gen) && st.conn != Conn::Connecting {
            return;
        }
        tracing::warn!(peer = %self.addr, "replica link failed: {why}");
        st.conn = Conn::Down;
        st.outq.clear();
        let now = Instant::now();
        let State {
            parts, failures, ..
        } = &mut *st;
        for p in parts.iter_mut().flatten() {
            if matches!(p.phase, Phase::Queued | Phase::Sending | Phase::Sent) {
                // A part still being written stays `Sending` (its data is being read) and is
                // held by the sender when it finishes.
                if p.phase != Phase::Sending {
                    p.phase = Phase::Held(now);
                }
                report(failures, p);
            }
        }
        drop(st);
        self.cv.notify_all();
        self.poke();
        self.sweep();
    }

    /// The first connection failed (later attempts fail quietly: the link is down).
    pub(super) fn connect_failed(&self, why: &str) {
        let gen = self.lock().gen;
        self.fail(gen, why);
    }

    /// Marks the link up on a new connection generation; returns it.
    pub(super) fn up(&self) -> u64 {
        let mut st = self.lock();
        st.gen += 1;
        st.conn = Conn::Up(st.gen);
        let gen = st.gen;
        drop(st);
        self.cv.notify_all();
        gen
    }

    /// Whether connection `gen` is still the link's, and up.
    pub(super) fn is_up(&self, gen: u64) -> bool {
        self.lock().conn == Conn::Up(gen)
    }

    /// Takes the queued parts ready to go (at most [`SEND_BATCH`]) for connection `gen`,
    /// encoding their headers into `batch`; they are `Sending` until [`Link::sent`]. False
    /// (and nothing taken) when connection `gen` is no longer the link's, or down.
    pub(super) fn take_batch(&self, gen: u64, now: Instant, batch: &mut Vec<Outgoing>) -> bool {
        let mut st = self.lock();
        if st.conn != Conn::Up(gen) {
            return false;
        }
        let State { parts, outq, .. } = &mut *st;
        while batch.len() < SEND_BATCH {
            let Some(id) = outq.front().copied() else {
                break;
            };
            let Some(p) = parts.get_mut(id as usize).and_then(Option::as_mut) else {
                outq.pop_front();
                continue;
            };
            if p.retry_at.is_some_and(|t| t > now) {
                break;
            }
            outq.pop_front();
            p.phase = Phase::Sending;
            p.sent = Some((gen, now));
            p.retry_at = None;
            p.first_sent.get_or_insert(now);
            let data_len = if p.frame.op.has_data() {
                p.frame.len as usize
            } else {
                0
            };
            // SAFETY: the part's command keeps `data` valid until it completes, and a
            // `Sending` part is never completed (sweeps skip it).
            let data = unsafe { slice(p.data, data_len) };
            let mut hdr = [0u8; HDR_BYTES];
            p.frame.encode(data, &mut hdr);
            batch.push(Outgoing {
                id,
                seq: p.seq,
                hdr,
                data: p.data,
                len: data_len,
            });
        }
        true
    }

    /// The send of `batch` on connection `gen` ended (`ok`: every byte of it was written):
    /// its parts still unanswered are `Sent`, or held and reported if it failed.
    pub(super) fn sent(&self, gen: u64, batch: &[Outgoing], ok: bool) {
        let now = Instant::now();
        let mut st = self.lock();
        let still_up = st.conn == Conn::Up(gen);
        let State {
            parts, failures, ..
        } = &mut *st;
        for o in batch {
            // Only the part this batch carried, if still unanswered (an answer may have
            // completed it already, and its id may belong to a new part by now).
            let Some(p) = parts
                .get_mut(o.id as usize)
                .and_then(Option::as_mut)
                .filter(|p| p.seq == o.seq && p.phase == Phase::Sending)
            else {
                continue;
            };
            if ok && still_up {
                p.phase = Phase::Sent;
            } else {
                p.phase = Phase::Held(now);
                report(failures, p);
            }
        }
    }

    /// The answers (part id, status) read on connection `gen`, taken under one lock; the
    /// parts they complete are handed to `done`'s sinks afterwards, consecutive ones of one
    /// sink (one reactor) together. `done` and `batch` are the reader's buffers.
    pub(super) fn on_answers(
        &self,
        gen: u64,
        answers: &[(u32, i32)],
        done: &mut Vec<(Part, i32)>,
        batch: &mut Vec<(u64, i32)>,
    ) {
        let now = Instant::now();
        let (mut requeued, mut held) = (false, false);
        {
            let mut st = self.lock();
            for &(id, status) in answers {
                match self.answer(&mut st, gen, id, status, now) {
                    Verdict::Ignored => {}
                    Verdict::Requeued => requeued = true,
                    Verdict::Held => held = true,
                    Verdict::Done(p) => done.push((p, status)),
                }
            }
        }
        if requeued {
            self.poke();
        }
        if held {
            self.sweep();
        }
        let mut i = 0;
        while i < done.len() {
            let sink = done[i].0.sink.clone();
            batch.clear();
            while let Some((p, status)) = done.get(i).filter(|(p, _)| Arc::ptr_eq(&p.sink, &sink)) {
                if *status == 0 {
                    if let Some((_, sent)) = p.sent {
                        p.member.renew_lease(sent);
                    }
                    p.member.acked(p.queued);
                }
                batch.push((p.tag, *status));
                i += 1;
            }
            sink.complete_many(batch);
        }
        done.clear();
    }

    /// What one answer does to its part (under the link's lock).
    fn answer(&self, st: &mut State, gen: u64, id: u32, status: i32, now: Instant) -> Verdict {
        // A part still `Sending` counts: the replica read it whole, so the write carrying it
        // is past its bytes (the sender, finding it gone, leaves its id alone).
        let Some(p) = st
            .parts
            .get_mut(id as usize)
            .and_then(Option::as_mut)
            .filter(|p| matches!(p.phase, Phase::Sent | Phase::Sending))
            .filter(|p| p.sent.is_some_and(|(g, _)| g == gen))
        else {
            return Verdict::Ignored;
        };
        let retry = Duration::from_millis(REPLICA_NOT_READY_RETRY_MS);
        if status == NOT_HELD && p.first_sent.is_some_and(|t| now.duration_since(t) < retry) {
            p.phase = Phase::Queued;
            p.retry_at = Some(now + Duration::from_millis(REPLICA_NOT_READY_PAUSE_MS));
            st.outq.push_back(id);
            return Verdict::Requeued;
        }
        let answered = status == 0
            || status == FENCED
            || (p.frame.op == Op::Recent
                && (status > 0 || status == RECENT_END || status == RECENT_UNKNOWN));
        if !answered {
            // The replica could not store it (or never got the volume): its copy is no
            // longer trustworthy. Hold the part and report the replica.
            tracing::warn!(peer = %self.addr, status, "replica refused a part");
            p.phase = Phase::Held(now);
            report(&mut st.failures, p);
            return Verdict::Held;
        }
        match st.parts[id as usize].take() {
            Some(p) => {
                st.free.push(id);
                Verdict::Done(p)
            }
            None => Verdict::Ignored,
        }
    }

    /// Oldest send time among parts in flight on connection `gen`.
    pub(super) fn oldest_in_flight(&self, gen: u64) -> Option<Instant> {
        let st = self.lock();
        st.parts
            .iter()
            .flatten()
            .filter(|p| p.phase == Phase::Sent)
            .filter_map(|p| p.sent.filter(|(g, _)| *g == gen).map(|(_, t)| t))
            .min()
    }
}

/// What an answer did to its part.
enum Verdict {
    /// Not a part in flight on this connection (a late answer): nothing.
    Ignored,
    /// The replica does not hold the volume yet: sent again shortly.
    Requeued,
    /// The replica failed it: held, the replica reported.
    Held,
    /// Answered: complete it with the answer's status.
    Done(Part),
}

/// A part of `p`'s replica failed: an in-sync replica is reported (its writes wait for the
/// control plane); one being rebuilt is dropped (writes never wait for it).
fn report(failures: &mut BTreeSet<[u8; 16]>, p: &Part) {
    if p.member.mode() == Mode::InSync {
        failures.insert(p.frame.volume);
    } else {
        p.member.set_dropped();
    }
}

/// The links of this server's primaries, by replica server address.
pub struct ReplicaHub {
    links: Mutex<HashMap<SocketAddr, Arc<Link>>>,
    stop: Arc<AtomicBool>,
    /// Drawn at random when the hub is made (one per process).
    session: u64,
    /// Where its links are driven.
    home: Arc<dyn LinkHome>,
    /// The hub's own link reactor, when no data-path reactor hosts its links.
    own: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for ReplicaHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaHub").finish_non_exhaustive()
    }
}

impl ReplicaHub {
    /// A hub driving its links on a link reactor of its own (a thread with one ring for
    /// every link): for tools and tests without a target.
    pub fn new() -> io::Result<ReplicaHub> {
        let stop = Arc::new(AtomicBool::new(false));
        let (home, thread) = engine::start_own(stop.clone())?;
        let mut hub = Self::with_home(home, stop);
        hub.own = Mutex::new(Some(thread));
        Ok(hub)
    }

    /// A hub whose links are driven by `home`: a data-path reactor
    /// (`TargetHandle::link_home`), so replicated writes issued there go out in the same
    /// loop pass.
    pub fn hosted(home: Arc<dyn LinkHome>) -> ReplicaHub {
        Self::with_home(home, Arc::new(AtomicBool::new(false)))
    }

    fn with_home(home: Arc<dyn LinkHome>, stop: Arc<AtomicBool>) -> ReplicaHub {
        ReplicaHub {
            links: Mutex::new(HashMap::new()),
            stop,
            session: uuid::Uuid::new_v4().as_u64_pair().0,
            home,
            own: Mutex::new(None),
        }
    }

    /// The link to `addr`, started on first use.
    pub fn link(&self, addr: SocketAddr) -> io::Result<Arc<Link>> {
        let mut links = self.links.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(l) = links.get(&addr) {
            return Ok(l.clone());
        }
        if self.stop.load(Ordering::Acquire) {
            return Err(io::Error::other("replication is shutting down"));
        }
        let link = Arc::new(Link::new(
            addr,
            self.stop.clone(),
            self.session,
            links.len(),
            self.home.clone(),
        ));
        self.home.adopt_link(link.clone());
        links.insert(addr, link.clone());
        Ok(link)
    }

    /// Replicas that failed since the last call: (volume, replica server address).
    pub fn take_failures(&self) -> Vec<([u8; 16], SocketAddr)> {
        let links: Vec<Arc<Link>> = self
            .links
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        let mut out = Vec::new();
        for l in links {
            out.extend(l.take_failures().into_iter().map(|v| (v, l.addr)));
        }
        out
    }

    /// Stops every link (parts still held complete with errors first) and the hub's own
    /// link reactor, if it has one.
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::Release);
        let links: Vec<Arc<Link>> = self
            .links
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        for l in links {
            // (Not `l.fail(l.lock().gen, …)`: that guard would live through the call.)
            let gen = l.lock().gen;
            l.fail(gen, "shutting down");
        }
        self.home.stop();
        let own = self.own.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = own {
            let _ = t.join();
        }
    }
}

impl Drop for ReplicaHub {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A part's data as a slice.
///
/// # Safety
/// `p` must point to `len` readable bytes that nobody writes while the slice lives.
pub(super) unsafe fn slice<'a>(p: DataPtr, len: usize) -> &'a [u8] {
    if len == 0 || p.0.is_null() {
        return &[];
    }
    // SAFETY: forwarded caller contract.
    unsafe { std::slice::from_raw_parts(p.0, len) }
}

/// One part in a send batch.
pub(super) struct Outgoing {
    id: u32,
    seq: u64,
    pub(super) hdr: [u8; HDR_BYTES],
    pub(super) data: DataPtr,
    pub(super) len: usize,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{Backend, FileBackend};
    use crate::replica::engine::PAUSE_AFTER_SEND_MS;
    use crate::replica::rebuild::Waiter;
    use crate::replica::{Op, ReplicaServer};

    /// The replica may answer a part before its home has seen the send that carried it
    /// complete: the answer still completes the part (it was dropped once,
    /// and the part then went "unanswered" until the link broke and the replica was
    /// recorded out of sync for nothing).
    #[test]
    fn an_answer_that_overtakes_the_end_of_its_send_completes_the_part() {
        const SIZE: u64 = 1 << 20;
        let dir = tempfile::tempdir().expect("tempdir");
        let image: Arc<dyn Backend> =
            Arc::new(FileBackend::open(&dir.path().join("replica.img"), SIZE).expect("image"));
        let volume = [9u8; 16];
        let server = ReplicaServer::start("127.0.0.1:0".parse().expect("addr")).expect("listen");
        server.set_images(vec![(volume, Some(image), 1)]);
        let hub = ReplicaHub::new().expect("hub");
        let link = hub.link(server.local_addr()).expect("link");
        assert!(link.wait_up(Duration::from_secs(10)), "link up");
        PAUSE_AFTER_SEND_MS.store(300, Ordering::Relaxed);
        let member = Arc::new(MemberState::new(SIZE, true));
        let waiter = Arc::new(Waiter::default());
        let sink: Arc<dyn CompletionSink> = waiter.clone();
        let data = vec![7u8; 4096];
        let frame = write_frame(volume, 0);
        // SAFETY: `data` outlives the part's completion, awaited below.
        unsafe { link.submit(frame, data.as_ptr(), &sink, 42, &member) };
        let r = waiter.wait(1);
        PAUSE_AFTER_SEND_MS.store(0, Ordering::Relaxed);
        assert!(r.is_ok(), "the write's replica part: {r:?}");
        assert!(
            hub.take_failures().is_empty(),
            "the replica answered: it did not fail"
        );
        hub.shutdown();
    }

    /// A 4 KiB write at `offset` of `volume`, epoch 1.
    fn write_frame(volume: [u8; 16], offset: u64) -> Frame {
        Frame {
            op: Op::Write { fua: false },
            volume,
            epoch: 1,
            offset,
            len: 4096,
            id: 0,
            session: 0,
        }
    }

    /// Completions as a test sees them.
    #[derive(Default)]
    struct Seen(Mutex<Vec<(u64, i32)>>);

    impl CompletionSink for Seen {
        fn complete(&self, tag: u64, result: i32) {
            self.0.lock().expect("seen").push((tag, result));
        }
    }

    /// A replica server that takes frames and never answers (hung, not dead: its socket
    /// stays open) is reported once a part has waited [`REPLICA_IO_TIMEOUT_MS`]; the part
    /// is held until the replica is dropped from the in-sync set, then completes as no
    /// longer owed (its chunk marked for the rebuild); the link connects again.
    ///
    /// [`REPLICA_IO_TIMEOUT_MS`]: crate::limits::REPLICA_IO_TIMEOUT_MS
    #[test]
    fn a_replica_that_never_answers_is_reported_its_part_held_and_the_link_reconnects() {
        use crate::limits::{REPLICA_IO_TIMEOUT_MS, REPLICA_RECONNECT_MS};
        use std::net::TcpListener;

        const SIZE: u64 = 1 << 20;
        let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
        listener.set_nonblocking(true).expect("nonblocking");
        let mut accepted = Vec::new();
        let accept_within = |accepted: &mut Vec<std::net::TcpStream>, limit: Duration| {
            let deadline = Instant::now() + limit;
            loop {
                match listener.accept() {
                    Ok((s, _)) => return accepted.push(s),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        assert!(Instant::now() < deadline, "no connection within {limit:?}");
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(e) => panic!("accept: {e}"),
                }
            }
        };
        let hub = ReplicaHub::new().expect("hub");
        let link = hub
            .link(listener.local_addr().expect("addr"))
            .expect("link");
        accept_within(&mut accepted, Duration::from_secs(5));
        assert!(link.wait_up(Duration::from_secs(5)), "link up");

        let volume = [4u8; 16];
        let member = Arc::new(MemberState::new(SIZE, true));
        let seen = Arc::new(Seen::default());
        let sink: Arc<dyn CompletionSink> = seen.clone();
        let data = vec![3u8; 4096];
        let frame = write_frame(volume, 8192);
        let sent = Instant::now();
        // SAFETY: `data` outlives the part's completion, awaited below.
        unsafe { link.submit(frame, data.as_ptr(), &sink, 7, &member) };

        let timeout = Duration::from_millis(REPLICA_IO_TIMEOUT_MS);
        let failures = loop {
            let f = hub.take_failures();
            if !f.is_empty() {
                break f;
            }
            assert!(
                sent.elapsed() < timeout + Duration::from_secs(3),
                "the silent replica was never reported"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(
            sent.elapsed() >= timeout,
            "reported after {:?}, before the part could time out",
            sent.elapsed()
        );
        assert_eq!(failures, vec![(volume, link.addr())]);
        assert!(
            seen.0.lock().expect("seen").is_empty(),
            "the part is held while the replica is in sync (an acknowledged write must be on it)"
        );

        // The control plane drops the replica: the held part is no longer owed.
        member.set_dropped();
        let deadline = Instant::now() + Duration::from_secs(2);
        while seen.0.lock().expect("seen").is_empty() {
            assert!(Instant::now() < deadline, "the held part never completed");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(*seen.0.lock().expect("seen"), vec![(7, 0)]);
        assert!(member.has_dirty(), "its chunk is marked for the rebuild");

        // The link gave the hung connection up and connects again.
        accept_within(
            &mut accepted,
            Duration::from_millis(REPLICA_RECONNECT_MS) + Duration::from_secs(3),
        );
        assert!(link.wait_up(Duration::from_secs(5)), "link up again");
        hub.shutdown();
    }
}
