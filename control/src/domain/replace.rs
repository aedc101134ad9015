//! Node replacement (`ReplaceNode`): every copy a node holds moves to one other node,
//! make-before-break, by the eviction machinery (`eviction::plan_moves` with a fixed
//! target; the leader orders `MoveReplica`, the primary's agent rebuilds the new copy, the
//! old copy leaves in the decision that records the new one in sync, and a primary on the
//! node is handed over to its new copy once that is in sync).
//!
//! LightOS replaces an `Inactive` node (its server disabled or failed) by an `Unattached`
//! one; replacing an active node needs `ReplaceWhileActive`. evstor follows that: the source
//! is *active* while its server is enabled and live, and a replacement of an active node
//! without the flag is refused (400: the reference's "source and target nodes are not in
//! the correct states"; 409 is for a replacement already running on either node). The target is a node of another server that is
//! enabled and live and holds no copy of the volumes it is to take (an `Unattached` node,
//! or any attached one). While the replacement runs the source is `Detaching` and takes
//! no new copies, the target `Attaching`; once the source holds nothing it is
//! `Unattached` (placement leaves it alone; it can be the target of a later replacement).
//!
//! Kept apart from `Node`, whose stored row shape other code relies on: a node's role
//! ([`NodeRole`]) is its own projection row.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::eviction::{self, Eviction, EvictionStatus};
use super::inventory::{Event, Inventory, Node, Server, ServerState};
use super::names::check_etag;
use super::{Applied, DomainError, Event as AnyEvent, RowKey, State};

/// A node's replacement by `target`; `progress` counts the copies leaving the source
/// (`Evicting` while it runs, `Completed` once the source holds none).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeReplacement {
    pub target: Uuid,
    pub progress: Eviction,
}

/// What a node is for placement, beyond its registration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRole {
    /// Holds no data and gets none by placement or eviction: a replaced node, or the node
    /// of a server created without `extendCluster`. Only a replacement attaches it.
    pub unattached: bool,
    /// Its last (or running) replacement, as the source.
    pub replacement: Option<NodeReplacement>,
}

impl NodeRole {
    /// A replacement of this node is running.
    pub fn replacing(&self) -> bool {
        self.replacement
            .as_ref()
            .is_some_and(|r| r.progress.running())
    }
}

impl Inventory {
    /// The role of a node (the default for nodes nothing was recorded of).
    pub fn role(&self, node: Uuid) -> NodeRole {
        self.roles.get(&node).cloned().unwrap_or_default()
    }

    /// The running replacement whose target is `node`, by its source.
    pub fn replaced_by(&self, node: Uuid) -> Option<Uuid> {
        self.roles
            .iter()
            .find(|(_, r)| {
                r.replacing() && r.replacement.as_ref().is_some_and(|x| x.target == node)
            })
            .map(|(src, _)| *src)
    }

    /// Placement and evictions may put new copies on `node`: it is attached and not being
    /// replaced.
    pub fn takes_new_copies(&self, node: Uuid) -> bool {
        self.roles
            .get(&node)
            .is_none_or(|r| !r.unattached && !r.replacing())
    }
}

/// A node is active while its server is enabled and live.
fn active(server: &Server) -> bool {
    server.state == ServerState::Enabled && !server.failed
}

fn node(state: &State, uuid: Uuid) -> Result<&Node, DomainError> {
    state
        .inventory
        .nodes
        .get(&uuid)
        .ok_or_else(|| DomainError::not_found("node", uuid))
}

fn server_of<'a>(state: &'a State, n: &Node) -> Result<&'a Server, DomainError> {
    state
        .inventory
        .servers
        .get(&n.server_uuid)
        .ok_or_else(|| DomainError::not_found("server", n.server_uuid))
}

/// `ReplaceNode`: checks the two nodes (see the module doc) and starts the replacement;
/// a source holding nothing is replaced at once.
pub fn start(
    state: &State,
    src: Uuid,
    target: Uuid,
    if_match: &Option<String>,
    while_active: bool,
) -> Result<Vec<AnyEvent>, DomainError> {
    let (s, t) = (node(state, src)?, node(state, target)?);
    check_etag("node", src, s.etag, if_match)?;
    if src == target {
        return Err(DomainError::InvalidArgument(format!(
            "node {src} cannot replace itself"
        )));
    }
    if s.server_uuid == t.server_uuid {
        return Err(DomainError::InvalidArgument(format!(
            "node {target} runs on the same server as node {src}; the target must be a node of \
             another server"
        )));
    }
    let inv = &state.inventory;
    for n in [src, target] {
        if inv.role(n).replacing() || inv.replaced_by(n).is_some() {
            return Err(DomainError::Conflict(format!(
                "node {n} is already part of a running node replacement"
            )));
        }
    }
    if !while_active && active(server_of(state, s)?) {
        return Err(DomainError::FailedPrecondition(format!(
            "node {src} is active (its server is enabled and live): disable its server first, \
             or set ReplaceWhileActive"
        )));
    }
    check_target(state, src, t)?;
    let copies = eviction::copies_on(state, &[src]).count();
    let mut events = vec![AnyEvent::Inventory(Event::NodeReplacementStarted {
        src,
        target,
        copies: u32::try_from(copies).unwrap_or(u32::MAX),
    })];
    if copies == 0 {
        events.push(AnyEvent::Inventory(Event::NodeReplacementCompleted { src }));
    }
    Ok(events)
}

/// The target must be able to take every copy of the source: an enabled, live server,
/// and no copy of those volumes already.
fn check_target(state: &State, src: Uuid, t: &Node) -> Result<(), DomainError> {
    let server = server_of(state, t)?;
    if !active(server) {
        return Err(DomainError::FailedPrecondition(format!(
            "node {} cannot take copies: its server {} is not enabled and live",
            t.uuid, server.name
        )));
    }
    let target_nodes = eviction::nodes_of(state, server.uuid);
    if let Some(v) =
        eviction::copies_on(state, &[src]).find(|v| v.nodes().any(|n| target_nodes.contains(&n)))
    {
        return Err(DomainError::FailedPrecondition(format!(
            "node {} cannot take the copy of volume {} ({}): its server holds one already",
            t.uuid, v.name, v.uuid
        )));
    }
    Ok(())
}

/// Leader (at `leader_epoch`): the source of a running replacement holds no copy any more.
pub fn complete(state: &State, src: Uuid, leader_epoch: u64) -> Result<Vec<AnyEvent>, DomainError> {
    super::cluster::check_epoch(state, leader_epoch)?;
    let running = state.inventory.role(src).replacing();
    let empty = eviction::copies_on(state, &[src]).next().is_none();
    Ok(if running && empty {
        vec![AnyEvent::Inventory(Event::NodeReplacementCompleted { src })]
    } else {
        vec![]
    })
}

/// The next steps of the running replacement of `src` (nothing if none runs).
pub fn plan(state: &State, src: Uuid) -> eviction::Plan {
    match &state.inventory.role(src).replacement {
        Some(r) if r.progress.running() => eviction::plan_moves(state, &[src], Some(r.target)),
        _ => eviction::Plan::default(),
    }
}

/// Applies the replacement events: the roles of both nodes, and the source's ETag.
pub fn evolve(state: &mut State, at: Applied, event: &Event) -> Vec<RowKey> {
    let inv = &mut state.inventory;
    match event {
        Event::NodeReplacementStarted {
            src,
            target,
            copies,
        } => {
            inv.roles.entry(*target).or_default().unattached = false;
            inv.roles.entry(*src).or_default().replacement = Some(NodeReplacement {
                target: *target,
                progress: Eviction {
                    status: EvictionStatus::Evicting,
                    start_unix_ns: at.time_unix_ns,
                    end_unix_ns: 0,
                    copies_at_start: *copies,
                },
            });
            touch(inv, *src, at);
            vec![
                RowKey::NodeRole(*src),
                RowKey::NodeRole(*target),
                RowKey::Node(*src),
            ]
        }
        Event::NodeReplacementCompleted { src } => {
            let role = inv.roles.entry(*src).or_default();
            role.unattached = true;
            let r = role
                .replacement
                .as_mut()
                .expect("invariant: a node replacement completes only after it started");
            r.progress.status = EvictionStatus::Completed;
            r.progress.end_unix_ns = at.time_unix_ns;
            touch(inv, *src, at);
            vec![RowKey::NodeRole(*src), RowKey::Node(*src)]
        }
        _ => unreachable!("replace::evolve handles node replacement events only"),
    }
}

fn touch(inv: &mut Inventory, node: Uuid, at: Applied) {
    if let Some(n) = inv.nodes.get_mut(&node) {
        n.etag = at.seq;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::inventory::tests::{
        available_volume, disable, enable, four_servers, in_sync, leader, move_cmd, run, server_of,
        types,
    };
    use crate::domain::inventory::Command;
    use crate::domain::volume::{failover_target, Command as VolumeCommand, ProtectionState};
    use crate::domain::Command as AnyCommand;

    fn replace(src: Uuid, target: Uuid, if_match: Option<&str>, while_active: bool) -> AnyCommand {
        AnyCommand::Inventory(Command::ReplaceNode {
            src,
            target,
            if_match: if_match.map(str::to_string),
            while_active,
        })
    }

    fn complete(src: Uuid, leader_epoch: u64) -> AnyCommand {
        AnyCommand::Inventory(Command::CompleteNodeReplacement { src, leader_epoch })
    }

    fn node_of(state: &State, server: Uuid) -> Uuid {
        state.inventory.node_of(server).unwrap().uuid
    }

    /// A node none of `volumes`' copies is on.
    fn free_node(state: &State, volumes: &[Uuid]) -> Uuid {
        let used: Vec<Uuid> = volumes
            .iter()
            .flat_map(|v| state.volumes.get(*v).unwrap().nodes().collect::<Vec<_>>())
            .collect();
        *state
            .inventory
            .nodes
            .keys()
            .find(|n| !used.contains(n))
            .unwrap()
    }

    #[test]
    fn a_replacement_is_refused_for_unknown_or_unusable_nodes_and_an_active_source() {
        let mut s = four_servers();
        leader(&mut s, 7);
        let v = available_volume(&mut s, "two", 2, 1);
        let (primary, src) = (v.node_uuid, v.replica_nodes[0]);
        let target = free_node(&s, &[v.uuid]);
        let unknown = Uuid::from_u128(999);
        let err = |s: &mut State, cmd| run(s, cmd).unwrap_err();
        assert!(matches!(
            err(&mut s, replace(unknown, target, None, true)),
            DomainError::NotFound(_)
        ));
        assert!(matches!(
            err(&mut s, replace(src, unknown, None, true)),
            DomainError::NotFound(_)
        ));
        assert!(matches!(
            err(&mut s, replace(src, src, None, true)),
            DomainError::InvalidArgument(_)
        ));
        // The primary's node holds a copy of `two` already.
        assert!(matches!(
            err(&mut s, replace(src, primary, None, true)),
            DomainError::FailedPrecondition(m) if m.contains("two")
        ));
        // Active source: only with ReplaceWhileActive.
        assert!(matches!(
            err(&mut s, replace(src, target, None, false)),
            DomainError::FailedPrecondition(m) if m.contains("ReplaceWhileActive")
        ));
        let etag = s.inventory.nodes[&src].etag;
        assert!(matches!(
            err(&mut s, replace(src, target, Some("1"), true)),
            DomainError::EtagMismatch(_)
        ));
        // A target whose server is disabled cannot take copies.
        let t_server = server_of(&s, target);
        run(&mut s, disable(t_server, false, false)).unwrap();
        assert!(matches!(
            err(&mut s, replace(src, target, None, true)),
            DomainError::FailedPrecondition(_)
        ));
        run(&mut s, enable(t_server)).unwrap();
        assert_eq!(
            s.inventory.nodes[&src].etag, etag,
            "refusals change nothing"
        );
        let started = run(&mut s, replace(src, target, Some(&etag.to_string()), true)).unwrap();
        assert_eq!(types(&started), ["NodeReplacementStarted"]);
        assert_ne!(s.inventory.nodes[&src].etag, etag);
        // Either node is now busy.
        let other = free_node(&s, &[v.uuid]);
        let other = if other == target {
            *s.inventory
                .nodes
                .keys()
                .find(|n| ![src, target, primary].contains(n))
                .unwrap()
        } else {
            other
        };
        assert!(matches!(
            err(&mut s, replace(src, other, None, true)),
            DomainError::Conflict(_)
        ));
        assert!(matches!(
            err(&mut s, replace(target, other, None, true)),
            DomainError::Conflict(_)
        ));
        // A disabled source is inactive: no flag needed.
        let p_server = server_of(&s, primary);
        run(&mut s, disable(p_server, true, false)).unwrap();
        let r = run(&mut s, replace(primary, other, None, false));
        assert!(r.is_ok(), "{r:?}");
    }

    #[test]
    fn a_replacement_moves_every_copy_to_the_target_make_before_break() {
        let mut s = four_servers();
        leader(&mut s, 7);
        let two = available_volume(&mut s, "two", 2, 1);
        let (primary, src) = (two.node_uuid, two.replica_nodes[0]);
        // `one` goes to src's server too: the others are disabled meanwhile.
        let src_server = server_of(&s, src);
        let others: Vec<Uuid> = s
            .inventory
            .servers
            .keys()
            .copied()
            .filter(|u| *u != src_server)
            .collect();
        for u in &others {
            run(&mut s, disable(*u, true, false)).unwrap();
        }
        let one = available_volume(&mut s, "one", 1, 2);
        assert_eq!(one.node_uuid, src);
        for u in &others {
            run(&mut s, enable(*u)).unwrap();
        }
        let target = free_node(&s, &[two.uuid, one.uuid]);
        let started = run(&mut s, replace(src, target, None, true)).unwrap();
        assert_eq!(
            started,
            [AnyEvent::Inventory(Event::NodeReplacementStarted {
                src,
                target,
                copies: 2
            })]
        );
        assert!(!s.inventory.takes_new_copies(src));
        assert_eq!(s.inventory.replaced_by(target), Some(src));
        // Both copies move to the target: the replica, and the primary (its server is
        // enabled, so no hand-over to another copy comes first).
        let p = plan(&s, src);
        assert_eq!((p.remaining, p.moves.len()), (2, 2), "{p:?}");
        assert!(
            p.moves.iter().all(|m| m.from == src && m.to == target),
            "{p:?}"
        );
        for m in p.moves {
            assert_eq!(
                types(&run(&mut s, move_cmd(m, 7)).unwrap()),
                ["VolumeReplicaAdded"]
            );
        }
        assert!(plan(&s, src).moves.is_empty(), "one move per volume");
        assert!(
            run(&mut s, complete(src, 7)).unwrap().is_empty(),
            "copies remain"
        );
        let cmd = in_sync(&s, two.uuid, target);
        assert_eq!(
            types(&run(&mut s, cmd).unwrap()),
            ["VolumeReplicaInSync", "VolumeReplicaRemoved"]
        );
        let after = s.volumes.get(two.uuid).unwrap();
        assert_eq!(after.nodes().collect::<Vec<_>>(), [primary, target]);
        assert_eq!(after.protection, ProtectionState::FullyProtected);
        // The primary: in sync, then handed over to its new copy although its server is
        // enabled.
        let cmd = in_sync(&s, one.uuid, target);
        assert_eq!(types(&run(&mut s, cmd).unwrap()), ["VolumeReplicaInSync"]);
        let vol = s.volumes.get(one.uuid).unwrap().clone();
        assert_eq!(failover_target(&s, &vol), Some((target, true)));
        let promote = VolumeCommand::PromoteReplica {
            uuid: one.uuid,
            node: target,
            leader_epoch: 7,
            planned: true,
        };
        assert_eq!(
            types(&run(&mut s, AnyCommand::Volume(promote)).unwrap()),
            ["VolumePrimaryHandedOver", "VolumeReplicaRemoved"]
        );
        assert_eq!(
            s.volumes.get(one.uuid).unwrap().nodes().collect::<Vec<_>>(),
            [target]
        );
        assert_eq!(plan(&s, src).remaining, 0);
        assert!(matches!(
            run(&mut s, complete(src, 6)),
            Err(DomainError::StaleEpoch(_))
        ));
        assert_eq!(
            types(&run(&mut s, complete(src, 7)).unwrap()),
            ["NodeReplacementCompleted"]
        );
        let role = s.inventory.role(src);
        let r = role.replacement.clone().unwrap();
        assert_eq!(
            (r.progress.status, r.progress.progress(0)),
            (EvictionStatus::Completed, 100)
        );
        assert!(role.unattached && !role.replacing());
        assert_eq!(s.inventory.replaced_by(target), None);
        // The replaced node gets no new copies.
        let many = available_volume(&mut s, "three", 3, 3);
        assert!(!many.nodes().any(|n| n == src), "{many:?}");
    }

    #[test]
    fn an_empty_node_is_replaced_at_once_and_an_unattached_node_can_take_over_another() {
        let mut s = four_servers();
        leader(&mut s, 7);
        let v = available_volume(&mut s, "one", 1, 1);
        let empty = free_node(&s, &[v.uuid]);
        let spare = *s
            .inventory
            .nodes
            .keys()
            .find(|n| ![empty, v.node_uuid].contains(n))
            .unwrap();
        let events = run(&mut s, replace(empty, spare, None, true)).unwrap();
        assert_eq!(
            types(&events),
            ["NodeReplacementStarted", "NodeReplacementCompleted"]
        );
        assert!(s.inventory.role(empty).unattached);
        // The unattached node takes the copy of another node and is attached again.
        let holder = server_of(&s, v.node_uuid);
        run(&mut s, disable(holder, true, false)).unwrap();
        run(&mut s, replace(v.node_uuid, empty, None, false)).unwrap();
        assert!(!s.inventory.role(empty).unattached);
        assert_eq!(s.inventory.replaced_by(empty), Some(v.node_uuid));
        assert_eq!(node_of(&s, server_of(&s, empty)), empty);
    }
}
