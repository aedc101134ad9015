//! The control plane's hands on the data path: the node's block store (thin volumes,
//! snapshots, clones, rollback) and the NVMe/TCP target that serves volumes as namespaces.
//! The reconciler calls [`DataPlane`]; the API reads usage and live sessions through
//! [`DataPathView`].
//!
//! Every call is idempotent, so the reconciler can repeat work a crash interrupted: creating
//! an image that exists, or deleting one that is gone, succeeds without change.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use evstor_datapath::blockstore::{
    BlockStore, DeviceSpec, MediaError, PoolStats, StoreError, Usage,
};
use evstor_datapath::limits::{
    ANA_GROUPS_MAX, BLOCK_BYTES, CHANGE_CHUNK_BYTES, CHANGE_LOG_REFRESH_MS, CHANGE_WINDOW_MS,
    MAX_CNTLID, REBUILD_BARRIER_MS, REPLICATION_PORT_OFFSET, SNAPSHOT_DRAIN_MS,
    SNAPSHOT_REPLICA_WAIT_MS,
};
use evstor_datapath::replica::{
    rollback_members, seed_snapshots, snapshot_members, Hooks, Member, Mode, ReplicaHub,
    ReplicaServer, SnapshotHook, StoreSnapshots,
};
use evstor_datapath::{
    Acl, Ana, Backend, Backing, ConnectedHost, NamespaceSpec, QosLimits, Replication, TargetHandle,
};
use uuid::Uuid;

use crate::api::DataPathView;
use crate::domain::inventory::Device;
use crate::domain::policy::QosLimit;
use crate::domain::snapshot::{Snapshot, SnapshotState};
use crate::domain::volume::{Volume, VolumeState, ALLOW_ANY, ALLOW_NONE};
use crate::domain::State;
use crate::reconcile::{DataPlane, Rebuilt};

/// The block store plus (when serving) the NVMe/TCP target.
pub struct VolumeStore {
    store: Arc<BlockStore>,
    target: Option<TargetHandle>,
    /// Cluster mode: this server's node; only volumes whose primary it is are served here.
    node: Option<Uuid>,
    /// The last table handed to the target; publishing is skipped when nothing changed.
    published: Mutex<Vec<NamespaceSpec>>,
    /// Cluster mode: replication of the volumes whose primary this node is, and the
    /// listener for the volumes it is a replica of.
    repl: Option<Repl>,
    /// When the last table withheld a volume this node was promoted to serve (its former
    /// primary's read lease still runs): the soonest moment to publish again.
    publish_again: Mutex<Option<Instant>>,
    /// The snapshots being taken, as of the last publication: a replica takes only those
    /// (one it does not know of yet may be one it would release as unknown).
    creating_snapshots: Arc<RwLock<HashSet<Uuid>>>,
    /// Volumes this process created (their storage, as the primary): no earlier process
    /// served them, so their first publication here reconciles nothing.
    created_here: Mutex<HashSet<Uuid>>,
}

/// This server's side of replication.
struct Repl {
    hub: ReplicaHub,
    server: ReplicaServer,
    /// In-sync replicas of this node's primaries, by (volume, replica node), with the
    /// replica server's address and the epoch published: kept across publications so a
    /// replica that leaves the set is told ([`Member::drop_replica`]).
    members: Mutex<HashMap<(Uuid, Uuid), Published>>,
    /// What was last handed to the listener: (volume, epoch, size, compression, whether
    /// this node is an in-sync replica rather than the primary).
    replicas: Mutex<Vec<ListenerEntry>>,
    /// Volumes this process has seen itself an in-sync replica of, with the newest such
    /// epoch: when it becomes their primary, it saw the switch happen.
    copies: Mutex<HashMap<Uuid, u64>>,
    /// The epoch at which this node last took over each volume as its primary.
    took_over: Mutex<HashMap<Uuid, u64>>,
}

/// A volume as handed to the replication listener: volume, epoch, size, compression, and
/// whether this node is an in-sync replica of it (else its primary).
type ListenerEntry = (Uuid, u64, u64, bool, bool);

/// One replica as published.
struct Published {
    /// Its replica server's address.
    addr: SocketAddr,
    /// The volume's epoch and size it was made for.
    epoch: u64,
    size: u64,
    member: Arc<Member>,
    /// Whether the control plane had it in sync at the last publication.
    recorded_in_sync: bool,
}

impl Published {
    /// The control plane now records the replica `in_sync` or not. A replica it moved out
    /// of sync since the last publication is dropped: it takes no more writes, and those
    /// held for it complete. One it still records out of sync is left alone whatever its
    /// mode: a rebuild that just finished has turned it in sync here, and writes wait for
    /// it from then on, before the control plane records it in sync (dropping it in that
    /// gap would leave a replica the control plane then counts in sync taking no writes).
    fn recorded(&mut self, in_sync: bool) {
        if self.recorded_in_sync && !in_sync {
            self.member.drop_replica();
        }
        self.recorded_in_sync = in_sync;
    }
}

/// For `volume`, which this node was the primary of until now: the time (Unix ms, by the
/// change log's clock) from which its copy may hold changes its in-sync replicas lack, or
/// None if it cannot tell. Each replica accepted every part queued before the newest it
/// accepted (parts go out in queue order), and a write's local change is recorded after
/// its part was queued; retried parts can be out of that order for at most the window a
/// failover reconciles anyway ([`CHANGE_WINDOW_MS`]).
fn deposed_since(repl: &Repl, volume: Uuid) -> Option<u64> {
    let members = repl.members.lock().unwrap_or_else(|p| p.into_inner());
    let ago: Vec<Option<Duration>> = members
        .iter()
        .filter(|((u, _), p)| *u == volume && p.member.state.mode() == Mode::InSync)
        .map(|(_, p)| p.member.state.last_acked_queued_ago())
        .collect();
    // Every in-sync replica must have accepted something.
    if ago.is_empty() || ago.contains(&None) {
        return None;
    }
    let ago_ms = ago.into_iter().flatten().max()?.as_millis() as u64;
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_millis() as u64;
    Some(
        now_ms
            .saturating_sub(ago_ms)
            .saturating_sub(CHANGE_WINDOW_MS + CHANGE_LOG_REFRESH_MS),
    )
}

/// Forgets the `members` that are not in the just published `table`, telling each: a
/// replica that left a volume this node still leads is dropped (the control plane
/// recorded it out of sync, or removed it: what is held for it is no longer owed); the
/// replicas of a volume this node no longer leads are deposed (what is held for them, or
/// still sent to them through the old table, fails as fenced: the new primary may lack it).
fn depart(members: &mut HashMap<(Uuid, Uuid), Published>, table: &[NamespaceSpec]) {
    let mut led: HashSet<[u8; 16]> = HashSet::new();
    let mut live: HashSet<*const Member> = HashSet::new();
    for s in table {
        if let Backing::Image {
            replication: Some(r),
            ..
        } = &s.backing
        {
            led.insert(s.uuid);
            live.extend(r.members.iter().map(Arc::as_ptr));
        }
    }
    members.retain(|(volume, _), p| {
        let m = &p.member;
        let kept = live.contains(&Arc::as_ptr(m));
        if !kept && led.contains(volume.as_bytes()) {
            m.drop_replica();
        } else if !kept {
            m.depose();
        }
        kept
    });
}

/// A replica the primary could not write to, to record out of sync.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaFailure {
    pub volume: Uuid,
    pub node: Uuid,
    /// The volume's epoch the primary wrote under.
    pub epoch: u64,
}

/// The ANA group of the namespaces `node` serves optimized: its server's slot (group 1
/// for a server without one, e.g. a single server).
pub fn ana_group(state: &State, node: Uuid) -> u32 {
    state
        .inventory
        .server_of(node)
        .map_or(1, |s| s.slot)
        .clamp(1, ANA_GROUPS_MAX)
}

/// The controller IDs of the server in `slot`: one disjoint range per slot, so a host
/// connected to several servers of one subsystem never sees an ID twice.
pub fn cntlid_range(slot: u32) -> std::ops::RangeInclusive<u16> {
    let per = (MAX_CNTLID as u32) / ANA_GROUPS_MAX;
    let slot = slot.clamp(1, ANA_GROUPS_MAX);
    let lo = (slot - 1) * per + 1;
    (lo as u16)..=((lo + per - 1) as u16)
}

/// The NVMe/TCP portals of the other nodes (the discovery log lists them after this one).
fn peer_portals(state: &State, node: Option<Uuid>) -> Vec<SocketAddr> {
    let Some(node) = node else {
        return Vec::new();
    };
    state
        .inventory
        .nodes
        .values()
        .filter(|n| n.uuid != node)
        .filter_map(|n| n.nvme_endpoint.parse().ok())
        .collect()
}

/// Where a node's replication listener is: its NVMe/TCP endpoint's address, next port.
pub fn replication_addr(nvme_endpoint: &str) -> Option<SocketAddr> {
    let a: SocketAddr = nvme_endpoint.parse().ok()?;
    let port = a.port().checked_add(REPLICATION_PORT_OFFSET)?;
    Some(SocketAddr::new(a.ip(), port))
}

/// Where the block store keeps its metadata database.
pub fn blockstore_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("blockstore")
}

/// The pool's devices (of `node`, or every device in a one-node cluster) in the order they
/// were added (the pool's address order).
pub fn pool_devices(state: &State, node: Option<Uuid>) -> Vec<DeviceSpec> {
    let mut devices: Vec<&Device> = state
        .inventory
        .devices
        .values()
        .filter(|d| node.is_none_or(|n| d.node_uuid == n))
        .collect();
    devices.sort_by_key(|d| (d.etag, d.path.clone()));
    devices
        .into_iter()
        .map(|d| DeviceSpec {
            path: PathBuf::from(&d.path),
            size_bytes: d.size_bytes,
        })
        .collect()
}

impl VolumeStore {
    /// Opens the block store on the cluster's devices, without a target (control-plane tests).
    pub fn open(data_dir: &Path, state: &State, node: Option<Uuid>) -> anyhow::Result<VolumeStore> {
        let store = BlockStore::open(&blockstore_dir(data_dir), &pool_devices(state, node))?;
        Ok(VolumeStore {
            store,
            target: None,
            node,
            published: Mutex::new(Vec::new()),
            repl: None,
            publish_again: Mutex::new(None),
            creating_snapshots: Arc::default(),
            created_here: Mutex::default(),
        })
    }

    /// As [`VolumeStore::open`], serving volumes through `target`.
    pub fn with_target(
        data_dir: &Path,
        state: &State,
        target: TargetHandle,
        node: Option<Uuid>,
    ) -> anyhow::Result<VolumeStore> {
        let mut s = VolumeStore::open(data_dir, state, node)?;
        s.target = Some(target);
        Ok(s)
    }

    /// Cluster mode: listens for primaries' replicated writes on `listen` and replicates
    /// this node's primaries.
    pub fn start_replication(&mut self, listen: SocketAddr) -> std::io::Result<SocketAddr> {
        let (store, creating) = (self.store.clone(), self.creating_snapshots.clone());
        let snapshots: SnapshotHook = Arc::new(move |volume, snapshot| {
            let snapshot = Uuid::from_bytes(snapshot);
            // The primary asks right after the request was ordered; this node's state may
            // lag a little behind.
            let deadline = Instant::now() + Duration::from_millis(SNAPSHOT_REPLICA_WAIT_MS / 2);
            while !creating
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .contains(&snapshot)
            {
                if Instant::now() >= deadline {
                    return Err(std::io::Error::from_raw_os_error(libc::EAGAIN));
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            store
                .retake_snapshot(Uuid::from_bytes(volume), snapshot)
                .map_err(io_err)
        });
        let store = self.store.clone();
        let rollback: SnapshotHook = Arc::new(move |volume, snapshot| {
            store
                .rollback(Uuid::from_bytes(volume), Uuid::from_bytes(snapshot))
                .map_err(io_err)
        });
        let store = self.store.clone();
        // A snapshot this copy lacked, copied to it by its primary before its rebuild
        // (`replica::seed_snapshots`); it keeps it while it is an out-of-sync replica of
        // the volume, until the rebuild's completion records it as a holder.
        let seed: SnapshotHook = Arc::new(move |volume, snapshot| {
            store
                .retake_snapshot(Uuid::from_bytes(volume), Uuid::from_bytes(snapshot))
                .map_err(io_err)
        });
        let hooks = Hooks {
            snapshot: Some(snapshots),
            rollback: Some(rollback),
            seed: Some(seed),
        };
        let server = ReplicaServer::start_with_hooks(listen, hooks)?;
        let addr = server.local_addr();
        // Links driven by the target's reactor, so a replicated write goes out in the pass
        // that issued it; without a target (tests of the control plane), on a thread.
        let hub = match &self.target {
            Some(t) => ReplicaHub::hosted(t.link_home()),
            None => ReplicaHub::new()?,
        };
        self.repl = Some(Repl {
            hub,
            server,
            members: Mutex::new(HashMap::new()),
            replicas: Mutex::new(Vec::new()),
            copies: Mutex::new(HashMap::new()),
            took_over: Mutex::new(HashMap::new()),
        });
        Ok(addr)
    }

    /// The replication of `v` as this primary publishes it: every replica, the in-sync
    /// ones taking writes, the others marking what they miss until rebuilt.
    fn replication_of(&self, state: &State, v: &Volume) -> Option<Replication> {
        let repl = self.repl.as_ref()?;
        if v.replica_nodes.is_empty() {
            return None;
        }
        let mut members = repl.members.lock().unwrap_or_else(|p| p.into_inner());
        // The first publication of this epoch here: the members made now, before this node
        // serves, see every write from now on. Copies that were current then (in sync, or
        // the deposed primary of a switch this process saw as an in-sync replica) need
        // only what changed around the switch or restart.
        let first_of_epoch = !members
            .iter()
            .any(|((u, _), p)| *u == v.uuid && p.epoch == v.epoch);
        let was_copy = repl
            .copies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&v.uuid)
            .is_some_and(|e| *e < v.epoch);
        // What this copy changed around the switch, when it takes over now. The first
        // publication of an epoch in this process is one too when this process did not see
        // a switch nor create the volume: it is this node's first as the primary since it
        // restarted, and its previous process's last writes may have reached some copies
        // and not others.
        let created = self
            .created_here
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&v.uuid);
        let switch = (first_of_epoch && (was_copy || !created))
            .then(|| self.took_over(repl, v))
            .flatten();
        let mut out = Vec::new();
        for &node in &v.replica_nodes {
            let in_sync = !v.out_of_sync.contains(&node);
            let addr = state
                .inventory
                .nodes
                .get(&node)
                .and_then(|n| replication_addr(&n.nvme_endpoint));
            let Some(addr) = addr else {
                tracing::error!(
                    "replica node {node} of volume {} has no usable endpoint",
                    v.uuid
                );
                continue;
            };
            let key = (v.uuid, node);
            let keep = members
                .get_mut(&key)
                .filter(|p| p.addr == addr && p.epoch == v.epoch && p.size == v.size_bytes);
            let member = match keep {
                Some(p) => {
                    p.recorded(in_sync);
                    p.member.clone()
                }
                None => match repl.hub.link(addr) {
                    Ok(link) => {
                        // The deposed primary was current only at a switch seen here.
                        let current = in_sync || (was_copy && v.deposed == Some(node));
                        let m = if let (Some(changed), true) = (&switch, current) {
                            let m = Member::current(link, v.size_bytes, in_sync);
                            match changed {
                                Some(chunks) => chunks
                                    .iter()
                                    .for_each(|c| m.state.mark(c * CHANGE_CHUNK_BYTES, 1)),
                                None => m.state.mark(0, v.size_bytes),
                            }
                            Arc::new(m)
                        } else {
                            Arc::new(Member::new(link, v.size_bytes, in_sync))
                        };
                        members.insert(
                            key,
                            Published {
                                addr,
                                epoch: v.epoch,
                                size: v.size_bytes,
                                member: m.clone(),
                                recorded_in_sync: in_sync,
                            },
                        );
                        m
                    }
                    Err(e) => {
                        tracing::error!("starting the replica link to {addr}: {e}");
                        continue;
                    }
                },
            };
            out.push(member);
        }
        Some(Replication {
            epoch: v.epoch,
            members: out,
        })
    }

    /// Records that this process made `volume`'s storage.
    fn created(&self, volume: Uuid) {
        let mut c = self.created_here.lock().unwrap_or_else(|p| p.into_inner());
        c.insert(volume);
    }

    /// Takes over `v` at `v.epoch`: the chunks this node's copy changed in the
    /// [`CHANGE_WINDOW_MS`] before its last change as a replica (Some(None) when it cannot
    /// tell). Worked out once per epoch, before this node serves a write of it; None when
    /// that was done already (the members made then are the ones that saw the switch).
    fn took_over(&self, repl: &Repl, v: &Volume) -> Option<Option<Vec<u64>>> {
        let mut took = repl.took_over.lock().unwrap_or_else(|p| p.into_inner());
        if took.get(&v.uuid).is_some_and(|e| *e == v.epoch) {
            return None;
        }
        let since = self
            .store
            .last_change_ms(v.uuid)
            .map(|at| at.saturating_sub(CHANGE_WINDOW_MS + CHANGE_LOG_REFRESH_MS));
        took.insert(v.uuid, v.epoch);
        Some(since.and_then(|t| self.store.changed_since(v.uuid, t)))
    }

    /// The replicas of `volume` (a primary of this node) that take its writes now, by
    /// node, with the epoch they were published under.
    fn in_sync_members(&self, volume: Uuid) -> (u64, Vec<(Uuid, Arc<Member>)>) {
        let Some(repl) = &self.repl else {
            return (0, Vec::new());
        };
        let members = repl.members.lock().unwrap_or_else(|p| p.into_inner());
        let mut epoch = 0;
        let mut out = Vec::new();
        for ((v, node), p) in members.iter() {
            if *v == volume && p.member.state.mode() == Mode::InSync {
                epoch = p.epoch;
                out.push((*node, p.member.clone()));
            }
        }
        out.sort_by_key(|(n, _)| *n);
        (epoch, out)
    }

    /// Tells members that left every published volume's in-sync set ([`depart`]).
    fn drop_departed(&self, table: &[NamespaceSpec]) {
        if let Some(repl) = &self.repl {
            depart(
                &mut repl.members.lock().unwrap_or_else(|p| p.into_inner()),
                table,
            );
        }
    }

    /// Hands the replication listener the volumes this node holds an in-sync replica of.
    fn publish_replicas(&self, state: &State) {
        let (Some(repl), Some(node)) = (&self.repl, self.node) else {
            return;
        };
        // In-sync replicas take writes; primaries are listed too, so an older primary's
        // frames are refused as fenced.
        let mut want: Vec<ListenerEntry> = state
            .volumes
            .by_uuid
            .values()
            // (A rollback also reaches the replicas holding the snapshot.)
            .filter(|v| {
                matches!(
                    v.state,
                    VolumeState::Creating | VolumeState::Available | VolumeState::Rollback
                )
            })
            .filter_map(|v| {
                // Out-of-sync replicas too: a rebuild writes to them.
                let replica = v.replica_nodes.contains(&node);
                let take = (replica && self.store.contains(v.uuid)) || v.node_uuid == node;
                take.then_some((v.uuid, v.epoch, v.size_bytes, v.compression, replica))
            })
            .collect();
        want.sort();
        {
            let mut copies = repl.copies.lock().unwrap_or_else(|p| p.into_inner());
            for v in state.volumes.by_uuid.values() {
                if v.in_sync_replicas().any(|n| n == node) {
                    let e = copies.entry(v.uuid).or_insert(v.epoch);
                    *e = (*e).max(v.epoch);
                }
            }
            copies.retain(|u, _| state.volumes.by_uuid.contains_key(u));
            let mut created = self.created_here.lock().unwrap_or_else(|p| p.into_inner());
            created.retain(|u| state.volumes.by_uuid.contains_key(u));
            let mut took = repl.took_over.lock().unwrap_or_else(|p| p.into_inner());
            took.retain(|u, e| state.volumes.get(*u).is_some_and(|v| v.epoch == *e));
        }
        let mut last = repl.replicas.lock().unwrap_or_else(|p| p.into_inner());
        if *last == want {
            return;
        }
        // Volumes this process was the primary of and now holds a replica of: deposed.
        let deposed: Vec<(Uuid, Option<u64>)> = want
            .iter()
            .filter(|w| w.4 && last.iter().any(|l| l.0 == w.0 && !l.4))
            .map(|w| (w.0, deposed_since(repl, w.0)))
            .collect();
        let images = want
            .iter()
            .map(|&(uuid, epoch, size, compress, replica)| {
                let image = replica
                    .then(|| Arc::new(self.store.image(uuid, size, compress)) as Arc<dyn Backend>);
                (*uuid.as_bytes(), image, epoch)
            })
            .collect();
        repl.server.set_images(images);
        for (uuid, since) in deposed {
            tracing::info!(volume = %uuid, since_unix_ms = ?since, "deposed as the primary");
            repl.server
                .set_deposed_since(*uuid.as_bytes(), since.unwrap_or(0));
        }
        *last = want;
    }

    /// Appends to the block store the pool devices `state` gives this node beyond those it
    /// has (added through the API while serving), in the order it opens them with.
    fn add_new_devices(&self, state: &State) {
        let want = pool_devices(state, self.node);
        let have = self.store.devices();
        if want.len() <= have.len() {
            return;
        }
        if !want.iter().zip(&have).all(|(w, (p, _))| w.path == *p) {
            tracing::error!(
                "the pool's devices {have:?} are not the first of those recorded for this node \
                 ({want:?}); adding none"
            );
            return;
        }
        for d in &want[have.len()..] {
            if let Err(e) = self.store.add_device(d) {
                tracing::error!("adding {} to the pool: {e}", d.path.display());
                return;
            }
        }
    }

    /// The block store.
    pub fn store(&self) -> &Arc<BlockStore> {
        &self.store
    }

    /// Where the target listens (I/O, discovery), when serving.
    pub fn target_addrs(&self) -> Option<(SocketAddr, Option<SocketAddr>)> {
        self.target
            .as_ref()
            .map(|t| (t.local_addr(), t.discovery_addr()))
    }

    /// Stops the target, ending every host connection.
    pub fn shutdown(&mut self) {
        if let Some(t) = self.target.take() {
            t.shutdown();
        }
        if let Some(r) = &self.repl {
            r.hub.shutdown();
            r.server.shutdown();
        }
    }

    fn namespace_of(&self, state: &State, v: &Volume) -> NamespaceSpec {
        let primary = self.node.is_none_or(|n| v.node_uuid == n);
        // A planned hand-over: serve only once the old primary stopped (or its server
        // failed), so no host reads its copy after this one took a write.
        let released = v
            .releasing
            .is_none_or(|old| state.inventory.server_of(old).is_none_or(|s| s.failed));
        // A promoted replica serves once the read lease it gave the former primary ran
        // out: until then that primary may still read its own copy (see
        // `evstor_datapath::replica`), which this one's writes would make stale.
        let owed = match &self.repl {
            Some(r) if primary => r.server.lease_given_for(*v.uuid.as_bytes()),
            _ => Duration::ZERO,
        };
        if !owed.is_zero() {
            let at = Instant::now() + owed;
            let mut again = self.publish_again.lock().unwrap_or_else(|p| p.into_inner());
            *again = Some(again.map_or(at, |t| t.min(at)));
        }
        NamespaceSpec {
            nsid: v.nsid,
            uuid: *v.uuid.as_bytes(),
            size_bytes: v.size_bytes,
            backing: Backing::Image {
                store: self.store.clone(),
                compress: v.compression,
                replication: if primary {
                    self.replication_of(state, v)
                } else {
                    None
                },
            },
            host_acl: acl(&v.acl),
            ip_acl: acl(&v.ip_acl),
            qos: qos_of(state, v),
            ana: Ana {
                group: ana_group(state, v.node_uuid),
                optimized: primary && released && owed.is_zero(),
            },
        }
    }
}

/// A volume's QoS policy in the data path's absolute terms: MB/s are 10^6 bytes per second,
/// IOPS per GB scale with the volume's size in GiB (at least 1 IOPS when the policy sets any).
pub fn qos_of(state: &State, v: &Volume) -> QosLimits {
    let Some(p) = v.qos_policy.and_then(|u| state.policies.get(u)) else {
        return QosLimits::default();
    };
    let per_gb = |rate: u32| match rate {
        0 => 0,
        r => (u64::from(r) * v.size_bytes / (1 << 30)).max(1),
    };
    match p.limit {
        QosLimit::Iops { read, write } => QosLimits {
            read_iops: read.into(),
            write_iops: write.into(),
            ..QosLimits::default()
        },
        QosLimit::BandwidthMbps { read, write } => QosLimits {
            read_bytes_per_sec: u64::from(read) * 1_000_000,
            write_bytes_per_sec: u64::from(write) * 1_000_000,
            ..QosLimits::default()
        },
        QosLimit::IopsPerGb { read, write } => QosLimits {
            read_iops: per_gb(read),
            write_iops: per_gb(write),
            ..QosLimits::default()
        },
    }
}

fn io_err(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

/// A volume ACL in the data path's terms.
pub fn acl(entries: &[String]) -> Acl {
    match entries {
        [one] if one == ALLOW_ANY => Acl::AllowAny,
        [] => Acl::AllowNone,
        [one] if one == ALLOW_NONE => Acl::AllowNone,
        list => Acl::List(list.to_vec()),
    }
}

impl DataPlane for VolumeStore {
    fn prepare(&self, v: &Volume) -> std::io::Result<()> {
        self.created(v.uuid);
        self.store.create_volume(v.uuid).map_err(io_err)
    }

    fn prepare_clone(&self, v: &Volume, snapshot: Uuid) -> std::io::Result<()> {
        self.created(v.uuid);
        self.store.clone_volume(snapshot, v.uuid).map_err(io_err)
    }

    fn release(&self, uuid: Uuid) -> std::io::Result<()> {
        self.store.delete(uuid).map_err(io_err)
    }

    fn take_snapshot(&self, s: &Snapshot) -> std::io::Result<Vec<Uuid>> {
        let me = self.node.unwrap_or(s.node_uuid);
        let (epoch, members) = self.in_sync_members(s.source_volume);
        if members.is_empty() {
            // The only copy: nothing to agree with (and a repeat finds it taken).
            self.store
                .snapshot(s.source_volume, s.uuid)
                .map_err(io_err)?;
            return Ok(vec![me]);
        }
        let volume = *s.source_volume.as_bytes();
        // Every change admitted before the gate closed is on every in-sync copy once it
        // completed; none is admitted until the gate opens again.
        let hold = self.target.as_ref().and_then(|t| t.hold_writes(volume));
        if hold
            .as_ref()
            .is_some_and(|h| !h.drained(Duration::from_millis(SNAPSHOT_DRAIN_MS)))
        {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the volume's writes did not drain for its snapshot",
            ));
        }
        let nodes: Vec<Uuid> = members.iter().map(|(n, _)| *n).collect();
        let members: Vec<Arc<Member>> = members.into_iter().map(|(_, m)| m).collect();
        let took = snapshot_members(
            &members,
            volume,
            epoch,
            *s.uuid.as_bytes(),
            Duration::from_millis(SNAPSHOT_REPLICA_WAIT_MS),
        );
        self.store
            .retake_snapshot(s.source_volume, s.uuid)
            .map_err(io_err)?;
        drop(hold);
        let mut holders = vec![me];
        holders.extend(nodes.iter().zip(took).filter(|(_, t)| *t).map(|(n, _)| *n));
        Ok(holders)
    }

    fn release_snapshot(&self, uuid: Uuid) -> std::io::Result<()> {
        self.store.delete(uuid).map_err(io_err)
    }

    /// The volume is withdrawn from hosts while it is in `Rollback`, so nothing writes to it:
    /// the replicas holding the snapshot roll back their own copies (`Op::Rollback`).
    fn rollback(
        &self,
        v: &Volume,
        snapshot: Uuid,
        replicas: &[(Uuid, SocketAddr)],
    ) -> std::io::Result<Vec<Uuid>> {
        self.store.rollback(v.uuid, snapshot).map_err(io_err)?;
        let Some(repl) = &self.repl else {
            return Ok(Vec::new());
        };
        let mut nodes = Vec::new();
        let mut members = Vec::new();
        for (node, addr) in replicas {
            match repl.hub.link(*addr) {
                Ok(link) => {
                    nodes.push(*node);
                    members.push(Arc::new(Member::new(link, v.size_bytes, false)));
                }
                Err(e) => tracing::warn!("the replication link to {addr}: {e}"),
            }
        }
        let done = rollback_members(
            &members,
            *v.uuid.as_bytes(),
            v.epoch,
            *snapshot.as_bytes(),
            Duration::from_millis(SNAPSHOT_REPLICA_WAIT_MS),
        );
        Ok(nodes
            .into_iter()
            .zip(done)
            .filter(|(_, d)| *d)
            .map(|(n, _)| n)
            .collect())
    }

    fn publish(&self, state: &State) -> std::io::Result<()> {
        self.add_new_devices(state);
        *self
            .creating_snapshots
            .write()
            .unwrap_or_else(|p| p.into_inner()) = state
            .snapshots
            .by_uuid
            .values()
            .filter(|s| s.state == SnapshotState::Creating)
            .map(|s| s.uuid)
            .collect();
        let trim = state
            .config
            .value(state, "EnableTrim")
            .is_none_or(|v| v == "true");
        self.store.set_trim(trim);
        // A volume shrunk with Force loses the blocks past its end (a crash between the
        // shrink and this pass is covered: the check runs on every pass).
        let mine = |v: &&Volume| self.node.is_none_or(|n| v.node_uuid == n);
        for v in state.volumes.by_uuid.values().filter(mine) {
            if v.state == VolumeState::Available {
                if let Err(e) = self.store.truncate(v.uuid, v.size_bytes / BLOCK_BYTES) {
                    tracing::warn!("truncating volume {} failed: {e}", v.uuid);
                }
            }
        }
        // Replicas first: the listener then refuses the former primaries of volumes this
        // node now leads, so the read leases they hold can only run out.
        self.publish_replicas(state);
        *self.publish_again.lock().unwrap_or_else(|p| p.into_inner()) = None;
        let Some(target) = &self.target else {
            return Ok(());
        };
        // Every copy this node holds is a namespace (a path for multipath hosts): ANA
        // Optimized on the primary, Inaccessible elsewhere.
        let held = |v: &&Volume| self.node.is_none_or(|n| v.nodes().any(|c| c == n));
        let table: Vec<NamespaceSpec> = state
            .volumes
            .by_uuid
            .values()
            .filter(held)
            .filter(|v| match v.state {
                VolumeState::Available => mine(v) || self.store.contains(v.uuid),
                VolumeState::Creating => self.store.contains(v.uuid),
                _ => false,
            })
            .map(|v| self.namespace_of(state, v))
            .collect();
        target.set_peer_portals(peer_portals(state, self.node));
        let mut published = self.published.lock().unwrap_or_else(|p| p.into_inner());
        if *published == table {
            return Ok(());
        }
        // Remembered only when the whole table was taken, so a failure is retried next pass.
        published.clear();
        let set = target.try_set_namespaces(table.clone()).map_err(io_err);
        self.drop_departed(&table);
        set?;
        *published = table;
        Ok(())
    }

    fn holds(&self, uuid: Uuid) -> bool {
        self.store.contains(uuid)
    }

    fn snapshots_held(&self) -> Vec<Uuid> {
        self.store.snapshots()
    }

    fn rebuild(
        &self,
        v: &Volume,
        node: Uuid,
        snapshots: &[(Uuid, bool)],
    ) -> std::io::Result<Rebuilt> {
        let (Some(repl), Some(target)) = (&self.repl, &self.target) else {
            return Err(std::io::Error::from(std::io::ErrorKind::Unsupported));
        };
        let member = {
            let members = repl.members.lock().unwrap_or_else(|p| p.into_inner());
            members
                .get(&(v.uuid, node))
                .filter(|p| p.epoch == v.epoch && p.size == v.size_bytes)
                .map(|p| p.member.clone())
        };
        let member = member.ok_or_else(|| {
            std::io::Error::other("the replica is not published yet; the rebuild waits")
        })?;
        let barrier = || {
            target
                .pass_barrier(std::time::Duration::from_millis(REBUILD_BARRIER_MS))
                .map_err(io_err)
        };
        let plan: Vec<([u8; 16], bool)> = snapshots
            .iter()
            .map(|(s, held)| (*s.as_bytes(), *held))
            .collect();
        let source = StoreSnapshots {
            store: &self.store,
            size_bytes: v.size_bytes,
        };
        // A failed attempt leaves everything to copy (`replica::seed_snapshots`).
        let seeded = seed_snapshots(
            &member,
            &source,
            *v.uuid.as_bytes(),
            v.epoch,
            v.size_bytes,
            &plan,
            barrier,
        )?;
        let local = self.store.image(v.uuid, v.size_bytes, v.compression);
        // A failed attempt leaves every chunk it did not copy dirty (`replica::rebuild`).
        let copied_bytes = evstor_datapath::replica::rebuild(
            &member,
            &local,
            *v.uuid.as_bytes(),
            v.epoch,
            v.size_bytes,
            barrier,
        )?;
        Ok(Rebuilt {
            copied_bytes,
            snapshots: seeded.into_iter().map(Uuid::from_bytes).collect(),
        })
    }

    fn repairs_pending(&self) -> Vec<Uuid> {
        let Some(repl) = &self.repl else {
            return Vec::new();
        };
        let members = repl.members.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<Uuid> = members
            .iter()
            .filter(|(_, p)| {
                p.member.state.mode() == Mode::InSync && p.member.state.must_ask_recent()
            })
            .map(|((u, _), _)| *u)
            .collect();
        out.sort();
        out.dedup();
        out
    }

    fn repair(&self, v: &Volume) -> std::io::Result<u64> {
        let (Some(repl), Some(target)) = (&self.repl, &self.target) else {
            return Ok(0);
        };
        let pending: Vec<Arc<Member>> = {
            let members = repl.members.lock().unwrap_or_else(|p| p.into_inner());
            members
                .iter()
                .filter(|((u, _), p)| {
                    *u == v.uuid
                        && p.epoch == v.epoch
                        && p.size == v.size_bytes
                        && p.member.state.mode() == Mode::InSync
                        && p.member.state.must_ask_recent()
                })
                .map(|(_, p)| p.member.clone())
                .collect()
        };
        let local = self.store.image(v.uuid, v.size_bytes, v.compression);
        let mut copied = 0;
        for m in pending {
            let barrier = || {
                target
                    .pass_barrier(std::time::Duration::from_millis(REBUILD_BARRIER_MS))
                    .map_err(io_err)
            };
            copied += evstor_datapath::replica::repair(
                &m,
                &local,
                *v.uuid.as_bytes(),
                v.epoch,
                v.size_bytes,
                barrier,
            )?;
        }
        Ok(copied)
    }

    fn rebuild_percent(&self, volume: Uuid, node: Uuid) -> Option<u8> {
        let members = self.repl.as_ref()?.members.lock();
        let members = members.unwrap_or_else(|p| p.into_inner());
        members
            .get(&(volume, node))
            .map(|p| p.member.state.rebuild_percent())
    }

    fn take_replica_failures(&self) -> Vec<ReplicaFailure> {
        let Some(repl) = &self.repl else {
            return Vec::new();
        };
        let failed = repl.hub.take_failures();
        if failed.is_empty() {
            return Vec::new();
        }
        let members = repl.members.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<ReplicaFailure> = members
            .iter()
            .filter(|((volume, _), p)| {
                failed
                    .iter()
                    .any(|(v, a)| v == volume.as_bytes() && *a == p.addr)
            })
            .map(|((volume, node), p)| ReplicaFailure {
                volume: *volume,
                node: *node,
                epoch: p.epoch,
            })
            .collect();
        out.sort_by_key(|f| (f.volume, f.node));
        out
    }

    fn publish_again_in(&self) -> Option<Duration> {
        let at = *self.publish_again.lock().unwrap_or_else(|p| p.into_inner());
        at.map(|t| t.saturating_duration_since(Instant::now()))
    }

    fn serves(&self, v: &Volume) -> bool {
        self.target
            .as_ref()
            .is_none_or(|t| t.serves(v.nsid, *v.uuid.as_bytes()))
    }

    fn take_media_errors(&self) -> Vec<MediaError> {
        self.store.take_media_errors()
    }
}

impl DataPathView for VolumeStore {
    fn hosts_of(&self, nsid: u32) -> Vec<String> {
        let mut hosts: Vec<String> = self
            .connected_hosts()
            .into_iter()
            .filter(|h| h.nsids.contains(&nsid))
            .map(|h| h.host_nqn)
            .collect();
        hosts.sort();
        hosts.dedup();
        hosts
    }

    fn connected_hosts(&self) -> Vec<ConnectedHost> {
        self.target
            .as_ref()
            .map(TargetHandle::connected_hosts)
            .unwrap_or_default()
    }

    fn usage(&self, image: Uuid) -> Option<Usage> {
        self.store.usage(image).ok()
    }

    fn store_report(&self) -> String {
        let pool = self.store.stats();
        let mem = self.store.map_memory();
        format!(
            "pool: capacity {} bytes, used {} bytes, logical {} bytes, compression ratio {:.2}, \
             media errors {}\nmaps: {} bytes for {} data blocks, allocator {} bytes\n\n\
             RocksDB (block store metadata):\n{}",
            pool.capacity_bytes,
            pool.used_bytes,
            pool.logical_bytes,
            pool.compression_ratio(),
            pool.media_errors,
            mem.map_bytes,
            mem.data_blocks,
            mem.alloc_bytes,
            self.store.rocksdb_stats()
        )
    }

    fn io_totals(&self, image: Uuid) -> Option<evstor_datapath::blockstore::IoTotals> {
        self.store.io_totals(image)
    }

    fn integrity_errors(&self, image: Uuid) -> u32 {
        self.store.media_errors_of(image)
    }

    fn device_integrity_errors(&self, path: &Path) -> u32 {
        self.store.media_errors_on(path)
    }

    fn pool(&self) -> PoolStats {
        self.store.stats()
    }

    fn changed_blocks(
        &self,
        target: Uuid,
        base: Option<Uuid>,
        from: u64,
        to: u64,
        max: usize,
    ) -> Result<Vec<u64>, StoreError> {
        self.store.changed_blocks(target, base, from, to, max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A replica that leaves a volume this node still leads is dropped (its held writes
    /// are no longer owed); the replicas of a volume this node stopped leading (a hand-over,
    /// a failover it learns of late) are deposed, so a write held for them fails instead of
    /// being acknowledged by a server that is no longer the primary.
    #[test]
    fn a_replica_that_left_is_dropped_and_those_of_a_volume_handed_over_are_deposed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let dev = DeviceSpec {
            path: dir.path().join("pool.dev"),
            size_bytes: 64 << 20,
        };
        let store = BlockStore::open(&dir.path().join("meta"), &[dev]).expect("store");
        let hub = ReplicaHub::new().expect("hub");
        // Nobody listens there: nothing is sent in this test.
        let addr: SocketAddr = "127.0.0.1:9".parse().expect("addr");
        let member = || Arc::new(Member::new(hub.link(addr).expect("link"), 1 << 20, true));
        let (led, handed_over) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let (stays, leaves, other) = (member(), member(), member());
        let mut members: HashMap<(Uuid, Uuid), Published> = HashMap::new();
        for (key, m) in [
            ((led, Uuid::from_u128(10)), &stays),
            ((led, Uuid::from_u128(11)), &leaves),
            ((handed_over, Uuid::from_u128(10)), &other),
        ] {
            members.insert(
                key,
                Published {
                    addr,
                    epoch: 1,
                    size: 1 << 20,
                    member: m.clone(),
                    recorded_in_sync: true,
                },
            );
        }
        let spec = |uuid: Uuid, replication| NamespaceSpec {
            nsid: 1,
            uuid: *uuid.as_bytes(),
            size_bytes: 1 << 20,
            backing: Backing::Image {
                store: store.clone(),
                compress: false,
                replication,
            },
            host_acl: Acl::AllowAny,
            ip_acl: Acl::AllowAny,
            qos: Default::default(),
            ana: Default::default(),
        };
        // This node still leads `led` (with one replica fewer) and serves `handed_over` as
        // a replica only.
        let table = vec![
            spec(
                led,
                Some(Replication {
                    epoch: 1,
                    members: vec![stays.clone()],
                }),
            ),
            spec(handed_over, None),
        ];
        depart(&mut members, &table);
        assert_eq!(stays.state.mode(), Mode::InSync);
        assert_eq!(leaves.state.mode(), Mode::Dropped);
        assert_eq!(other.state.mode(), Mode::Deposed);
        assert_eq!(members.len(), 1, "only the member still published is kept");
        hub.shutdown();
    }

    /// A rebuilt replica takes writes (and writes wait for it) from the end of its rebuild
    /// on: a publication before the control plane records it in sync must not drop it, or
    /// the control plane would count in sync a replica that takes no writes. One the
    /// control plane moves out of sync is dropped.
    #[test]
    fn a_rebuilt_replica_is_kept_until_recorded_in_sync_and_dropped_when_recorded_out() {
        let hub = ReplicaHub::new().expect("hub");
        // Nobody listens there: nothing is sent in this test.
        let addr: SocketAddr = "127.0.0.1:9".parse().expect("addr");
        let member = Arc::new(Member::new(hub.link(addr).expect("link"), 1 << 20, false));
        let mut p = Published {
            addr,
            epoch: 1,
            size: 1 << 20,
            member: member.clone(),
            recorded_in_sync: false,
        };
        assert_eq!(member.state.mode(), Mode::Dropped, "made out of sync");
        p.recorded(false);
        // The rebuild runs and finishes: writes wait for the replica again.
        member.state.set_rebuilding();
        assert!(member.state.rebuilt());
        // Published again (some other change) before the control plane records it in sync.
        p.recorded(false);
        assert_eq!(
            member.state.mode(),
            Mode::InSync,
            "the rebuilt replica is kept"
        );
        p.recorded(true);
        assert_eq!(member.state.mode(), Mode::InSync);
        // It fails, and the control plane records it out of sync.
        p.recorded(false);
        assert_eq!(
            member.state.mode(),
            Mode::Dropped,
            "recorded out of sync: dropped"
        );
        hub.shutdown();
    }
}
