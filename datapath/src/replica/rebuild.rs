//! Rebuilding a replica from its primary while host I/O goes on.
//!
//! 1. A `RebuildStart` frame: the replica starts remembering which blocks live writes reach.
//! 2. The member turns `Rebuilding`: every write is sent to it again (in the link's order,
//!    after `RebuildStart`), but none waits for it if it fails.
//! 3. A barrier: every reactor finishes the pass it is in. A write that skipped the replica
//!    (it saw the member `Dropped`) was issued in such a pass, and a block store write is
//!    applied by the end of its pass, so from now on the local image holds it.
//! 4. Every dirty chunk is read from the local image and sent as `Copy` frames (all-zero
//!    parts as `CopyZeroes`); the replica writes a copy only to blocks no live write
//!    reached, so a copy read before a concurrent write never overwrites that write.
//! 5. A flush, `RebuildEnd`, and the member is in sync again unless it failed meanwhile.
//!
//! Only the chunks marked dirty are copied: what was written while the replica was
//! dropped, or everything for a member the primary knows nothing about (a new replica, or
//! after the primary restarted).

use std::io;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use super::{Frame, Member, Mode, Op, FENCED, RECENT_END, RECENT_UNKNOWN};
use crate::backend::{run_sync, Backend, CompletionSink, IoKind, IoQueue, IoRequest};
use crate::buffer::SlotBuf;
use crate::limits::{
    REBUILD_CHUNK_BYTES, REPLICA_CONNECT_TIMEOUT_MS, REPLICA_FRAME_DATA_MAX, REPLICA_HOLD_MAX_MS,
    REPLICA_RECONNECT_MS,
};

/// Frames of one chunk.
pub(super) const PARTS: usize = (REBUILD_CHUNK_BYTES as usize).div_ceil(REPLICA_FRAME_DATA_MAX);

/// Collects the rebuild's own completions (and a test's).
#[derive(Default)]
pub(super) struct Waiter {
    done: Mutex<Vec<(u64, i32)>>,
    cv: Condvar,
}

impl CompletionSink for Waiter {
    fn complete(&self, tag: u64, result: i32) {
        self.done
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((tag, result));
        self.cv.notify_all();
    }
}

impl Waiter {
    /// Waits until at least `n` completions arrived (at most `2 ×` [`REPLICA_HOLD_MAX_MS`]
    /// without one).
    fn arrived(&self, n: usize) -> io::Result<MutexGuard<'_, Vec<(u64, i32)>>> {
        let limit = Duration::from_millis(2 * REPLICA_HOLD_MAX_MS);
        let mut done = self.done.lock().unwrap_or_else(|p| p.into_inner());
        while done.len() < n {
            let (d, t) = self
                .cv
                .wait_timeout(done, limit)
                .unwrap_or_else(|p| p.into_inner());
            done = d;
            if t.timed_out() && done.len() < n {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "replica silent"));
            }
        }
        Ok(done)
    }

    /// Waits for one completion; its status.
    fn status(&self) -> io::Result<i32> {
        Ok(self.arrived(1)?.remove(0).1)
    }

    /// Waits for `n` completions; the first error, if any.
    pub(super) fn wait(&self, n: usize) -> io::Result<()> {
        let mut done = self.arrived(n)?;
        let err = done.iter().find(|(_, r)| *r < 0).map(|(_, r)| *r);
        done.clear();
        match err {
            Some(r) => Err(io::Error::from_raw_os_error(-r)),
            None => Ok(()),
        }
    }
}

/// Rebuilds `member` (a replica of `volume` at `epoch`) from `local`, the primary's image of
/// `size_bytes`; `barrier` returns once every reactor has finished the pass it was in.
/// Returns the bytes sent. Fails, leaving the member dropped, if the replica fails.
pub fn rebuild(
    member: &Member,
    local: &dyn Backend,
    volume: [u8; 16],
    epoch: u64,
    size_bytes: u64,
    barrier: impl FnOnce() -> io::Result<()>,
) -> io::Result<u64> {
    if member.state.must_ask_recent() {
        if member.state.was_in_sync() {
            // A survivor of the failover that failed before it was asked what it changed
            // around it: by now its answer may no longer reach back that far.
            member.state.mark(0, size_bytes);
        } else {
            mark_recent(member, volume, epoch, size_bytes)?;
        }
        member.state.asked_recent();
    }
    let r = copy(member, local, volume, epoch, size_bytes, barrier, false);
    if r.is_err() {
        // Writes no longer go to it; what they change is marked for the next attempt.
        member.state.set_dropped();
    }
    r
}

/// Brings an in-sync `member` that was current when this primary took over (see
/// [`Member::current`]) level with `local` where the copies may differ: the chunks either
/// changed shortly before learning of the switch (the deposed primary's last writes, never
/// acknowledged, may have reached one and not the other), copied as a rebuild copies them
/// while writes keep waiting for the replica. Returns the bytes sent (0 when there was
/// nothing to do). A replica that cannot tell what it changed is copied whole.
pub fn repair(
    member: &Member,
    local: &dyn Backend,
    volume: [u8; 16],
    epoch: u64,
    size_bytes: u64,
    barrier: impl FnOnce() -> io::Result<()>,
) -> io::Result<u64> {
    if !member.state.must_ask_recent() {
        return Ok(0);
    }
    mark_recent(member, volume, epoch, size_bytes)?;
    member.state.asked_recent();
    if !member.state.has_dirty() {
        return Ok(0);
    }
    copy(member, local, volume, epoch, size_bytes, barrier, true)
}

/// Marks dirty the chunks `member`'s copy changed around the switch to `epoch`, asked with
/// [`Op::Recent`]; every chunk if it cannot tell.
fn mark_recent(member: &Member, volume: [u8; 16], epoch: u64, size_bytes: u64) -> io::Result<()> {
    let one = Arc::new(Waiter::default());
    let sink: Arc<dyn CompletionSink> = one.clone();
    let chunks = size_bytes.div_ceil(REBUILD_CHUNK_BYTES);
    let mut cursor = 0;
    while cursor < chunks {
        let f = Frame {
            op: Op::Recent,
            volume,
            epoch,
            offset: cursor,
            len: 0,
            id: 0,
            session: 0,
        };
        // SAFETY: no data.
        unsafe {
            member
                .link
                .submit_owed(f, std::ptr::null(), &sink, 0, &member.state)
        };
        match one.status()? {
            c if c >= 0 => {
                member.state.mark(c as u64 * REBUILD_CHUNK_BYTES, 1);
                cursor = c as u64 + 1;
            }
            RECENT_END => return Ok(()),
            RECENT_UNKNOWN => {
                member.state.mark(0, size_bytes);
                return Ok(());
            }
            FENCED => return Err(io::Error::other("a newer primary exists")),
            e => return Err(io::Error::from_raw_os_error(-e)),
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn copy(
    member: &Member,
    local: &dyn Backend,
    volume: [u8; 16],
    epoch: u64,
    size_bytes: u64,
    barrier: impl FnOnce() -> io::Result<()>,
    in_sync: bool,
) -> io::Result<u64> {
    let waiter = Arc::new(Waiter::default());
    let sink: Arc<dyn CompletionSink> = waiter.clone();
    let frame = |op, offset, len| Frame {
        op,
        volume,
        epoch,
        offset,
        len,
        id: 0,
        session: 0,
    };
    let send = |f: Frame, data: *const u8| {
        // SAFETY: `data` (for copies) points into `buf` below, which is neither changed nor
        // dropped before `waiter.wait` has seen this part complete.
        unsafe { member.link.submit_owed(f, data, &sink, 0, &member.state) };
    };
    let alive = || match member.state.mode() {
        Mode::Dropped => Err(io::Error::other("the replica failed during the rebuild")),
        Mode::Deposed => Err(io::Error::other("this server no longer leads the volume")),
        _ => Ok(()),
    };
    let connect = Duration::from_millis(4 * (REPLICA_CONNECT_TIMEOUT_MS + REPLICA_RECONNECT_MS));
    if !member.link.wait_up(connect) {
        return Err(io::Error::new(
            io::ErrorKind::NotConnected,
            "the replica's server does not answer",
        ));
    }
    // Writes go to the replica again from here, after RebuildStart in the link's order. If
    // RebuildStart does not arrive, neither do they: they are held, then marked dirty.
    send(frame(Op::RebuildStart, 0, 0), std::ptr::null());
    if !in_sync {
        member.state.set_rebuilding();
    }
    waiter.wait(1)?;
    alive()?;
    barrier()?;
    let mut buf = SlotBuf::new(PARTS, REPLICA_FRAME_DATA_MAX)
        .ok_or_else(|| io::Error::other("no memory for the rebuild buffer"))?;
    let mut q = IoQueue::new_sync();
    let chunks = size_bytes.div_ceil(REBUILD_CHUNK_BYTES);
    member.state.rebuild_started(member.state.dirty_chunks());
    let mut next = 0;
    while let Some(c) = member.state.take_dirty(next, chunks) {
        next = c + 1;
        let start = c * REBUILD_CHUNK_BYTES;
        let end = (start + REBUILD_CHUNK_BYTES).min(size_bytes);
        let copied = copy_chunk(local, &mut q, &mut buf, start..end, &waiter, |f, data| {
            send(frame(f.0, f.1, f.2), data)
        });
        if let Err(e) = copied.and_then(|()| alive()) {
            // The chunk is off the map but maybe not on the replica: the next attempt
            // copies it again.
            member.state.mark(start, REBUILD_CHUNK_BYTES);
            if e.kind() == io::ErrorKind::TimedOut {
                // Frames may still point into the buffer: it must outlive them.
                std::mem::forget(buf);
            }
            return Err(e);
        }
        member
            .state
            .copied_bytes
            .fetch_add(end - start, Ordering::Relaxed);
        member.state.chunk_copied();
    }
    send(frame(Op::Flush, 0, 0), std::ptr::null());
    send(frame(Op::RebuildEnd, 0, 0), std::ptr::null());
    waiter.wait(2)?;
    alive()?;
    if !in_sync && !member.state.rebuilt() {
        return Err(io::Error::other("the replica failed as the rebuild ended"));
    }
    Ok(member.state.copied_bytes.load(Ordering::Relaxed))
}

/// Sends `range` of `local` (one chunk) as copy frames through `send` (op, offset, length;
/// data); returns only once every frame it sent has completed (or the wait timed out:
/// then they may still read `buf`), so `buf` is free again.
fn copy_chunk(
    local: &dyn Backend,
    q: &mut IoQueue,
    buf: &mut SlotBuf,
    range: std::ops::Range<u64>,
    waiter: &Waiter,
    send: impl Fn((Op, u64, u32), *const u8),
) -> io::Result<()> {
    let parts: Vec<(u64, u32)> = range
        .clone()
        .step_by(REPLICA_FRAME_DATA_MAX)
        .map(|off| {
            (
                off,
                (range.end - off).min(REPLICA_FRAME_DATA_MAX as u64) as u32,
            )
        })
        .collect();
    copy_parts(local, q, buf, &parts, waiter, send)
}

/// Sends `parts` of `local` (offset, length: at most [`PARTS`] of them, each at most
/// [`REPLICA_FRAME_DATA_MAX`]) as copy frames through `send`, all-zero ones without data;
/// returns once every frame it sent has completed (or the wait timed out: then they may
/// still read `buf`).
pub(super) fn copy_parts(
    local: &dyn Backend,
    q: &mut IoQueue,
    buf: &mut SlotBuf,
    parts: &[(u64, u32)],
    waiter: &Waiter,
    send: impl Fn((Op, u64, u32), *const u8),
) -> io::Result<()> {
    debug_assert!(parts.len() <= PARTS);
    let mut sent = 0;
    let mut r = Ok(());
    for (k, &(off, len)) in parts.iter().enumerate() {
        if let Err(e) = read(local, q, buf.slot_ptr(k), off, len) {
            r = Err(e);
            break;
        }
        if buf.slot(k, len as usize).iter().all(|b| *b == 0) {
            send((Op::CopyZeroes, off, len), std::ptr::null());
        } else {
            send((Op::Copy, off, len), buf.slot_ptr(k));
        }
        sent += 1;
    }
    let waited = waiter.wait(sent);
    match waited {
        Err(e) if e.kind() == io::ErrorKind::TimedOut => Err(e),
        w => r.and(w),
    }
}

/// Reads `len` bytes at `offset` of `local` into `buf`, synchronously.
fn read(
    local: &dyn Backend,
    q: &mut IoQueue,
    buf: *mut u8,
    offset: u64,
    len: u32,
) -> io::Result<()> {
    let req = IoRequest {
        kind: IoKind::Read,
        offset,
        len,
        buf,
        tag: 1,
    };
    // SAFETY: `buf` is a slot of the rebuild's own buffer, at least `len` bytes, untouched
    // until the request completed.
    let res = unsafe { run_sync(local, q, &req) }?;
    match res {
        r if r == len as i32 => Ok(()),
        r if r < 0 => Err(io::Error::from_raw_os_error(-r)),
        _ => Err(io::Error::other("short read of the local image")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::FileBackend;
    use crate::replica::{ReplicaHub, ReplicaServer};

    /// A local image whose second chunk cannot be read (a media error).
    #[derive(Debug)]
    struct BadChunk(FileBackend);

    impl Backend for BadChunk {
        fn size_bytes(&self) -> u64 {
            self.0.size_bytes()
        }

        unsafe fn submit(&self, q: &mut IoQueue, req: &IoRequest) -> io::Result<()> {
            if req.kind == IoKind::Read && req.offset / REBUILD_CHUNK_BYTES == 1 {
                return Err(io::Error::other("media error"));
            }
            // SAFETY: forwarded caller contract.
            unsafe { self.0.submit(q, req) }
        }
    }

    /// A chunk an attempt took off the dirty map but could not copy stays dirty for the
    /// next attempt (it was lost, and a later attempt recorded the replica in sync
    /// without it).
    #[test]
    fn a_failed_attempt_leaves_the_chunks_it_did_not_copy_dirty() {
        const SIZE: u64 = 3 * REBUILD_CHUNK_BYTES;
        let dir = tempfile::tempdir().expect("tempdir");
        let open = |name: &str| FileBackend::open(&dir.path().join(name), SIZE).expect("image");
        let volume = [3u8; 16];
        let server = ReplicaServer::start("127.0.0.1:0".parse().expect("addr")).expect("listen");
        let image: Arc<dyn Backend> = Arc::new(open("replica.img"));
        server.set_images(vec![(volume, Some(image), 1)]);
        let hub = ReplicaHub::new().expect("hub");
        let member = Member::new(hub.link(server.local_addr()).expect("link"), SIZE, false);
        assert_eq!(member.state.dirty_chunks(), 3, "a new member: a full copy");
        let local = BadChunk(open("local.img"));
        let r = rebuild(&member, &local, volume, 1, SIZE, || Ok(()));
        assert!(r.is_err(), "the second chunk cannot be read");
        assert_eq!(
            member.state.dirty_chunks(),
            2,
            "chunk 0 was copied; 1 (failed) and 2 (not reached) are still to copy"
        );
        hub.shutdown();
    }
}
