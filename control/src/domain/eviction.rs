//! Where a server's data is and where it can go: the risk of service loss a server carries,
//! and the plan of an eviction (`DisableServer` with `evictData`). Pure functions of the
//! state: the API shows [`risk`] and an eviction's progress, `decide` refuses what the risk
//! forbids, and the leader's orchestrator turns a [`plan`] into fenced `MoveReplica` and
//! `CompleteEviction` commands.
//!
//! Terms: a volume's copies are its primary and its replicas; a copy is *in sync* when it
//! is the primary or a replica not recorded out of sync; a node is *live* when the leader
//! does not hold its server failed. Volumes being deleted do not count.
//!
//! Risk of service loss, for a server whose node holds copies:
//!
//! - `SourceOfRiskOfServiceLoss`: it holds an in-sync copy of a volume and no live node of
//!   another server does (taking it down stops the volume, or loses its data).
//! - `InRiskOfServiceLoss`: not a source, but it holds an in-sync copy of a volume that
//!   has fewer live in-sync copies than its `replicaCount` (the volume is already short of
//!   copies; one more loss elsewhere would make this server its last copy). An out-of-sync
//!   copy does not count: losing it loses no acknowledged write.
//! - `NoRiskOfServiceLoss` otherwise.
//!
//! An eviction moves every copy on the server's node elsewhere, make-before-break (see
//! `volume`): a replica gets a replacement on an enabled, live node holding no copy of the
//! volume, in a failure domain the volume's other copies do not use when there is one, the
//! least loaded first; a primary is handed over to an in-sync replica on an enabled server
//! (the orchestrator's fail-over), or, when it has none, gets a replacement first and is
//! handed over to it once that is in sync. A volume that is not `Available` waits; one
//! whose copy has nowhere to go is reported (the eviction's `errorMessage`) and tried again
//! on every pass; a move whose new copy's server failed or was disabled is cancelled (the
//! new copy leaves) and starts again elsewhere. The eviction completes when the server
//! holds no copy of any volume. A node replacement (`replace`) plans the same way with a
//! fixed target ([`plan_moves`]).
//! Snapshot copies do not move: a node keeps the ones it holds.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::volume::{failover_target, Volume, VolumeState};
use super::State;
use crate::limits::EVICTION_MOVES_MAX;

/// `ServerEvictionStatus.StatusEnum`, in the API's order. evstor records `Evicting`,
/// `Completed`, `Aborted` (an abort is immediate, so never `Aborting`) and `Failed`: an
/// eviction that cannot progress keeps trying (it says why in its error message) until no
/// copy moved for `EvictionNoProgressTimeout` (the leader's clock, see
/// `cluster::orchestrator::eviction_clock`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum EvictionStatus {
    #[default]
    None,
    Failed,
    Evicting,
    Aborting,
    Completed,
    Aborted,
}

/// A server's last (or running) eviction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Eviction {
    pub status: EvictionStatus,
    pub start_unix_ns: u64,
    /// 0 while it runs.
    pub end_unix_ns: u64,
    /// Copies the server held when it started; progress counts them leaving.
    pub copies_at_start: u32,
}

impl Eviction {
    pub fn running(&self) -> bool {
        self.status == EvictionStatus::Evicting
    }

    /// Percent of the copies held at the start that have left, with `remaining` copies on
    /// the server now (100 once completed).
    pub fn progress(&self, remaining: usize) -> u32 {
        if self.status == EvictionStatus::Completed || self.copies_at_start == 0 {
            return 100;
        }
        let start = u64::from(self.copies_at_start);
        let left = (remaining as u64).min(start);
        ((start - left) * 100 / start) as u32
    }
}

/// `Server.RiskOfServiceLossEnum` as evstor judges it (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Risk {
    No,
    In,
    Source,
}

/// The nodes of a server (one per server today).
pub fn nodes_of(state: &State, server: Uuid) -> Vec<Uuid> {
    state
        .inventory
        .nodes
        .values()
        .filter(|n| n.server_uuid == server)
        .map(|n| n.uuid)
        .collect()
}

fn live(state: &State, node: Uuid) -> bool {
    state.inventory.server_of(node).is_some_and(|s| !s.failed)
}

/// Whether a volume's copies count for risk (its data still matters).
fn counts(v: &Volume) -> bool {
    !matches!(v.state, VolumeState::Deleting | VolumeState::Deleted)
}

/// Whether `nodes` hold an in-sync copy of `v` and no live node outside them does.
pub fn sole_holder(state: &State, v: &Volume, nodes: &[Uuid]) -> bool {
    v.in_sync_copies().any(|n| nodes.contains(&n))
        && !v
            .in_sync_copies()
            .any(|n| !nodes.contains(&n) && live(state, n))
}

/// The risk of taking `server` down, and the volume that makes it so (the first, by id).
pub fn risk(state: &State, server: Uuid) -> (Risk, Option<&Volume>) {
    let nodes = nodes_of(state, server);
    let mut worst = (Risk::No, None);
    for v in state.volumes.by_uuid.values().filter(|v| counts(v)) {
        if !v.in_sync_copies().any(|n| nodes.contains(&n)) {
            continue;
        }
        if sole_holder(state, v, &nodes) {
            return (Risk::Source, Some(v));
        }
        let live_in_sync = v.in_sync_copies().filter(|n| live(state, *n)).count();
        if live_in_sync < v.replica_count as usize && worst.0 == Risk::No {
            worst = (Risk::In, Some(v));
        }
    }
    worst
}

/// Volumes (any state) with a copy on one of `nodes`.
pub fn copies_on<'a>(state: &'a State, nodes: &'a [Uuid]) -> impl Iterator<Item = &'a Volume> {
    state
        .volumes
        .by_uuid
        .values()
        .filter(|v| v.nodes().any(|n| nodes.contains(&n)))
}

/// Copies per node, pending moves' new copies included.
pub fn node_load(state: &State) -> BTreeMap<Uuid, usize> {
    let mut load = BTreeMap::new();
    for n in state.volumes.by_uuid.values().flat_map(Volume::nodes) {
        *load.entry(n).or_default() += 1;
    }
    load
}

/// Where the copy of `v` leaving `from` goes: a node of an enabled, live server holding
/// no copy of `v`, in a failure domain none of `v`'s other copies uses if there is one,
/// then the least loaded (ties by id, so the choice is a pure function of the state).
pub fn replacement_node(
    state: &State,
    v: &Volume,
    from: Uuid,
    load: &BTreeMap<Uuid, usize>,
) -> Option<Uuid> {
    let inv = &state.inventory;
    let holders: BTreeSet<Uuid> = v
        .nodes()
        .filter_map(|n| inv.server_of(n))
        .map(|s| s.uuid)
        .collect();
    let used: BTreeSet<&str> = v
        .nodes()
        .filter(|n| *n != from)
        .filter_map(|n| inv.server_of(n))
        .map(|s| s.domain())
        .collect();
    inv.nodes
        .values()
        .filter_map(|n| inv.servers.get(&n.server_uuid).map(|s| (n, s)))
        .filter(|(n, s)| {
            s.placeable() && inv.takes_new_copies(n.uuid) && !holders.contains(&s.uuid)
        })
        .min_by_key(|(n, s)| {
            (
                used.contains(s.domain()),
                load.get(&n.uuid).copied().unwrap_or(0),
                n.uuid,
            )
        })
        .map(|(n, _)| n.uuid)
}

/// One replica move to order: the copy of `volume` on `from` goes to `to`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Move {
    pub volume: Uuid,
    pub from: Uuid,
    pub to: Uuid,
}

/// What an eviction of a server needs now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Moves to order (at most [`EVICTION_MOVES_MAX`] in flight with the running ones).
    pub moves: Vec<Move>,
    /// Running moves to cancel, (volume, new node): their new copy's server failed or was
    /// disabled, so it would never get in sync.
    pub cancels: Vec<(Uuid, Uuid)>,
    /// Why some copies cannot move now.
    pub stalled: Vec<String>,
    /// Copies still on the server (0: the eviction is complete).
    pub remaining: usize,
}

/// The next steps of evicting `server`'s copies (see the module doc).
pub fn plan(state: &State, server: Uuid) -> Plan {
    plan_moves(state, &nodes_of(state, server), None)
}

/// Whether the copy of `v` may go to `to` (a node replacement's fixed target): its server
/// is enabled and live and holds no copy of `v`.
fn target_takes(state: &State, v: &Volume, to: Uuid) -> bool {
    let inv = &state.inventory;
    let Some(server) = inv.server_of(to) else {
        return false;
    };
    server.placeable()
        && !v
            .nodes()
            .any(|n| inv.server_of(n).is_some_and(|s| s.uuid == server.uuid))
}

/// The next steps of moving every copy on `nodes` away: to `target` when given (a node
/// replacement), else where [`replacement_node`] finds room (an eviction).
pub fn plan_moves(state: &State, nodes: &[Uuid], target: Option<Uuid>) -> Plan {
    let mut load = node_load(state);
    let mut plan = Plan::default();
    let mut in_flight = copies_on(state, nodes)
        .filter(|v| v.replacing.iter().any(|r| nodes.contains(&r.replaces)))
        .count();
    for v in copies_on(state, nodes) {
        plan.remaining += 1;
        let Some(from) = v.nodes().find(|n| nodes.contains(n)) else {
            continue;
        };
        match v.state {
            VolumeState::Available => {}
            VolumeState::Failed => {
                plan.stalled.push(format!(
                    "volume {} ({}) is Failed: its copy cannot be moved",
                    v.name, v.uuid
                ));
                continue;
            }
            // Being created, deleted or rolled back: it is looked at again when settled.
            _ => continue,
        }
        let stuck = v.replacing.iter().filter(|r| {
            r.replaces == from
                && !state
                    .inventory
                    .server_of(r.node)
                    .is_some_and(|s| s.placeable())
        });
        plan.cancels.extend(stuck.map(|r| (v.uuid, r.node)));
        // A move is running, or the primary is about to be handed over to an in-sync
        // replica on an enabled server (then this node is a replica, moved next).
        let handing_over = v.node_uuid == from && failover_target(state, v).is_some();
        if !v.replacing.is_empty() || handing_over || in_flight >= EVICTION_MOVES_MAX {
            continue;
        }
        // Only a live primary can rebuild a new copy; a failed one's copies wait for a
        // fail-over (or for its server).
        if !live(state, v.node_uuid) {
            plan.stalled.push(format!(
                "volume {} ({}) has no live primary to copy from",
                v.name, v.uuid
            ));
            continue;
        }
        let to = match target {
            Some(t) if target_takes(state, v, t) => Some(t),
            Some(t) => {
                plan.stalled.push(format!(
                    "node {t} cannot take the copy of volume {} ({}) now: its server is not \
                     enabled and live, or holds a copy already",
                    v.name, v.uuid
                ));
                continue;
            }
            None => replacement_node(state, v, from, &load),
        };
        match to {
            Some(to) => {
                *load.entry(to).or_default() += 1;
                in_flight += 1;
                plan.moves.push(Move {
                    volume: v.uuid,
                    from,
                    to,
                });
            }
            None => plan.stalled.push(format!(
                "no enabled, live server without a copy of volume {} ({}) can take its copy",
                v.name, v.uuid
            )),
        }
    }
    plan
}
