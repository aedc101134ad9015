//! Controllers: state shared by one admin queue and its I/O queues, and the registry.
//!
//! A controller is created by an admin Connect and lives until its admin
//! connection ends or its keep-alive timer expires. Its mutable state sits
//! behind one mutex that only admin commands, Connects and namespace
//! publications take; the I/O path only touches the atomics.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use crate::admission::{self, CtrlKey};
use crate::limits::{MAX_CHANGED_NS, MAX_CNTLID, MAX_IO_QUEUES_PER_CTRL, MAX_PENDING_EVENTS};
use crate::notify::Notifier;
use crate::ns::NsTable;
use crate::nvme::aen;

/// Event mask bit: a namespace-changed notice is outstanding until the log is read.
pub const MASK_NS: u32 = 1;
/// Event mask bit: an ANA-change notice is outstanding until the log is read.
pub const MASK_ANA: u32 = 2;

/// Per-controller I/O counters for the SMART log.
#[derive(Debug, Default)]
pub struct Stats {
    /// Bytes read.
    pub read_bytes: AtomicU64,
    /// Bytes written.
    pub write_bytes: AtomicU64,
    /// Read commands.
    pub read_cmds: AtomicU64,
    /// Write commands.
    pub write_cmds: AtomicU64,
}

/// What a namespace looked like to this controller (for change detection).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeenNs {
    /// Namespace ID.
    pub nsid: u32,
    /// UUID.
    pub uuid: [u8; 16],
    /// Size in bytes.
    pub size_bytes: u64,
    /// ANA group and state.
    pub ana: crate::config::Ana,
}

/// Mutable controller state.
#[derive(Debug)]
pub struct CtrlState {
    /// Controller Configuration property.
    pub cc: u32,
    /// Controller Status property.
    pub csts: u32,
    /// Keep Alive Timeout in ms the host asked for (0 = disabled); what is enforced is
    /// [`Controller::effective_kato_ms`].
    pub kato_ms: u32,
    /// Last Keep Alive (or Connect).
    pub last_keepalive: Instant,
    /// I/O queues granted by Set Features Number of Queues.
    pub io_queues_granted: u16,
    /// Connected I/O queues and how to wake them.
    pub io_queues: Vec<(u16, Arc<Notifier>)>,
    /// Asynchronous Event Configuration.
    pub aec: u32,
    /// Events waiting for an AER.
    pub events: VecDeque<u32>,
    /// Event kinds reported and not yet acknowledged by reading their log.
    pub masked: u32,
    /// Changed namespace list.
    pub changed_ns: Vec<u32>,
    /// The list overflowed.
    pub changed_overflow: bool,
    /// Namespaces visible at the last publication.
    pub seen: Vec<SeenNs>,
    /// ANA change count.
    pub ana_chgcnt: u64,
}

/// What an admin Connect establishes.
#[derive(Debug)]
pub struct ControllerInit {
    /// Controller ID.
    pub cntlid: u16,
    /// Host NQN.
    pub host_nqn: String,
    /// Host ID.
    pub host_id: [u8; 16],
    /// Admin connection's peer.
    pub remote: SocketAddr,
    /// Discovery controller.
    pub discovery: bool,
    /// Keep Alive Timeout from Connect (ms).
    pub kato_ms: u32,
    /// Wakes the admin queue.
    pub admin_notify: Arc<Notifier>,
    /// Its entry in the admission ledger.
    pub ledger_key: CtrlKey,
}

/// One controller.
#[derive(Debug)]
pub struct Controller {
    /// Controller ID.
    pub cntlid: u16,
    /// Host NQN.
    pub host_nqn: String,
    /// Host ID.
    pub host_id: [u8; 16],
    /// Admin connection's peer.
    pub remote: SocketAddr,
    /// Discovery controller (no namespaces, no I/O queues).
    pub discovery: bool,
    /// Set when the controller is being torn down; queues exit.
    pub dead: AtomicBool,
    /// Wakes the admin queue (events, teardown).
    pub admin_notify: Arc<Notifier>,
    /// Counters.
    pub stats: Stats,
    /// Its entry in the admission ledger.
    pub ledger_key: CtrlKey,
    state: Mutex<CtrlState>,
}

impl Controller {
    /// A fresh controller (CC.EN = 0).
    pub fn new(init: ControllerInit, table: &NsTable) -> Controller {
        let ControllerInit {
            cntlid,
            host_nqn,
            host_id,
            remote,
            discovery,
            kato_ms,
            admin_notify,
            ledger_key,
        } = init;
        let seen = if discovery {
            Vec::new()
        } else {
            seen_in(table, &host_nqn, remote)
        };
        Controller {
            cntlid,
            host_nqn,
            host_id,
            remote,
            discovery,
            dead: AtomicBool::new(false),
            admin_notify,
            stats: Stats::default(),
            ledger_key,
            state: Mutex::new(CtrlState {
                cc: 0,
                csts: 0,
                kato_ms,
                last_keepalive: Instant::now(),
                io_queues_granted: MAX_IO_QUEUES_PER_CTRL,
                io_queues: Vec::new(),
                aec: 0,
                events: VecDeque::with_capacity(MAX_PENDING_EVENTS),
                masked: 0,
                changed_ns: Vec::new(),
                changed_overflow: false,
                seen,
                ana_chgcnt: 1,
            }),
        }
    }

    /// Locks the state. A poisoned lock means a reactor panicked while
    /// holding it; the state is plain data, so continuing with it is sound.
    pub fn state(&self) -> MutexGuard<'_, CtrlState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether any namespace is visible to this controller now.
    pub fn sees_namespaces(&self) -> bool {
        !self.discovery && !self.state().seen.is_empty()
    }

    /// The keep-alive timeout enforced on this controller (ms, 0 = none): what the host
    /// asked for, bounded by `no_namespace_kato_ms` while it sees no namespace.
    pub fn effective_kato_ms(&self, no_namespace_kato_ms: u32) -> u32 {
        let st = self.state();
        let sees = !self.discovery && !st.seen.is_empty();
        admission::effective_kato_ms(st.kato_ms, sees, no_namespace_kato_ms)
    }

    /// Whether the controller is being torn down.
    pub fn is_dead(&self) -> bool {
        self.dead.load(Ordering::Acquire)
    }

    /// Marks the controller dead and wakes every queue.
    pub fn kill(&self) {
        self.dead.store(true, Ordering::Release);
        self.admin_notify.notify();
        for (_, n) in self.state().io_queues.iter() {
            n.notify();
        }
    }

    /// Recomputes visibility after a publication, queueing AENs for what changed.
    pub fn namespaces_published(&self, table: &NsTable) {
        if self.discovery {
            return;
        }
        let now = seen_in(table, &self.host_nqn, self.remote);
        let mut st = self.state();
        let changed = diff(&st.seen, &now);
        if changed.is_empty() {
            return;
        }
        for id in changed {
            if st.changed_ns.contains(&id) {
                continue;
            }
            if st.changed_ns.len() >= MAX_CHANGED_NS {
                st.changed_overflow = true;
            } else {
                st.changed_ns.push(id);
            }
        }
        let ana_changed = st.seen.len() != now.len()
            || st
                .seen
                .iter()
                .zip(&now)
                .any(|(a, b)| (a.nsid, a.ana) != (b.nsid, b.ana));
        st.seen = now;
        if ana_changed {
            st.ana_chgcnt += 1;
        }
        let mut woke = queue_event(&mut st, aen::CFG_NS_ATTR, MASK_NS, aen::NS_CHANGED);
        if ana_changed {
            woke |= queue_event(&mut st, aen::CFG_ANA_CHANGE, MASK_ANA, aen::ANA_CHANGE);
        }
        drop(st);
        if woke {
            self.admin_notify.notify();
        }
    }
}

/// Queues an event if the host enabled it and the same kind is not already outstanding.
fn queue_event(st: &mut CtrlState, cfg_bit: u32, mask: u32, event: u32) -> bool {
    if st.aec & cfg_bit == 0 || st.masked & mask != 0 || st.events.len() >= MAX_PENDING_EVENTS {
        return false;
    }
    st.masked |= mask;
    st.events.push_back(event);
    true
}

fn seen_in(table: &NsTable, host_nqn: &str, remote: SocketAddr) -> Vec<SeenNs> {
    table
        .visible(host_nqn, remote.ip())
        .map(|n| SeenNs {
            nsid: n.spec.nsid,
            uuid: n.spec.uuid,
            size_bytes: n.spec.size_bytes,
            ana: n.spec.ana,
        })
        .collect()
}

/// Namespace IDs that appeared, disappeared or changed between two lists sorted by nsid
/// (one merge pass: a table may hold tens of thousands of namespaces).
fn diff(old: &[SeenNs], new: &[SeenNs]) -> Vec<u32> {
    let mut out = Vec::new();
    let (mut o, mut n) = (old.iter().peekable(), new.iter().peekable());
    loop {
        match (o.peek(), n.peek()) {
            (None, None) => return out,
            (Some(x), Some(y)) if x.nsid == y.nsid => {
                if x != y {
                    out.push(x.nsid);
                }
                o.next();
                n.next();
            }
            (Some(x), Some(y)) if x.nsid < y.nsid => {
                out.push(x.nsid);
                o.next();
            }
            (Some(x), None) => {
                out.push(x.nsid);
                o.next();
            }
            (_, Some(y)) => {
                out.push(y.nsid);
                n.next();
            }
        }
    }
}

/// All live controllers, by ID.
#[derive(Debug)]
pub struct Registry {
    ctrls: BTreeMap<u16, Arc<Controller>>,
    next: u16,
    /// The IDs this target may hand out.
    range: std::ops::RangeInclusive<u16>,
}

impl Default for Registry {
    fn default() -> Registry {
        Registry::new(1..=MAX_CNTLID)
    }
}

impl Registry {
    /// A registry handing out IDs within `range` (clamped to the dynamic IDs).
    pub fn new(range: std::ops::RangeInclusive<u16>) -> Registry {
        let lo = (*range.start()).clamp(1, MAX_CNTLID);
        let hi = (*range.end()).clamp(lo, MAX_CNTLID);
        Registry {
            ctrls: BTreeMap::new(),
            next: hi,
            range: lo..=hi,
        }
    }

    /// Picks an unused controller ID.
    pub fn allocate_id(&mut self) -> Option<u16> {
        let (lo, hi) = (*self.range.start(), *self.range.end());
        for _ in lo..=hi {
            self.next = if self.next >= hi { lo } else { self.next + 1 };
            if !self.ctrls.contains_key(&self.next) {
                return Some(self.next);
            }
        }
        None
    }

    /// Registers a controller under its ID.
    pub fn insert(&mut self, c: Arc<Controller>) {
        self.ctrls.insert(c.cntlid, c);
    }

    /// Looks up a controller.
    pub fn get(&self, cntlid: u16) -> Option<Arc<Controller>> {
        self.ctrls.get(&cntlid).cloned()
    }

    /// Removes a controller if it is still the registered one.
    pub fn remove(&mut self, c: &Arc<Controller>) {
        if self.ctrls.get(&c.cntlid).is_some_and(|r| Arc::ptr_eq(r, c)) {
            self.ctrls.remove(&c.cntlid);
        }
    }

    /// Every live controller.
    pub fn all(&self) -> impl Iterator<Item = &Arc<Controller>> {
        self.ctrls.values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(nsid: u32, size: u64) -> SeenNs {
        SeenNs {
            nsid,
            uuid: [nsid as u8; 16],
            size_bytes: size,
            ana: Default::default(),
        }
    }

    #[test]
    fn diff_reports_added_removed_and_resized() {
        let old = [s(1, 10), s(2, 10), s(3, 10)];
        let new = [s(1, 10), s(3, 20), s(4, 10)];
        assert_eq!(diff(&old, &new), vec![2, 3, 4]);
        assert!(diff(&old, &old).is_empty());
    }

    #[test]
    fn registry_allocates_ids_within_its_range_only() {
        let mut r = Registry::new(1001..=1003);
        let ids: Vec<u16> = (0..3).filter_map(|_| r.allocate_id()).collect();
        assert_eq!(ids, vec![1001, 1002, 1003]);
    }

    #[test]
    fn registry_allocates_unique_ids() {
        let mut r = Registry::default();
        let a = r.allocate_id().expect("id");
        let b = r.allocate_id().expect("id");
        assert_ne!(a, b);
        assert!(a >= 1 && b >= 1);
    }
}
