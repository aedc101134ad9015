//! The primary's side: one [`Link`] per replica server, shared by every volume replicated
//! there, and the [`ReplicaHub`] that holds them.
//!
//! A link is one TCP connection driven by two threads (not one per I/O): the sender
//! batches queued parts into one vectored write, the receiver reads answers and hands each
//! completion to the reactor that issued the part ([`CompletionSink`]). Every part it
//! accepts completes within bounded time: answered; failed at once when the link is full;
//! or, when the replica failed, held until the control plane drops the replica from the
//! volume's in-sync set (then it completes with success: the copy is no longer owed, and
//! its chunks are marked for the rebuild) or until [`REPLICA_HOLD_MAX_MS`] passes (then
//! with an error the host retries). A part for a replica that is not in sync (being
//! rebuilt) never waits: it completes as soon as it fails, marked dirty; a rebuild's own
//! frames fail instead (`submit_owed`).

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::{
    decode_answer, Frame, MemberState, Mode, Op, ANSWER_BYTES, FENCED, HDR_BYTES, NOT_HELD,
    RECENT_END, RECENT_UNKNOWN,
};
use crate::backend::CompletionSink;
use crate::limits::{
    REPLICA_CONNECT_TIMEOUT_MS, REPLICA_HOLD_MAX_MS, REPLICA_IO_TIMEOUT_MS, REPLICA_LINK_PARTS_MAX,
    REPLICA_NOT_READY_PAUSE_MS, REPLICA_NOT_READY_RETRY_MS, REPLICA_POLL_MS, REPLICA_RECONNECT_MS,
};

/// Parts the sender puts into one vectored write.
const SEND_BATCH: usize = 32;

/// A data pointer the issuing command keeps valid until the part completes.
#[derive(Clone, Copy)]
struct DataPtr(*const u8);
// SAFETY: the pointee is a command's data buffer that its queue neither frees nor reuses
// until every part of the command (this one included) has completed; the link only reads it.
unsafe impl Send for DataPtr {}

/// One replica part: a frame, its data, and whom to tell.
struct Part {
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
    stream: Option<TcpStream>,
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
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link").field("addr", &self.addr).finish()
    }
}

impl Link {
    fn new(addr: SocketAddr, stop: Arc<AtomicBool>, session: u64) -> Link {
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
                stream: None,
                next_seq: 0,
            }),
            cv: Condvar::new(),
            stop,
        }
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
            self.cv.notify_all();
        } else {
            drop(st);
            self.sweep();
        }
    }

    /// Completes held parts whose replica no longer holds writes up (dropped, or being
    /// rebuilt: success, their chunks marked dirty) or that waited too long (error).
    pub fn sweep(&self) {
        let now = Instant::now();
        let hold_max = Duration::from_millis(REPLICA_HOLD_MAX_MS);
        let mut done = Vec::new();
        {
            let mut st = self.lock();
            for id in 0..st.parts.len() {
                let res = match &st.parts[id] {
                    Some(p) => match p.phase {
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
    fn fail(&self, gen: u64, why: &str) {
        let mut st = self.lock();
        if st.conn != Conn::Up(gen) && st.conn != Conn::Connecting {
            return;
        }
        tracing::warn!(peer = %self.addr, "replica link failed: {why}");
        st.conn = Conn::Down;
        if let Some(s) = st.stream.take() {
            let _ = s.shutdown(Shutdown::Both);
        }
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
        self.sweep();
    }

    /// The receiver's answers (part id, status) on connection `gen`, taken under one lock;
    /// the parts they complete are handed to `done`'s sinks afterwards, consecutive ones of
    /// one sink (one reactor) together. `done` and `batch` are the receiver's buffers.
    fn on_answers(
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
            self.cv.notify_all();
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
    fn oldest_in_flight(&self, gen: u64) -> Option<Instant> {
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
}

impl std::fmt::Debug for ReplicaHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaHub").finish_non_exhaustive()
    }
}

impl Default for ReplicaHub {
    fn default() -> Self {
        ReplicaHub {
            links: Mutex::new(HashMap::new()),
            stop: Arc::new(AtomicBool::new(false)),
            session: uuid::Uuid::new_v4().as_u64_pair().0,
        }
    }
}

impl ReplicaHub {
    /// The link to `addr`, started on first use.
    pub fn link(&self, addr: SocketAddr) -> io::Result<Arc<Link>> {
        let mut links = self.links.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(l) = links.get(&addr) {
            return Ok(l.clone());
        }
        let link = Arc::new(Link::new(addr, self.stop.clone(), self.session));
        let driver = link.clone();
        std::thread::Builder::new()
            .name(format!("evstor-repl-{addr}"))
            .spawn(move || drive(&driver))?;
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

    /// Stops every link's threads (parts still held complete with errors first).
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::Release);
        for l in self
            .links
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
        {
            // (Not `l.fail(l.lock().gen, …)`: that guard would live through the call.)
            let gen = l.lock().gen;
            l.fail(gen, "shutting down");
            l.cv.notify_all();
        }
    }
}

/// The link's driver thread: connects, sends, reconnects after failures, sweeps holds.
fn drive(link: &Arc<Link>) {
    let pause = Duration::from_millis(REPLICA_RECONNECT_MS);
    while !link.stop.load(Ordering::Acquire) {
        let timeout = Duration::from_millis(REPLICA_CONNECT_TIMEOUT_MS);
        match TcpStream::connect_timeout(&link.addr, timeout).and_then(|s| {
            s.set_nodelay(true)?;
            s.set_write_timeout(Some(Duration::from_millis(REPLICA_IO_TIMEOUT_MS)))?;
            s.set_read_timeout(Some(Duration::from_millis(REPLICA_POLL_MS)))?;
            Ok(s)
        }) {
            Ok(s) => {
                let gen = up(link, &s);
                let rx = s.try_clone();
                let recv_link = link.clone();
                let receiver =
                    rx.map(|rx| std::thread::spawn(move || receive(&recv_link, rx, gen)));
                send_loop(link, s, gen);
                if let Ok(r) = receiver {
                    let _ = r.join();
                }
            }
            Err(e) => {
                let gen = link.lock().gen;
                link.fail(gen, &format!("connecting to {}: {e}", link.addr));
            }
        }
        link.sweep();
        std::thread::sleep(pause);
    }
    link.sweep();
}

/// Marks the link up on a new connection generation; returns it.
fn up(link: &Link, s: &TcpStream) -> u64 {
    let mut st = link.lock();
    st.gen += 1;
    st.conn = Conn::Up(st.gen);
    st.stream = s.try_clone().ok();
    let gen = st.gen;
    drop(st);
    link.cv.notify_all();
    gen
}

/// Sends queued parts until connection `gen` fails or the hub stops.
fn send_loop(link: &Link, mut s: TcpStream, gen: u64) {
    let mut batch: Vec<Outgoing> = Vec::with_capacity(SEND_BATCH);
    let sweep_every = Duration::from_millis(REPLICA_POLL_MS);
    loop {
        batch.clear();
        {
            let mut st = link.lock();
            loop {
                if st.conn != Conn::Up(gen) || link.stop.load(Ordering::Acquire) {
                    return;
                }
                let now = Instant::now();
                let ready = st.outq.front().copied().and_then(|id| {
                    let p = st.parts.get(id as usize)?.as_ref()?;
                    Some(p.retry_at.is_none_or(|t| t <= now))
                });
                match ready {
                    Some(true) => break,
                    Some(false) => {
                        st = link
                            .cv
                            .wait_timeout(st, sweep_every)
                            .map(|r| r.0)
                            .unwrap_or_else(|p| p.into_inner().0);
                    }
                    None => {
                        let (g, timed_out) = link
                            .cv
                            .wait_timeout(st, sweep_every)
                            .map(|(g, t)| (g, t.timed_out()))
                            .unwrap_or_else(|p| {
                                let (g, t) = p.into_inner();
                                (g, t.timed_out())
                            });
                        st = g;
                        if timed_out {
                            drop(st);
                            link.sweep();
                            st = link.lock();
                        }
                    }
                }
            }
            let now = Instant::now();
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
        }
        let r = write_batch(&mut s, &batch);
        #[cfg(test)]
        tests::pause_after_send();
        let now = Instant::now();
        let mut st = link.lock();
        let still_up = st.conn == Conn::Up(gen);
        let State {
            parts, failures, ..
        } = &mut *st;
        for o in &batch {
            // Only the part this batch carried, if still unanswered (an answer may have
            // completed it already, and its id may belong to a new part by now).
            let Some(p) = parts
                .get_mut(o.id as usize)
                .and_then(Option::as_mut)
                .filter(|p| p.seq == o.seq && p.phase == Phase::Sending)
            else {
                continue;
            };
            if r.is_ok() && still_up {
                p.phase = Phase::Sent;
            } else {
                p.phase = Phase::Held(now);
                report(failures, p);
            }
        }
        drop(st);
        if let Err(e) = r {
            link.fail(gen, &format!("sending: {e}"));
            return;
        }
    }
}

/// A part's data as a slice.
///
/// # Safety
/// `p` must point to `len` readable bytes that nobody writes while the slice lives.
unsafe fn slice<'a>(p: DataPtr, len: usize) -> &'a [u8] {
    if len == 0 || p.0.is_null() {
        return &[];
    }
    // SAFETY: forwarded caller contract.
    unsafe { std::slice::from_raw_parts(p.0, len) }
}

/// One part in a send batch.
struct Outgoing {
    id: u32,
    seq: u64,
    hdr: [u8; HDR_BYTES],
    data: DataPtr,
    len: usize,
}

/// Writes every header and its data with vectored writes.
fn write_batch(s: &mut TcpStream, batch: &[Outgoing]) -> io::Result<()> {
    if batch.len() > SEND_BATCH {
        return Err(io::Error::other("a send batch over its bound"));
    }
    // On the stack: a header and at most one data piece per part.
    let mut iov = [IoSlice::new(&[]); 2 * SEND_BATCH];
    let mut n = 0;
    for o in batch {
        iov[n] = IoSlice::new(&o.hdr);
        n += 1;
        // SAFETY: as in `send_loop`: the parts are `Sending`, so their data stays valid
        // until the replica has read them whole (then this write is past their bytes).
        let d = unsafe { slice(o.data, o.len) };
        if !d.is_empty() {
            iov[n] = IoSlice::new(d);
            n += 1;
        }
    }
    let mut bufs: &mut [IoSlice<'_>] = &mut iov[..n];
    while !bufs.is_empty() {
        match s.write_vectored(bufs) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Answers the receiver takes from the socket at once.
const ANSWERS_PER_READ: usize = 64;

/// Reads answers on connection `gen` until it fails; breaks it when a part waits too long.
/// Everything one read returned is handled as one batch (one lock, one wake-up per reactor).
fn receive(link: &Link, mut rx: TcpStream, gen: u64) {
    let timeout = Duration::from_millis(REPLICA_IO_TIMEOUT_MS);
    let mut buf = [0u8; ANSWERS_PER_READ * ANSWER_BYTES];
    let mut have = 0usize;
    let mut answers: Vec<(u32, i32)> = Vec::with_capacity(ANSWERS_PER_READ);
    let mut done: Vec<(Part, i32)> = Vec::with_capacity(ANSWERS_PER_READ);
    let mut batch: Vec<(u64, i32)> = Vec::with_capacity(ANSWERS_PER_READ);
    loop {
        if link.lock().conn != Conn::Up(gen) {
            return;
        }
        match rx.read(&mut buf[have..]) {
            Ok(0) => return link.fail(gen, "replica closed the connection"),
            Ok(n) => {
                have += n;
                let whole = have - have % ANSWER_BYTES;
                for a in buf[..whole].chunks_exact(ANSWER_BYTES) {
                    let Ok(a) = <&[u8; ANSWER_BYTES]>::try_from(a) else {
                        continue;
                    };
                    match decode_answer(a) {
                        Ok(answer) => answers.push(answer),
                        Err(e) => return link.fail(gen, &format!("bad answer: {e}")),
                    }
                }
                buf.copy_within(whole..have, 0);
                have -= whole;
                link.on_answers(gen, &answers, &mut done, &mut batch);
                answers.clear();
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) =>
            {
                if link
                    .oldest_in_flight(gen)
                    .is_some_and(|t| t.elapsed() >= timeout)
                {
                    return link.fail(gen, "a part went unanswered");
                }
            }
            Err(e) => return link.fail(gen, &format!("receiving: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU64;

    use super::*;
    use crate::backend::{Backend, FileBackend};
    use crate::replica::rebuild::Waiter;
    use crate::replica::{Op, ReplicaServer};

    /// Test failpoint: the sender sleeps this long after each write, before it marks the
    /// parts it wrote as sent (a preempted sender thread).
    static PAUSE_AFTER_SEND_MS: AtomicU64 = AtomicU64::new(0);

    pub(super) fn pause_after_send() {
        let ms = PAUSE_AFTER_SEND_MS.load(Ordering::Relaxed);
        if ms > 0 {
            std::thread::sleep(Duration::from_millis(ms));
        }
    }

    /// The replica may answer a part before the sender thread has even returned from the
    /// write that carried it: the answer still completes the part (it was dropped once,
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
        let hub = ReplicaHub::default();
        let link = hub.link(server.local_addr()).expect("link");
        assert!(link.wait_up(Duration::from_secs(10)), "link up");
        PAUSE_AFTER_SEND_MS.store(300, Ordering::Relaxed);
        let member = Arc::new(MemberState::new(SIZE, true));
        let waiter = Arc::new(Waiter::default());
        let sink: Arc<dyn CompletionSink> = waiter.clone();
        let data = vec![7u8; 4096];
        let frame = Frame {
            op: Op::Write { fua: false },
            volume,
            epoch: 1,
            offset: 0,
            len: 4096,
            id: 0,
            session: 0,
        };
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
}
