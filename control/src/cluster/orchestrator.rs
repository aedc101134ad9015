//! The leader's orchestrator: runs on every server, acts only while this server leads (an
//! epoch from its session whose lease deadline has not passed). Each pass:
//!
//! 1. records the election (`LeaderElected` with its epoch) if the journal names another;
//! 2. records server health: a registered server without a liveness key is `Failed`, one
//!    with a key again recovers (a server created through the API and not joined yet has
//!    no health);
//! 3. fails volumes over: a volume whose primary's server failed gets an in-sync replica
//!    on a live server as its primary (`PromoteReplica`, a new volume epoch); one whose
//!    primary's server was disabled is handed over the same way, planned: the new primary
//!    serves once the old one confirmed it stopped (`ReleasePrimary`);
//! 4. evicts the servers disabled with `evictData`: orders the next replica moves off each
//!    (`MoveReplica`, planned by `domain::eviction::plan`: a new out-of-sync copy elsewhere,
//!    which the primary's agent rebuilds; the old copy leaves once the new one is in sync),
//!    cancels moves whose target's server failed or was disabled (`CancelReplicaMove`),
//!    records `CompleteEviction` once a server holds no copy, and `FailEviction` once
//!    none moved for `EvictionNoProgressTimeout` ([`eviction_clock`]); node replacements
//!    (`ReplaceNode`) run the same way with a fixed target (`domain::replace::plan`) and
//!    end with `CompleteNodeReplacement`;
//! 5. now and then trims the etcd log to its last [`ClusterConfig::tail_batches`] batches
//!    and compacts etcd's history up to that point.
//!
//! Every append here is fenced: the writer's etcd transaction compares the leader key's
//! create revision with the epoch, and `decide` refuses an epoch other than the recorded
//! leader's. A refused append means another server leads: this one steps down until its
//! session wins a new epoch. Data-plane work is not here: each server's agent (the
//! reconciler) does its own volumes' steps.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use uuid::Uuid;

use super::etcd::{Compare, EtcdClient, Op, Range};
use super::session::{alive_servers, LeaderView};
use super::Keys;
use crate::domain::cluster::Command as ClusterCommand;
use crate::domain::config::parse_go_duration_secs;
use crate::domain::eviction;
use crate::domain::inventory::{Command as InventoryCommand, ServerState};
use crate::domain::replace;
use crate::domain::volume::{failover_target, Command as VolumeCommand};
use crate::domain::{Command, DomainError};
use crate::error::ControlError;
use crate::limits::{LOG_TRIM_INTERVAL_MS, ORCHESTRATOR_TICK_MS};
use crate::store::{Bus, RequestMeta};

/// What the orchestrator needs.
pub struct Orchestrator {
    pub etcd: EtcdClient,
    pub keys: Keys,
    pub bus: Bus,
    pub runtime: tokio::runtime::Handle,
    pub view: Arc<Mutex<LeaderView>>,
    pub server_uuid: Uuid,
    pub tail_batches: u64,
    pub stop: Arc<AtomicBool>,
    /// Test failpoint `orchestrator-ignore-lease`: act on an epoch even past its lease
    /// deadline, as a leader whose clock misled it would (only fencing stops it then).
    pub ignore_lease: bool,
    /// Per evicting server: the copies it held when this leader last saw the number change,
    /// and when. Leader-local: a new leader starts the clock again (an eviction fails
    /// later, never sooner, than `EvictionNoProgressTimeout`).
    pub eviction_progress: Mutex<HashMap<Uuid, Progress>>,
}

/// Copies an evicting server held, and since when.
pub type Progress = (usize, Instant);

/// An eviction's progress clock after a pass that found `remaining` copies on the server:
/// the clock restarts when the number changed, and the eviction fails once it stood still
/// for longer than `timeout` (`None`: it never fails).
pub fn eviction_clock(
    last: Option<Progress>,
    remaining: usize,
    now: Instant,
    timeout: Option<Duration>,
) -> (Progress, bool) {
    match last {
        Some((n, since)) if n == remaining => {
            let stuck = timeout.is_some_and(|t| now.saturating_duration_since(since) > t);
            ((n, since), stuck)
        }
        _ => ((remaining, now), false),
    }
}

/// Why a pass ended early.
enum Stop {
    /// Another epoch leads: an append was fenced or refused as stale.
    Deposed(String),
    /// Anything else (etcd unreachable, …): try again next pass.
    Retry(String),
}

impl From<ControlError> for Stop {
    fn from(e: ControlError) -> Stop {
        match e {
            ControlError::Fenced(m) | ControlError::Domain(DomainError::StaleEpoch(m)) => {
                Stop::Deposed(m)
            }
            other => Stop::Retry(other.to_string()),
        }
    }
}

impl Orchestrator {
    pub fn spawn(self) -> std::io::Result<std::thread::JoinHandle<()>> {
        std::thread::Builder::new()
            .name("orchestrator".into())
            .spawn(move || self.run())
    }

    fn run(self) {
        let mut leading: Option<u64> = None;
        let mut deposed: Option<u64> = None;
        let mut last_trim = Instant::now();
        while !self.stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(ORCHESTRATOR_TICK_MS));
            let view = *self.view.lock().unwrap_or_else(|p| p.into_inner());
            let epoch = if self.ignore_lease {
                view.epoch.or(leading)
            } else {
                view.acting_epoch(Instant::now())
            };
            let epoch = epoch.filter(|e| deposed != Some(*e));
            let Some(epoch) = epoch else {
                if let Some(old) = leading.take() {
                    tracing::warn!(
                        "orchestrator: stepping down (epoch {old}): the lease may have expired"
                    );
                }
                continue;
            };
            if leading != Some(epoch) {
                tracing::warn!("orchestrator: leading the cluster as epoch {epoch}");
                leading = Some(epoch);
            }
            let trim = last_trim.elapsed() >= Duration::from_millis(LOG_TRIM_INTERVAL_MS);
            match self.pass(epoch, trim) {
                Ok(()) => {
                    if trim {
                        last_trim = Instant::now();
                    }
                }
                Err(Stop::Deposed(why)) => {
                    tracing::warn!(
                        "orchestrator: append refused, epoch {epoch} no longer leads ({why}); \
                         stepping down"
                    );
                    deposed = Some(epoch);
                    leading = None;
                }
                Err(Stop::Retry(why)) => tracing::info!("orchestrator: pass incomplete: {why}"),
            }
        }
    }

    fn submit(&self, what: &str, epoch: u64, command: Command) -> Result<(), Stop> {
        let meta = RequestMeta::system(&format!("orchestrator epoch {epoch}: {what}"));
        self.runtime
            .block_on(self.bus.submit_fenced(meta, command, epoch))
            .map(|_| ())
            .map_err(Stop::from)
    }

    fn pass(&self, epoch: u64, trim: bool) -> Result<(), Stop> {
        let (initialized, recorded) = {
            let s = self.bus.state();
            (s.cluster.initialized, s.cluster.leader_epoch)
        };
        if !initialized {
            return Ok(());
        }
        if recorded != epoch {
            let cmd = Command::Cluster(ClusterCommand::RecordLeader {
                server_uuid: self.server_uuid,
                epoch,
            });
            self.submit("leader elected", epoch, cmd)?;
        }
        self.record_health(epoch)?;
        self.fail_over(epoch)?;
        self.evict(epoch)?;
        if trim {
            self.trim(epoch)?;
        }
        Ok(())
    }

    /// Promotes an in-sync replica of every volume whose primary's server failed.
    fn fail_over(&self, epoch: u64) -> Result<(), Stop> {
        let moves: Vec<(Uuid, Uuid, bool)> = {
            let state = self.bus.state();
            state
                .volumes
                .by_uuid
                .values()
                .filter_map(|v| failover_target(&state, v).map(|(n, p)| (v.uuid, n, p)))
                .collect()
        };
        for (uuid, node, planned) in moves {
            tracing::warn!(volume = %uuid, %node, planned, "moving the volume's primary");
            let cmd = Command::Volume(VolumeCommand::PromoteReplica {
                uuid,
                node,
                leader_epoch: epoch,
                planned,
            });
            self.submit("fail over", epoch, cmd)?;
        }
        Ok(())
    }

    /// Orders the next replica moves off every server being evicted, and completes the
    /// evictions of servers that hold no copy any more. A copy with nowhere to go waits
    /// (the server's `LastEviction` says why) and is looked at again next pass.
    fn evict(&self, epoch: u64) -> Result<(), Stop> {
        let (moves, cancels, done, replaced, failed) = {
            let state = self.bus.state();
            let (mut moves, mut cancels, mut done) = (Vec::new(), Vec::new(), Vec::new());
            let timeout = state
                .config
                .value(&state, "EvictionNoProgressTimeout")
                .and_then(|t| parse_go_duration_secs(&t))
                .filter(|s| *s > 0)
                .map(Duration::from_secs);
            let mut clocks = self
                .eviction_progress
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            clocks.retain(|u, _| state.inventory.servers.get(u).is_some_and(|s| s.evicting()));
            let mut failed = Vec::new();
            for s in state.inventory.servers.values().filter(|s| s.evicting()) {
                let plan = eviction::plan(&state, s.uuid);
                if plan.remaining == 0 {
                    done.push(s.uuid);
                }
                let last = clocks.get(&s.uuid).copied();
                let (clock, stuck) = eviction_clock(last, plan.remaining, Instant::now(), timeout);
                clocks.insert(s.uuid, clock);
                if stuck && plan.remaining > 0 {
                    failed.push((s.uuid, plan.stalled.join("; ")));
                    continue;
                }
                moves.extend(plan.moves);
                cancels.extend(plan.cancels);
            }
            let mut replaced = Vec::new();
            for (src, _) in state.inventory.roles.iter().filter(|(_, r)| r.replacing()) {
                let plan = replace::plan(&state, *src);
                if plan.remaining == 0 {
                    replaced.push(*src);
                }
                moves.extend(plan.moves);
                cancels.extend(plan.cancels);
            }
            (moves, cancels, done, replaced, failed)
        };
        for (uuid, why) in failed {
            tracing::warn!(server = %uuid, "eviction failed: no copy moved within EvictionNoProgressTimeout ({why})");
            let cmd = Command::Inventory(InventoryCommand::FailEviction {
                uuid,
                leader_epoch: epoch,
            });
            self.submit("eviction failed", epoch, cmd)?;
        }
        for (uuid, node) in cancels {
            tracing::warn!(volume = %uuid, %node, "cancelling a replica move: its target left");
            let cmd = Command::Volume(VolumeCommand::CancelReplicaMove {
                uuid,
                node,
                leader_epoch: epoch,
            });
            self.submit("cancel replica move", epoch, cmd)?;
        }
        for m in moves {
            tracing::warn!(volume = %m.volume, from = %m.from, to = %m.to, "moving a replica");
            let cmd = Command::Volume(VolumeCommand::MoveReplica {
                uuid: m.volume,
                from: m.from,
                to: m.to,
                leader_epoch: epoch,
            });
            self.submit("move replica", epoch, cmd)?;
        }
        for uuid in done {
            tracing::warn!(server = %uuid, "eviction complete");
            let cmd = Command::Inventory(InventoryCommand::CompleteEviction {
                uuid,
                leader_epoch: epoch,
            });
            self.submit("eviction complete", epoch, cmd)?;
        }
        for src in replaced {
            tracing::warn!(node = %src, "node replacement complete");
            let cmd = Command::Inventory(InventoryCommand::CompleteNodeReplacement {
                src,
                leader_epoch: epoch,
            });
            self.submit("node replacement complete", epoch, cmd)?;
        }
        Ok(())
    }

    fn record_health(&self, epoch: u64) -> Result<(), Stop> {
        let alive: BTreeSet<Uuid> = alive_servers(&self.etcd, &self.keys)
            .map_err(|e| Stop::Retry(e.to_string()))?
            .into_iter()
            .map(|r| r.server_uuid)
            .collect();
        let changes: Vec<(Uuid, bool)> = self
            .bus
            .state()
            .inventory
            .servers
            .values()
            // A server created through the API has no process (nor liveness) yet.
            .filter(|s| s.state != ServerState::Creating)
            .filter(|s| s.failed == alive.contains(&s.uuid))
            .map(|s| (s.uuid, !s.failed))
            .collect();
        for (uuid, was_alive) in changes {
            let alive = !was_alive;
            let cmd =
                Command::Inventory(InventoryCommand::RecordServerHealth { uuid, alive, epoch });
            let what = if alive {
                "server recovered"
            } else {
                "server failed"
            };
            self.submit(what, epoch, cmd)?;
        }
        Ok(())
    }

    /// Deletes log batches older than the tail and compacts etcd's history; fenced like
    /// appends, so a deposed leader deletes nothing.
    fn trim(&self, epoch: u64) -> Result<(), Stop> {
        let prefix = self.keys.log_prefix();
        let mut r = Range::prefix(&prefix);
        r.keys_only = true;
        r.descending = true;
        r.limit = self.tail_batches as i64 + 1;
        let found = self
            .etcd
            .range(&r)
            .map_err(|e| Stop::Retry(e.to_string()))?;
        if (found.kvs.len() as u64) <= self.tail_batches {
            return Ok(());
        }
        let Some(newest_trimmed) = found.kvs.last() else {
            return Ok(());
        };
        let mut end = newest_trimmed.key.clone();
        end.push(0); // every batch up to and including the newest one past the tail
        let t = self
            .etcd
            .txn(
                &[Compare::CreateRevision(self.keys.leader(), epoch as i64)],
                &[Op::Delete {
                    key: prefix,
                    range_end: end,
                }],
                &[],
            )
            .map_err(|e| Stop::Retry(e.to_string()))?;
        if !t.succeeded {
            return Err(Stop::Deposed("the leader key has another epoch".into()));
        }
        if let Err(e) = self.etcd.compact(t.revision) {
            tracing::info!("orchestrator: compacting etcd at {}: {e}", t.revision);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_eviction_fails_only_after_standing_still_past_the_timeout() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let timeout = Some(s(10));
        // First look: the clock starts.
        let (c, stuck) = eviction_clock(None, 5, t0, timeout);
        assert_eq!((c, stuck), ((5, t0), false));
        // Same count, within the timeout: keeps its start.
        let (c, stuck) = eviction_clock(Some(c), 5, t0 + s(9), timeout);
        assert_eq!((c, stuck), ((5, t0), false));
        // A copy left: the clock starts again.
        let (c, stuck) = eviction_clock(Some(c), 4, t0 + s(11), timeout);
        assert_eq!((c, stuck), ((4, t0 + s(11)), false));
        // Standing still past the timeout: failed.
        assert!(eviction_clock(Some(c), 4, t0 + s(22), timeout).1);
        // No timeout configured (0): never.
        assert!(!eviction_clock(Some(c), 4, t0 + s(10_000), None).1);
    }
}
