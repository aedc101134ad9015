//! Servers, nodes and NVMe devices: the hardware the cluster runs on. On one machine that is
//! one server with one node whose devices (files or block devices) make its storage pool.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{Applied, Ctx, DomainError, Event as AnyEvent, RowKey, State};

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
}

#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// Server start-up: a device named in the configuration joins the node's pool.
    AddDevice { device: Device },
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
}

impl Event {
    pub fn type_name(&self) -> &'static str {
        match self {
            Event::ServerRegistered { .. } => "ServerRegistered",
            Event::NodeRegistered { .. } => "NodeRegistered",
            Event::DeviceAdded { .. } => "DeviceAdded",
        }
    }
}

pub fn decide(state: &State, _: &Ctx, cmd: &Command) -> Result<Vec<AnyEvent>, DomainError> {
    match cmd {
        Command::AddDevice { device } => {
            let inv = &state.inventory;
            if inv.devices.values().any(|d| d.path == device.path) {
                return Ok(vec![]); // already in the pool: a restart with the same config
            }
            if inv.devices.contains_key(&device.serial) {
                return Err(DomainError::AlreadyExists(format!(
                    "an NVMe device with serial {} is already in the pool",
                    device.serial
                )));
            }
            let mut device = device.clone();
            if let Some(n) = inv.first_node() {
                device.node_uuid = n.uuid;
                device.server_uuid = n.server_uuid;
            }
            Ok(vec![AnyEvent::Inventory(Event::DeviceAdded { device })])
        }
    }
}

pub fn evolve(state: &mut State, at: Applied, event: &Event) -> Vec<RowKey> {
    let inv = &mut state.inventory;
    match event {
        Event::ServerRegistered {
            uuid,
            name,
            api_endpoint,
        } => {
            inv.servers.insert(
                *uuid,
                Server {
                    uuid: *uuid,
                    name: name.clone(),
                    state: ServerState::Enabled,
                    api_endpoint: api_endpoint.clone(),
                    etag: at.seq,
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
            inv.devices.insert(device.serial.clone(), device);
            vec![key]
        }
    }
}
