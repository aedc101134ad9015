//! The engine that drives replication links' sockets through a ring: connect, vectored
//! sends of queued parts, reads of answers, timeouts and reconnects, with no thread of its
//! own. A data-path reactor embeds one (the target's first reactor is the home of a hub
//! made with [`super::ReplicaHub::hosted`]); a hub without a target runs one on a link
//! reactor thread of its own ([`start_own`]).
//!
//! Per link, at most one send and one receive are in flight. A send carries every part
//! queued since the last one (up to [`SEND_BATCH`]); the next is issued when it
//! completes, so parts queued meanwhile batch up by themselves. The socket, the send's
//! iovecs and headers and the answer buffer live in the engine's [`LinkConn`], which is
//! dropped only when none of its operations is in flight.
//!
//! What happens to parts (held, reported, timed out) is the [`Link`]'s business; the
//! engine only tells it what the socket did.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use io_uring::{opcode, types};

use super::link::{slice, Outgoing, Part, SEND_BATCH};
use super::{decode_answer, Link, ANSWER_BYTES};
use crate::backend::IoQueue;
use crate::limits::{
    REACTOR_SWEEP_MS, REPLICA_CONNECT_TIMEOUT_MS, REPLICA_IO_TIMEOUT_MS, REPLICA_RECONNECT_MS,
};
use crate::notify::{Mail, Mailbox};
use crate::reactor::tag;

/// Answers one receive takes at most.
const ANSWERS_PER_READ: usize = 64;
const RBUF_BYTES: usize = ANSWERS_PER_READ * ANSWER_BYTES;

/// Where a hub's links are driven: a reactor's mailbox (or the hub's own link reactor's).
pub trait LinkHome: Send + Sync {
    /// Hands a new link to the home's engine.
    fn adopt_link(&self, link: Arc<Link>);
    /// Asks the home to look at link `idx` (parts to send, or a failure to act on).
    fn poke_link(&self, idx: usize);
    /// The hub stopped: the home closes its links.
    fn stop(&self);
}

impl<A: Send> LinkHome for Mailbox<A> {
    fn adopt_link(&self, link: Arc<Link>) {
        self.post(|m| m.links.push(link));
    }

    fn poke_link(&self, idx: usize) {
        self.post(|m| m.wake.push(tag::make(tag::LINK_POKE, idx, 0, 0)));
    }

    fn stop(&self) {
        self.post(|_| {});
    }
}

/// Test failpoint: after a send completes, the engine waits this long before it marks the
/// parts it carried as sent (a home busy elsewhere), so their answers arrive first.
#[cfg(test)]
pub(super) static PAUSE_AFTER_SEND_MS: std::sync::atomic::AtomicU64 =
    std::sync::atomic::AtomicU64::new(0);

/// A socket address the kernel reads during a connect.
struct SockAddr {
    storage: libc::sockaddr_storage,
    len: libc::socklen_t,
}

impl SockAddr {
    fn new(addr: SocketAddr) -> SockAddr {
        // SAFETY: sockaddr_storage is plain data; zeroed is a valid value.
        let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let len = match addr {
            SocketAddr::V4(a) => {
                let sin = libc::sockaddr_in {
                    sin_family: libc::AF_INET as libc::sa_family_t,
                    sin_port: a.port().to_be(),
                    sin_addr: libc::in_addr {
                        s_addr: u32::from_ne_bytes(a.ip().octets()),
                    },
                    sin_zero: [0; 8],
                };
                // SAFETY: sockaddr_storage is larger than, and aligned for, sockaddr_in.
                unsafe { std::ptr::write((&raw mut storage).cast(), sin) };
                std::mem::size_of::<libc::sockaddr_in>()
            }
            SocketAddr::V6(a) => {
                let sin6 = libc::sockaddr_in6 {
                    sin6_family: libc::AF_INET6 as libc::sa_family_t,
                    sin6_port: a.port().to_be(),
                    sin6_flowinfo: a.flowinfo(),
                    sin6_addr: libc::in6_addr {
                        s6_addr: a.ip().octets(),
                    },
                    sin6_scope_id: a.scope_id(),
                };
                // SAFETY: sockaddr_storage is larger than, and aligned for, sockaddr_in6.
                unsafe { std::ptr::write((&raw mut storage).cast(), sin6) };
                std::mem::size_of::<libc::sockaddr_in6>()
            }
        };
        SockAddr {
            storage,
            len: len as libc::socklen_t,
        }
    }
}

/// A send in progress: the batch, its iovecs and the message header (stable in memory
/// while the kernel reads them).
struct SendBuf {
    batch: Vec<Outgoing>,
    iov: [libc::iovec; 2 * SEND_BATCH],
    /// iovecs in use, and the first one not fully written yet.
    n: usize,
    at: usize,
    msg: libc::msghdr,
    /// A send that wrote part of the batch: the rest goes out next.
    partial: bool,
    /// Test failpoint: when to mark the batch sent.
    #[cfg(test)]
    mark_at: Option<Instant>,
}

impl SendBuf {
    fn new() -> Box<SendBuf> {
        Box::new(SendBuf {
            batch: Vec::with_capacity(SEND_BATCH),
            iov: [libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            }; 2 * SEND_BATCH],
            n: 0,
            at: 0,
            // SAFETY: msghdr is plain data; zeroed is a valid (empty) header.
            msg: unsafe { std::mem::zeroed() },
            partial: false,
            #[cfg(test)]
            mark_at: None,
        })
    }

    /// Points the iovecs at the batch's headers and data.
    fn fill(&mut self) {
        let mut n = 0;
        for o in &self.batch {
            self.iov[n] = libc::iovec {
                iov_base: o.hdr.as_ptr() as *mut libc::c_void,
                iov_len: o.hdr.len(),
            };
            n += 1;
            // SAFETY: the batch's parts are `Sending`: their commands keep the data valid
            // and unchanged until they complete, which they cannot while `Sending`.
            let d = unsafe { slice(o.data, o.len) };
            if !d.is_empty() {
                self.iov[n] = libc::iovec {
                    iov_base: d.as_ptr() as *mut libc::c_void,
                    iov_len: d.len(),
                };
                n += 1;
            }
        }
        self.n = n;
        self.at = 0;
        self.partial = false;
    }

    /// Accounts `written` bytes; whether any are left.
    fn advance(&mut self, mut written: usize) -> bool {
        while self.at < self.n && written > 0 {
            let v = &mut self.iov[self.at];
            if written >= v.iov_len {
                written -= v.iov_len;
                v.iov_len = 0;
                self.at += 1;
            } else {
                // SAFETY: advancing inside the same buffer.
                v.iov_base = unsafe { v.iov_base.cast::<u8>().add(written) }.cast();
                v.iov_len -= written;
                written = 0;
            }
        }
        while self.at < self.n && self.iov[self.at].iov_len == 0 {
            self.at += 1;
        }
        self.at < self.n
    }

    /// The message header for what is left to write.
    fn header(&mut self) -> *const libc::msghdr {
        // SAFETY: at <= n <= the array's length.
        self.msg.msg_iov = unsafe { self.iov.as_mut_ptr().add(self.at) };
        self.msg.msg_iovlen = self.n - self.at;
        &self.msg
    }
}

/// One link's connection as the engine drives it.
struct LinkConn {
    link: Arc<Link>,
    /// Tag generation of the current socket: completions of an older one are ignored.
    tgen: u32,
    sock: Option<OwnedFd>,
    /// The link's connection generation, once this socket is up.
    gen: Option<u64>,
    /// When the connect in flight began.
    connecting: Option<Instant>,
    /// The connect in flight took too long (and was cancelled).
    connect_cancelled: bool,
    /// A cancel of the connect in flight was queued.
    cancel_queued: bool,
    addr: Box<SockAddr>,
    next_connect: Instant,
    /// Operations of the socket in flight (connect, send, receive).
    ops: u32,
    send: Box<SendBuf>,
    send_in_flight: bool,
    recv_armed: bool,
    rbuf: Box<[u8; RBUF_BYTES]>,
    have: usize,
    /// Shut down: dropped once no operation is in flight.
    shut: bool,
}

impl LinkConn {
    /// Shuts the socket down: its operations end (a connect too), then it is dropped.
    fn close(&mut self) {
        if self.shut {
            return;
        }
        self.shut = true;
        if let Some(fd) = &self.sock {
            // SAFETY: shutdown on a socket we own; an error (not connected) is fine.
            unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_RDWR) };
        }
    }
}

/// The link connections of one home.
pub struct LinkEngine {
    conns: Vec<Option<LinkConn>>,
    answers: Vec<(u32, i32)>,
    done: Vec<(Part, i32)>,
    batch: Vec<(u64, i32)>,
}

impl Default for LinkEngine {
    fn default() -> Self {
        LinkEngine {
            conns: Vec::new(),
            answers: Vec::with_capacity(ANSWERS_PER_READ),
            done: Vec::with_capacity(ANSWERS_PER_READ),
            batch: Vec::with_capacity(ANSWERS_PER_READ),
        }
    }
}

impl std::fmt::Debug for LinkEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkEngine")
            .field("links", &self.conns.iter().flatten().count())
            .finish()
    }
}

impl LinkEngine {
    /// Takes a new link over; it connects in the next pass.
    pub fn adopt(&mut self, link: Arc<Link>) {
        let idx = link.idx;
        if self.conns.len() <= idx {
            self.conns.resize_with(idx + 1, || None);
        }
        let addr = Box::new(SockAddr::new(link.addr()));
        self.conns[idx] = Some(LinkConn {
            link,
            tgen: 0,
            sock: None,
            gen: None,
            connecting: None,
            connect_cancelled: false,
            cancel_queued: false,
            addr,
            next_connect: Instant::now(),
            ops: 0,
            send: SendBuf::new(),
            send_in_flight: false,
            recv_armed: false,
            rbuf: Box::new([0; RBUF_BYTES]),
            have: 0,
            shut: false,
        });
    }

    /// Whether any socket is open (or any operation in flight).
    pub fn live(&self) -> bool {
        self.conns.iter().flatten().any(|c| c.sock.is_some())
    }

    /// Applies a ring completion of one of the link kinds (`tag::is_link`).
    pub fn on_cqe(&mut self, now: Instant, kind: u64, idx: usize, tgen: u32, res: i32) {
        let _ = now; // (the test failpoint's clock)
        let LinkEngine {
            conns,
            answers,
            done,
            batch,
        } = self;
        let Some(c) = conns
            .get_mut(idx)
            .and_then(Option::as_mut)
            .filter(|c| c.tgen == tgen && c.sock.is_some())
        else {
            return;
        };
        match kind {
            tag::LINK_CONNECT => {
                c.ops -= 1;
                c.connecting = None;
                if res == 0 && !c.shut {
                    c.gen = Some(c.link.up());
                    tracing::info!(peer = %c.link.addr(), "replica link up");
                } else {
                    if !c.shut || c.connect_cancelled {
                        let why = if c.connect_cancelled {
                            "timed out".to_string()
                        } else {
                            io::Error::from_raw_os_error(-res).to_string()
                        };
                        c.link
                            .connect_failed(&format!("connecting to {}: {why}", c.link.addr()));
                    }
                    c.close();
                }
            }
            tag::LINK_SEND => {
                c.ops -= 1;
                let Some(gen) = c.gen else {
                    return;
                };
                if res < 0 {
                    c.link.sent(gen, &c.send.batch, false);
                    c.send.batch.clear();
                    c.send_in_flight = false;
                    let e = io::Error::from_raw_os_error(-res);
                    c.link.fail(gen, &format!("sending: {e}"));
                    c.close();
                } else if c.send.advance(res as usize) {
                    c.send.partial = true;
                    c.send_in_flight = false;
                } else {
                    #[cfg(test)]
                    {
                        let ms = PAUSE_AFTER_SEND_MS.load(Ordering::Relaxed);
                        if ms > 0 {
                            c.send.mark_at = Some(now + Duration::from_millis(ms));
                            return;
                        }
                    }
                    c.link.sent(gen, &c.send.batch, true);
                    c.send.batch.clear();
                    c.send_in_flight = false;
                }
            }
            tag::LINK_RECV => {
                c.ops -= 1;
                c.recv_armed = false;
                let Some(gen) = c.gen else {
                    return;
                };
                if res > 0 {
                    c.have += res as usize;
                    let whole = c.have - c.have % ANSWER_BYTES;
                    for a in c.rbuf[..whole].chunks_exact(ANSWER_BYTES) {
                        let Ok(a) = <&[u8; ANSWER_BYTES]>::try_from(a) else {
                            continue;
                        };
                        match decode_answer(a) {
                            Ok(answer) => answers.push(answer),
                            Err(e) => {
                                answers.clear();
                                c.link.fail(gen, &format!("bad answer: {e}"));
                                c.close();
                                return;
                            }
                        }
                    }
                    c.rbuf.copy_within(whole..c.have, 0);
                    c.have -= whole;
                    c.link.on_answers(gen, answers, done, batch);
                    answers.clear();
                } else if !c.shut {
                    let why = if res == 0 {
                        "replica closed the connection".to_string()
                    } else {
                        format!("receiving: {}", io::Error::from_raw_os_error(-res))
                    };
                    c.link.fail(gen, &why);
                    c.close();
                }
            }
            _ => {} // LINK_CANCEL: the cancelled operation reports itself
        }
    }

    /// Looks at every link: connects, sends what is queued, keeps a receive armed, drops
    /// closed sockets. Once per loop pass.
    pub fn service(&mut self, ioq: &mut IoQueue, now: Instant) {
        for (idx, slot) in self.conns.iter_mut().enumerate() {
            if let Some(c) = slot.as_mut() {
                service_one(c, idx, ioq, now);
            }
        }
    }

    /// Every sweep period: held parts, unanswered parts, connects that take too long.
    pub fn tick(&mut self, ioq: &mut IoQueue, now: Instant) {
        let io_timeout = Duration::from_millis(REPLICA_IO_TIMEOUT_MS);
        let connect_timeout = Duration::from_millis(REPLICA_CONNECT_TIMEOUT_MS);
        for c in self.conns.iter_mut().flatten() {
            c.link.sweep();
            if let Some(gen) = c.gen.filter(|_| !c.shut) {
                if c.link
                    .oldest_in_flight(gen)
                    .is_some_and(|t| now.duration_since(t) >= io_timeout)
                {
                    c.link.fail(gen, "a part went unanswered");
                    c.close();
                }
            }
            if c.connecting
                .is_some_and(|t| now.duration_since(t) >= connect_timeout)
                && !c.connect_cancelled
            {
                c.connect_cancelled = true;
                c.close();
            }
        }
        self.service(ioq, now);
    }
}

/// Cancels the connect in flight of a closing connection (a shut-down socket may still be
/// waiting for its handshake).
fn cancel_connect(c: &mut LinkConn, idx: usize, ioq: &mut IoQueue) {
    if c.connecting.is_none() || c.cancel_queued {
        return;
    }
    let target = tag::make(tag::LINK_CONNECT, idx, c.tgen, 0);
    let e = opcode::AsyncCancel::new(target)
        .build()
        .user_data(tag::make(tag::LINK_CANCEL, idx, c.tgen, 0));
    // SAFETY: a cancel references no memory.
    if unsafe { ioq.push_op(&e) }.is_ok() {
        c.cancel_queued = true;
    }
}

fn service_one(c: &mut LinkConn, idx: usize, ioq: &mut IoQueue, now: Instant) {
    c.link.clear_poke();
    let Some(fd) = c.sock.as_ref().map(|s| s.as_raw_fd()) else {
        if !c.link.stopped() && now >= c.next_connect {
            connect(c, idx, ioq, now);
        }
        return;
    };
    if c.link.stopped() {
        c.close();
    }
    if let Some(gen) = c.gen.filter(|_| !c.shut) {
        // The link may have been failed outside this socket (by the hub): taking the next
        // batch tells, under the one lock it takes; while a send is unfinished, ask.
        let up = if c.send_in_flight || c.send.partial {
            c.link.is_up(gen)
        } else {
            c.send.batch.clear();
            let up = c.link.take_batch(gen, now, &mut c.send.batch);
            c.send.fill();
            up
        };
        if !up {
            c.close();
        }
    }
    if c.shut {
        cancel_connect(c, idx, ioq);
        if c.ops == 0 {
            // Nothing of the socket in flight: drop it, connect again later. A batch it
            // wrote only part of is held (as the link already is).
            if let (Some(gen), false) = (c.gen, c.send.batch.is_empty()) {
                c.link.sent(gen, &c.send.batch, false);
            }
            c.sock = None;
            c.gen = None;
            c.have = 0;
            c.send.batch.clear();
            c.send.partial = false;
            c.send_in_flight = false;
            c.next_connect = now + Duration::from_millis(REPLICA_RECONNECT_MS);
        }
        return;
    }
    let Some(gen) = c.gen else {
        return; // connecting
    };
    #[cfg(test)]
    if let Some(t) = c.send.mark_at {
        if now < t {
            return;
        }
        c.send.mark_at = None;
        c.link.sent(gen, &c.send.batch, true);
        c.send.batch.clear();
        c.send_in_flight = false;
    }
    if !c.send_in_flight && c.send.n > c.send.at {
        let e = opcode::SendMsg::new(types::Fd(fd), c.send.header())
            .flags(libc::MSG_NOSIGNAL as u32)
            .build()
            .user_data(tag::make(tag::LINK_SEND, idx, c.tgen, 0));
        // SAFETY: the header, iovecs and headers live in the boxed send buffer and the
        // data in the parts' commands, all kept until this send completes (the
        // connection is dropped only with nothing in flight).
        match unsafe { ioq.push_op(&e) } {
            Ok(()) => {
                c.send_in_flight = true;
                c.ops += 1;
            }
            Err(err) => {
                c.link.sent(gen, &c.send.batch, false);
                c.send.batch.clear();
                c.link.fail(gen, &format!("cannot queue a send: {err}"));
                c.close();
                return;
            }
        }
    }
    if !c.recv_armed {
        let have = c.have;
        let e = opcode::Recv::new(
            types::Fd(fd),
            // SAFETY: `have` < RBUF_BYTES (whole answers are always taken out).
            unsafe { c.rbuf.as_mut_ptr().add(have) },
            (RBUF_BYTES - have) as u32,
        )
        .build()
        .user_data(tag::make(tag::LINK_RECV, idx, c.tgen, 0));
        // SAFETY: the boxed buffer lives until the receive completes (as above).
        match unsafe { ioq.push_op(&e) } {
            Ok(()) => {
                c.recv_armed = true;
                c.ops += 1;
            }
            Err(err) => {
                c.link.fail(gen, &format!("cannot queue a receive: {err}"));
                c.close();
            }
        }
    }
}

/// Opens a socket and starts connecting it.
fn connect(c: &mut LinkConn, idx: usize, ioq: &mut IoQueue, now: Instant) {
    let domain = match c.link.addr() {
        SocketAddr::V4(_) => libc::AF_INET,
        SocketAddr::V6(_) => libc::AF_INET6,
    };
    // SAFETY: socket has no memory-safety preconditions; the result is checked.
    let fd = unsafe { libc::socket(domain, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        let e = io::Error::last_os_error();
        c.link
            .connect_failed(&format!("connecting to {}: {e}", c.link.addr()));
        c.next_connect = now + Duration::from_millis(REPLICA_RECONNECT_MS);
        return;
    }
    // SAFETY: a fresh descriptor owned by nobody else.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    // SAFETY: sets an int option from a live local.
    unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            (&raw const one).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    c.tgen = tag::next_gen(c.tgen);
    let e = opcode::Connect::new(
        types::Fd(fd),
        (&raw const c.addr.storage).cast(),
        c.addr.len,
    )
    .build()
    .user_data(tag::make(tag::LINK_CONNECT, idx, c.tgen, 0));
    // SAFETY: the boxed address and the socket live in the connection until the connect
    // completes.
    match unsafe { ioq.push_op(&e) } {
        Ok(()) => {
            c.sock = Some(sock);
            c.ops = 1;
            c.shut = false;
            c.connecting = Some(now);
            c.connect_cancelled = false;
            c.cancel_queued = false;
        }
        Err(err) => {
            c.link
                .connect_failed(&format!("cannot queue a connect: {err}"));
            c.next_connect = now + Duration::from_millis(REPLICA_RECONNECT_MS);
        }
    }
}

/// The mailbox of a hub's own link reactor.
type OwnMailbox = Mailbox<()>;

/// Starts a link reactor of the hub's own, which drives its links until `stop` is set and
/// its sockets are closed.
pub(super) fn start_own(stop: Arc<AtomicBool>) -> io::Result<(Arc<dyn LinkHome>, JoinHandle<()>)> {
    let mailbox = Arc::new(OwnMailbox::new(64)?);
    let m = mailbox.clone();
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    let thread = std::thread::Builder::new()
        .name("evstor-repl-links".into())
        .spawn(move || {
            // Made on the thread that uses it: a single-issuer ring refuses others.
            match IoQueue::reactor(256, 1024) {
                Ok(ioq) => {
                    let _ = tx.send(Ok(()));
                    run_own(&m, &stop, ioq);
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                }
            }
        })?;
    match rx.recv() {
        Ok(Ok(())) => Ok((mailbox, thread)),
        Ok(Err(e)) => {
            let _ = thread.join();
            Err(e)
        }
        Err(_) => {
            let _ = thread.join();
            Err(io::Error::other("the link reactor died at start"))
        }
    }
}

fn run_own(mailbox: &OwnMailbox, stop: &AtomicBool, mut ioq: IoQueue) {
    let mut engine = LinkEngine::default();
    let mut mail: Mail<()> = Mail::default();
    let mut wake_buf = Box::new([0u8; 8]);
    let mut wake_armed = false;
    let mut cqes: Vec<(u64, i32)> = Vec::with_capacity(256);
    let sweep = Duration::from_millis(REACTOR_SWEEP_MS);
    let mut next_tick = Instant::now();
    loop {
        let now = Instant::now();
        if mailbox.has_mail() {
            mailbox.take(&mut mail);
            for l in mail.links.drain(..) {
                engine.adopt(l);
            }
            mail.wake.clear();
        }
        ioq.reap(|t, r| cqes.push((t, r)));
        for &(t, r) in &cqes {
            let (kind, idx, gen, _) = tag::split(t);
            if kind == tag::WAKE {
                wake_armed = false;
            } else if tag::is_link(kind) {
                engine.on_cqe(now, kind, idx, gen, r);
            }
        }
        let worked = !cqes.is_empty();
        cqes.clear();
        engine.service(&mut ioq, now);
        if now >= next_tick {
            next_tick = now + sweep;
            engine.tick(&mut ioq, now);
        }
        if stop.load(Ordering::Acquire) && !engine.live() {
            break;
        }
        if !wake_armed {
            let e = opcode::Read::new(types::Fd(mailbox.fd()), wake_buf.as_mut_ptr(), 8)
                .build()
                .user_data(tag::make(tag::WAKE, 0, 0, 0));
            // SAFETY: wake_buf outlives the ring (the ring is dropped first, below).
            wake_armed = unsafe { ioq.push_op(&e) }.is_ok();
        }
        if let Err(e) = ioq.submit() {
            tracing::warn!("link reactor ring submit failed: {e}");
        }
        if worked || ioq.has_ready() || mailbox.has_mail() {
            continue;
        }
        let timeout = next_tick.saturating_duration_since(Instant::now());
        if !timeout.is_zero() && mailbox.about_to_sleep() {
            if let Err(e) = ioq.wait(timeout) {
                tracing::warn!("link reactor wait failed: {e}");
            }
            mailbox.awake();
        }
    }
    // The ring goes first: nothing of it may write into the buffers below afterwards.
    drop(ioq);
    drop(engine);
    drop(wake_buf);
}
