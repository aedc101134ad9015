//! Reactors: the threads that serve connections. Each owns many connections and drives
//! their sockets and their storage through one io_uring.
//!
//! # The loop
//!
//! One pass: take the mailbox (new connections from the acceptor, wake-ups of queues by
//! other threads, reclaims), reap every completion (receives, sends, storage), then look
//! at each connection an event touched: issue its storage operations, send what its queue
//! staged (one `sendmsg` per connection per pass, data straight from the command buffers),
//! re-arm its receive, advance its closing; then the replication links this reactor is the
//! home of ([`crate::replica::LinkEngine`]): the parts its queues (and others) replicated
//! in this pass go out in one send per link. Then one `io_uring_enter` submits everything.
//! A command runs to completion inside the pass that brings its last input: a read on a
//! memory-backed volume is received, executed and answered without leaving the loop.
//!
//! Receives are multishot with provided buffers: the kernel picks a buffer from the
//! reactor's ring ([`RECV_BUFS`] of [`RECV_BUF_BYTES`]) for each chunk it delivers, the
//! connection's [`crate::rx::Rx`] takes what it needs (H2C data straight into the command
//! buffer, small PDUs in place) and the buffer goes back at once. An idle connection holds
//! no buffer.
//!
//! When a pass finds nothing to do, the reactor busy-polls for a bounded, adaptive window
//! ([`BUSY_POLL_US_MAX`]: it grows while polling finds work, shrinks while it does not,
//! so an idle reactor goes to sleep at once), then sleeps in the kernel until a completion
//! arrives, its eventfd is written (mail while asleep) or the next deadline (at most
//! [`REACTOR_SWEEP_MS`]): an idle target wakes ten times a second per reactor.
//!
//! # Invariants
//!
//! - A reactor never blocks on a socket: every socket operation is a ring operation. It
//!   blocks only where a backend does (the block store's metadata commit and its device
//!   reads of non-memory devices run on the calling thread).
//! - No allocation per I/O: slots, send batches, the submission list and the pool's wait
//!   lists are sized at Connect; receive buffers and ring at start-up; the carry buffer
//!   of a connection once, when a PDU first straddles two receives.
//! - A completion is applied only to the connection it was issued for: ring tags carry
//!   the connection's slot and its generation.
//! - A connection is dropped only when nothing of it is in flight (receive, send, storage
//!   part), so no buffer is freed or reused under the kernel.
//! - A command completes only when all its parts did ([`crate::queue`]).

use std::io;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use io_uring::{cqueue, opcode, types};

use crate::admission::{ConnKey, PortClass};
use crate::backend::IoQueue;
use crate::buffer::Region;
use crate::conn::{Closing, Conn, Ident, Phase};
use crate::error::DatapathError;
use crate::limits::{
    BUSY_POLL_US_MAX, QOS_REFILL_MS, REACTOR_CQ_ENTRIES, REACTOR_DRAIN_MS, REACTOR_SQ_ENTRIES,
    REACTOR_SWEEP_MS, RECV_BUFS, RECV_BUF_BYTES, SEND_TIMEOUT_MS,
};
use crate::notify::{self, Mail, Notifier, WakeRead, Wakeable};
use crate::replica::LinkEngine;
use crate::target::{LedgerGuard, Shared};

/// A reactor's inbox.
pub type Mailbox = notify::Mailbox<Adopt>;

/// A connection the acceptor hands to a reactor.
#[derive(Debug)]
pub struct Adopt {
    /// The socket.
    pub sock: TcpStream,
    /// Its port.
    pub port: PortClass,
    /// Its ledger entry.
    pub key: ConnKey,
    /// The host's address.
    pub peer: SocketAddr,
    /// When it was accepted.
    pub accepted: Instant,
    /// Leaves the ledger when the connection ends.
    pub ledger: LedgerGuard,
}

/// Ring tags: what a completion is for. Bit 63 stays clear (batch runs use it).
pub(crate) mod tag {
    pub const RECV: u64 = 1;
    pub const SEND: u64 = 2;
    pub const IO: u64 = 3;
    pub const WAKE: u64 = 4;
    pub const CANCEL: u64 = 5;
    /// Replication links ([`crate::replica::LinkEngine`]): a connect, a send, a receive, a
    /// cancel of one of them, and (in mail only) a link to look at.
    pub const LINK_CONNECT: u64 = 8;
    pub const LINK_SEND: u64 = 9;
    pub const LINK_RECV: u64 = 10;
    pub const LINK_CANCEL: u64 = 11;
    pub const LINK_POKE: u64 = 12;

    /// Whether a completion of this kind is a replication link's.
    pub fn is_link(kind: u64) -> bool {
        (LINK_CONNECT..=LINK_CANCEL).contains(&kind)
    }
    const GEN_MASK: u64 = 0xff_ffff;

    /// Kind, connection slot, its generation and (storage) the command slot.
    pub fn make(kind: u64, idx: usize, gen: u32, slot: u16) -> u64 {
        (kind << 56) | ((gen as u64 & GEN_MASK) << 32) | ((idx as u64 & 0xffff) << 16) | slot as u64
    }

    pub fn split(t: u64) -> (u64, usize, u32, u16) {
        (
            (t >> 56) & 0x7f,
            ((t >> 16) & 0xffff) as usize,
            ((t >> 32) & GEN_MASK) as u32,
            t as u16,
        )
    }

    /// The next generation of a connection slot (what tags can carry).
    pub fn next_gen(g: u32) -> u32 {
        (g.wrapping_add(1)) & GEN_MASK as u32
    }
}

/// Buffer group of the provided receive buffers.
const BGID: u16 = 0;

/// The CPUs this process may run on (its affinity mask), ascending.
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data; zeroed is a valid (empty) set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: sched_getaffinity writes at most size_of::<cpu_set_t>() bytes into `set`.
    let r = unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if r != 0 {
        return Vec::new();
    }
    (0..libc::CPU_SETSIZE as usize)
        // SAFETY: c < CPU_SETSIZE, inside the set.
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        .collect()
}

/// A CPU set of `cpus`.
fn cpu_set(cpus: &[usize]) -> libc::cpu_set_t {
    // SAFETY: cpu_set_t is plain data; zeroed is a valid (empty) set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &c in cpus.iter().filter(|c| **c < libc::CPU_SETSIZE as usize) {
        // SAFETY: c < CPU_SETSIZE, inside the set.
        unsafe { libc::CPU_SET(c, &mut set) };
    }
    set
}

/// Moves every thread of this process but `keep` onto `cpus` (best effort: a thread that
/// ends meanwhile is skipped).
pub fn move_threads(cpus: &[usize], keep: &[libc::pid_t]) {
    let set = cpu_set(cpus);
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return;
    };
    for t in tasks.flatten() {
        let Some(tid) = t
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<libc::pid_t>().ok())
        else {
            continue;
        };
        if keep.contains(&tid) {
            continue;
        }
        // SAFETY: reads one cpu_set_t we own; `tid` is a thread of this process.
        let r =
            unsafe { libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set) };
        if r != 0 {
            tracing::debug!(
                tid,
                "cannot move a thread off the reactors' CPUs: {}",
                io::Error::last_os_error()
            );
        }
    }
}

/// Pins the calling thread to `cpu` (best effort).
fn pin(cpu: usize) {
    // SAFETY: cpu_set_t is plain data; zeroed is a valid (empty) set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: the caller passes a CPU from allowed_cpus (< CPU_SETSIZE).
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: reads one cpu_set_t we own.
    let r = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if r != 0 {
        tracing::debug!(cpu, "cannot pin reactor: {}", io::Error::last_os_error());
    }
}

/// Starts reactor `id` (on `cpu` if given) with the mailbox `shared.reactors[id]`; returns
/// once its ring is set up (with its thread's kernel id), or why it could not be.
pub fn spawn(
    id: usize,
    shared: Arc<Shared>,
    cpu: Option<usize>,
) -> Result<(JoinHandle<()>, libc::pid_t), DatapathError> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    let h = std::thread::Builder::new()
        .name(format!("nvmf-reactor-{id}"))
        .spawn(move || {
            if let Some(c) = cpu {
                pin(c);
            }
            // SAFETY: gettid has no preconditions.
            let tid = unsafe { libc::gettid() };
            match Reactor::new(id, shared) {
                Ok(r) => {
                    let _ = tx.send(Ok(tid));
                    r.run();
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                }
            }
        })?;
    match rx.recv() {
        Ok(Ok(tid)) => Ok((h, tid)),
        Ok(Err(e)) => {
            let _ = h.join();
            Err(e)
        }
        Err(_) => {
            let _ = h.join();
            Err(DatapathError::Closed("reactor thread died at start"))
        }
    }
}

/// The provided receive buffers of one reactor, and the ring the kernel takes them from.
struct RecvBufs {
    entries: Region,
    data: Region,
    tail: u16,
}

impl RecvBufs {
    fn new(ioq: &mut IoQueue) -> io::Result<RecvBufs> {
        let ring = ioq
            .ring()
            .ok_or_else(|| io::Error::from(io::ErrorKind::Unsupported))?;
        let entries = Region::new(RECV_BUFS * std::mem::size_of::<types::BufRingEntry>())?;
        let data = Region::new(RECV_BUFS * RECV_BUF_BYTES)?;
        // SAFETY: `entries` is a page-aligned mapping of RECV_BUFS entries that lives as
        // long as this struct, which the reactor drops after its ring.
        unsafe {
            ring.submitter().register_buf_ring_with_flags(
                entries.as_ptr() as u64,
                RECV_BUFS as u16,
                BGID,
                0,
            )?;
        }
        let mut b = RecvBufs {
            entries,
            data,
            tail: 0,
        };
        for bid in 0..RECV_BUFS {
            b.put(bid as u16);
        }
        b.publish();
        Ok(b)
    }

    fn put(&mut self, bid: u16) {
        let base = self.entries.as_ptr().cast::<types::BufRingEntry>();
        let at = (self.tail as usize) & (RECV_BUFS - 1);
        // SAFETY: at < RECV_BUFS entries of the mapping; the kernel only reads entries
        // between its head and the published tail, and this one is past the tail.
        let e = unsafe { &mut *base.add(at) };
        // SAFETY: bid < RECV_BUFS, so the buffer lies inside `data`.
        let addr = unsafe { self.data.as_ptr().add(bid as usize * RECV_BUF_BYTES) };
        e.set_addr(addr as u64);
        e.set_len(RECV_BUF_BYTES as u32);
        e.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
    }

    fn publish(&self) {
        let base = self.entries.as_ptr().cast::<types::BufRingEntry>();
        // SAFETY: the tail field of entry 0 is the ring's tail, a u16 the kernel reads
        // with acquire semantics; it is suitably aligned for an atomic access.
        unsafe {
            let tail = types::BufRingEntry::tail(base).cast::<AtomicU16>();
            (*tail).store(self.tail, Ordering::Release);
        }
    }

    /// Hands buffer `bid` back to the kernel.
    fn give_back(&mut self, bid: u16) {
        if (bid as usize) < RECV_BUFS {
            self.put(bid);
            self.publish();
        }
    }

    /// The first `len` bytes of buffer `bid` (what a receive completion delivered).
    fn chunk(&self, bid: u16, len: usize) -> &[u8] {
        let len = len.min(RECV_BUF_BYTES);
        if bid as usize >= RECV_BUFS {
            return &[];
        }
        // SAFETY: inside the mapping; the kernel wrote these bytes before posting the
        // completion and will not touch the buffer until it is given back.
        unsafe {
            std::slice::from_raw_parts(self.data.as_ptr().add(bid as usize * RECV_BUF_BYTES), len)
        }
    }
}

/// The adaptive busy-poll window.
struct BusyPoll {
    window_ns: u64,
}

const POLL_MAX_NS: u64 = BUSY_POLL_US_MAX * 1000;
const POLL_STEP_NS: u64 = POLL_MAX_NS / 8;

impl BusyPoll {
    /// Polls until work shows up (true) or the window passes (false).
    fn spin(&mut self, ioq: &mut IoQueue, mailbox: &Mailbox) -> bool {
        if self.window_ns == 0 {
            return false;
        }
        let start = Instant::now();
        let mut n = 0u32;
        loop {
            if mailbox.has_mail() || ioq.poll_ready().unwrap_or(true) {
                self.window_ns = (self.window_ns * 2).clamp(POLL_STEP_NS, POLL_MAX_NS);
                return true;
            }
            n = n.wrapping_add(1);
            if n.is_multiple_of(16) && start.elapsed().as_nanos() as u64 >= self.window_ns {
                self.window_ns /= 2;
                if self.window_ns < POLL_STEP_NS {
                    self.window_ns = 0;
                }
                return false;
            }
            std::hint::spin_loop();
        }
    }

    /// After a sleep: work that came sooner than a poll window would have been caught by
    /// polling, so poll again next time.
    fn slept(&mut self, slept: Duration, work: bool) {
        if work && (slept.as_nanos() as u64) < POLL_MAX_NS {
            self.window_ns = (self.window_ns * 2).clamp(POLL_STEP_NS, POLL_MAX_NS);
        }
    }
}

/// One reactor thread's state.
struct Reactor {
    shared: Arc<Shared>,
    mailbox: Arc<Mailbox>,
    /// Declared before the receive buffers: the ring goes first.
    ioq: IoQueue,
    bufs: RecvBufs,
    /// Replication links this reactor is the home of (after the ring: dropped after it).
    links: LinkEngine,
    conns: Vec<Option<Box<Conn>>>,
    gens: Vec<u32>,
    vacant: Vec<usize>,
    live: usize,
    dirty: Vec<usize>,
    fast: Vec<usize>,
    cqes: Vec<(u64, i32, u32)>,
    mail: Mail<Adopt>,
    wake: WakeRead,
    poll: BusyPoll,
    next_sweep: Instant,
    next_fast: Instant,
    stopping: Option<Instant>,
}

impl Reactor {
    fn new(id: usize, shared: Arc<Shared>) -> Result<Reactor, DatapathError> {
        let mailbox = shared
            .reactors
            .get(id)
            .cloned()
            .ok_or(DatapathError::Closed("no mailbox for reactor"))?;
        let mut ioq = IoQueue::reactor(REACTOR_SQ_ENTRIES, REACTOR_CQ_ENTRIES)?;
        ioq.set_remote(mailbox.clone());
        let bufs = RecvBufs::new(&mut ioq)?;
        let conns_max = shared.cfg.max_connections + shared.cfg.max_discovery_connections;
        let now = Instant::now();
        Ok(Reactor {
            shared,
            mailbox,
            ioq,
            bufs,
            links: LinkEngine::default(),
            conns: Vec::new(),
            gens: Vec::new(),
            vacant: Vec::new(),
            live: 0,
            dirty: Vec::with_capacity(conns_max),
            fast: Vec::with_capacity(conns_max),
            cqes: Vec::with_capacity(REACTOR_CQ_ENTRIES as usize),
            mail: Mail::default(),
            wake: WakeRead::default(),
            poll: BusyPoll { window_ns: 0 },
            next_sweep: now,
            next_fast: now,
            stopping: None,
        })
    }

    fn run(mut self) {
        loop {
            // Odd while in a pass: storage a pass issues is applied by its end (the block
            // store's deferred work runs in `ioq.submit`), which a rebuild waits for.
            self.mailbox.passes.fetch_add(1, Ordering::SeqCst);
            let now = Instant::now();
            let mut worked = self.take_mail();
            worked |= self.reap(now);
            self.service(now);
            self.links.service(&mut self.ioq, now);
            self.arm_wake();
            if let Err(e) = self.ioq.submit() {
                tracing::warn!("reactor ring submit failed: {e}");
            }
            self.mailbox.passes.fetch_add(1, Ordering::SeqCst);
            if self.stop_check(now) {
                break;
            }
            self.timers(now);
            if worked || !self.dirty.is_empty() || self.ioq.has_ready() {
                continue;
            }
            if self.poll.spin(&mut self.ioq, &self.mailbox) {
                continue;
            }
            self.sleep(now);
        }
        // Whatever did not drain by the deadline: queues leak the buffers still in flight.
        self.conns.clear();
    }

    fn mark(dirty: &mut Vec<usize>, c: &mut Conn, idx: usize) {
        if !c.dirty {
            c.dirty = true;
            dirty.push(idx);
        }
    }

    // ---------------------------------------------------------------------------------
    // Mail

    fn take_mail(&mut self) -> bool {
        if !self.mailbox.has_mail() {
            return false;
        }
        let mut mail = std::mem::take(&mut self.mail);
        self.mailbox.take(&mut mail);
        while let Some(a) = mail.adopt.pop_front() {
            self.adopt(a);
        }
        for l in mail.links.drain(..) {
            self.links.adopt(l);
        }
        for &t in &mail.wake {
            // A link's poke only asks for a pass: every pass looks at the links.
            if tag::split(t).0 != tag::LINK_POKE {
                self.wake(t);
            }
        }
        mail.wake.clear();
        for &key in &mail.close {
            self.close_key(key);
        }
        mail.close.clear();
        for &(t, res) in &mail.done {
            let (kind, idx, gen, slot) = tag::split(t);
            if kind == tag::IO {
                self.on_io(idx, gen, slot, res);
            }
        }
        mail.done.clear();
        self.mail = mail;
        true
    }

    fn adopt(&mut self, a: Adopt) {
        if self.stopping.is_some() || self.shared.shutdown.load(Ordering::Acquire) {
            self.mailbox.conns.fetch_sub(1, Ordering::Relaxed);
            return; // dropping `a` closes the socket and leaves the ledger
        }
        let idx = match self.vacant.pop() {
            Some(i) => i,
            None => {
                self.conns.push(None);
                self.gens.push(0);
                self.conns.len() - 1
            }
        };
        self.gens[idx] = tag::next_gen(self.gens[idx]);
        let gen = self.gens[idx];
        let token = tag::make(0, idx, gen, 0);
        let mb: Arc<dyn Wakeable> = self.mailbox.clone();
        let notify = Arc::new(Notifier::new(mb, token));
        let local = a.sock.local_addr().unwrap_or(self.shared.io_addr);
        let id = Ident {
            port: a.port,
            key: a.key,
            peer: a.peer,
            local,
            accepted: a.accepted,
        };
        let fd = OwnedFd::from(a.sock);
        let mut c = Box::new(Conn::new(id, gen, fd, notify, a.ledger));
        c.rearm = true;
        Self::mark(&mut self.dirty, &mut c, idx);
        self.conns[idx] = Some(c);
        self.live += 1;
    }

    fn wake(&mut self, token: u64) {
        let (_, idx, gen, _) = tag::split(token);
        let Reactor { conns, dirty, .. } = self;
        let Some(c) = conns
            .get_mut(idx)
            .and_then(|c| c.as_deref_mut())
            .filter(|c| c.gen == gen)
        else {
            return;
        };
        c.notify.taken();
        if let Some(q) = c.queue() {
            if let Err(e) = q.on_wake() {
                c.fail_queue(e);
            }
        }
        Self::mark(dirty, c, idx);
    }

    fn close_key(&mut self, key: ConnKey) {
        let Reactor { conns, dirty, .. } = self;
        for (idx, slot) in conns.iter_mut().enumerate() {
            if let Some(c) = slot.as_deref_mut().filter(|c| c.id.key == key) {
                tracing::info!(peer = %c.id.peer, "closing a reclaimed handshake");
                c.close(Closing::Now);
                Self::mark(dirty, c, idx);
            }
        }
    }

    // ---------------------------------------------------------------------------------
    // Completions

    fn reap(&mut self, now: Instant) -> bool {
        let Reactor { ioq, cqes, .. } = self;
        ioq.reap_flags(|t, r, f| cqes.push((t, r, f)));
        if self.cqes.is_empty() {
            return false;
        }
        let mut cqes = std::mem::take(&mut self.cqes);
        for &(t, r, f) in &cqes {
            self.on_cqe(now, t, r, f);
        }
        cqes.clear();
        self.cqes = cqes;
        true
    }

    fn on_cqe(&mut self, now: Instant, t: u64, res: i32, flags: u32) {
        let (kind, idx, gen, slot) = tag::split(t);
        match kind {
            tag::RECV => self.on_recv(now, idx, gen, res, flags),
            tag::SEND => self.on_send(idx, gen, res),
            tag::IO => self.on_io(idx, gen, slot, res),
            tag::WAKE => self.wake.completed(),
            tag::CANCEL => {}
            k if tag::is_link(k) => self.links.on_cqe(now, k, idx, gen, res),
            _ => tracing::warn!(t, "completion with an unknown tag"),
        }
    }

    fn on_recv(&mut self, now: Instant, idx: usize, gen: u32, res: i32, flags: u32) {
        let bid = cqueue::buffer_select(flags);
        let more = cqueue::more(flags);
        let Reactor {
            conns,
            bufs,
            shared,
            dirty,
            ..
        } = self;
        let conn = conns
            .get_mut(idx)
            .and_then(|c| c.as_deref_mut())
            .filter(|c| c.gen == gen);
        let Some(c) = conn else {
            if let Some(b) = bid {
                bufs.give_back(b);
            }
            return;
        };
        if !more {
            c.recv_armed = false;
        }
        if res > 0 {
            if let Some(b) = bid {
                c.on_bytes(shared, now, bufs.chunk(b, res as usize));
                bufs.give_back(b);
            }
            c.rearm |= !more;
        } else if res == -libc::ENOBUFS {
            c.rearm = true;
        } else {
            if res < 0 && res != -libc::ECANCELED {
                tracing::debug!(peer = %c.id.peer, "receive failed: {}", io::Error::from_raw_os_error(-res));
            }
            c.close(Closing::Now); // EOF or error
        }
        Self::mark(dirty, c, idx);
    }

    fn on_send(&mut self, idx: usize, gen: u32, res: i32) {
        let Reactor { conns, dirty, .. } = self;
        let Some(c) = conns
            .get_mut(idx)
            .and_then(|c| c.as_deref_mut())
            .filter(|c| c.gen == gen)
        else {
            return;
        };
        c.send_in_flight = false;
        let pre = std::mem::replace(&mut c.pre_in_flight, false);
        if res < 0 {
            tracing::debug!(peer = %c.id.peer, "send failed: {}", io::Error::from_raw_os_error(-res));
            c.close(Closing::Now);
        } else if pre {
            c.pre_sent(res as usize);
        } else if let Some(q) = c.queue() {
            if let Err(e) = q.on_sent(res as usize) {
                c.fail_queue(e);
            }
        }
        Self::mark(dirty, c, idx);
    }

    fn on_io(&mut self, idx: usize, gen: u32, slot: u16, res: i32) {
        let Reactor { conns, dirty, .. } = self;
        let Some(c) = conns
            .get_mut(idx)
            .and_then(|c| c.as_deref_mut())
            .filter(|c| c.gen == gen)
        else {
            tracing::warn!(idx, "storage completion for a connection that is gone");
            return;
        };
        if let Some(q) = c.queue() {
            if let Err(e) = q.on_io_done(slot, res) {
                c.fail_queue(e);
            }
        }
        Self::mark(dirty, c, idx);
    }

    // ---------------------------------------------------------------------------------
    // Looking at connections

    fn service(&mut self, now: Instant) {
        let mut dirty = std::mem::take(&mut self.dirty);
        for &idx in &dirty {
            self.service_one(idx, now);
        }
        dirty.clear();
        // Servicing marks nothing dirty; keep the (empty) list's capacity.
        dirty.append(&mut self.dirty);
        self.dirty = dirty;
    }

    fn service_one(&mut self, idx: usize, now: Instant) {
        let Reactor {
            conns,
            ioq,
            shared,
            fast,
            ..
        } = self;
        let Some(c) = conns.get_mut(idx).and_then(|c| c.as_deref_mut()) else {
            return;
        };
        c.dirty = false;
        if c.rx_stalled() && c.queue().is_some_and(|q| q.rx_may_resume()) {
            c.resume_rx(shared, now);
        }
        issue_storage(c, idx, ioq);
        if c.closing != Closing::Now {
            issue_send(c, idx, ioq, now);
            issue_recv(c, idx, ioq);
        }
        if c.closing == Closing::AfterSend && !c.sending() {
            c.closing = Closing::Now;
        }
        if c.closing == Closing::Now && advance_close(c, idx, ioq) {
            self.free(idx);
            return;
        }
        let wants_fast = c.rx_stalled() || c.queue().is_some_and(|q| q.wants_fast_tick());
        if wants_fast && !c.fast {
            c.fast = true;
            fast.push(idx);
        }
    }

    fn free(&mut self, idx: usize) {
        if let Some(c) = self.conns.get_mut(idx).and_then(Option::take) {
            if c.fast {
                self.fast.retain(|&i| i != idx);
            }
            drop(c); // the queue leaves its controller, the socket closes, the ledger hears
            self.vacant.push(idx);
            self.live -= 1;
            self.mailbox.conns.fetch_sub(1, Ordering::Relaxed);
        }
    }

    fn arm_wake(&mut self) {
        // SAFETY: the mailbox and `wake` live as long as the reactor (and its ring).
        unsafe {
            self.wake.arm(
                &mut self.ioq,
                self.mailbox.fd(),
                tag::make(tag::WAKE, 0, 0, 0),
            )
        };
    }

    // ---------------------------------------------------------------------------------
    // Time

    fn timers(&mut self, now: Instant) {
        if !self.fast.is_empty() && now >= self.next_fast {
            self.next_fast = now + Duration::from_millis(QOS_REFILL_MS);
            self.fast_tick(now);
        }
        if now >= self.next_sweep {
            self.next_sweep = now + Duration::from_millis(REACTOR_SWEEP_MS);
            self.sweep(now);
            self.links.tick(&mut self.ioq, now);
        }
    }

    /// Every refill period: QoS retries, and stalled PDUs retrying the pool.
    fn fast_tick(&mut self, now: Instant) {
        let Reactor {
            conns,
            fast,
            dirty,
            shared,
            ..
        } = self;
        // Round robin: the queue ticked first takes the tokens a shared namespace earned
        // this period, so the first place rotates; a fixed order starved the others.
        if fast.len() > 1 {
            fast.rotate_left(1);
        }
        fast.retain(|&idx| {
            let Some(c) = conns.get_mut(idx).and_then(|c| c.as_deref_mut()) else {
                return false;
            };
            if let Some(q) = c.queue() {
                if let Err(e) = q.on_tick(now) {
                    c.fail_queue(e);
                }
            }
            c.resume_rx(shared, now);
            Self::mark(dirty, c, idx);
            let keep = c.rx_stalled() || c.queue().is_some_and(|q| q.wants_fast_tick());
            c.fast = keep;
            keep
        });
    }

    /// Every sweep period: deadlines of every connection.
    fn sweep(&mut self, now: Instant) {
        let send_max = Duration::from_millis(SEND_TIMEOUT_MS);
        let Reactor {
            conns,
            dirty,
            shared,
            ..
        } = self;
        for (idx, slot) in conns.iter_mut().enumerate() {
            let Some(c) = slot.as_deref_mut() else {
                continue;
            };
            if c.handshake_deadline(shared).is_some_and(|d| now > d) {
                tracing::debug!(peer = %c.id.peer, "handshake deadline passed");
                c.close(Closing::Now);
            }
            if c.send_since()
                .is_some_and(|t| now.duration_since(t) > send_max)
            {
                tracing::info!(peer = %c.id.peer, "send timed out");
                c.close(Closing::Now);
            }
            if c.closing == Closing::No {
                if let Some(q) = c.queue() {
                    if let Err(e) = q.on_tick(now) {
                        c.fail_queue(e);
                    }
                }
            }
            let busy = c.closing != Closing::No
                || c.queue().is_some_and(|q| q.tx_staged() || q.has_submits());
            if busy {
                Self::mark(dirty, c, idx);
            }
        }
    }

    fn sleep(&mut self, now: Instant) {
        let mut until = self.next_sweep;
        if !self.fast.is_empty() {
            until = until.min(self.next_fast);
        }
        if self.stopping.is_some() {
            until = until.min(now + Duration::from_millis(QOS_REFILL_MS));
        }
        let timeout = until.saturating_duration_since(now);
        if timeout.is_zero() || !self.mailbox.about_to_sleep() {
            return;
        }
        let start = Instant::now();
        if let Err(e) = self.ioq.wait(timeout) {
            tracing::warn!("reactor wait failed: {e}");
        }
        self.mailbox.awake();
        let work = self.ioq.has_ready() || self.mailbox.has_mail();
        self.poll.slept(start.elapsed(), work);
    }

    /// Starts or advances shutdown; true once the reactor may exit.
    fn stop_check(&mut self, now: Instant) -> bool {
        if self.stopping.is_none() {
            if !self.shared.shutdown.load(Ordering::Acquire) {
                return false;
            }
            self.stopping = Some(now + Duration::from_millis(REACTOR_DRAIN_MS));
            let Reactor { conns, dirty, .. } = self;
            for (idx, slot) in conns.iter_mut().enumerate() {
                if let Some(c) = slot.as_deref_mut() {
                    c.close(Closing::Now);
                    Self::mark(dirty, c, idx);
                }
            }
            return false;
        }
        if self.live == 0 {
            return true;
        }
        if self.stopping.is_some_and(|d| now > d) {
            tracing::warn!(
                connections = self.live,
                "reactor stopped with I/O still in flight; its buffers are leaked"
            );
            return true;
        }
        false
    }
}

/// Issues the storage operations the connection's queue asked for.
fn issue_storage(c: &mut Conn, idx: usize, ioq: &mut IoQueue) {
    let gen = c.gen;
    let Some(q) = c.queue() else {
        return;
    };
    if !q.has_submits() {
        return;
    }
    let r = q.drain_submits(|ns, req| {
        let mut req = *req;
        req.tag = tag::make(tag::IO, idx, gen, req.tag as u16);
        // SAFETY: the request's buffer is its slot's data buffer, which the queue keeps
        // (and never hands to anyone else) until this part's completion is applied, or
        // leaks if the connection is dropped before; the slot holds an Arc to the
        // namespace, so the backend outlives the operation.
        unsafe { ns.backend.submit_parts(ioq, &req) }
    });
    if let Err(e) = r {
        c.fail_queue(e);
    }
}

/// Sends what the connection has staged, if no send is in flight.
fn issue_send(c: &mut Conn, idx: usize, ioq: &mut IoQueue, now: Instant) {
    if c.send_in_flight {
        return;
    }
    let t = tag::make(tag::SEND, idx, c.gen, 0);
    let fd = types::Fd(c.fd.as_raw_fd());
    let e = if let Some(bytes) = c.pre_pending() {
        let e = opcode::Send::new(fd, bytes.as_ptr(), bytes.len() as u32)
            .flags(libc::MSG_NOSIGNAL)
            .build();
        c.pre_in_flight = true;
        c.pre_since = Some(now);
        e
    } else {
        if c.prepare_send(now) == 0 {
            return;
        }
        opcode::SendMsg::new(fd, &c.msg)
            .flags((libc::MSG_NOSIGNAL | libc::MSG_WAITALL) as u32)
            .build()
    };
    // SAFETY: the bytes (the connection's `pre`, or its queue's held batch and slot
    // buffers), the iovecs and the header live in the boxed connection, which is dropped
    // only after this send's completion.
    match unsafe { ioq.push_op(&e.user_data(t)) } {
        Ok(()) => c.send_in_flight = true,
        Err(err) => {
            tracing::warn!("cannot queue a send: {err}");
            c.pre_in_flight = false;
            c.close(Closing::Now);
        }
    }
}

/// Arms the connection's multishot receive if it needs it.
fn issue_recv(c: &mut Conn, idx: usize, ioq: &mut IoQueue) {
    if !c.rearm || c.recv_armed || c.closing != Closing::No {
        return;
    }
    let e = opcode::RecvMulti::new(types::Fd(c.fd.as_raw_fd()), BGID)
        .build()
        .user_data(tag::make(tag::RECV, idx, c.gen, 0));
    // SAFETY: the socket lives in the connection, dropped only after the receive ended;
    // the buffers belong to the reactor's provided ring.
    match unsafe { ioq.push_op(&e) } {
        Ok(()) => {
            c.recv_armed = true;
            c.rearm = false;
        }
        Err(err) => {
            tracing::warn!("cannot queue a receive: {err}");
            c.close(Closing::Now);
        }
    }
}

/// Shuts a closing connection's socket down (ending its receive and any stuck send) and
/// says whether it may be dropped: nothing of it in flight any more.
fn advance_close(c: &mut Conn, idx: usize, ioq: &mut IoQueue) -> bool {
    if !c.shut {
        c.shut = true;
        // SAFETY: shutdown on a socket we own; errors (already disconnected) are fine.
        unsafe { libc::shutdown(c.fd.as_raw_fd(), libc::SHUT_RDWR) };
        if c.recv_armed {
            let target = tag::make(tag::RECV, idx, c.gen, 0);
            let e = opcode::AsyncCancel::new(target)
                .build()
                .user_data(tag::make(tag::CANCEL, idx, c.gen, 0));
            // SAFETY: a cancel references no memory.
            let _ = unsafe { ioq.push_op(&e) };
        }
    }
    let storage = matches!(&c.phase, Phase::Live(q) if q.parts_in_flight());
    !c.recv_armed && !c.send_in_flight && !storage
}
