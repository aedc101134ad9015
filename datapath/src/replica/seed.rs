//! Giving a copy the snapshots it lacks before it is rebuilt.
//!
//! A new replica, or one that was away while snapshots were taken, would hold the volume's
//! data once rebuilt but none of those snapshots. Before its rebuild, the primary copies
//! them to it in the order they were taken: each one as what differs from an older
//! snapshot the copy holds (rolled back to it first), or whole into an image it zeroed,
//! then has the copy take it ([`Op::SeedSnapshot`]). So the copy's snapshots share blocks
//! the way the primary's do. The rebuild that follows copies what differs between the last
//! of them and the volume, plus whatever writes change meanwhile.
//!
//! From the first frame on, the copy's image is no longer what its dirty chunks describe:
//! every chunk is marked dirty first, so an attempt that fails leaves a full copy to do.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use uuid::Uuid;

use super::rebuild::{copy_parts, Waiter, PARTS};
use super::snapshot::ask;
use super::{Frame, Member, Op};
use crate::backend::{Backend, CompletionSink, IoQueue};
use crate::blockstore::{BlockStore, StoreError, TreeError};
use crate::buffer::SlotBuf;
use crate::limits::{
    LBA_BYTES, REBUILD_CHUNK_BYTES, REPLICA_CONNECT_TIMEOUT_MS, REPLICA_FRAME_DATA_MAX,
    REPLICA_HOLD_MAX_MS, REPLICA_RECONNECT_MS,
};

/// Blocks asked of [`SnapshotSource::changed_blocks`] at a time.
const CHANGED_PAGE: usize = 4096;
/// Bytes one zeroing frame covers (its length is 32 bits).
const ZERO_FRAME_BYTES: u64 = 1 << 30;

/// The primary's snapshots of the volume, as the seeding reads them.
pub trait SnapshotSource {
    /// A readable image of `snapshot`.
    fn snapshot_image(&self, snapshot: [u8; 16]) -> io::Result<Arc<dyn Backend>>;

    /// Up to `max` blocks ([`LBA_BYTES`]) of image `image` at or after block `from` that
    /// differ from snapshot `base` (without a base: that hold data), ascending; `None` when
    /// `base` is not an earlier state of `image` (a rollback went past it).
    fn changed_blocks(
        &self,
        image: [u8; 16],
        base: Option<[u8; 16]>,
        from: u64,
        max: usize,
    ) -> io::Result<Option<Vec<u64>>>;
}

/// A block store's snapshots of a volume of `size_bytes`.
pub struct StoreSnapshots<'a> {
    pub store: &'a Arc<BlockStore>,
    pub size_bytes: u64,
}

impl SnapshotSource for StoreSnapshots<'_> {
    fn snapshot_image(&self, snapshot: [u8; 16]) -> io::Result<Arc<dyn Backend>> {
        let s = Uuid::from_bytes(snapshot);
        if !self.store.contains(s) {
            return Err(io::Error::other(format!("snapshot {s} is not held here")));
        }
        Ok(Arc::new(self.store.image(s, self.size_bytes, false)))
    }

    fn changed_blocks(
        &self,
        image: [u8; 16],
        base: Option<[u8; 16]>,
        from: u64,
        max: usize,
    ) -> io::Result<Option<Vec<u64>>> {
        let to = self.size_bytes.div_ceil(LBA_BYTES);
        let base_id = base.map(Uuid::from_bytes);
        match self
            .store
            .changed_blocks(Uuid::from_bytes(image), base_id, from, to, max)
        {
            Ok(blocks) => Ok(Some(blocks)),
            Err(StoreError::Tree(TreeError::NotSameChain { .. })) => Ok(None),
            // A base this store no longer holds cannot be copied against either.
            Err(StoreError::Tree(TreeError::NoImage(i))) if Some(i) == base_id => Ok(None),
            Err(e) => Err(io::Error::other(e)),
        }
    }
}

/// Copies to `member` (a replica of `volume` at `epoch`, of `size_bytes`, not taking
/// writes: dropped) the snapshots of `snapshots` it does not hold: every snapshot of the
/// volume this primary holds, oldest first, each with whether the copy holds it. Then
/// leaves its dirty chunks at what differs between its image and the volume, for the
/// rebuild that follows; `barrier` returns once every reactor has finished the pass it
/// was in. Returns the snapshots it copied (none: nothing was done).
pub fn seed_snapshots(
    member: &Arc<Member>,
    source: &dyn SnapshotSource,
    volume: [u8; 16],
    epoch: u64,
    size_bytes: u64,
    snapshots: &[([u8; 16], bool)],
    barrier: impl FnOnce() -> io::Result<()>,
) -> io::Result<Vec<[u8; 16]>> {
    if snapshots.iter().all(|(_, held)| *held) {
        return Ok(Vec::new());
    }
    let connect = Duration::from_millis(4 * (REPLICA_CONNECT_TIMEOUT_MS + REPLICA_RECONNECT_MS));
    if !member.link.wait_up(connect) {
        return Err(io::Error::new(
            io::ErrorKind::NotConnected,
            "the replica's server does not answer",
        ));
    }
    member.state.mark(0, size_bytes);
    let mut s = Seeder {
        member,
        source,
        volume,
        epoch,
        size_bytes,
        waiter: Arc::new(Waiter::default()),
        now: Content::Unknown,
    };
    // Snapshots the copy holds, oldest first: what a next one can be copied against.
    let mut bases: Vec<[u8; 16]> = Vec::new();
    let mut seeded = Vec::new();
    for &(snapshot, held) in snapshots {
        if !held {
            s.seed(snapshot, &mut bases)?;
            seeded.push(snapshot);
        }
        bases.push(snapshot);
    }
    // Writes mark what they change from here; what they changed before is in the local
    // image once the barrier returns, so it is in the difference taken after it.
    member.state.clear_dirty();
    let marked = barrier().and_then(|()| match s.now {
        Content::Snapshot(b) => s.mark_changed_chunks(volume, b),
        _ => Ok(false),
    });
    match marked {
        Ok(true) => {}
        Ok(false) => member.state.mark(0, size_bytes),
        Err(e) => {
            // The copy holds a snapshot's data now, whatever the next attempt finds to do.
            member.state.mark(0, size_bytes);
            return Err(e);
        }
    }
    // What the copy changed before is gone: nothing to ask of it.
    member.state.asked_recent();
    Ok(seeded)
}

/// What the copy's image of the volume holds now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Content {
    /// Anything (as before the seeding).
    Unknown,
    /// Zeroes.
    Zeroes,
    /// A snapshot's data.
    Snapshot([u8; 16]),
}

struct Seeder<'a> {
    member: &'a Arc<Member>,
    source: &'a dyn SnapshotSource,
    volume: [u8; 16],
    epoch: u64,
    size_bytes: u64,
    waiter: Arc<Waiter>,
    now: Content,
}

impl Seeder<'_> {
    /// Copies `snapshot` to the copy against the newest of `bases` it can (dropping those
    /// the copy turns out not to have), and has the copy take it.
    fn seed(&mut self, snapshot: [u8; 16], bases: &mut Vec<[u8; 16]>) -> io::Result<()> {
        let base = loop {
            let mut found = None;
            for (k, b) in bases.iter().enumerate().rev() {
                if self.on_chain(snapshot, *b)? {
                    found = Some((k, *b));
                    break;
                }
            }
            let Some((k, b)) = found else {
                self.zero()?;
                break None;
            };
            if self.now == Content::Snapshot(b) || self.ask(Op::Rollback, b) {
                self.now = Content::Snapshot(b);
                break Some(b);
            }
            // The copy does not have it after all: try an older one.
            bases.remove(k);
        };
        self.now = Content::Unknown;
        let blocks = self.send_changed(snapshot, base)?;
        tracing::debug!(
            snapshot = %uuid_text(snapshot),
            base = ?base.map(uuid_text),
            blocks,
            "copied a snapshot to a replica"
        );
        if !self.ask(Op::SeedSnapshot, snapshot) {
            return Err(io::Error::other(
                "the replica did not take the copied snapshot",
            ));
        }
        self.now = Content::Snapshot(snapshot);
        Ok(())
    }

    /// Whether snapshot `base` is an earlier state of `image`.
    fn on_chain(&self, image: [u8; 16], base: [u8; 16]) -> io::Result<bool> {
        Ok(self
            .source
            .changed_blocks(image, Some(base), 0, 1)?
            .is_some())
    }

    /// Marks dirty each chunk ([`REBUILD_CHUNK_BYTES`]) of `image` that differs from
    /// snapshot `base`, one lookup per chunk; false if `base` is not an earlier state of
    /// `image` (nothing marked).
    fn mark_changed_chunks(&self, image: [u8; 16], base: [u8; 16]) -> io::Result<bool> {
        let chunk_blocks = REBUILD_CHUNK_BYTES / LBA_BYTES;
        let mut from = 0;
        loop {
            let Some(first) = self.source.changed_blocks(image, Some(base), from, 1)? else {
                return Ok(false);
            };
            let Some(&b) = first.first() else {
                return Ok(true);
            };
            let chunk = b / chunk_blocks;
            self.member.state.mark(chunk * REBUILD_CHUNK_BYTES, 1);
            from = (chunk + 1) * chunk_blocks;
        }
    }

    /// Makes the copy's image read as zeroes (unless it does).
    fn zero(&mut self) -> io::Result<()> {
        if self.now == Content::Zeroes {
            return Ok(());
        }
        self.now = Content::Unknown;
        let sink: Arc<dyn CompletionSink> = self.waiter.clone();
        let ranges: Vec<u64> = (0..self.size_bytes)
            .step_by(ZERO_FRAME_BYTES as usize)
            .collect();
        for batch in ranges.chunks(PARTS) {
            for &off in batch {
                let len = (self.size_bytes - off).min(ZERO_FRAME_BYTES) as u32;
                let f = self.frame(Op::WriteZeroes, off, len);
                // SAFETY: no data.
                unsafe {
                    self.member
                        .link
                        .submit_owed(f, std::ptr::null(), &sink, 0, &self.member.state)
                };
            }
            self.waiter.wait(batch.len())?;
        }
        self.now = Content::Zeroes;
        Ok(())
    }

    /// Copies the blocks of `snapshot` that differ from `base` (without one: that hold
    /// data) to the copy's image of the volume, a page of [`CHANGED_PAGE`] blocks at a
    /// time; returns how many.
    fn send_changed(&self, snapshot: [u8; 16], base: Option<[u8; 16]>) -> io::Result<u64> {
        let image = self.source.snapshot_image(snapshot)?;
        let mut buf = SlotBuf::new(PARTS, REPLICA_FRAME_DATA_MAX)
            .ok_or_else(|| io::Error::other("no memory for the copy buffer"))?;
        let mut q = IoQueue::new_sync();
        let sink: Arc<dyn CompletionSink> = self.waiter.clone();
        let send = |(op, offset, len): (Op, u64, u32), data: *const u8| {
            let f = self.frame(op, offset, len);
            // SAFETY: `data` points into `buf`, which `copy_parts` neither changes nor
            // drops before every frame it sent has completed (on a timed-out wait it is
            // leaked below).
            unsafe {
                self.member
                    .link
                    .submit_owed(f, data, &sink, 0, &self.member.state)
            };
        };
        let mut parts: Vec<(u64, u32)> = Vec::with_capacity(PARTS);
        let mut sent = 0u64;
        let mut from = 0;
        let r = loop {
            let page = match self
                .source
                .changed_blocks(snapshot, base, from, CHANGED_PAGE)
            {
                Ok(Some(page)) => page,
                Ok(None) => break Err(io::Error::other("the snapshot's chain changed")),
                Err(e) => break Err(e),
            };
            let mut failed = None;
            for (first, n) in runs(&page) {
                let start = first * LBA_BYTES;
                let end = ((first + n) * LBA_BYTES).min(self.size_bytes);
                for off in (start..end).step_by(REPLICA_FRAME_DATA_MAX) {
                    parts.push((off, (end - off).min(REPLICA_FRAME_DATA_MAX as u64) as u32));
                    if parts.len() == PARTS {
                        let r = self.send_parts(&*image, &mut q, &mut buf, &parts, &send);
                        parts.clear();
                        if let Err(e) = r {
                            failed = Some(e);
                            break;
                        }
                    }
                }
                if failed.is_some() {
                    break;
                }
            }
            if let Some(e) = failed {
                break Err(e);
            }
            sent += page.len() as u64;
            match page.last() {
                Some(&last) if page.len() == CHANGED_PAGE => from = last + 1,
                _ => break Ok(()),
            }
        };
        let r = r.and_then(|()| match parts.is_empty() {
            true => Ok(()),
            false => self.send_parts(&*image, &mut q, &mut buf, &parts, &send),
        });
        if let Err(e) = &r {
            if e.kind() == io::ErrorKind::TimedOut {
                // Frames may still point into the buffer: it must outlive them.
                std::mem::forget(buf);
            }
        }
        r.map(|()| sent)
    }

    fn send_parts(
        &self,
        image: &dyn Backend,
        q: &mut IoQueue,
        buf: &mut SlotBuf,
        parts: &[(u64, u32)],
        send: &impl Fn((Op, u64, u32), *const u8),
    ) -> io::Result<()> {
        copy_parts(image, q, buf, parts, &self.waiter, send)?;
        let bytes: u64 = parts.iter().map(|(_, len)| u64::from(*len)).sum();
        self.member
            .state
            .copied_bytes
            .fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Asks the copy to run `op` with `snapshot`; whether it did.
    fn ask(&self, op: Op, snapshot: [u8; 16]) -> bool {
        let timeout = Duration::from_millis(2 * REPLICA_HOLD_MAX_MS);
        let done = ask(
            std::slice::from_ref(self.member),
            op,
            self.volume,
            self.epoch,
            snapshot,
            timeout,
            |_| true,
        );
        done.first().copied().unwrap_or(false)
    }

    fn frame(&self, op: Op, offset: u64, len: u32) -> Frame {
        Frame {
            op,
            volume: self.volume,
            epoch: self.epoch,
            offset,
            len,
            id: 0,
            session: 0,
        }
    }
}

/// Ascending blocks as runs (first, count).
fn runs(blocks: &[u64]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &b in blocks {
        match out.last_mut() {
            Some((first, n)) if *first + *n == b => *n += 1,
            _ => out.push((b, 1)),
        }
    }
    out
}

fn uuid_text(id: [u8; 16]) -> uuid::Uuid {
    uuid::Uuid::from_bytes(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_group_into_runs() {
        assert_eq!(runs(&[]), vec![]);
        assert_eq!(runs(&[3, 4, 5, 9, 11, 12]), vec![(3, 3), (9, 1), (11, 2)]);
    }
}
