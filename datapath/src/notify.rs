//! Cross-thread wake-ups of one queue: the control plane (a namespace publication, a
//! controller teardown), the buffer pool (a grant) or another reactor asks the reactor
//! that owns the queue to look at it again.
//!
//! A [`Notifier`] names its queue by a token and its reactor by a [`Mailbox`]. Notifying
//! puts the token in the mailbox at most once until the reactor has taken it (an atomic
//! flag), and writes the reactor's eventfd only if the reactor is asleep, so a busy
//! reactor is woken without a system call. Nothing here allocates: the mailbox's wake list
//! has room for every queue the reactor may hold.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use io_uring::{opcode, types};

use crate::admission::ConnKey;
use crate::backend::IoQueue;
use crate::replica::Link;

/// What other threads ask of one reactor.
#[derive(Debug)]
pub struct Mail<A> {
    /// New connections to take over.
    pub adopt: VecDeque<A>,
    /// Tokens of queues to look at again (each at most once, see [`Notifier`]).
    pub wake: Vec<u64>,
    /// Connections to close (reclaimed handshakes), by ledger key.
    pub close: Vec<ConnKey>,
    /// Completions of this reactor's operations reported by other threads (replica
    /// answers): tag and result, applied like ring completions.
    pub done: Vec<(u64, i32)>,
    /// Replication links to drive (this reactor is their home).
    pub links: Vec<Arc<Link>>,
}

impl<A> Default for Mail<A> {
    fn default() -> Mail<A> {
        Mail {
            adopt: VecDeque::new(),
            wake: Vec::new(),
            close: Vec::new(),
            done: Vec::new(),
            links: Vec::new(),
        }
    }
}

impl<A> Mail<A> {
    fn is_empty(&self) -> bool {
        self.adopt.is_empty()
            && self.wake.is_empty()
            && self.close.is_empty()
            && self.done.is_empty()
            && self.links.is_empty()
    }
}

/// One reactor's inbox, its eventfd, and whether it sleeps.
#[derive(Debug)]
pub struct Mailbox<A> {
    mail: Mutex<Mail<A>>,
    /// Set while anything waits in `mail` (read by the reactor's busy poll without a lock).
    pending: AtomicBool,
    /// Set by the reactor right before it sleeps in the kernel, cleared when it wakes.
    sleeping: AtomicBool,
    efd: OwnedFd,
    /// Connections the reactor holds (the acceptor balances on it).
    pub conns: AtomicUsize,
    /// Loop passes: odd while the reactor is in one (see `TargetHandle::pass_barrier`).
    pub passes: std::sync::atomic::AtomicU64,
}

impl<A> Mailbox<A> {
    /// A mailbox whose wake list has room for `tokens` wake-ups without allocating (two
    /// per queue: a closed queue's last token may still wait when its slot is reused).
    pub fn new(tokens: usize) -> io::Result<Mailbox<A>> {
        // Blocking, so the reactor's ring read on it waits (a write never blocks: the
        // counter would have to reach 2^64 - 1).
        // SAFETY: eventfd has no memory-safety preconditions; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Mailbox {
            mail: Mutex::new(Mail {
                adopt: VecDeque::new(),
                wake: Vec::with_capacity(tokens),
                close: Vec::new(),
                done: Vec::new(),
                links: Vec::new(),
            }),
            pending: AtomicBool::new(false),
            sleeping: AtomicBool::new(false),
            // SAFETY: fd is a fresh descriptor owned by nobody else.
            efd: unsafe { OwnedFd::from_raw_fd(fd) },
            conns: AtomicUsize::new(0),
            passes: std::sync::atomic::AtomicU64::new(0),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Mail<A>> {
        // Plain queues: a panic elsewhere cannot leave them inconsistent.
        self.mail.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the mail under the lock, marks it pending and wakes the reactor.
    pub fn post(&self, f: impl FnOnce(&mut Mail<A>)) {
        f(&mut self.lock());
        self.pending.store(true, Ordering::SeqCst);
        self.kick();
    }

    /// Writes the eventfd if the reactor sleeps (a busy reactor sees `pending`).
    pub fn kick(&self) {
        if self.sleeping.load(Ordering::SeqCst) {
            let one = 1u64.to_ne_bytes();
            // SAFETY: writes 8 bytes from a local array to an owned eventfd; a full
            // counter (EAGAIN) already means "readable", so the result can be ignored.
            let _ = unsafe { libc::write(self.efd.as_raw_fd(), one.as_ptr().cast(), one.len()) };
        }
    }

    /// Whether mail waits (lock-free; for the busy poll).
    pub fn has_mail(&self) -> bool {
        self.pending.load(Ordering::Acquire)
    }

    /// Swaps the mail with `into` (whose queues must be empty), so it is handled without
    /// the lock and neither side allocates.
    pub fn take(&self, into: &mut Mail<A>) {
        let mut m = self.lock();
        self.pending.store(false, Ordering::SeqCst);
        std::mem::swap(&mut *m, into);
    }

    /// Called by the reactor right before it sleeps: false if mail arrived meanwhile (do
    /// not sleep). Any later `post` sees `sleeping` and writes the eventfd.
    pub fn about_to_sleep(&self) -> bool {
        self.sleeping.store(true, Ordering::SeqCst);
        if self.pending.load(Ordering::SeqCst) || !self.lock().is_empty() {
            self.sleeping.store(false, Ordering::SeqCst);
            return false;
        }
        true
    }

    /// Called by the reactor once it is awake again.
    pub fn awake(&self) {
        self.sleeping.store(false, Ordering::SeqCst);
    }

    /// Drops whatever waits (after the reactor has gone: connections still waiting for
    /// adoption are closed).
    pub fn clear(&self) {
        let mut m = self.lock();
        m.adopt.clear();
        m.wake.clear();
        m.close.clear();
        m.links.clear();
        self.pending.store(false, Ordering::SeqCst);
    }

    /// The eventfd the reactor keeps a read pending on.
    pub fn fd(&self) -> RawFd {
        self.efd.as_raw_fd()
    }
}

/// Wakes one queue (by token) on its reactor, from any thread.
pub struct Notifier {
    /// None: attached to no reactor (the state machine's unit tests count instead).
    target: Option<Arc<dyn Wakeable>>,
    token: u64,
    /// Set from a notification until the reactor takes the token, so a queue is in its
    /// reactor's wake list at most once (the list never grows past the queue count).
    queued: AtomicBool,
    /// Notifications of a detached notifier.
    count: AtomicUsize,
}

impl std::fmt::Debug for Notifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Notifier")
            .field("token", &self.token)
            .field("attached", &self.target.is_some())
            .finish()
    }
}

/// A mailbox as the notifier sees it (whatever the reactor's adoption type).
pub trait Wakeable: Send + Sync {
    /// Queues `token` for the reactor and wakes it.
    fn wake_token(&self, token: u64);
}

impl<A: Send> Wakeable for Mailbox<A> {
    fn wake_token(&self, token: u64) {
        self.post(|m| m.wake.push(token));
    }
}

impl<A: Send> crate::backend::CompletionSink for Mailbox<A> {
    fn complete(&self, tag: u64, result: i32) {
        self.post(|m| m.done.push((tag, result)));
    }

    fn complete_many(&self, done: &[(u64, i32)]) {
        if !done.is_empty() {
            self.post(|m| m.done.extend_from_slice(done));
        }
    }
}

impl Notifier {
    /// A notifier for the queue `token` of the reactor behind `mailbox`.
    pub fn new(mailbox: Arc<dyn Wakeable>, token: u64) -> Notifier {
        Notifier {
            target: Some(mailbox),
            token,
            queued: AtomicBool::new(false),
            count: AtomicUsize::new(0),
        }
    }

    /// A notifier attached to no reactor: it counts (for tests of the state machine).
    #[cfg(test)]
    pub fn detached() -> Notifier {
        Notifier {
            target: None,
            token: 0,
            queued: AtomicBool::new(false),
            count: AtomicUsize::new(0),
        }
    }

    /// Asks the reactor to look at the queue (coalesces with earlier notifications).
    pub fn notify(&self) {
        match &self.target {
            Some(m) => {
                if !self.queued.swap(true, Ordering::AcqRel) {
                    m.wake_token(self.token);
                }
            }
            None => {
                self.count.fetch_add(1, Ordering::SeqCst);
            }
        }
    }

    /// Called by the reactor when it takes the token, before it looks at the queue, so a
    /// notification that races with the look queues the token again.
    pub fn taken(&self) {
        self.queued.store(false, Ordering::Release);
    }

    /// Notifications of a detached notifier so far.
    #[cfg(test)]
    pub fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }
}

/// Lets the buffer pool (or any waker-based API) wake the queue.
impl std::task::Wake for Notifier {
    fn wake(self: Arc<Self>) {
        self.notify();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.notify();
    }
}

/// A read kept pending on a mailbox's eventfd in its owner's ring, so that a post wakes
/// the ring's wait (the reactors', the replication listener's).
#[derive(Debug)]
pub struct WakeRead {
    buf: Box<[u8; 8]>,
    armed: bool,
}

impl Default for WakeRead {
    fn default() -> WakeRead {
        WakeRead {
            buf: Box::new([0; 8]),
            armed: false,
        }
    }
}

impl WakeRead {
    /// Pushes the read, tagged `user_data`, unless one is pending.
    ///
    /// # Safety
    /// `fd` stays open, and `self` is not dropped, until `ring` is dropped or the read
    /// has completed.
    pub unsafe fn arm(&mut self, ring: &mut IoQueue, fd: RawFd, user_data: u64) {
        if self.armed {
            return;
        }
        let e = opcode::Read::new(types::Fd(fd), self.buf.as_mut_ptr(), 8)
            .build()
            .user_data(user_data);
        // SAFETY: the caller keeps `fd` and this boxed buffer alive as long as the read.
        if unsafe { ring.push_op(&e) }.is_ok() {
            self.armed = true;
        }
    }

    /// The read completed (its completion was reaped).
    pub fn completed(&mut self) {
        self.armed = false;
    }
}
