//! A replica as its primary tracks it: whether it receives writes (in sync, dropped,
//! rebuilding), while it does not, which chunks of the volume it missed, and until when
//! it promised not to serve the volume itself (the primary's read lease).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::time::{Duration, Instant};

use super::clock_ns;
use crate::limits::{REBUILD_CHUNK_BYTES, REPLICA_LEASE_TRUST_PERCENT, REPLICA_READ_LEASE_MS};

/// Receives every write; a failure holds writes until the control plane drops it.
const IN_SYNC: u8 = 0;
/// Receives nothing; writes mark the chunks it misses.
const DROPPED: u8 = 1;
/// Being rebuilt: receives every write, but a failure drops it (writes never wait for it).
const REBUILDING: u8 = 2;
/// This server no longer leads the volume: every part not yet answered fails as fenced.
const DEPOSED: u8 = 3;

/// What a replica's writes do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Writes wait for it.
    InSync,
    /// Writes skip it and mark its dirty chunks.
    Dropped,
    /// Writes go to it, but do not wait for it if it fails.
    Rebuilding,
    /// This server is no longer the volume's primary (another one took over, or the
    /// volume is gone): a part sent to it or held for it fails as fenced
    /// ([`super::FENCED`]), so the host retries on the new primary instead of being told
    /// that a write it sent here is on every copy. Final.
    Deposed,
}

/// A replica's mode and the chunks it missed, shared by every table that names it.
#[derive(Debug)]
pub struct MemberState {
    mode: AtomicU8,
    /// One bit per [`REBUILD_CHUNK_BYTES`] of the volume.
    dirty: Vec<AtomicU64>,
    /// Set when a change fell outside the bitmap (the volume grew): everything is dirty.
    all_dirty: AtomicBool,
    /// Bytes a rebuild sent so far.
    pub copied_bytes: AtomicU64,
    /// The running rebuild's chunks: to copy when it started, and copied since.
    rebuild_chunks: AtomicU64,
    rebuild_copied: AtomicU64,
    /// Until when ([`clock_ns`]) the replica's promise not to serve the volume holds, as
    /// far as this primary may rely on it; 0: no promise.
    lease_until: AtomicU64,
    /// When ([`clock_ns`]) the newest part the replica accepted entered the link's queue;
    /// 0: none yet. Parts are sent in queue order, so (retries aside) what this primary
    /// queued before it reached the replica.
    acked_queued: AtomicU64,
    /// A copy that was current when this primary took over, whose own recent changes
    /// ([`super::Op::Recent`]) are still to be asked and marked.
    ask_recent: AtomicBool,
    /// It was in sync when this primary took over (else: the deposed primary).
    was_in_sync: bool,
}

impl MemberState {
    /// A replica of a volume of `size_bytes`: in sync and clean, or dropped with every
    /// chunk dirty (nothing is known of what it holds: a full copy).
    pub fn new(size_bytes: u64, in_sync: bool) -> MemberState {
        let chunks = size_bytes.div_ceil(REBUILD_CHUNK_BYTES);
        let words = chunks.div_ceil(64) as usize;
        // Only the volume's chunks are ever dirty (the last word is partly used).
        let fill = |w: u64| -> u64 {
            let bits = chunks.saturating_sub(w * 64).min(64);
            match (in_sync, bits) {
                (true, _) | (false, 0) => 0,
                (false, 64) => u64::MAX,
                (false, b) => (1u64 << b) - 1,
            }
        };
        MemberState {
            mode: AtomicU8::new(if in_sync { IN_SYNC } else { DROPPED }),
            dirty: (0..words as u64).map(|w| AtomicU64::new(fill(w))).collect(),
            all_dirty: AtomicBool::new(false),
            copied_bytes: AtomicU64::new(0),
            rebuild_chunks: AtomicU64::new(0),
            rebuild_copied: AtomicU64::new(0),
            lease_until: AtomicU64::new(0),
            acked_queued: AtomicU64::new(0),
            ask_recent: AtomicBool::new(false),
            was_in_sync: in_sync,
        }
    }

    /// A replica that was current when this primary took over: clean (the caller marks
    /// what changed around the switch), its own recent changes still to be asked.
    pub fn current(size_bytes: u64, in_sync: bool) -> MemberState {
        let mut m = MemberState::new(size_bytes, true);
        if !in_sync {
            m.mode = AtomicU8::new(DROPPED);
        }
        m.was_in_sync = in_sync;
        m.ask_recent = AtomicBool::new(true);
        m
    }

    /// Whether the replica's own recent changes are still to be asked.
    pub fn must_ask_recent(&self) -> bool {
        self.ask_recent.load(Ordering::SeqCst)
    }

    /// Its recent changes are marked (or everything is).
    pub fn asked_recent(&self) {
        self.ask_recent.store(false, Ordering::SeqCst);
    }

    /// Whether it was in sync when this primary took over.
    pub fn was_in_sync(&self) -> bool {
        self.was_in_sync
    }

    /// The replica accepted a frame sent at `sent`: its promise runs from the frame's
    /// arrival, which was later, so counting from `sent` (and only the trusted part of the
    /// lease) never overestimates it.
    pub fn renew_lease(&self, sent: Instant) {
        let trusted = REPLICA_READ_LEASE_MS * REPLICA_LEASE_TRUST_PERCENT / 100;
        let until = clock_ns(sent + Duration::from_millis(trusted));
        self.lease_until.fetch_max(until, Ordering::Relaxed);
    }

    /// The replica accepted a part queued at `queued`.
    pub fn acked(&self, queued: Instant) {
        self.acked_queued
            .fetch_max(clock_ns(queued), Ordering::Relaxed);
    }

    /// How long ago the newest part the replica accepted was queued, if it accepted any.
    pub fn last_acked_queued_ago(&self) -> Option<Duration> {
        let at = Some(self.acked_queued.load(Ordering::Relaxed)).filter(|t| *t > 0)?;
        Some(Duration::from_nanos(
            clock_ns(Instant::now()).saturating_sub(at),
        ))
    }

    /// Whether the replica's promise still holds at `now` ([`clock_ns`]); never once
    /// deposed (the promise was made to the primary this server no longer is).
    pub fn leased(&self, now: u64) -> bool {
        now < self.lease_until.load(Ordering::Relaxed) && self.mode() != Mode::Deposed
    }

    /// The current mode.
    pub fn mode(&self) -> Mode {
        match self.mode.load(Ordering::SeqCst) {
            IN_SYNC => Mode::InSync,
            REBUILDING => Mode::Rebuilding,
            DEPOSED => Mode::Deposed,
            _ => Mode::Dropped,
        }
    }

    /// Stops sending it writes (from now on they mark its dirty chunks); a deposed member
    /// stays deposed.
    pub fn set_dropped(&self) {
        let _ = self
            .mode
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |m| {
                (m == IN_SYNC || m == REBUILDING).then_some(DROPPED)
            });
    }

    /// Starts sending it writes again, without waiting for it (a rebuild begins); a
    /// deposed member stays deposed.
    pub fn set_rebuilding(&self) {
        let _ = self
            .mode
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |m| {
                (m != DEPOSED).then_some(REBUILDING)
            });
    }

    /// This server no longer leads the volume (see [`Mode::Deposed`]).
    pub fn set_deposed(&self) {
        self.mode.store(DEPOSED, Ordering::SeqCst);
    }

    /// A finished rebuild: writes wait for it again. False if it failed meanwhile.
    pub fn rebuilt(&self) -> bool {
        self.mode
            .compare_exchange(REBUILDING, IN_SYNC, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    }

    /// Records that `[offset, offset + len)` changed without reaching the replica.
    pub fn mark(&self, offset: u64, len: u64) {
        let first = offset / REBUILD_CHUNK_BYTES;
        let last = (offset + len.max(1) - 1) / REBUILD_CHUNK_BYTES;
        for c in first..=last {
            match self.dirty.get((c / 64) as usize) {
                Some(w) => {
                    w.fetch_or(1 << (c % 64), Ordering::SeqCst);
                }
                None => self.all_dirty.store(true, Ordering::SeqCst),
            }
        }
    }

    /// Forgets every dirty chunk (the caller marks what differs another way).
    pub fn clear_dirty(&self) {
        self.all_dirty.store(false, Ordering::SeqCst);
        for w in &self.dirty {
            w.store(0, Ordering::SeqCst);
        }
    }

    /// Takes the next dirty chunk at or after `from` (clearing its bit), if any.
    pub fn take_dirty(&self, from: u64, chunks: u64) -> Option<u64> {
        if self.all_dirty.swap(false, Ordering::SeqCst) {
            for w in &self.dirty {
                w.store(u64::MAX, Ordering::SeqCst);
            }
        }
        (from..chunks).find(|&c| {
            let Some(w) = self.dirty.get((c / 64) as usize) else {
                return false;
            };
            let bit = 1u64 << (c % 64);
            w.fetch_and(!bit, Ordering::SeqCst) & bit != 0
        })
    }

    /// A rebuild starts with `chunks` to copy.
    pub fn rebuild_started(&self, chunks: u64) {
        self.rebuild_copied.store(0, Ordering::Relaxed);
        self.rebuild_chunks.store(chunks, Ordering::Relaxed);
    }

    /// The running rebuild copied one more chunk.
    pub fn chunk_copied(&self) {
        self.rebuild_copied.fetch_add(1, Ordering::Relaxed);
    }

    /// How far the last rebuild got, in percent of what it had to copy (100 for nothing).
    pub fn rebuild_percent(&self) -> u8 {
        let total = self.rebuild_chunks.load(Ordering::Relaxed);
        let done = self.rebuild_copied.load(Ordering::Relaxed).min(total);
        match total {
            0 => 100,
            t => (done * 100 / t) as u8,
        }
    }

    /// Whether anything is marked dirty.
    pub fn has_dirty(&self) -> bool {
        self.all_dirty.load(Ordering::SeqCst) || self.dirty_chunks() > 0
    }

    /// Chunks marked dirty now.
    pub fn dirty_chunks(&self) -> u64 {
        self.dirty
            .iter()
            .map(|w| u64::from(w.load(Ordering::SeqCst).count_ones()))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_cover_every_chunk_a_range_touches_and_are_taken_once() {
        let m = MemberState::new(10 * REBUILD_CHUNK_BYTES, true);
        assert_eq!(m.dirty_chunks(), 0);
        m.mark(REBUILD_CHUNK_BYTES - 4096, 8192);
        m.mark(7 * REBUILD_CHUNK_BYTES, 4096);
        assert_eq!(m.dirty_chunks(), 3);
        assert_eq!(m.take_dirty(0, 10), Some(0));
        assert_eq!(m.take_dirty(0, 10), Some(1));
        assert_eq!(m.take_dirty(2, 10), Some(7));
        assert_eq!(m.take_dirty(0, 10), None);
    }

    #[test]
    fn a_dropped_member_starts_all_dirty_and_a_rebuild_ends_only_if_it_did_not_fail() {
        let m = MemberState::new(3 * REBUILD_CHUNK_BYTES, false);
        assert_eq!((m.mode(), m.dirty_chunks()), (Mode::Dropped, 3));
        m.set_rebuilding();
        m.set_dropped();
        assert!(
            !m.rebuilt(),
            "a replica that failed mid-rebuild is not in sync"
        );
        m.set_rebuilding();
        assert!(m.rebuilt());
        assert_eq!(m.mode(), Mode::InSync);
    }

    #[test]
    fn a_deposed_member_stays_deposed_and_promises_nothing() {
        let m = MemberState::new(REBUILD_CHUNK_BYTES, true);
        m.renew_lease(Instant::now());
        assert!(m.leased(clock_ns(Instant::now())));
        m.set_deposed();
        assert!(
            !m.leased(clock_ns(Instant::now())),
            "a lease given to the former primary does not serve reads here"
        );
        m.set_dropped();
        m.set_rebuilding();
        assert!(!m.rebuilt());
        assert_eq!(m.mode(), Mode::Deposed);
    }

    #[test]
    fn rebuild_progress_is_the_share_of_the_chunks_it_started_with() {
        let m = MemberState::new(4 * REBUILD_CHUNK_BYTES, false);
        m.rebuild_started(m.dirty_chunks());
        assert_eq!(m.rebuild_percent(), 0);
        m.chunk_copied();
        assert_eq!(m.rebuild_percent(), 25);
        for _ in 0..5 {
            m.chunk_copied();
        }
        assert_eq!(m.rebuild_percent(), 100, "never past 100");
        m.rebuild_started(0);
        assert_eq!(m.rebuild_percent(), 100, "nothing to copy");
    }

    #[test]
    fn a_lease_holds_for_the_trusted_part_from_when_the_frame_was_sent() {
        let m = MemberState::new(REBUILD_CHUNK_BYTES, true);
        let sent = Instant::now();
        assert!(!m.leased(clock_ns(sent)), "no frame accepted: no lease");
        m.renew_lease(sent);
        let trusted = REPLICA_READ_LEASE_MS * REPLICA_LEASE_TRUST_PERCENT / 100;
        let ms = |n: u64| clock_ns(sent + Duration::from_millis(n));
        assert!(m.leased(ms(trusted - 1)));
        assert!(!m.leased(ms(trusted)));
        // An older frame's answer arriving late does not shorten it.
        if let Some(older) = sent.checked_sub(Duration::from_millis(10)) {
            m.renew_lease(older);
        }
        assert!(m.leased(ms(trusted - 1)));
    }
}
