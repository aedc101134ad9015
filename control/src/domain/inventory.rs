//! Servers, nodes and NVMe devices: the hardware the cluster runs on. On one machine that is
//! one server with one node whose devices (files or block devices) make its storage pool; in
//! cluster mode every `evstor serve --etcd` process is a server with one node, registered by
//! `JoinServer` when it first joins.
//!
//! A server has an administrative state (`Enabled`, `Disabled`) and a health fact recorded by
//! the cluster's leader from etcd liveness (`ServerFailed`, `ServerRecovered`, each carrying
//! the leader's epoch; an epoch other than the recorded leader's is refused). Placement of
//! new volumes ([`place`]) uses only healthy, enabled servers.
//!
//! Disabling a server that is the `SourceOfRiskOfServiceLoss` (it holds the only in-sync
//! copy of a volume, see `eviction`) is refused unless forced or evicting. Disabling with
//! eviction also records `ServerEvictionStarted`; the leader moves the server's copies
//! away and records `ServerEvictionCompleted` once it holds none (at once for a server
//! holding nothing); enabling it meanwhile aborts (`ServerEvictionAborted`, and the moves
//! not completed are dropped). Deleting a server is refused while it holds the only
//! in-sync copy of a volume or is still a volume's primary, unless forced. Replacing a node
//! (`ReplaceNode`: its copies move to another node) is in `replace`; placement skips
//! unattached nodes and nodes being replaced.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::creation::{self, Create, ServerCreation};
use super::eviction::{self, Eviction, EvictionStatus, Risk};
use super::led::{self, LedPattern};
use super::names::{check_etag, check_name};
use super::replace::{self, NodeRole};
use super::volume::VolumeState;
use super::{Applied, Ctx, DomainError, Event as AnyEvent, RowKey, State};
use crate::limits::DEVICES_PER_NODE_MAX;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServerState {
    #[default]
    Unknown,
    Creating,
    Enabled,
    Disabled,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Server {
    pub uuid: Uuid,
    pub name: String,
    pub state: ServerState,
    pub api_endpoint: String,
    pub etag: u64,
    /// The leader saw its liveness lease expire (cluster mode); cleared when it is back.
    pub failed: bool,
    /// Empty: the server is its own failure domain (its name).
    pub failure_domain: String,
    /// A small number unique among the cluster's servers, given at registration (the
    /// smallest free one): its data path's ANA group and controller ID range derive from it.
    pub slot: u32,
    /// The last (or running) eviction of its data.
    pub eviction: Option<Eviction>,
}

impl Server {
    /// The failure domain placement keeps replicas apart by.
    pub fn domain(&self) -> &str {
        if self.failure_domain.is_empty() {
            &self.name
        } else {
            &self.failure_domain
        }
    }

    /// New volumes may be placed here.
    pub fn placeable(&self) -> bool {
        self.state == ServerState::Enabled && !self.failed
    }

    /// Its data is being moved away.
    pub fn evicting(&self) -> bool {
        self.eviction.as_ref().is_some_and(Eviction::running)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Node {
    pub uuid: Uuid,
    pub server_uuid: Uuid,
    pub name: String,
    pub nvme_endpoint: String,
    pub etag: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Device {
    pub serial: String,
    pub model: String,
    pub path: String,
    pub size_bytes: u64,
    pub node_uuid: Uuid,
    pub server_uuid: Uuid,
    pub etag: u64,
}

impl Device {
    /// A pool device; `evstor serve` fills in the model it probed.
    pub fn backing_file(serial: &str, path: &str, size_bytes: u64) -> Device {
        Device {
            serial: serial.into(),
            model: "evstor backing file".into(),
            path: path.into(),
            size_bytes,
            node_uuid: Uuid::nil(),
            server_uuid: Uuid::nil(),
            etag: 0,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Inventory {
    pub servers: BTreeMap<Uuid, Server>,
    pub nodes: BTreeMap<Uuid, Node>,
    pub devices: BTreeMap<String, Device>,
    /// Nodes' roles beyond their registration (unattached, replacements; see `replace`).
    pub roles: BTreeMap<Uuid, NodeRole>,
    /// Servers created through the API that have not joined yet (see `creation`).
    pub created: BTreeMap<Uuid, ServerCreation>,
    /// Devices' LED patterns, by serial (see `led`).
    pub leds: BTreeMap<String, LedPattern>,
    /// Devices servers have but keep out of their pools (`evstor serve --spare-device`),
    /// by serial, until added through the API (`AddNvmeDevice`).
    pub spares: BTreeMap<String, Device>,
}

impl Inventory {
    /// The node volumes are placed on (the first; one node per server on one machine).
    pub fn first_node(&self) -> Option<&Node> {
        self.nodes.values().next()
    }

    /// Raw capacity of all devices.
    pub fn capacity_bytes(&self) -> u64 {
        self.devices.values().map(|d| d.size_bytes).sum()
    }

    /// The server a node runs on.
    pub fn server_of(&self, node: Uuid) -> Option<&Server> {
        self.nodes
            .get(&node)
            .and_then(|n| self.servers.get(&n.server_uuid))
    }

    /// The node of a server (one per server).
    pub fn node_of(&self, server: Uuid) -> Option<&Node> {
        self.nodes.values().find(|n| n.server_uuid == server)
    }
}

/// What a server brings when it joins a cluster (`evstor serve --etcd … --name …`).
#[derive(Debug, Clone, PartialEq)]
pub struct Join {
    /// Chosen by the joining server and kept in its data directory.
    pub server_uuid: Uuid,
    pub name: String,
    pub api_endpoint: String,
    pub nvme_endpoint: String,
    pub failure_domain: String,
    pub devices: Vec<Device>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// Server start-up: a device named in the configuration joins the node's pool (the
    /// device's `node_uuid`, or the first node when it is nil).
    AddDevice { device: Device },
    /// A server joins the cluster with its node and devices (nothing if it already has).
    JoinServer(Join),
    /// Leader: a server's liveness changed. `epoch` must be the recorded leader's.
    RecordServerHealth { uuid: Uuid, alive: bool, epoch: u64 },
    /// Stop placing new volumes on the server; its primaries are handed over (by the
    /// leader). Refused while it is the source of a risk of service loss unless `force` or
    /// `evict` (move every copy it holds elsewhere first).
    DisableServer {
        uuid: Uuid,
        if_match: Option<String>,
        force: bool,
        evict: bool,
    },
    EnableServer {
        uuid: Uuid,
        if_match: Option<String>,
    },
    /// Remove a server that is down and holds no volume (`force`: also when it is up or
    /// holds volumes, which then fail).
    DeleteServer {
        uuid: Uuid,
        if_match: Option<String>,
        force: bool,
    },
    /// Leader (at `leader_epoch`): the evicted server holds no copy any more.
    CompleteEviction { uuid: Uuid, leader_epoch: u64 },
    /// Leader (at `leader_epoch`): the eviction moved no copy for longer than
    /// `EvictionNoProgressTimeout`; it ends `Failed` (moves in flight are called off).
    FailEviction { uuid: Uuid, leader_epoch: u64 },
    /// Move every copy on node `src` to node `target` (see `replace`); an active source
    /// needs `while_active`.
    ReplaceNode {
        src: Uuid,
        target: Uuid,
        if_match: Option<String>,
        while_active: bool,
    },
    /// Leader (at `leader_epoch`): the replaced node `src` holds no copy any more.
    CompleteNodeReplacement { src: Uuid, leader_epoch: u64 },
    /// Pre-register a server by its endpoint; its process joins later (see `creation`).
    CreateServer(Create),
    /// The device `serial` (on `server`, when named) shows `pattern` (see `led`).
    SetDeviceLedPattern {
        serial: String,
        server: Option<Uuid>,
        pattern: LedPattern,
        if_match: Option<String>,
    },
    /// Server start-up: the devices `node` has outside its pool (the configured spares).
    ReportSpareDevices { node: Uuid, devices: Vec<Device> },
    /// The spare device `serial` joins `node`'s pool (`POST /nvmeDevices`).
    AddNvmeDevice { serial: String, node: Uuid },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Event {
    ServerRegistered {
        uuid: Uuid,
        name: String,
        api_endpoint: String,
    },
    NodeRegistered {
        uuid: Uuid,
        server_uuid: Uuid,
        name: String,
        nvme_endpoint: String,
    },
    DeviceAdded {
        device: Device,
    },
    FailureDomainSet {
        server_uuid: Uuid,
        failure_domain: String,
    },
    ServerFailed {
        uuid: Uuid,
        epoch: u64,
    },
    ServerRecovered {
        uuid: Uuid,
        epoch: u64,
    },
    ServerDisabled {
        uuid: Uuid,
    },
    ServerEnabled {
        uuid: Uuid,
    },
    ServerDeleted {
        uuid: Uuid,
    },
    /// Its data starts moving away; it held `copies` copies of volumes then.
    ServerEvictionStarted {
        uuid: Uuid,
        copies: u32,
    },
    /// It holds no copy any more.
    ServerEvictionCompleted {
        uuid: Uuid,
    },
    /// It was enabled again before its eviction completed.
    ServerEvictionAborted {
        uuid: Uuid,
    },
    /// Every copy on node `src` (`copies` of them then) moves to node `target`.
    NodeReplacementStarted {
        src: Uuid,
        target: Uuid,
        copies: u32,
    },
    /// Node `src` holds no copy any more; it is unattached.
    NodeReplacementCompleted {
        src: Uuid,
    },
    /// A server is to join with this endpoint (`host:port`); `Creating` until it does.
    ServerCreated {
        uuid: Uuid,
        endpoint: String,
        extend_cluster: bool,
    },
    /// The created server's process joined (its registration precedes this).
    CreatedServerJoined {
        uuid: Uuid,
    },
    /// The device's LED pattern was set.
    DeviceLedPatternSet {
        serial: String,
        pattern: LedPattern,
    },
    /// Its eviction made no progress for `EvictionNoProgressTimeout`: it ended `Failed`.
    ServerEvictionFailed {
        uuid: Uuid,
    },
    /// The devices `node` has outside its pool now (replacing what it reported before).
    SpareDevicesReported {
        node: Uuid,
        devices: Vec<Device>,
    },
}

impl Event {
    pub fn type_name(&self) -> &'static str {
        match self {
            Event::ServerRegistered { .. } => "ServerRegistered",
            Event::NodeRegistered { .. } => "NodeRegistered",
            Event::DeviceAdded { .. } => "DeviceAdded",
            Event::FailureDomainSet { .. } => "FailureDomainSet",
            Event::ServerFailed { .. } => "ServerFailed",
            Event::ServerRecovered { .. } => "ServerRecovered",
            Event::ServerDisabled { .. } => "ServerDisabled",
            Event::ServerEnabled { .. } => "ServerEnabled",
            Event::ServerDeleted { .. } => "ServerDeleted",
            Event::ServerEvictionStarted { .. } => "ServerEvictionStarted",
            Event::ServerEvictionCompleted { .. } => "ServerEvictionCompleted",
            Event::ServerEvictionAborted { .. } => "ServerEvictionAborted",
            Event::ServerEvictionFailed { .. } => "ServerEvictionFailed",
            Event::NodeReplacementStarted { .. } => "NodeReplacementStarted",
            Event::NodeReplacementCompleted { .. } => "NodeReplacementCompleted",
            Event::ServerCreated { .. } => "ServerCreated",
            Event::CreatedServerJoined { .. } => "CreatedServerJoined",
            Event::DeviceLedPatternSet { .. } => "DeviceLedPatternSet",
            Event::SpareDevicesReported { .. } => "SpareDevicesReported",
        }
    }
}

pub fn decide(state: &State, ctx: &Ctx, cmd: &Command) -> Result<Vec<AnyEvent>, DomainError> {
    match cmd {
        Command::AddDevice { device } => add_device(state, device),
        Command::JoinServer(j) => join(state, j),
        Command::RecordServerHealth { uuid, alive, epoch } => {
            super::cluster::check_epoch(state, *epoch)?;
            let s = server(state, *uuid)?;
            Ok(match (s.failed, *alive) {
                (false, false) => vec![inv(Event::ServerFailed {
                    uuid: *uuid,
                    epoch: *epoch,
                })],
                (true, true) => vec![inv(Event::ServerRecovered {
                    uuid: *uuid,
                    epoch: *epoch,
                })],
                _ => vec![],
            })
        }
        Command::DisableServer {
            uuid,
            if_match,
            force,
            evict,
        } => disable(state, *uuid, if_match, *force, *evict),
        Command::EnableServer { uuid, if_match } => enable(state, *uuid, if_match),
        Command::CompleteEviction { uuid, leader_epoch } => {
            super::cluster::check_epoch(state, *leader_epoch)?;
            let s = server(state, *uuid)?;
            let nodes = eviction::nodes_of(state, *uuid);
            let empty = eviction::copies_on(state, &nodes).next().is_none();
            Ok(if s.evicting() && empty {
                vec![inv(Event::ServerEvictionCompleted { uuid: *uuid })]
            } else {
                vec![]
            })
        }
        Command::FailEviction { uuid, leader_epoch } => {
            super::cluster::check_epoch(state, *leader_epoch)?;
            if !server(state, *uuid)?.evicting() {
                return Ok(vec![]);
            }
            let mut events = vec![inv(Event::ServerEvictionFailed { uuid: *uuid })];
            events.extend(super::volume::abort_moves(
                state,
                &eviction::nodes_of(state, *uuid),
            ));
            Ok(events)
        }
        Command::DeleteServer {
            uuid,
            if_match,
            force,
        } => delete_server(state, *uuid, if_match, *force),
        Command::ReplaceNode {
            src,
            target,
            if_match,
            while_active,
        } => replace::start(state, *src, *target, if_match, *while_active),
        Command::CompleteNodeReplacement { src, leader_epoch } => {
            replace::complete(state, *src, *leader_epoch)
        }
        Command::CreateServer(c) => creation::create(state, ctx, c),
        Command::SetDeviceLedPattern {
            serial,
            server,
            pattern,
            if_match,
        } => led::set(state, serial, *server, *pattern, if_match),
        Command::ReportSpareDevices { node, devices } => report_spares(state, *node, devices),
        Command::AddNvmeDevice { serial, node } => add_nvme_device(state, serial, *node),
    }
}

fn report_spares(
    state: &State,
    node: Uuid,
    devices: &[Device],
) -> Result<Vec<AnyEvent>, DomainError> {
    let inventory = &state.inventory;
    let n = inventory
        .nodes
        .get(&node)
        .ok_or_else(|| DomainError::not_found("node", node))?;
    let mut now: Vec<Device> = devices
        .iter()
        .filter(|d| !inventory.devices.contains_key(&d.serial))
        .map(|d| Device {
            node_uuid: node,
            server_uuid: n.server_uuid,
            etag: 0,
            ..d.clone()
        })
        .collect();
    now.sort_by(|a, b| a.serial.cmp(&b.serial));
    let before: Vec<Device> = inventory
        .spares
        .values()
        .filter(|d| d.node_uuid == node)
        .map(|d| Device {
            etag: 0,
            ..d.clone()
        })
        .collect();
    if before == now {
        return Ok(vec![]);
    }
    Ok(vec![inv(Event::SpareDevicesReported {
        node,
        devices: now,
    })])
}

fn add_nvme_device(state: &State, serial: &str, node: Uuid) -> Result<Vec<AnyEvent>, DomainError> {
    if serial.is_empty() || node.is_nil() {
        return Err(DomainError::InvalidArgument(
            "serialNumber and nodeUUID are required".into(),
        ));
    }
    let inventory = &state.inventory;
    let n = inventory
        .nodes
        .get(&node)
        .ok_or_else(|| DomainError::not_found("node", node))?;
    if let Some(d) = inventory.devices.get(serial) {
        return Err(DomainError::InvalidArgument(format!(
            "NVMe device {serial} is already attached to node {}",
            d.node_uuid
        )));
    }
    let spare = inventory
        .spares
        .get(serial)
        .ok_or_else(|| DomainError::not_found("NVMe device", serial))?;
    if spare.node_uuid != node {
        return Err(DomainError::InvalidArgument(format!(
            "NVMe device {serial} belongs to server {}, not to node {node}'s",
            spare.server_uuid
        )));
    }
    let active = inventory
        .servers
        .get(&n.server_uuid)
        .is_some_and(|s| !s.failed && s.state == ServerState::Enabled);
    if !active {
        return Err(DomainError::InvalidArgument(format!(
            "node {node} is not active (its server failed or is disabled)"
        )));
    }
    let managed = inventory
        .devices
        .values()
        .filter(|d| d.node_uuid == node)
        .count();
    if managed >= DEVICES_PER_NODE_MAX {
        return Err(DomainError::InvalidArgument(format!(
            "node {node} already manages {managed} devices, the most a pool holds"
        )));
    }
    Ok(vec![inv(Event::DeviceAdded {
        device: Device {
            etag: 0,
            ..spare.clone()
        },
    })])
}

fn inv(e: Event) -> AnyEvent {
    AnyEvent::Inventory(e)
}

fn disable(
    state: &State,
    uuid: Uuid,
    if_match: &Option<String>,
    force: bool,
    evict: bool,
) -> Result<Vec<AnyEvent>, DomainError> {
    let s = not_creating(state, uuid)?;
    check_etag("server", s.uuid, s.etag, if_match)?;
    let mut events = Vec::new();
    if s.state != ServerState::Disabled {
        if !force && !evict {
            if let (Risk::Source, Some(v)) = eviction::risk(state, uuid) {
                return Err(DomainError::FailedPrecondition(format!(
                    "disabling server {} can lead to risk of service loss: it holds the only \
                     in-sync copy of volume {} ({}); set evictData to move its data first, \
                     or ForceDisable",
                    s.name, v.name, v.uuid
                )));
            }
        }
        events.push(inv(Event::ServerDisabled { uuid }));
    }
    if evict && !s.evicting() {
        let nodes = eviction::nodes_of(state, uuid);
        let copies = eviction::copies_on(state, &nodes).count();
        if copies > 0 && state.inventory.servers.len() == 1 {
            return Err(DomainError::FailedPrecondition(format!(
                "server {} is the only server: its data has nowhere to go",
                s.name
            )));
        }
        events.push(inv(Event::ServerEvictionStarted {
            uuid,
            copies: u32::try_from(copies).unwrap_or(u32::MAX),
        }));
        if copies == 0 {
            events.push(inv(Event::ServerEvictionCompleted { uuid }));
        }
    }
    Ok(events)
}

/// Enabling a server also aborts its running eviction: the moves away from it that have
/// not completed are dropped.
fn enable(
    state: &State,
    uuid: Uuid,
    if_match: &Option<String>,
) -> Result<Vec<AnyEvent>, DomainError> {
    let s = not_creating(state, uuid)?;
    check_etag("server", s.uuid, s.etag, if_match)?;
    let mut events = Vec::new();
    if s.state != ServerState::Enabled {
        events.push(inv(Event::ServerEnabled { uuid }));
    }
    if s.evicting() {
        events.push(inv(Event::ServerEvictionAborted { uuid }));
        events.extend(super::volume::abort_moves(
            state,
            &eviction::nodes_of(state, uuid),
        ));
    }
    Ok(events)
}

/// A server that has joined: one created through the API has no process to enable or
/// disable yet.
fn not_creating(state: &State, uuid: Uuid) -> Result<&Server, DomainError> {
    let s = server(state, uuid)?;
    if s.state == ServerState::Creating {
        return Err(DomainError::Conflict(format!(
            "server {uuid} is being created: start its `evstor serve` first"
        )));
    }
    Ok(s)
}

fn server(state: &State, uuid: Uuid) -> Result<&Server, DomainError> {
    state
        .inventory
        .servers
        .get(&uuid)
        .ok_or_else(|| DomainError::not_found("server", uuid))
}

fn add_device(state: &State, device: &Device) -> Result<Vec<AnyEvent>, DomainError> {
    let inventory = &state.inventory;
    let node = if device.node_uuid.is_nil() {
        inventory.first_node()
    } else {
        inventory.nodes.get(&device.node_uuid)
    };
    let node = node.ok_or_else(|| DomainError::not_found("node", device.node_uuid))?;
    if inventory
        .devices
        .values()
        .any(|d| d.node_uuid == node.uuid && d.path == device.path)
    {
        return Ok(vec![]); // already in the pool: a restart with the same config
    }
    if inventory.devices.contains_key(&device.serial) {
        return Err(DomainError::AlreadyExists(format!(
            "an NVMe device with serial {} is already in the pool",
            device.serial
        )));
    }
    let mut device = device.clone();
    device.node_uuid = node.uuid;
    device.server_uuid = node.server_uuid;
    Ok(vec![inv(Event::DeviceAdded { device })])
}

/// The events that register a server, its node and its devices (bootstrap and join).
pub fn registration(
    server_uuid: Uuid,
    node_uuid: Uuid,
    name: &str,
    api_endpoint: &str,
    nvme_endpoint: &str,
    failure_domain: &str,
    devices: &[Device],
) -> Vec<AnyEvent> {
    let mut events = vec![inv(Event::ServerRegistered {
        uuid: server_uuid,
        name: name.to_string(),
        api_endpoint: api_endpoint.to_string(),
    })];
    if !failure_domain.is_empty() {
        events.push(inv(Event::FailureDomainSet {
            server_uuid,
            failure_domain: failure_domain.to_string(),
        }));
    }
    events.push(inv(Event::NodeRegistered {
        uuid: node_uuid,
        server_uuid,
        name: format!("{name}-0"),
        nvme_endpoint: nvme_endpoint.to_string(),
    }));
    for device in devices {
        let mut device = device.clone();
        device.node_uuid = node_uuid;
        device.server_uuid = server_uuid;
        events.push(inv(Event::DeviceAdded { device }));
    }
    events
}

fn join(state: &State, j: &Join) -> Result<Vec<AnyEvent>, DomainError> {
    if !state.cluster.initialized {
        return Err(DomainError::Unavailable(
            "the cluster is not initialized yet".into(),
        ));
    }
    // A server created through the API joins under its created id.
    let created = creation::creating(state, j.server_uuid);
    if state.inventory.servers.contains_key(&j.server_uuid) && !created {
        return Ok(vec![]); // a restart of a member
    }
    check_name("server", &j.name)?;
    check_failure_domain(&j.failure_domain)?;
    if let Some(other) = state.inventory.servers.values().find(|s| s.name == j.name) {
        return Err(DomainError::AlreadyExists(format!(
            "a server named {} is already a member ({}); give this one another --name",
            j.name, other.uuid
        )));
    }
    if let Some(d) = j
        .devices
        .iter()
        .find(|d| state.inventory.devices.contains_key(&d.serial))
    {
        return Err(DomainError::AlreadyExists(format!(
            "an NVMe device with serial {} is already in the cluster",
            d.serial
        )));
    }
    // The node id derives from the server id so that a retried join names the same node.
    let node_uuid = Uuid::from_u128(j.server_uuid.as_u128() ^ NODE_ID_SALT);
    let mut events = registration(
        j.server_uuid,
        node_uuid,
        &j.name,
        &j.api_endpoint,
        &j.nvme_endpoint,
        &j.failure_domain,
        &j.devices,
    );
    if created {
        events.push(inv(Event::CreatedServerJoined {
            uuid: j.server_uuid,
        }));
    }
    Ok(events)
}

/// Mixed into a server id to name its node.
const NODE_ID_SALT: u128 = 0x6e6f_6465_2d6f_662d_7365_7276_6572_2d30;

/// A failure domain is a name like any other, or empty (the server's own).
pub fn check_failure_domain(fd: &str) -> Result<(), DomainError> {
    if fd.is_empty() {
        Ok(())
    } else {
        check_name("failure domain", fd)
    }
}

/// Volumes (not yet deleted) with a copy on `node`.
fn volumes_on(state: &State, node: Uuid) -> Vec<Uuid> {
    state
        .volumes
        .by_uuid
        .values()
        .filter(|v| v.node_uuid == node || v.replica_nodes.contains(&node))
        .map(|v| v.uuid)
        .collect()
}

fn delete_server(
    state: &State,
    uuid: Uuid,
    if_match: &Option<String>,
    force: bool,
) -> Result<Vec<AnyEvent>, DomainError> {
    let s = server(state, uuid)?;
    check_etag("server", s.uuid, s.etag, if_match)?;
    if s.state == ServerState::Creating {
        return Ok(vec![inv(Event::ServerDeleted { uuid })]); // nothing joined yet
    }
    if state.inventory.servers.len() == 1 {
        return Err(DomainError::FailedPrecondition(
            "the last server of a cluster cannot be deleted".into(),
        ));
    }
    if !s.failed && !force {
        return Err(DomainError::Conflict(format!(
            "server {} is running; stop it first (or set forceDelete)",
            s.name
        )));
    }
    if force {
        return Ok(vec![inv(Event::ServerDeleted { uuid })]);
    }
    let nodes = eviction::nodes_of(state, uuid);
    let list = |vs: &[Uuid]| {
        let names: Vec<String> = vs.iter().take(5).map(Uuid::to_string).collect();
        format!("{} volume(s) ({}…)", vs.len(), names.join(", "))
    };
    let sole: Vec<Uuid> = state
        .volumes
        .by_uuid
        .values()
        .filter(|v| !matches!(v.state, VolumeState::Deleting | VolumeState::Deleted))
        .filter(|v| eviction::sole_holder(state, v, &nodes))
        .map(|v| v.uuid)
        .collect();
    if !sole.is_empty() {
        return Err(DomainError::FailedPrecondition(format!(
            "server {} holds the only in-sync copy of {}; move them first (disable it with \
             evictData) or set forceDelete (they then become Failed)",
            s.name,
            list(&sole)
        )));
    }
    // Its replicas simply leave their volumes; a volume whose primary is here would fail,
    // although an in-sync copy lives on: its primary moves first (the leader's fail-over).
    let primaries: Vec<Uuid> = eviction::copies_on(state, &nodes)
        .filter(|v| nodes.contains(&v.node_uuid))
        .map(|v| v.uuid)
        .collect();
    if !primaries.is_empty() {
        return Err(DomainError::Conflict(format!(
            "server {} is still the primary of {}; retry once they failed over, or set \
             forceDelete (they then become Failed)",
            s.name,
            list(&primaries)
        )));
    }
    Ok(vec![inv(Event::ServerDeleted { uuid })])
}

/// Nodes for a new volume with `count` copies, primary first: on distinct healthy, enabled
/// servers, in distinct failure domains while there are enough, least loaded first (ties by
/// id, so the choice is a pure function of the state). `primary` pins the first (a clone
/// lives where its snapshot's data is).
pub fn place(state: &State, count: usize, primary: Option<Uuid>) -> Result<Vec<Uuid>, DomainError> {
    let inv = &state.inventory;
    let load = eviction::node_load(state);
    let mut candidates: Vec<(&Node, &Server)> = inv
        .nodes
        .values()
        .filter_map(|n| inv.servers.get(&n.server_uuid).map(|s| (n, s)))
        .filter(|(n, s)| s.placeable() && inv.takes_new_copies(n.uuid) && Some(n.uuid) != primary)
        .collect();
    candidates.sort_by_key(|(n, _)| (load.get(&n.uuid).copied().unwrap_or(0), n.uuid));
    let mut chosen: Vec<Uuid> = Vec::with_capacity(count);
    let mut servers = BTreeSet::new();
    let mut domains = BTreeSet::new();
    if let Some(p) = primary {
        let s = inv
            .server_of(p)
            .ok_or_else(|| DomainError::not_found("node", p))?;
        chosen.push(p);
        servers.insert(s.uuid);
        domains.insert(s.domain().to_string());
    }
    // First pass: new failure domains only; second: any server not yet used.
    for distinct_domain in [true, false] {
        for (n, s) in &candidates {
            if chosen.len() == count {
                break;
            }
            if servers.contains(&s.uuid) || (distinct_domain && domains.contains(s.domain())) {
                continue;
            }
            chosen.push(n.uuid);
            servers.insert(s.uuid);
            domains.insert(s.domain().to_string());
        }
    }
    if chosen.len() < count {
        return Err(DomainError::InvalidArgument(format!(
            "replicaCount {count} needs {count} servers that are enabled and healthy; \
             {} are",
            inv.servers.values().filter(|s| s.placeable()).count()
        )));
    }
    Ok(chosen)
}

pub fn evolve(state: &mut State, at: Applied, event: &Event) -> Vec<RowKey> {
    let inv = &mut state.inventory;
    match event {
        Event::ServerRegistered {
            uuid,
            name,
            api_endpoint,
        } => {
            // A server created through the API keeps the slot it got then.
            let slot = match inv.servers.get(uuid) {
                Some(s) => s.slot,
                None => creation::free_slot(inv),
            };
            inv.servers.insert(
                *uuid,
                Server {
                    uuid: *uuid,
                    name: name.clone(),
                    state: ServerState::Enabled,
                    api_endpoint: api_endpoint.clone(),
                    etag: at.seq,
                    failed: false,
                    failure_domain: String::new(),
                    slot,
                    eviction: None,
                },
            );
            vec![RowKey::Server(*uuid)]
        }
        Event::NodeRegistered {
            uuid,
            server_uuid,
            name,
            nvme_endpoint,
        } => {
            inv.nodes.insert(
                *uuid,
                Node {
                    uuid: *uuid,
                    server_uuid: *server_uuid,
                    name: name.clone(),
                    nvme_endpoint: nvme_endpoint.clone(),
                    etag: at.seq,
                },
            );
            vec![RowKey::Node(*uuid)]
        }
        Event::DeviceAdded { device } => {
            let mut device = device.clone();
            device.etag = at.seq;
            let key = RowKey::Device(device.serial.clone());
            let mut rows = vec![key];
            if inv.spares.remove(&device.serial).is_some() {
                rows.push(RowKey::Spare(device.serial.clone()));
            }
            inv.devices.insert(device.serial.clone(), device);
            rows
        }
        Event::SpareDevicesReported { node, devices } => {
            let mut rows: Vec<RowKey> = inv
                .spares
                .values()
                .filter(|d| d.node_uuid == *node)
                .map(|d| RowKey::Spare(d.serial.clone()))
                .collect();
            inv.spares.retain(|_, d| d.node_uuid != *node);
            for d in devices {
                let mut d = d.clone();
                d.etag = at.seq;
                rows.push(RowKey::Spare(d.serial.clone()));
                inv.spares.insert(d.serial.clone(), d);
            }
            rows
        }
        Event::FailureDomainSet {
            server_uuid,
            failure_domain,
        } => change_server(inv, *server_uuid, at, |s| {
            s.failure_domain = failure_domain.clone()
        }),
        Event::ServerFailed { uuid, .. } => change_server(inv, *uuid, at, |s| s.failed = true),
        Event::ServerRecovered { uuid, .. } => change_server(inv, *uuid, at, |s| s.failed = false),
        Event::ServerDisabled { uuid } => {
            change_server(inv, *uuid, at, |s| s.state = ServerState::Disabled)
        }
        Event::ServerEnabled { uuid } => {
            change_server(inv, *uuid, at, |s| s.state = ServerState::Enabled)
        }
        Event::ServerDeleted { uuid } => remove_server(state, *uuid, at),
        Event::ServerEvictionStarted { uuid, copies } => change_server(inv, *uuid, at, |s| {
            s.eviction = Some(Eviction {
                status: EvictionStatus::Evicting,
                start_unix_ns: at.time_unix_ns,
                end_unix_ns: 0,
                copies_at_start: *copies,
            })
        }),
        Event::ServerEvictionCompleted { uuid } => change_server(inv, *uuid, at, |s| {
            end_eviction(s, at, EvictionStatus::Completed)
        }),
        Event::ServerEvictionAborted { uuid } => change_server(inv, *uuid, at, |s| {
            end_eviction(s, at, EvictionStatus::Aborted)
        }),
        Event::ServerEvictionFailed { uuid } => change_server(inv, *uuid, at, |s| {
            end_eviction(s, at, EvictionStatus::Failed)
        }),
        Event::NodeReplacementStarted { .. } | Event::NodeReplacementCompleted { .. } => {
            replace::evolve(state, at, event)
        }
        Event::ServerCreated { .. } | Event::CreatedServerJoined { .. } => {
            creation::evolve(state, at, event)
        }
        Event::DeviceLedPatternSet { serial, pattern } => led::evolve(state, at, serial, *pattern),
    }
}

fn end_eviction(s: &mut Server, at: Applied, status: EvictionStatus) {
    let e = s
        .eviction
        .as_mut()
        .expect("invariant: an eviction ends only after it started");
    e.status = status;
    e.end_unix_ns = at.time_unix_ns;
}

fn change_server(
    inv: &mut Inventory,
    uuid: Uuid,
    at: Applied,
    change: impl FnOnce(&mut Server),
) -> Vec<RowKey> {
    let s = inv
        .servers
        .get_mut(&uuid)
        .expect("invariant: server events name a registered server");
    change(s);
    s.etag = at.seq;
    vec![RowKey::Server(uuid)]
}

/// A deleted server takes its node and devices along; volumes whose primary was there fail,
/// and replicas there are dropped from their volumes.
fn remove_server(state: &mut State, uuid: Uuid, at: Applied) -> Vec<RowKey> {
    let inv = &mut state.inventory;
    let mut rows = vec![RowKey::Server(uuid)];
    inv.servers.remove(&uuid);
    if inv.created.remove(&uuid).is_some() {
        rows.push(RowKey::ServerCreation(uuid));
    }
    let nodes: Vec<Uuid> = inv
        .nodes
        .values()
        .filter(|n| n.server_uuid == uuid)
        .map(|n| n.uuid)
        .collect();
    for n in &nodes {
        inv.nodes.remove(n);
        rows.push(RowKey::Node(*n));
        if inv.roles.remove(n).is_some() {
            rows.push(RowKey::NodeRole(*n));
        }
    }
    let serials: Vec<String> = inv
        .devices
        .values()
        .filter(|d| d.server_uuid == uuid)
        .map(|d| d.serial.clone())
        .collect();
    for s in serials {
        inv.devices.remove(&s);
        if inv.leds.remove(&s).is_some() {
            rows.push(RowKey::DeviceLed(s.clone()));
        }
        rows.push(RowKey::Device(s));
    }
    let touched: Vec<Uuid> = nodes.iter().flat_map(|n| volumes_on(state, *n)).collect();
    for v in touched {
        let mut vol = state
            .volumes
            .get(v)
            .cloned()
            .expect("invariant: volumes_on names existing volumes");
        vol.replica_nodes.retain(|r| !nodes.contains(r));
        vol.out_of_sync.retain(|r| !nodes.contains(r));
        vol.replacing
            .retain(|r| !nodes.contains(&r.node) && !nodes.contains(&r.replaces));
        if nodes.contains(&vol.node_uuid) {
            vol.state = VolumeState::Failed;
            vol.protection = super::volume::ProtectionState::NotAvailable;
        } else if vol.state != VolumeState::Failed {
            vol.protection = vol.protection_now();
        }
        vol.etag = at.seq;
        state.volumes.insert(vol);
        rows.push(RowKey::Volume(v));
    }
    rows
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::domain::cluster::tests::bootstrap_events;
    use crate::domain::cluster::Command as ClusterCommand;
    use crate::domain::volume::tests::new_volume;
    use crate::domain::volume::{
        Command as VolumeCommand, Event as VolumeEvent, ProtectionState, Volume,
    };
    use crate::domain::{decide as decide_any, test_ctx, Command as AnyCommand};

    pub(crate) fn apply(state: &mut State, events: &[AnyEvent]) {
        for e in events {
            let seq = state.cluster.etag.max(1000) + 1;
            let at = Applied {
                seq,
                time_unix_ns: 1,
            };
            state.evolve(at, e);
            state.cluster.etag = state.cluster.etag.max(seq);
        }
    }

    pub(crate) fn run(state: &mut State, cmd: AnyCommand) -> Result<Vec<AnyEvent>, DomainError> {
        let events = decide_any(state, &test_ctx(), &cmd)?;
        apply(state, &events);
        Ok(events)
    }

    pub(crate) fn join_cmd(n: u128, name: &str, fd: &str) -> AnyCommand {
        AnyCommand::Inventory(Command::JoinServer(Join {
            server_uuid: Uuid::from_u128(n),
            name: name.into(),
            api_endpoint: format!("127.0.0.1:{n}"),
            nvme_endpoint: format!("127.0.0.1:{}", n + 1),
            failure_domain: fd.into(),
            devices: vec![Device::backing_file(
                &format!("dev-{name}"),
                "/d/dev0",
                1 << 40,
            )],
        }))
    }

    /// Bootstrap plus servers `s2`, `s3`, `s4` in failure domains rack-a, rack-a, rack-b.
    pub(crate) fn four_servers() -> State {
        let mut s = State::default();
        apply(&mut s, &bootstrap_events());
        for (n, name, fd) in [
            (2, "s2", "rack-a"),
            (3, "s3", "rack-a"),
            (4, "s4", "rack-b"),
        ] {
            run(&mut s, join_cmd(n, name, fd)).unwrap();
        }
        s
    }

    pub(crate) fn leader(state: &mut State, epoch: u64) {
        let cmd = AnyCommand::Cluster(ClusterCommand::RecordLeader {
            server_uuid: Uuid::from_u128(2),
            epoch,
        });
        run(state, cmd).unwrap();
    }

    #[test]
    fn join_registers_server_node_devices_once_and_names_are_unique() {
        let mut s = four_servers();
        assert_eq!(s.inventory.servers.len(), 4);
        assert_eq!(s.inventory.nodes.len(), 4);
        let s2 = &s.inventory.servers[&Uuid::from_u128(2)];
        assert_eq!((s2.domain(), s2.state), ("rack-a", ServerState::Enabled));
        // The same server again (a restart): nothing.
        assert!(run(&mut s, join_cmd(2, "s2", "rack-a")).unwrap().is_empty());
        // Another server with a taken name.
        let err = run(&mut s, join_cmd(9, "s2", "")).unwrap_err();
        assert!(matches!(err, DomainError::AlreadyExists(_)), "{err:?}");
        // Before bootstrap nobody can join.
        let err = decide_any(&State::default(), &test_ctx(), &join_cmd(5, "x", "")).unwrap_err();
        assert!(matches!(err, DomainError::Unavailable(_)), "{err:?}");
    }

    #[test]
    fn spares_are_reported_once_and_join_their_own_nodes_pool_only() {
        let mut s = four_servers();
        let node_of = |s: &State, n: u128| s.inventory.node_of(Uuid::from_u128(n)).unwrap().uuid;
        let (n2, n3) = (node_of(&s, 2), node_of(&s, 3));
        let report = |node, serials: &[&str]| {
            AnyCommand::Inventory(Command::ReportSpareDevices {
                node,
                devices: serials
                    .iter()
                    .map(|x| Device::backing_file(x, &format!("/d/{x}"), 1 << 30))
                    .collect(),
            })
        };
        assert_eq!(run(&mut s, report(n2, &["sp-a", "sp-b"])).unwrap().len(), 1);
        assert!(
            run(&mut s, report(n2, &["sp-b", "sp-a"]))
                .unwrap()
                .is_empty(),
            "the same spares again (a restart): nothing"
        );
        assert_eq!(s.inventory.spares["sp-a"].node_uuid, n2);
        let add = |serial: &str, node| {
            AnyCommand::Inventory(Command::AddNvmeDevice {
                serial: serial.into(),
                node,
            })
        };
        let err = run(&mut s, add("sp-a", n3)).unwrap_err();
        assert!(matches!(err, DomainError::InvalidArgument(_)), "{err:?}");
        let err = run(&mut s, add("dev-s3", n3)).unwrap_err();
        assert!(
            matches!(err, DomainError::InvalidArgument(_)),
            "in a pool: {err:?}"
        );
        let err = run(&mut s, add("nope", n2)).unwrap_err();
        assert!(matches!(err, DomainError::NotFound(_)), "{err:?}");
        run(&mut s, add("sp-a", n2)).unwrap();
        assert_eq!(s.inventory.devices["sp-a"].node_uuid, n2);
        assert_eq!(s.inventory.spares.keys().collect::<Vec<_>>(), ["sp-b"]);
        // Reported again at the next start (sp-a is in the pool now): nothing changes.
        assert!(run(&mut s, report(n2, &["sp-a", "sp-b"]))
            .unwrap()
            .is_empty());
        // A disabled server's node takes no device.
        run(&mut s, report(n3, &["sp-c"])).unwrap();
        let disable = AnyCommand::Inventory(Command::DisableServer {
            uuid: Uuid::from_u128(3),
            if_match: None,
            force: true,
            evict: false,
        });
        run(&mut s, disable).unwrap();
        let err = run(&mut s, add("sp-c", n3)).unwrap_err();
        assert!(matches!(err, DomainError::InvalidArgument(_)), "{err:?}");
    }

    #[test]
    fn replicas_go_to_distinct_servers_and_failure_domains_when_possible() {
        let mut s = four_servers();
        let nodes = place(&s, 3, None).unwrap();
        let domains: BTreeSet<&str> = nodes
            .iter()
            .map(|n| s.inventory.server_of(*n).unwrap().domain())
            .collect();
        // Bootstrap's server, rack-a, rack-b: three distinct domains.
        assert_eq!(domains.len(), 3, "{domains:?}");
        // Only rack-a servers and one other left: a repeat of a domain, never of a server.
        leader(&mut s, 7);
        for n in [1u128, 4] {
            let uuid = if n == 1 {
                *s.inventory
                    .servers
                    .keys()
                    .find(|u| u.as_u128() > 10)
                    .unwrap()
            } else {
                Uuid::from_u128(n)
            };
            let cmd = Command::RecordServerHealth {
                uuid,
                alive: false,
                epoch: 7,
            };
            run(&mut s, AnyCommand::Inventory(cmd)).unwrap();
        }
        let nodes = place(&s, 2, None).unwrap();
        let servers: BTreeSet<Uuid> = nodes
            .iter()
            .map(|n| s.inventory.server_of(*n).unwrap().uuid)
            .collect();
        assert_eq!(servers, [Uuid::from_u128(2), Uuid::from_u128(3)].into());
        let err = place(&s, 3, None).unwrap_err();
        assert!(matches!(err, DomainError::InvalidArgument(_)), "{err:?}");
    }

    #[test]
    fn health_needs_the_recorded_leaders_epoch() {
        let mut s = four_servers();
        let failed = |epoch| {
            AnyCommand::Inventory(Command::RecordServerHealth {
                uuid: Uuid::from_u128(3),
                alive: false,
                epoch,
            })
        };
        // No leader recorded yet: no epoch is good.
        assert!(matches!(
            run(&mut s, failed(5)),
            Err(DomainError::StaleEpoch(_))
        ));
        leader(&mut s, 5);
        leader(&mut s, 9);
        // A deposed leader (epoch 5) is refused; the current one is heard.
        assert!(matches!(
            run(&mut s, failed(5)),
            Err(DomainError::StaleEpoch(_))
        ));
        assert_eq!(run(&mut s, failed(9)).unwrap().len(), 1);
        assert!(s.inventory.servers[&Uuid::from_u128(3)].failed);
        assert!(
            run(&mut s, failed(9)).unwrap().is_empty(),
            "no change, no event"
        );
        // An older epoch cannot be recorded as leader again.
        let old = AnyCommand::Cluster(ClusterCommand::RecordLeader {
            server_uuid: Uuid::from_u128(3),
            epoch: 6,
        });
        assert!(matches!(run(&mut s, old), Err(DomainError::StaleEpoch(_))));
    }

    #[test]
    fn disabled_servers_get_no_new_volumes_and_deletion_guards_data() {
        let mut s = four_servers();
        let s2 = Uuid::from_u128(2);
        for id in [1u128, 3, 4] {
            let uuid = match id {
                1 => *s
                    .inventory
                    .servers
                    .keys()
                    .find(|u| u.as_u128() > 10)
                    .unwrap(),
                n => Uuid::from_u128(n),
            };
            run(&mut s, disable(uuid, false, false)).unwrap();
        }
        let created = run(
            &mut s,
            AnyCommand::Volume(VolumeCommand::CreateVolume(new_volume("v1"))),
        )
        .unwrap();
        let AnyEvent::Volume(VolumeEvent::VolumeCreationRequested { volume }) = &created[0] else {
            panic!("{created:?}")
        };
        assert_eq!(s.inventory.server_of(volume.node_uuid).unwrap().uuid, s2);
        let delete = |force| {
            AnyCommand::Inventory(Command::DeleteServer {
                uuid: s2,
                if_match: None,
                force,
            })
        };
        // Running, and holding a volume.
        assert!(matches!(
            run(&mut s, delete(false)),
            Err(DomainError::Conflict(_))
        ));
        leader(&mut s, 3);
        let down = Command::RecordServerHealth {
            uuid: s2,
            alive: false,
            epoch: 3,
        };
        run(&mut s, AnyCommand::Inventory(down)).unwrap();
        // Down, but the only in-sync copy of v1: a precondition, not a race.
        let err = run(&mut s, delete(false)).unwrap_err();
        assert!(
            matches!(&err, DomainError::FailedPrecondition(m) if m.contains(&volume.uuid.to_string())),
            "{err:?}"
        );
        run(&mut s, delete(true)).unwrap();
        assert!(!s.inventory.servers.contains_key(&s2));
        assert!(s.inventory.node_of(s2).is_none());
        assert_eq!(
            s.volumes.get(volume.uuid).unwrap().state,
            crate::domain::volume::VolumeState::Failed
        );
    }

    pub(crate) fn disable(uuid: Uuid, force: bool, evict: bool) -> AnyCommand {
        AnyCommand::Inventory(Command::DisableServer {
            uuid,
            if_match: None,
            force,
            evict,
        })
    }

    pub(crate) fn enable(uuid: Uuid) -> AnyCommand {
        AnyCommand::Inventory(Command::EnableServer {
            uuid,
            if_match: None,
        })
    }

    fn complete(uuid: Uuid, leader_epoch: u64) -> AnyCommand {
        AnyCommand::Inventory(Command::CompleteEviction { uuid, leader_epoch })
    }

    /// Creates an available volume of `copies` copies (its id from `seed`); returns it.
    pub(crate) fn available_volume(state: &mut State, name: &str, copies: u32, seed: u8) -> Volume {
        let mut n = new_volume(name);
        n.replica_count = copies;
        let ctx = Ctx {
            seed: [seed; 16],
            ..test_ctx()
        };
        let cmd = AnyCommand::Volume(VolumeCommand::CreateVolume(n));
        let events = decide_any(state, &ctx, &cmd).unwrap();
        apply(state, &events);
        let AnyEvent::Volume(VolumeEvent::VolumeCreationRequested { volume }) = &events[0] else {
            panic!("{events:?}")
        };
        let uuid = volume.uuid;
        let done = VolumeCommand::MarkVolumeAvailable { uuid };
        run(state, AnyCommand::Volume(done)).unwrap();
        state.volumes.get(uuid).unwrap().clone()
    }

    pub(crate) fn server_of(state: &State, node: Uuid) -> Uuid {
        state.inventory.server_of(node).unwrap().uuid
    }

    pub(crate) fn in_sync(state: &State, uuid: Uuid, node: Uuid) -> AnyCommand {
        AnyCommand::Volume(VolumeCommand::MarkReplicaInSync {
            uuid,
            node,
            epoch: state.volumes.get(uuid).unwrap().epoch,
            copied_bytes: 1 << 30,
            snapshots: vec![],
        })
    }

    pub(crate) fn move_cmd(m: eviction::Move, leader_epoch: u64) -> AnyCommand {
        AnyCommand::Volume(VolumeCommand::MoveReplica {
            uuid: m.volume,
            from: m.from,
            to: m.to,
            leader_epoch,
        })
    }

    pub(crate) fn types(events: &[AnyEvent]) -> Vec<&'static str> {
        events.iter().map(AnyEvent::type_name).collect()
    }

    #[test]
    fn disabling_the_only_holder_of_a_volume_is_refused_unless_forced_or_evicting() {
        let mut s = four_servers();
        let v = available_volume(&mut s, "one", 1, 1);
        let holder = server_of(&s, v.node_uuid);
        assert_eq!(eviction::risk(&s, holder).0, Risk::Source);
        let err = run(&mut s, disable(holder, false, false)).unwrap_err();
        assert!(
            matches!(&err, DomainError::FailedPrecondition(m) if m.contains("one")),
            "{err:?}"
        );
        assert_eq!(s.inventory.servers[&holder].state, ServerState::Enabled);
        // Another server holds nothing: no risk, disabled as before.
        let other = *s.inventory.servers.keys().find(|u| **u != holder).unwrap();
        assert_eq!(eviction::risk(&s, other).0, Risk::No);
        assert_eq!(
            types(&run(&mut s, disable(other, false, false)).unwrap()),
            ["ServerDisabled"]
        );
        assert_eq!(
            types(&run(&mut s, disable(holder, true, false)).unwrap()),
            ["ServerDisabled"]
        );
        // An empty server's eviction completes at once.
        let empty = *s
            .inventory
            .servers
            .keys()
            .find(|u| **u != holder && **u != other)
            .unwrap();
        assert_eq!(
            types(&run(&mut s, disable(empty, false, true)).unwrap()),
            [
                "ServerDisabled",
                "ServerEvictionStarted",
                "ServerEvictionCompleted"
            ]
        );
        let e = s.inventory.servers[&empty].eviction.clone().unwrap();
        assert_eq!((e.status, e.progress(0)), (EvictionStatus::Completed, 100));
    }

    #[test]
    fn risk_is_in_risk_for_a_copy_of_a_degraded_volume_that_is_not_the_last() {
        let mut s = four_servers();
        let v = available_volume(&mut s, "three", 3, 1);
        let out = v.replica_nodes[0];
        let cmd = VolumeCommand::MarkReplicaOutOfSync {
            uuid: v.uuid,
            node: out,
            epoch: v.epoch,
        };
        run(&mut s, AnyCommand::Volume(cmd)).unwrap();
        let primary = server_of(&s, v.node_uuid);
        assert_eq!(eviction::risk(&s, primary).0, Risk::In);
        assert_eq!(eviction::risk(&s, server_of(&s, out)).0, Risk::No);
        // Down to one in-sync copy: its holder is the source.
        let cmd = VolumeCommand::MarkReplicaOutOfSync {
            uuid: v.uuid,
            node: v.replica_nodes[1],
            epoch: v.epoch,
        };
        run(&mut s, AnyCommand::Volume(cmd)).unwrap();
        assert_eq!(eviction::risk(&s, primary).0, Risk::Source);
    }

    #[test]
    fn evicting_moves_a_replica_make_before_break_then_completes() {
        let mut s = four_servers();
        leader(&mut s, 7);
        let v = available_volume(&mut s, "two", 2, 1);
        let (primary, old) = (v.node_uuid, v.replica_nodes[0]);
        let evicted = server_of(&s, old);
        let events = run(&mut s, disable(evicted, false, true)).unwrap();
        assert_eq!(types(&events), ["ServerDisabled", "ServerEvictionStarted"]);
        let plan = eviction::plan(&s, evicted);
        assert_eq!(plan.remaining, 1);
        let [m] = plan.moves[..] else {
            panic!("{plan:?}")
        };
        assert_eq!((m.volume, m.from), (v.uuid, old));
        assert!(!v.nodes().any(|n| n == m.to));
        // The new copy is in a failure domain the primary's does not share, when one exists.
        let used = s.inventory.server_of(primary).unwrap().domain().to_string();
        assert_ne!(s.inventory.server_of(m.to).unwrap().domain(), used);
        // Only the recorded leader orders moves.
        assert!(matches!(
            run(&mut s, move_cmd(m, 6)),
            Err(DomainError::StaleEpoch(_))
        ));
        let added = run(&mut s, move_cmd(m, 7)).unwrap();
        assert_eq!(types(&added), ["VolumeReplicaAdded"]);
        assert!(run(&mut s, move_cmd(m, 7)).unwrap().is_empty(), "a repeat");
        let during = s.volumes.get(v.uuid).unwrap().clone();
        assert_eq!(during.replica_nodes, [old, m.to]);
        assert_eq!(during.out_of_sync, [m.to]);
        assert_eq!(during.protection, ProtectionState::FullyProtected);
        assert!(
            eviction::plan(&s, evicted).moves.is_empty(),
            "one at a time"
        );
        assert!(run(&mut s, complete(evicted, 7)).unwrap().is_empty());
        // In sync: the replaced copy leaves in the same decision.
        let cmd = in_sync(&s, v.uuid, m.to);
        let done = run(&mut s, cmd).unwrap();
        assert_eq!(
            types(&done),
            ["VolumeReplicaInSync", "VolumeReplicaRemoved"]
        );
        let after = s.volumes.get(v.uuid).unwrap();
        assert_eq!(after.nodes().collect::<Vec<_>>(), [primary, m.to]);
        assert!(after.out_of_sync.is_empty() && after.replacing.is_empty());
        assert_eq!(after.protection, ProtectionState::FullyProtected);
        let plan = eviction::plan(&s, evicted);
        assert_eq!((plan.remaining, plan.moves.len()), (0, 0));
        assert!(matches!(
            run(&mut s, complete(evicted, 6)),
            Err(DomainError::StaleEpoch(_))
        ));
        assert_eq!(
            types(&run(&mut s, complete(evicted, 7)).unwrap()),
            ["ServerEvictionCompleted"]
        );
        let e = s.inventory.servers[&evicted].eviction.clone().unwrap();
        assert_eq!(e.status, EvictionStatus::Completed);
        assert_eq!((e.copies_at_start, e.progress(0)), (1, 100));
    }

    #[test]
    fn a_primary_without_another_copy_moves_by_a_new_copy_and_a_hand_over() {
        let mut s = four_servers();
        leader(&mut s, 7);
        let v = available_volume(&mut s, "one", 1, 1);
        let old = v.node_uuid;
        let evicted = server_of(&s, old);
        run(&mut s, disable(evicted, false, true)).unwrap();
        let [m] = eviction::plan(&s, evicted).moves[..] else {
            panic!("no move planned")
        };
        assert_eq!(m.from, old);
        run(&mut s, move_cmd(m, 7)).unwrap();
        // In sync, but the primary cannot simply leave: the leader hands it over.
        let cmd = in_sync(&s, v.uuid, m.to);
        let synced = run(&mut s, cmd).unwrap();
        assert_eq!(types(&synced), ["VolumeReplicaInSync"]);
        let vol = s.volumes.get(v.uuid).unwrap().clone();
        assert_eq!(
            crate::domain::volume::failover_target(&s, &vol),
            Some((m.to, true))
        );
        let promote = VolumeCommand::PromoteReplica {
            uuid: v.uuid,
            node: m.to,
            leader_epoch: 7,
            planned: true,
        };
        let handed = run(&mut s, AnyCommand::Volume(promote)).unwrap();
        assert_eq!(
            types(&handed),
            ["VolumePrimaryHandedOver", "VolumeReplicaRemoved"]
        );
        let after = s.volumes.get(v.uuid).unwrap();
        assert_eq!(after.nodes().collect::<Vec<_>>(), [m.to]);
        assert_eq!(after.releasing, Some(old));
        assert_eq!(after.protection, ProtectionState::FullyProtected);
        assert_eq!(
            types(&run(&mut s, complete(evicted, 7)).unwrap()),
            ["ServerEvictionCompleted"]
        );
    }

    /// Four servers led at epoch 7, a volume `two` of two copies whose replica's server is
    /// being evicted, and the one move its eviction plans, ordered.
    fn evicting_two_with_its_move_ordered() -> (State, Volume, Uuid, eviction::Move) {
        let mut s = four_servers();
        leader(&mut s, 7);
        let v = available_volume(&mut s, "two", 2, 1);
        let evicted = server_of(&s, v.replica_nodes[0]);
        run(&mut s, disable(evicted, false, true)).unwrap();
        let [m] = eviction::plan(&s, evicted).moves[..] else {
            panic!("no move planned")
        };
        run(&mut s, move_cmd(m, 7)).unwrap();
        (s, v, evicted, m)
    }

    #[test]
    fn enabling_an_evicting_server_aborts_and_drops_the_new_copies() {
        let (mut s, v, evicted, _) = evicting_two_with_its_move_ordered();
        let events = run(&mut s, enable(evicted)).unwrap();
        assert_eq!(
            types(&events),
            [
                "ServerEnabled",
                "ServerEvictionAborted",
                "VolumeReplicaRemoved"
            ]
        );
        let after = s.volumes.get(v.uuid).unwrap();
        assert_eq!(after.replica_nodes, v.replica_nodes);
        assert!(after.out_of_sync.is_empty() && after.replacing.is_empty());
        let server = &s.inventory.servers[&evicted];
        assert_eq!(server.state, ServerState::Enabled);
        assert_eq!(
            server.eviction.as_ref().map(|e| e.status),
            Some(EvictionStatus::Aborted)
        );
        // A late order of the aborted move finds no eviction to serve: nothing completes.
        assert!(run(&mut s, complete(evicted, 7)).unwrap().is_empty());
    }

    #[test]
    fn a_move_whose_target_failed_is_cancelled_and_starts_again_elsewhere() {
        let (mut s, v, evicted, m) = evicting_two_with_its_move_ordered();
        assert!(eviction::plan(&s, evicted).cancels.is_empty());
        let down = Command::RecordServerHealth {
            uuid: server_of(&s, m.to),
            alive: false,
            epoch: 7,
        };
        run(&mut s, AnyCommand::Inventory(down)).unwrap();
        let plan = eviction::plan(&s, evicted);
        assert_eq!(plan.cancels, [(v.uuid, m.to)]);
        let cancel = |leader_epoch| {
            AnyCommand::Volume(VolumeCommand::CancelReplicaMove {
                uuid: v.uuid,
                node: m.to,
                leader_epoch,
            })
        };
        assert!(matches!(
            run(&mut s, cancel(6)),
            Err(DomainError::StaleEpoch(_))
        ));
        assert_eq!(
            types(&run(&mut s, cancel(7)).unwrap()),
            ["VolumeReplicaRemoved"]
        );
        assert!(run(&mut s, cancel(7)).unwrap().is_empty(), "a repeat");
        assert_eq!(
            s.volumes.get(v.uuid).unwrap().replica_nodes,
            v.replica_nodes
        );
        let [again] = eviction::plan(&s, evicted).moves[..] else {
            panic!("no new move planned")
        };
        assert!(again.to != m.to && again.from == m.from, "{again:?}");
    }

    #[test]
    fn a_down_server_with_copies_others_hold_in_sync_can_be_deleted() {
        let mut s = four_servers();
        leader(&mut s, 7);
        let v = available_volume(&mut s, "two", 2, 1);
        let replica = server_of(&s, v.replica_nodes[0]);
        let primary = server_of(&s, v.node_uuid);
        for uuid in [replica, primary] {
            let down = Command::RecordServerHealth {
                uuid,
                alive: false,
                epoch: 7,
            };
            run(&mut s, AnyCommand::Inventory(down)).unwrap();
        }
        let delete = |uuid| {
            AnyCommand::Inventory(Command::DeleteServer {
                uuid,
                if_match: None,
                force: false,
            })
        };
        // Both down: each is the last in-sync copy on a live server.
        assert!(matches!(
            run(&mut s, delete(replica)),
            Err(DomainError::FailedPrecondition(_))
        ));
        let up = Command::RecordServerHealth {
            uuid: primary,
            alive: true,
            epoch: 7,
        };
        run(&mut s, AnyCommand::Inventory(up)).unwrap();
        // The primary still holds it: the replica may go (its volume turns Degraded); the
        // primary may not (it is the primary, and then the last copy).
        assert!(matches!(
            run(&mut s, delete(primary)),
            Err(DomainError::Conflict(_))
        ));
        run(&mut s, delete(replica)).unwrap();
        let after = s.volumes.get(v.uuid).unwrap();
        assert!(after.replica_nodes.is_empty() && after.out_of_sync.is_empty());
        assert_eq!(after.protection, ProtectionState::Degraded);
        assert!(matches!(
            run(&mut s, delete(primary)),
            Err(DomainError::Conflict(_))
        ));
    }
}
