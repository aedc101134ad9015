//! This server's etcd session: one lease, kept alive, that carries the server's liveness key
//! (`alive/<uuid>`, with what peers need to reach it) and, when the server wins the
//! election, the leader key (created by a transaction that requires it not to exist; the
//! epoch is the key's create revision).
//!
//! Fencing does not rest on timing: every orchestrator append compares the leader key's
//! create revision with its epoch (see [`super::log`]). The lease deadline only keeps a
//! leader from acting once it may have lost the key: it acts until the last successful
//! keep-alive's send time plus the TTL etcd granted, minus a safety margin
//! ([`LEASE_SAFETY_MARGIN_MS`]); a process stopped longer than that finds the deadline
//! passed before it does anything.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::etcd::{Compare, EtcdClient, EtcdResult, Op, OpResult, Range};
use super::{AliveRecord, Keys};
use crate::limits::{LEASE_KEEPALIVE_MS, LEASE_SAFETY_MARGIN_MS, LEASE_TTL_SECS};

/// What the session knows about leadership right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaderView {
    /// The epoch this server leads under, if it won the election with its current lease.
    pub epoch: Option<u64>,
    /// After this instant the lease may have expired: do not act as leader.
    pub valid_until: Instant,
}

impl LeaderView {
    /// The epoch to act under now, if any.
    pub fn acting_epoch(&self, now: Instant) -> Option<u64> {
        self.epoch.filter(|_| now < self.valid_until)
    }
}

/// A running session; dropping it does not end it, [`Session::stop`] does.
pub struct Session {
    view: Arc<Mutex<LeaderView>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Session {
    /// Starts the session thread: lease, liveness key, campaign, keep-alives.
    pub fn spawn(etcd: EtcdClient, keys: Keys, record: AliveRecord) -> std::io::Result<Session> {
        let view = Arc::new(Mutex::new(LeaderView {
            epoch: None,
            valid_until: Instant::now(),
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let runner = Runner {
            etcd,
            keys,
            record,
            view: view.clone(),
            stop: stop.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("etcd-session".into())
            .spawn(move || runner.run())?;
        Ok(Session {
            view,
            stop,
            thread: Some(thread),
        })
    }

    pub fn view(&self) -> LeaderView {
        *self.view.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A handle to the view for other threads.
    pub fn view_handle(&self) -> Arc<Mutex<LeaderView>> {
        self.view.clone()
    }

    /// Ends the session: the lease is revoked, so this server shows as down (and gives up
    /// leadership) at once rather than after the TTL.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Runner {
    etcd: EtcdClient,
    keys: Keys,
    record: AliveRecord,
    view: Arc<Mutex<LeaderView>>,
    stop: Arc<AtomicBool>,
}

impl Runner {
    fn set_view(&self, epoch: Option<u64>, valid_until: Instant) {
        let mut v = self.view.lock().unwrap_or_else(|p| p.into_inner());
        if v.epoch != epoch {
            match epoch {
                Some(e) => tracing::warn!("won the leader election: epoch {e}"),
                None if v.epoch.is_some() => tracing::warn!("leadership lost"),
                None => {}
            }
        }
        *v = LeaderView { epoch, valid_until };
    }

    fn run(self) {
        while !self.stop.load(Ordering::Relaxed) {
            let granted_at = Instant::now();
            let lease = match self.start_lease() {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!("etcd session: cannot start a lease: {e}");
                    self.set_view(None, Instant::now());
                    self.pause(Duration::from_millis(LEASE_KEEPALIVE_MS));
                    continue;
                }
            };
            self.keep(lease, granted_at);
            if self.stop.load(Ordering::Relaxed) {
                if let Err(e) = self.etcd.lease_revoke(lease.0) {
                    tracing::warn!("etcd session: revoking the lease: {e}");
                }
                return;
            }
        }
    }

    /// Sleeps in short steps so a stop is seen soon.
    fn pause(&self, d: Duration) {
        let end = Instant::now() + d;
        while !self.stop.load(Ordering::Relaxed) && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(50).min(end - Instant::now()));
        }
    }

    /// A new lease with the liveness key on it; returns (lease id, TTL).
    fn start_lease(&self) -> EtcdResult<(i64, i64)> {
        let (id, ttl) = self.etcd.lease_grant(LEASE_TTL_SECS)?;
        let value = serde_json::to_vec(&self.record).unwrap_or_default();
        self.etcd.txn(
            &[],
            &[Op::Put {
                key: self.keys.alive(self.record.server_uuid),
                value,
                lease: id,
            }],
            &[],
        )?;
        Ok((id, ttl))
    }

    /// Keeps `lease` alive until it is lost or the session stops, campaigning meanwhile.
    fn keep(&self, (lease, ttl): (i64, i64), granted_at: Instant) {
        let margin = Duration::from_millis(LEASE_SAFETY_MARGIN_MS);
        let deadline_after = |sent: Instant, ttl: i64| {
            (sent + Duration::from_secs(ttl.max(0) as u64))
                .checked_sub(margin)
                .unwrap_or(sent)
        };
        let mut valid_until = deadline_after(granted_at, ttl);
        let mut epoch = None;
        loop {
            if epoch.is_none() && Instant::now() < valid_until {
                match self.campaign(lease) {
                    Ok(e) => epoch = e,
                    Err(e) => tracing::debug!("etcd session: campaign: {e}"),
                }
            }
            self.set_view(epoch, valid_until);
            self.pause(Duration::from_millis(LEASE_KEEPALIVE_MS));
            if self.stop.load(Ordering::Relaxed) {
                return;
            }
            let sent = Instant::now();
            match self.etcd.lease_keepalive(lease) {
                Ok(0) => {
                    tracing::warn!("etcd session: lease {lease} expired; starting a new one");
                    self.set_view(None, Instant::now());
                    return;
                }
                Ok(ttl) => valid_until = deadline_after(sent, ttl),
                Err(e) => {
                    tracing::warn!("etcd session: keep-alive failed: {e}");
                    if Instant::now() >= valid_until {
                        epoch = None;
                    }
                }
            }
        }
    }

    /// Tries to create the leader key on `lease`; the epoch if this server holds it.
    fn campaign(&self, lease: i64) -> EtcdResult<Option<u64>> {
        let key = self.keys.leader();
        let t = self.etcd.txn(
            &[Compare::CreateRevision(key.clone(), 0)],
            &[Op::Put {
                key: key.clone(),
                value: self.record.server_uuid.to_string().into_bytes(),
                lease,
            }],
            &[Op::Range(Range::key(&key))],
        )?;
        if t.succeeded {
            return Ok(Some(t.revision as u64));
        }
        // Ours already (a retried campaign that had landed)?
        Ok(match t.responses.first() {
            Some(OpResult::Range(r)) => r
                .kvs
                .first()
                .filter(|kv| kv.lease == lease)
                .map(|kv| kv.create_revision as u64),
            _ => None,
        })
    }
}

/// Which servers hold a liveness key now (by uuid), with their records.
pub fn alive_servers(etcd: &EtcdClient, keys: &Keys) -> EtcdResult<Vec<AliveRecord>> {
    let r = etcd.range(&Range::prefix(&keys.alive_prefix()))?;
    Ok(r.kvs
        .iter()
        .filter_map(|kv| serde_json::from_slice(&kv.value).ok())
        .collect())
}
