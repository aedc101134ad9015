//! Storage behind a namespace: the [`Backend`] trait and its file implementation.
//!
//! A reactor owns one [`IoQueue`] (its io_uring, shared by the sockets and the storage of
//! all its connections; tests and tools may use a synchronous stand-in) and asks a
//! namespace's backend to queue operations on it; completions come back tagged. The
//! extent-mapped block store implements the same trait by queueing its own operations.
//!
//! A backend must never block the calling thread on something slow unless the operation
//! itself is (a reactor serves many connections): queue ring operations, or complete
//! inline what is as cheap as a memory copy (memory-backed files).

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use io_uring::{opcode, squeue, types, IoUring};

use crate::buffer::SlotBuf;
use crate::limits::RING_ENTRIES;

/// What to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoKind {
    /// Read `len` bytes at `offset` into `buf`.
    Read,
    /// Write `len` bytes from `buf` at `offset`; `fua` forces it to stable media first.
    Write {
        /// Force Unit Access.
        fua: bool,
    },
    /// Make all completed writes durable.
    Flush,
    /// Discard the range; later reads return zeroes.
    Deallocate,
    /// Make the range read as zeroes.
    WriteZeroes,
}

/// One storage operation.
#[derive(Debug, Clone, Copy)]
pub struct IoRequest {
    /// Operation.
    pub kind: IoKind,
    /// Byte offset in the namespace.
    pub offset: u64,
    /// Length in bytes.
    pub len: u32,
    /// Data buffer for Read/Write (null otherwise).
    pub buf: *mut u8,
    /// Returned with the completion.
    pub tag: u64,
}

/// Runs one request on `backend` through `q` and waits for it (not for the data path: a
/// rebuild's or a tool's own I/O); its result, bytes or -errno.
///
/// # Safety
/// As [`Backend::submit`]: `req.buf` stays valid for `req.len` bytes, and untouched, until
/// this returns.
pub unsafe fn run_sync(backend: &dyn Backend, q: &mut IoQueue, req: &IoRequest) -> io::Result<i32> {
    // SAFETY: forwarded caller contract; the completion is reaped before returning.
    unsafe { backend.submit(q, req) }?;
    q.submit()?;
    let mut res = None;
    loop {
        q.reap(|_, r| res = Some(r));
        if let Some(r) = res {
            return Ok(r);
        }
        q.wait(std::time::Duration::from_millis(10))?;
    }
}

/// Storage for one namespace, shared by all connections that see it.
pub trait Backend: Send + Sync + std::fmt::Debug {
    /// Capacity in bytes.
    fn size_bytes(&self) -> u64;

    /// Queues `req` on `q`; its completion is reported by [`IoQueue::reap`] with `req.tag`.
    ///
    /// # Safety
    /// For Read and Write, `req.buf` must point to `req.len` bytes that stay valid, and
    /// are neither read nor written by anyone else, until that completion has been reaped.
    unsafe fn submit(&self, q: &mut IoQueue, req: &IoRequest) -> io::Result<()>;

    /// As [`Backend::submit`], for a backend that also sends the operation elsewhere (a
    /// replicated volume): returns how many completions *beyond* the local one will be
    /// reported for `req.tag`, through the queue's [`CompletionSink`] (0 for a plain
    /// backend). Each reports 0 on success or -errno.
    ///
    /// # Safety
    /// As [`Backend::submit`], until every completion of `req.tag` has been reaped.
    unsafe fn submit_parts(&self, q: &mut IoQueue, req: &IoRequest) -> io::Result<u32> {
        // SAFETY: forwarded caller contract.
        unsafe { self.submit(q, req) }.map(|()| 0)
    }

    /// When the backend's data last changed (Unix ms; 0 if never), if it keeps a change
    /// log (see [`Backend::changed_since`]); None if it keeps none.
    fn last_change_ms(&self) -> Option<u64> {
        None
    }

    /// The chunks of [`CHANGE_CHUNK_BYTES`](crate::limits::CHANGE_CHUNK_BYTES) its change
    /// log shows changed at or after `since_ms` (Unix ms; a chunk's time may be up to
    /// [`CHANGE_LOG_REFRESH_MS`](crate::limits::CHANGE_LOG_REFRESH_MS) early), in order;
    /// None if it keeps no log (then anything may have changed).
    fn changed_since(&self, _since_ms: u64) -> Option<Vec<u64>> {
        None
    }
}

/// Where completions produced on another thread (a replica's answer) go: the reactor that
/// issued the operation, which applies them like its ring's.
pub trait CompletionSink: Send + Sync {
    /// Reports `result` for the operation tagged `tag`.
    fn complete(&self, tag: u64, result: i32);

    /// Reports several (tag, result) at once; a sink that wakes a thread per report
    /// overrides it to wake it once.
    fn complete_many(&self, done: &[(u64, i32)]) {
        for &(tag, result) in done {
            self.complete(tag, result);
        }
    }
}

/// Work a backend postponed to the end of the connection's loop pass, such as one metadata
/// commit for every write of the pass. It completes the postponed requests on the queue.
pub trait Deferred: Send + Sync {
    /// Finishes the postponed work and reports its completions with `q.complete_now`.
    fn run_deferred(&self, q: &mut IoQueue);
}

/// A reactor's submission context (or a standalone one, for tests and tools).
pub struct IoQueue {
    kind: QueueKind,
    /// Completions of operations a backend ran inline (sync queues, memory-backed files),
    /// and ring completions a batch run set aside, with their CQE flags.
    done: VecDeque<(u64, i32, u32)>,
    /// Postponed work, run by the next [`IoQueue::submit`].
    deferred: Option<Arc<dyn Deferred>>,
    /// Operations that went through the ring (tests check io_uring really was used).
    ring_ops: u64,
    /// Where other threads report completions of this queue's operations (reactors).
    remote: Option<Arc<dyn CompletionSink>>,
    /// Batches run so far ([`IoQueue::run_batch`] numbers its tags with it).
    batches: u64,
}

enum QueueKind {
    Uring { ring: Box<IoUring> },
    Sync,
}

impl IoQueue {
    /// An io_uring, or the synchronous fallback if the kernel refuses.
    pub fn new() -> IoQueue {
        match Self::new_uring() {
            Ok(q) => q,
            Err(_) => Self::new_sync(),
        }
    }

    /// The synchronous fallback (operations complete inside `submit`).
    pub fn new_sync() -> IoQueue {
        IoQueue {
            kind: QueueKind::Sync,
            done: VecDeque::with_capacity(2 * RING_ENTRIES as usize),
            deferred: None,
            ring_ops: 0,
            remote: None,
            batches: 0,
        }
    }

    fn new_uring() -> io::Result<IoQueue> {
        let ring = Box::new(IoUring::new(RING_ENTRIES)?);
        Ok(IoQueue {
            kind: QueueKind::Uring { ring },
            done: VecDeque::with_capacity(2 * RING_ENTRIES as usize),
            deferred: None,
            ring_ops: 0,
            remote: None,
            batches: 0,
        })
    }

    /// A reactor's ring: `sq` submission and `cq` completion entries, used only by the
    /// calling thread (single issuer, task work deferred to when the thread asks for
    /// completions, so the kernel never interrupts it). Falls back to a plain ring on a
    /// kernel that refuses those flags.
    pub fn reactor(sq: u32, cq: u32) -> io::Result<IoQueue> {
        let tuned = IoUring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .setup_taskrun_flag()
            .setup_cqsize(cq)
            .build(sq);
        let ring = match tuned {
            Ok(r) => r,
            Err(_) => IoUring::builder().setup_cqsize(cq).build(sq)?,
        };
        Ok(IoQueue {
            kind: QueueKind::Uring {
                ring: Box::new(ring),
            },
            done: VecDeque::with_capacity(cq as usize),
            deferred: None,
            ring_ops: 0,
            remote: None,
            batches: 0,
        })
    }

    /// Names where completions produced on other threads are reported (a reactor's
    /// mailbox); a queue without one cannot carry replicated writes.
    pub fn set_remote(&mut self, sink: Arc<dyn CompletionSink>) {
        self.remote = Some(sink);
    }

    /// See [`IoQueue::set_remote`].
    pub fn remote(&self) -> Option<&Arc<dyn CompletionSink>> {
        self.remote.as_ref()
    }

    /// The ring (to register provided buffers), if this queue is one.
    pub fn ring(&mut self) -> Option<&mut IoUring> {
        match &mut self.kind {
            QueueKind::Uring { ring } => Some(ring),
            QueueKind::Sync => None,
        }
    }

    /// Whether this queue is an io_uring.
    pub fn is_uring(&self) -> bool {
        matches!(self.kind, QueueKind::Uring { .. })
    }

    /// Operations submitted through the ring so far (0 on a sync queue, and for operations
    /// a backend ran inline).
    pub fn ring_ops(&self) -> u64 {
        self.ring_ops
    }

    /// File descriptor that polls readable while completions wait in the ring (io_uring
    /// only). It is the ring itself rather than a registered eventfd: readiness clears when
    /// [`IoQueue::reap`] empties the completion queue, so reaping costs no `read` syscall.
    pub fn poll_fd(&self) -> Option<RawFd> {
        match &self.kind {
            QueueKind::Uring { ring } => Some(ring.as_raw_fd()),
            QueueKind::Sync => None,
        }
    }

    /// Whether completions are already waiting (the loop must not sleep).
    pub fn has_ready(&mut self) -> bool {
        if !self.done.is_empty() || self.deferred.is_some() {
            return true;
        }
        match &mut self.kind {
            QueueKind::Uring { ring } => !ring.completion().is_empty(),
            QueueKind::Sync => false,
        }
    }

    /// Pushes a prepared SQE for storage, flushing the ring if its submission queue is
    /// full (counted in [`IoQueue::ring_ops`]).
    ///
    /// # Safety
    /// Every buffer and file descriptor the entry references must stay valid until its
    /// completion is reaped. Sync queues reject entries with `Unsupported`.
    pub unsafe fn push(&mut self, entry: &squeue::Entry) -> io::Result<()> {
        // SAFETY: forwarded caller contract.
        unsafe { self.push_op(entry) }?;
        self.ring_ops += 1;
        Ok(())
    }

    /// As [`IoQueue::push`], not counted (the reactor's socket operations).
    ///
    /// # Safety
    /// As [`IoQueue::push`].
    pub unsafe fn push_op(&mut self, entry: &squeue::Entry) -> io::Result<()> {
        let QueueKind::Uring { ring, .. } = &mut self.kind else {
            return Err(io::Error::from(io::ErrorKind::Unsupported));
        };
        // SAFETY: the caller guarantees the entry's resources outlive its completion.
        if unsafe { ring.submission().push(entry) }.is_ok() {
            return Ok(());
        }
        ring.submit()?;
        // SAFETY: as above.
        unsafe { ring.submission().push(entry) }
            .map_err(|_| io::Error::from(io::ErrorKind::WouldBlock))
    }

    /// Records a completion produced synchronously; [`IoQueue::reap`] reports it.
    pub fn complete_now(&mut self, tag: u64, result: i32) {
        self.done.push_back((tag, result, 0));
    }

    /// Runs `entries` to completion on the ring and stores each one's result (bytes or
    /// -errno) in `results`, in order. Completions of other operations that arrive meanwhile
    /// are kept for the next [`IoQueue::reap`]. Batches are tagged above every slot tag.
    ///
    /// It never returns while an entry it queued may still run (the caller's buffers are
    /// free again once it returns): an error of the ring itself is returned only after
    /// every queued entry completed, and if the ring stays unusable with entries in flight
    /// the process aborts rather than let the kernel write into reused memory.
    ///
    /// # Safety
    /// As [`IoQueue::push`] for every entry, until this returns.
    pub unsafe fn run_batch(
        &mut self,
        entries: impl Iterator<Item = squeue::Entry>,
        results: &mut [i32],
    ) -> io::Result<()> {
        // Tag: the batch bit, the batch's number (a completion set aside by an earlier
        // batch is never counted for this one), the index.
        const BATCH_TAG: u64 = 1 << 63;
        const GEN_SHIFT: u32 = 32;
        const INDEX: u64 = (1 << GEN_SHIFT) - 1;
        let gen = self.batches & ((1 << (63 - GEN_SHIFT)) - 1);
        self.batches += 1;
        let mine = BATCH_TAG | gen << GEN_SHIFT;
        let QueueKind::Uring { ring } = &mut self.kind else {
            return Err(io::Error::from(io::ErrorKind::Unsupported));
        };
        let mut queued = 0usize;
        let mut failure = None;
        for (i, e) in entries.enumerate().take(results.len()) {
            let e = e.user_data(mine | i as u64);
            // SAFETY: the caller guarantees the entry's resources outlive its completion.
            while unsafe { ring.submission().push(&e) }.is_err() {
                if let Err(err) = ring.submit() {
                    if !interrupted(&err) {
                        failure = Some(err);
                        break;
                    }
                }
            }
            if failure.is_some() {
                break;
            }
            queued += 1;
            self.ring_ops += 1;
        }
        let mut waiting = queued;
        let mut refusals = 0u32;
        while waiting > 0 {
            match ring.submit_and_wait(1) {
                Ok(_) => refusals = 0,
                // A signal (a stopped process resumed, a debugger) or a full completion
                // queue interrupts the wait, not the operations: wait again.
                Err(e) if interrupted(&e) => {}
                Err(e) => {
                    // The ring refuses to wait: the entries may still run, so whatever
                    // it is, keep waiting a while, and stop the process if it lasts.
                    refusals += 1;
                    if refusals > RING_REFUSALS_MAX {
                        tracing::error!(
                            error = %e,
                            in_flight = waiting,
                            "the ring refuses every wait with I/O in flight: aborting"
                        );
                        std::process::abort();
                    }
                    std::thread::sleep(std::time::Duration::from_millis(10));
                    failure.get_or_insert(e);
                }
            }
            for cqe in ring.completion() {
                let tag = cqe.user_data();
                if tag & BATCH_TAG == 0 {
                    self.done.push_back((tag, cqe.result(), cqe.flags()));
                } else if tag & !INDEX == mine {
                    results[(tag & INDEX) as usize] = cqe.result();
                    waiting -= 1;
                }
            }
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Asks for `d` to run at the next [`IoQueue::submit`] (once, however often it is asked
    /// for; work postponed by another backend runs first).
    pub fn defer(&mut self, d: &Arc<dyn Deferred>) {
        match &self.deferred {
            Some(cur) if Arc::ptr_eq(cur, d) => {}
            Some(_) => {
                self.run_deferred();
                self.deferred = Some(d.clone());
            }
            None => self.deferred = Some(d.clone()),
        }
    }

    fn run_deferred(&mut self) {
        if let Some(d) = self.deferred.take() {
            d.run_deferred(self);
        }
    }

    /// Runs postponed work, then hands queued SQEs to the kernel.
    pub fn submit(&mut self) -> io::Result<()> {
        self.run_deferred();
        if let QueueKind::Uring { ring, .. } = &mut self.kind {
            if !ring.submission().is_empty() {
                ring.submit()?;
            }
        }
        Ok(())
    }

    /// Calls `f(tag, result)` for every finished operation (result: bytes or -errno).
    pub fn reap(&mut self, mut f: impl FnMut(u64, i32)) {
        self.reap_flags(|tag, res, _| f(tag, res));
    }

    /// As [`IoQueue::reap`], with each completion's CQE flags (0 for inline ones).
    pub fn reap_flags(&mut self, mut f: impl FnMut(u64, i32, u32)) {
        while let Some((tag, res, flags)) = self.done.pop_front() {
            f(tag, res, flags);
        }
        if let QueueKind::Uring { ring } = &mut self.kind {
            for cqe in ring.completion() {
                f(cqe.user_data(), cqe.result(), cqe.flags());
            }
        }
    }

    /// Without waiting: lets the kernel post what is ready (a deferred-task-work ring only
    /// posts completions when asked, and says so in its flags) and reports whether
    /// completions wait. Costs a system call only when the kernel has work for us.
    pub fn poll_ready(&mut self) -> io::Result<bool> {
        if !self.done.is_empty() {
            return Ok(true);
        }
        let QueueKind::Uring { ring } = &mut self.kind else {
            return Ok(false);
        };
        let (taskrun, overflow, queued) = {
            let sq = ring.submission();
            (sq.taskrun(), sq.cq_overflow(), !sq.is_empty())
        };
        if taskrun || overflow || queued {
            ring.submitter().submit_and_wait(0)?;
        }
        Ok(!ring.completion().is_empty())
    }

    /// Submits what is queued and sleeps until a completion arrives or `timeout` passes.
    pub fn wait(&mut self, timeout: std::time::Duration) -> io::Result<()> {
        let QueueKind::Uring { ring } = &mut self.kind else {
            std::thread::sleep(timeout);
            return Ok(());
        };
        let ts = types::Timespec::from(timeout);
        let args = types::SubmitArgs::new().timespec(&ts);
        match ring.submitter().submit_with_args(1, &args) {
            Ok(_) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ETIME) || interrupted(&e) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// Consecutive refused waits [`IoQueue::run_batch`] sits out (10 ms apart) before it
/// gives up on a ring with its I/O in flight.
const RING_REFUSALS_MAX: u32 = 500;

/// Whether a ring's enter call failed without harm to what it carries: a signal, or a
/// completion queue too full to take more for now. Waiting again is right.
fn interrupted(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
    )
}

impl Drop for IoQueue {
    /// Postponed work still runs (a connection that dies mid-pass leaves no space reserved).
    fn drop(&mut self) {
        self.run_deferred();
    }
}

impl Default for IoQueue {
    fn default() -> Self {
        IoQueue::new()
    }
}

/// Whether the file lives in memory (tmpfs, ramfs). Such files have no non-blocking
/// read/write path (RWF_NOWAIT is EOPNOTSUPP), so io_uring hands every operation to a
/// worker thread: two context switches and a wake-up per I/O for what is a memcpy.
/// Running them inline on the reactor thread is several times cheaper, and never
/// waits on a device (only, rarely, on memory reclaim).
pub(crate) fn memory_backed(file: &File) -> bool {
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    const RAMFS_MAGIC: i64 = 0x8584_58f6;
    // SAFETY: statfs is plain data, zeroed is a valid value; fstatfs writes into it.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid owned fd and a live, exclusively borrowed statfs struct.
    if unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) } != 0 {
        return false;
    }
    matches!(st.f_type as i64, TMPFS_MAGIC | RAMFS_MAGIC)
}

/// A namespace stored in one regular file (or block device) through io_uring.
#[derive(Debug)]
pub struct FileBackend {
    file: File,
    path: PathBuf,
    size_bytes: u64,
    direct: bool,
    inline: bool,
}

impl FileBackend {
    /// Opens `path`, creating it sparse with `size_bytes` if missing and extending it if short.
    ///
    /// Uses O_DIRECT when the filesystem accepts it, buffered I/O otherwise.
    pub fn open(path: &Path, size_bytes: u64) -> io::Result<FileBackend> {
        let mut opts = OpenOptions::new();
        opts.read(true).write(true).create(true).truncate(false);
        let plain = opts.open(path)?;
        if plain.metadata()?.len() < size_bytes && plain.metadata()?.is_file() {
            plain.set_len(size_bytes)?;
        }
        let direct = Self::open_direct(path);
        let (file, direct) = match direct {
            Some(f) => (f, true),
            None => (plain, false),
        };
        let inline = memory_backed(&file);
        Ok(FileBackend {
            file,
            path: path.to_path_buf(),
            size_bytes,
            direct,
            inline,
        })
    }

    /// Whether operations run inline on the submitting thread instead of through io_uring.
    pub fn is_inline(&self) -> bool {
        self.inline
    }

    /// Opens with O_DIRECT and proves an aligned read works; None if the filesystem refuses.
    fn open_direct(path: &Path) -> Option<File> {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .ok()?;
        let mut probe = SlotBuf::new(1, 4096)?;
        f.read_at(probe.slot_mut(0, 4096), 0).ok()?;
        Some(f)
    }

    /// Whether I/O bypasses the page cache.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// The backing file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn entry(&self, req: &IoRequest) -> squeue::Entry {
        let fd = types::Fd(self.file.as_raw_fd());
        let e = match req.kind {
            IoKind::Read => opcode::Read::new(fd, req.buf, req.len)
                .offset(req.offset)
                .build(),
            IoKind::Write { fua } => opcode::Write::new(fd, req.buf, req.len)
                .offset(req.offset)
                .rw_flags(if fua { libc::RWF_DSYNC } else { 0 })
                .build(),
            IoKind::Flush => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            IoKind::Deallocate | IoKind::WriteZeroes => opcode::Fallocate::new(fd, req.len as u64)
                .offset(req.offset)
                .mode(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)
                .build(),
        };
        e.user_data(req.tag)
    }

    /// Runs the request on the calling thread; returns bytes done or -errno.
    ///
    /// # Safety
    /// As [`Backend::submit`]: `req.buf` valid for `req.len` bytes for Read/Write.
    unsafe fn run_sync(&self, req: &IoRequest) -> i32 {
        let len = req.len as usize;
        let res = match req.kind {
            IoKind::Read => {
                // SAFETY: the caller guarantees buf is valid for len bytes and unaliased.
                let b = unsafe { std::slice::from_raw_parts_mut(req.buf, len) };
                self.file.read_exact_at(b, req.offset)
            }
            IoKind::Write { fua } => {
                // SAFETY: the caller guarantees buf is valid for len bytes.
                let b = unsafe { std::slice::from_raw_parts(req.buf, len) };
                let r = self.file.write_all_at(b, req.offset);
                if fua {
                    r.and_then(|_| self.file.sync_data())
                } else {
                    r
                }
            }
            IoKind::Flush => self.file.sync_data(),
            IoKind::Deallocate | IoKind::WriteZeroes => self.punch(req.offset, req.len as u64),
        };
        match res {
            Ok(()) => req.len as i32,
            Err(e) => -e.raw_os_error().unwrap_or(libc::EIO),
        }
    }

    fn punch(&self, offset: u64, len: u64) -> io::Result<()> {
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        // SAFETY: fallocate on an owned fd with plain integer arguments.
        let r = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, offset as i64, len as i64) };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

impl Backend for FileBackend {
    fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    unsafe fn submit(&self, q: &mut IoQueue, req: &IoRequest) -> io::Result<()> {
        if q.is_uring() && !self.inline {
            let e = self.entry(req);
            // SAFETY: the caller upholds the buffer contract; the fd lives as long as self,
            // and the connection holds an Arc to this backend until the completion is reaped.
            return unsafe { q.push(&e) };
        }
        // SAFETY: forwarded caller contract.
        let res = unsafe { self.run_sync(req) };
        q.complete_now(req.tag, res);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A signal that interrupts the wait (a stopped process resumed: SIGSTOP then SIGCONT)
    /// does not end the batch: its operations are still in flight, and a later batch would
    /// otherwise take their completions for its own (a reactor died of that).
    #[test]
    fn a_batch_outlives_a_signal_that_interrupts_its_wait() {
        extern "C" fn nothing(_: libc::c_int) {}
        let Ok(mut q) = IoQueue::new_uring() else {
            eprintln!("no io_uring here: skipped");
            return;
        };
        // A handler without SA_RESTART, so the wait is interrupted rather than resumed.
        // SAFETY: plain sigaction on a no-op handler.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = nothing as extern "C" fn(libc::c_int) as usize;
            assert_eq!(libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut()), 0);
        }
        let mut fds = [0; 2];
        // SAFETY: pipe(2) fills two fds.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() } as usize;
        let writer = std::thread::spawn(move || {
            // The first wait also submitted the read, so it reports that instead of the
            // interruption; the second signal interrupts a wait that submitted nothing.
            for _ in 0..2 {
                std::thread::sleep(std::time::Duration::from_millis(200));
                // SAFETY: the test thread is alive (it waits on the batch until the write).
                unsafe { libc::pthread_kill(me as libc::pthread_t, libc::SIGUSR1) };
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
            // SAFETY: writes 4 bytes from a live buffer to the pipe.
            unsafe { libc::write(fds[1], b"late".as_ptr().cast(), 4) };
        });
        let mut buf = [0u8; 4];
        let mut results = [0i32; 1];
        let read = opcode::Read::new(types::Fd(fds[0]), buf.as_mut_ptr(), 4).build();
        // SAFETY: `buf` outlives the batch, which returns only once the read completed.
        let r = unsafe { q.run_batch(std::iter::once(read), &mut results) };
        writer.join().expect("writer");
        assert!(r.is_ok(), "the batch ended early: {r:?}");
        assert_eq!((results[0], &buf), (4, b"late"));
        // SAFETY: closing the pipe's fds.
        unsafe {
            libc::close(fds[0]);
            libc::close(fds[1]);
        }
    }

    fn roundtrip(q: &mut IoQueue) {
        let dir = tempfile::tempdir().expect("tempdir");
        roundtrip_in(q, dir.path());
    }

    fn roundtrip_in(q: &mut IoQueue, dir: &Path) {
        let path = dir.join("ns1");
        let be = FileBackend::open(&path, 1 << 20).expect("open backing file");
        assert_eq!(std::fs::metadata(&path).expect("stat").len(), 1 << 20);
        let mut buf = SlotBuf::new(2, 8192).expect("alloc");
        buf.slot_mut(0, 8192).fill(0xab);
        let ops = [
            (IoKind::Write { fua: true }, 0usize, 8192u32, 4096u64),
            (IoKind::Flush, 0, 0, 0),
            (IoKind::Read, 1, 8192, 4096),
        ];
        for (tag, (kind, slot, len, off)) in ops.into_iter().enumerate() {
            let req = IoRequest {
                kind,
                offset: off,
                len,
                buf: buf.slot_ptr(slot),
                tag: tag as u64,
            };
            // SAFETY: buf outlives the queue's completions, which are reaped below.
            unsafe { be.submit(q, &req) }.expect("submit");
            q.submit().expect("submit ring");
            let mut got = None;
            while got.is_none() {
                q.reap(|t, r| got = Some((t, r)));
            }
            let (t, r) = got.expect("completion");
            assert_eq!(t, tag as u64);
            assert!(r >= 0, "op {kind:?} failed: {r}");
        }
        assert!(buf.slot(1, 8192).iter().all(|&b| b == 0xab));
        let punch = IoRequest {
            kind: IoKind::Deallocate,
            offset: 4096,
            len: 4096,
            buf: std::ptr::null_mut(),
            tag: 9,
        };
        // SAFETY: no buffer involved.
        unsafe { be.submit(q, &punch) }.expect("punch");
        q.submit().expect("submit ring");
        let mut done = false;
        while !done {
            q.reap(|_, r| {
                assert!(r >= 0, "punch failed: {r}");
                done = true;
            });
        }
        let mut back = SlotBuf::new(1, 8192).expect("alloc");
        let check = back.slot_mut(0, 8192);
        be.file.read_exact_at(check, 4096).expect("read back");
        assert!(check[..4096].iter().all(|&b| b == 0));
        assert!(check[4096..].iter().all(|&b| b == 0xab));
    }

    /// A queue that must be an io_uring: evstor's data path depends on it, so a kernel
    /// without one fails these tests rather than quietly testing the fallback.
    fn uring() -> IoQueue {
        let q = IoQueue::new();
        assert!(
            q.is_uring(),
            "io_uring is unavailable (kernel.io_uring_disabled?)"
        );
        q
    }

    #[test]
    fn io_uring_queue_round_trip() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut q = uring();
        let be = FileBackend::open(&dir.path().join("probe"), 4096).expect("open");
        assert!(!be.is_inline(), "{} is memory-backed", dir.path().display());
        roundtrip_in(&mut q, dir.path());
        assert_eq!(
            q.ring_ops(),
            4,
            "write, flush, read and punch went through the ring"
        );
    }

    #[test]
    fn sync_queue_round_trip() {
        let mut q = IoQueue::new_sync();
        roundtrip(&mut q);
        assert_eq!(q.ring_ops(), 0);
    }

    #[test]
    fn memory_backed_files_complete_inline_on_an_io_uring_queue() {
        let shm = Path::new("/dev/shm");
        if !shm.is_dir() {
            // No tmpfs here: fine on a laptop sandbox, not in CI.
            assert!(
                std::env::var_os("EVSTOR_REQUIRE_ALL").is_none(),
                "no /dev/shm"
            );
            return;
        }
        let dir = tempfile::tempdir_in(shm).expect("tempdir in /dev/shm");
        let be = FileBackend::open(&dir.path().join("probe"), 4096).expect("open");
        assert!(be.is_inline(), "tmpfs files run inline");
        let mut q = uring();
        roundtrip_in(&mut q, dir.path());
        assert_eq!(q.ring_ops(), 0, "inline operations never reach the ring");
    }
}
