//! Per-namespace quality of service: token buckets that pace reads and writes.
//!
//! The control plane hands over absolute limits ([`QosLimits`]); every connection that
//! sees a namespace shares its [`QosState`], so the limit holds for the namespace as a
//! whole, not per queue. Tokens accrue in whole-millisecond steps of `rate / 1000`, kept
//! in fixed point (thousandths of a token) so that small rates such as 50 IOPS are exact.
//! A bucket holds at most [`QOS_BURST_MS`] worth of tokens, but never less than the cost
//! of the largest command, so every command can eventually pass.
//!
//! Unlimited directions cost one relaxed atomic load per I/O and never take the lock.
//!
//! The same state also holds the namespace's write gate: a replicated snapshot closes it
//! ([`QosState::hold_writes`]), so changes park like throttled commands, and waits until
//! the changes already admitted ([`WriteTicket`]s) have completed. Every copy then takes
//! the snapshot at the same point of the write stream.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::limits::{MAX_DATA_BYTES, QOS_BURST_MS, QOS_REFILL_MS};

/// Fixed-point scale: bucket levels are in thousandths of a token, so a rate in tokens
/// per second is also the number of scaled units that accrue per millisecond.
const SCALE: u64 = 1000;

const _: () = assert!(
    QOS_REFILL_MS == 1,
    "the fixed-point step assumes 1 ms refills"
);
const _: () = assert!(QOS_BURST_MS >= 1);

/// Absolute per-namespace limits; 0 means unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QosLimits {
    /// Read commands per second.
    pub read_iops: u64,
    /// Write commands per second.
    pub write_iops: u64,
    /// Bytes read per second.
    pub read_bytes_per_sec: u64,
    /// Bytes written per second.
    pub write_bytes_per_sec: u64,
}

impl QosLimits {
    /// No limit in either direction.
    pub const UNLIMITED: QosLimits = QosLimits {
        read_iops: 0,
        write_iops: 0,
        read_bytes_per_sec: 0,
        write_bytes_per_sec: 0,
    };

    fn limits(&self, dir: QosDir) -> (u64, u64) {
        match dir {
            QosDir::Read => (self.read_iops, self.read_bytes_per_sec),
            QosDir::Write => (self.write_iops, self.write_bytes_per_sec),
        }
    }

    fn is_limited(&self, dir: QosDir) -> bool {
        self.limits(dir) != (0, 0)
    }
}

/// Which pair of buckets a command draws from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QosDir {
    /// Read.
    Read = 0,
    /// Write.
    Write = 1,
}

/// One token bucket. Pure: time arrives as elapsed milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Bucket {
    /// Tokens per second; 0 = unlimited.
    rate: u64,
    /// Current level, in thousandths of a token.
    level: u64,
    /// Highest level, in thousandths of a token.
    cap: u64,
}

impl Bucket {
    /// A full bucket. `max_cost` is the most one command can ask for (in tokens).
    fn new(rate: u64, max_cost: u64) -> Bucket {
        let cap = Self::cap_for(rate, max_cost);
        Bucket {
            rate,
            level: cap,
            cap,
        }
    }

    fn cap_for(rate: u64, max_cost: u64) -> u64 {
        rate.saturating_mul(QOS_BURST_MS)
            .max(max_cost.saturating_mul(SCALE))
    }

    fn refill(&mut self, elapsed_ms: u64) {
        let add = self.rate.saturating_mul(elapsed_ms);
        self.level = self.level.saturating_add(add).min(self.cap);
    }

    /// Whether `cost` tokens may be taken now. A cost above the cap (impossible while
    /// `max_cost` holds) waits for a full bucket instead of waiting forever.
    fn has(&self, cost: u64) -> bool {
        self.rate == 0 || self.level >= cost.saturating_mul(SCALE).min(self.cap)
    }

    fn take(&mut self, cost: u64) {
        if self.rate != 0 {
            self.level = self.level.saturating_sub(cost.saturating_mul(SCALE));
        }
    }

    /// Changes the rate, keeping the tokens already earned (up to the new cap). A bucket
    /// that was unlimited starts full, as a new one does.
    fn set_rate(&mut self, rate: u64, max_cost: u64) {
        let was_unlimited = self.rate == 0;
        self.rate = rate;
        self.cap = Self::cap_for(rate, max_cost);
        self.level = if was_unlimited {
            self.cap
        } else {
            self.level.min(self.cap)
        };
    }
}

/// The buckets of one direction: commands and bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Pair {
    ops: Bucket,
    bytes: Bucket,
}

/// The most bytes one command can carry: the floor of every byte bucket's cap.
const MAX_COMMAND_BYTES: u64 = MAX_DATA_BYTES as u64;

impl Pair {
    fn new((iops, bps): (u64, u64)) -> Pair {
        Pair {
            ops: Bucket::new(iops, 1),
            bytes: Bucket::new(bps, MAX_COMMAND_BYTES),
        }
    }

    fn refill(&mut self, elapsed_ms: u64) {
        self.ops.refill(elapsed_ms);
        self.bytes.refill(elapsed_ms);
    }

    /// Takes one command of `bytes` from both buckets, or nothing.
    fn try_take(&mut self, bytes: u64) -> bool {
        if !(self.ops.has(1) && self.bytes.has(bytes)) {
            return false;
        }
        self.ops.take(1);
        self.bytes.take(bytes);
        true
    }

    fn set_rates(&mut self, (iops, bps): (u64, u64)) {
        self.ops.set_rate(iops, 1);
        self.bytes.set_rate(bps, MAX_COMMAND_BYTES);
    }
}

#[derive(Debug)]
struct Buckets {
    /// Milliseconds since the state's epoch at the last refill.
    last_ms: u64,
    dirs: [Pair; 2],
}

impl Buckets {
    fn advance(&mut self, now_ms: u64) {
        let elapsed = now_ms.saturating_sub(self.last_ms);
        if elapsed == 0 {
            return;
        }
        self.last_ms = now_ms;
        for p in &mut self.dirs {
            p.refill(elapsed);
        }
    }
}

/// The live QoS state of one namespace, shared by every connection that sees it and
/// carried over from table to table, so a new limit applies to live connections.
#[derive(Debug)]
pub struct QosState {
    /// Per direction: whether any limit applies (the lock-free fast path).
    limited: [AtomicBool; 2],
    epoch: Instant,
    buckets: Mutex<Buckets>,
    /// Holds on the write gate: while above zero, no change is admitted.
    write_holds: AtomicU32,
    /// Changes admitted and not yet completed (tickets alive).
    writes_in_flight: AtomicU64,
}

/// One admitted change (write, write-zeroes, deallocate) of a namespace, alive until the
/// command completes: a held gate waits for every ticket to go.
#[derive(Debug)]
pub struct WriteTicket(Arc<QosState>);

impl Drop for WriteTicket {
    fn drop(&mut self) {
        self.0.writes_in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A closed write gate; dropping it opens the gate again (parked changes then retry).
#[derive(Debug)]
pub struct WriteHold(Arc<QosState>);

impl WriteHold {
    /// Waits until every change admitted before the gate closed has completed; false if
    /// some are still running after `timeout`.
    pub fn drained(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.0.writes_in_flight.load(Ordering::SeqCst) > 0 {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        true
    }
}

impl Drop for WriteHold {
    fn drop(&mut self) {
        self.0.write_holds.fetch_sub(1, Ordering::SeqCst);
    }
}

impl QosState {
    /// Full buckets with the given limits.
    pub fn new(limits: QosLimits) -> QosState {
        QosState {
            limited: [
                AtomicBool::new(limits.is_limited(QosDir::Read)),
                AtomicBool::new(limits.is_limited(QosDir::Write)),
            ],
            epoch: Instant::now(),
            buckets: Mutex::new(Buckets {
                last_ms: 0,
                dirs: [
                    Pair::new(limits.limits(QosDir::Read)),
                    Pair::new(limits.limits(QosDir::Write)),
                ],
            }),
            write_holds: AtomicU32::new(0),
            writes_in_flight: AtomicU64::new(0),
        }
    }

    /// Admits one change while the write gate is open; `None` means "park it and retry".
    /// The count goes up before the gate is looked at, and a holder closes the gate before
    /// it reads the count (all `SeqCst`), so either the holder waits for this change or
    /// the change sees the gate closed.
    pub fn admit_write(self: &Arc<Self>) -> Option<WriteTicket> {
        self.writes_in_flight.fetch_add(1, Ordering::SeqCst);
        let ticket = WriteTicket(self.clone());
        (self.write_holds.load(Ordering::SeqCst) == 0).then_some(ticket)
    }

    /// Closes the write gate until the hold is dropped (holds nest).
    pub fn hold_writes(self: &Arc<Self>) -> WriteHold {
        self.write_holds.fetch_add(1, Ordering::SeqCst);
        WriteHold(self.clone())
    }

    /// The state a rebuilt table gives namespace `nsid`: the previous table's, updated in
    /// place with `limits`, or a new one.
    pub fn carry_over(previous: Option<&Arc<QosState>>, limits: QosLimits) -> Arc<QosState> {
        match previous {
            Some(q) => {
                q.update(limits);
                q.clone()
            }
            None => Arc::new(QosState::new(limits)),
        }
    }

    /// Takes the tokens for one command of `bytes` in direction `dir`; false means
    /// "not yet, retry after the next refill".
    pub fn try_take(&self, dir: QosDir, bytes: u32) -> bool {
        if !self.limited[dir as usize].load(Ordering::Relaxed) {
            return true;
        }
        self.try_take_at(dir, bytes, self.now_ms())
    }

    /// Changes the limits in place; tokens already earned are kept up to the new cap.
    pub fn update(&self, limits: QosLimits) {
        self.update_at(limits, self.now_ms());
    }

    fn now_ms(&self) -> u64 {
        // Truncation to whole milliseconds is the refill step. u64 ms lasts 584 million years.
        (self.epoch.elapsed().as_millis() / QOS_REFILL_MS as u128) as u64
    }

    fn lock(&self) -> MutexGuard<'_, Buckets> {
        // Plain numbers: a panic elsewhere cannot leave them inconsistent.
        self.buckets.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn try_take_at(&self, dir: QosDir, bytes: u32, now_ms: u64) -> bool {
        let mut b = self.lock();
        b.advance(now_ms);
        b.dirs[dir as usize].try_take(bytes as u64)
    }

    fn update_at(&self, limits: QosLimits, now_ms: u64) {
        let mut b = self.lock();
        // Tokens earned under the old rates are credited before the rates change.
        b.advance(now_ms);
        for dir in [QosDir::Read, QosDir::Write] {
            b.dirs[dir as usize].set_rates(limits.limits(dir));
            self.limited[dir as usize].store(limits.is_limited(dir), Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const READ_4K: u32 = 4096;

    /// Closed loop in simulated time: a client with `depth` commands queued retries every
    /// `step_ms`; returns how many commands passed in `secs` seconds.
    fn run(q: &QosState, dir: QosDir, bytes: u32, secs: u64, step_ms: u64, start_ms: u64) -> u64 {
        let mut passed = 0;
        let mut now = start_ms;
        while now < start_ms + secs * 1000 {
            now += step_ms;
            while q.try_take_at(dir, bytes, now) {
                passed += 1;
            }
        }
        passed
    }

    /// What one burst may add on top of the rate: the full bucket at the start.
    fn within(got: u64, want: u64, slack: u64) {
        assert!(
            got >= want && got <= want + slack,
            "passed {got}, want {want} (+{slack} burst)"
        );
    }

    #[test]
    fn iops_rate_is_exact_over_simulated_time() {
        for rate in [50, 1, 999, 2000, 123_457] {
            let q = QosState::new(QosLimits {
                read_iops: rate,
                ..QosLimits::UNLIMITED
            });
            let burst = (rate * QOS_BURST_MS / SCALE).max(1);
            within(run(&q, QosDir::Read, READ_4K, 10, 1, 0), rate * 10, burst);
        }
    }

    #[test]
    fn late_retries_within_the_burst_lose_nothing() {
        let q = QosState::new(QosLimits {
            write_iops: 2000,
            ..QosLimits::UNLIMITED
        });
        let burst = 2000 * QOS_BURST_MS / SCALE;
        within(
            run(&q, QosDir::Write, READ_4K, 10, QOS_BURST_MS, 0),
            20_000,
            burst,
        );
    }

    #[test]
    fn bandwidth_rate_is_exact_over_simulated_time() {
        let bps = 4 << 20;
        let q = QosState::new(QosLimits {
            read_bytes_per_sec: bps,
            ..QosLimits::UNLIMITED
        });
        let io = 64 * 1024;
        let passed = run(&q, QosDir::Read, io, 30, 1, 0);
        // The cap is the burst window's worth, at least one maximal command.
        let burst = (bps * QOS_BURST_MS / SCALE).max(MAX_COMMAND_BYTES) / io as u64;
        within(passed, bps * 30 / io as u64, burst);
    }

    #[test]
    fn both_buckets_must_allow_a_command() {
        let q = QosState::new(QosLimits {
            read_iops: 100,
            read_bytes_per_sec: 100 * 4096 / 2,
            ..QosLimits::UNLIMITED
        });
        // Bandwidth allows 50 per second of 4 KiB: it is the tighter limit.
        let passed = run(&q, QosDir::Read, READ_4K, 10, 1, 0);
        within(passed, 500, MAX_COMMAND_BYTES / 4096);
    }

    #[test]
    fn burst_is_capped_after_idling() {
        let q = QosState::new(QosLimits {
            read_iops: 2000,
            write_iops: 50,
            ..QosLimits::UNLIMITED
        });
        let mut n = 0;
        while q.try_take_at(QosDir::Read, READ_4K, 60_000) {
            n += 1;
        }
        assert_eq!(n, 2000 * QOS_BURST_MS / SCALE, "a few ms worth");
        let mut n = 0;
        while q.try_take_at(QosDir::Write, READ_4K, 60_000) {
            n += 1;
        }
        assert_eq!(
            n,
            (50 * QOS_BURST_MS / SCALE).max(1),
            "the burst window's worth, and at least one command"
        );
    }

    #[test]
    fn update_changes_the_rate_in_place() {
        let q = QosState::new(QosLimits {
            read_iops: 1000,
            ..QosLimits::UNLIMITED
        });
        within(
            run(&q, QosDir::Read, READ_4K, 5, 1, 0),
            5000,
            1000 * QOS_BURST_MS / SCALE,
        );
        q.update_at(
            QosLimits {
                read_iops: 300,
                ..QosLimits::UNLIMITED
            },
            5000,
        );
        // The bucket was drained; the new rate applies from the next millisecond.
        within(run(&q, QosDir::Read, READ_4K, 5, 1, 5000), 1500, 1);
        q.update_at(QosLimits::UNLIMITED, 10_000);
        assert!(!q.limited[0].load(Ordering::Relaxed));
        assert!((0..10_000).all(|_| q.try_take(QosDir::Read, READ_4K)));
        q.update_at(
            QosLimits {
                read_iops: 10,
                ..QosLimits::UNLIMITED
            },
            10_000,
        );
        // Back to limited: starts with a full bucket (the burst window's worth, at least one).
        let burst = 10 * QOS_BURST_MS;
        within(
            run(&q, QosDir::Read, READ_4K, 10, 1, 10_000),
            100,
            (burst / SCALE).max(1),
        );
    }

    #[test]
    fn carry_over_reuses_the_state() {
        let a = QosState::carry_over(None, QosLimits::UNLIMITED);
        let limits = QosLimits {
            write_bytes_per_sec: 1 << 20,
            ..QosLimits::UNLIMITED
        };
        let b = QosState::carry_over(Some(&a), limits);
        assert!(Arc::ptr_eq(&a, &b));
        assert!(a.limited[QosDir::Write as usize].load(Ordering::Relaxed));
        assert!(!a.limited[QosDir::Read as usize].load(Ordering::Relaxed));
    }

    #[test]
    fn unlimited_directions_never_take_the_lock() {
        let q = Arc::new(QosState::new(QosLimits {
            write_iops: 1,
            ..QosLimits::UNLIMITED
        }));
        let held = q.lock();
        let (tx, rx) = std::sync::mpsc::channel();
        let q2 = q.clone();
        std::thread::spawn(move || {
            let all = (0..100_000).all(|_| q2.try_take(QosDir::Read, u32::MAX));
            let _ = tx.send(all);
        });
        let r = rx.recv_timeout(std::time::Duration::from_secs(10));
        drop(held);
        assert_eq!(
            r,
            Ok(true),
            "reads are unlimited and must not wait for the lock"
        );
    }

    #[test]
    fn huge_rates_and_long_idles_saturate() {
        let q = QosState::new(QosLimits {
            read_bytes_per_sec: u64::MAX,
            ..QosLimits::UNLIMITED
        });
        assert!(q.try_take_at(QosDir::Read, u32::MAX, u64::MAX));
        assert!(q.try_take_at(QosDir::Read, u32::MAX, u64::MAX));
    }
}
