//! The domain core: commands, events, `decide` and `evolve` for every resource.
//!
//! Architecture Invariant: nothing in here does I/O or knows about HTTP, JSON, tokio or
//! RocksDB. `decide` is pure: everything it needs from the outside world (the time, the actor,
//! fresh ids) arrives in [`Ctx`]. `evolve` applies an event that `decide` produced (or that
//! the journal replays); it panics only on an event it cannot apply, which is corruption.
//!
//! Each resource lives in its own module with its own `Command` and `Event` enums; this module
//! only routes between them and owns the aggregate [`State`].

pub mod cluster;
pub mod config;
pub mod creation;
pub mod credential;
pub mod duration;
pub mod endpoint;
mod error;
pub mod eviction;
pub mod federation;
pub mod flag;
pub mod inventory;
pub mod led;
pub mod names;
pub mod policy;
pub mod project;
pub mod replace;
pub mod schedule;
pub mod snapshot;
pub mod url;
pub mod volume;

pub use error::DomainError;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// What `decide` may know of the world beyond the state.
#[derive(Debug, Clone)]
pub struct Ctx {
    pub now_unix_ns: u64,
    /// The token subject, or `system`.
    pub actor: String,
    /// Random seed for ids minted by this command (see [`Ctx::new_id`]).
    pub seed: [u8; 16],
}

impl Ctx {
    /// The `n`th fresh id of this command: deterministic for a given seed, so tests and replay
    /// see the same ids.
    pub fn new_id(&self, n: u8) -> Uuid {
        let mut bytes = self.seed;
        if n != 0 {
            // Spread `n` over every byte so sibling ids do not share a prefix.
            let mut x = u64::from(n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            for b in bytes.iter_mut() {
                x ^= x >> 29;
                x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
                *b ^= (x >> 56) as u8;
            }
        }
        uuid::Builder::from_random_bytes(bytes).into_uuid()
    }
}

/// Where an event sits in the log, handed to `evolve` so projections can carry versions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    pub seq: u64,
    pub time_unix_ns: u64,
}

/// Every projection of the cluster.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    pub cluster: cluster::ClusterState,
    pub projects: project::Projects,
    pub volumes: volume::Volumes,
    pub snapshots: snapshot::Snapshots,
    pub policies: policy::Policies,
    pub credentials: credential::Credentials,
    pub config: config::ClusterConfig,
    pub flags: flag::FeatureFlags,
    pub inventory: inventory::Inventory,
    pub resource_policies: schedule::ResourcePolicies,
    pub federation: federation::Federation,
    pub endpoints: endpoint::AdminEndpoints,
}

/// A request to change the cluster.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    Cluster(cluster::Command),
    Project(project::Command),
    Volume(volume::Command),
    Snapshot(snapshot::Command),
    Policy(policy::Command),
    Credential(credential::Command),
    Config(config::Command),
    Flag(flag::Command),
    Inventory(inventory::Command),
    Schedule(schedule::Command),
    Federation(federation::Command),
    Endpoint(endpoint::Command),
}

/// A fact that happened. Variant names of the inner enums are the stable event type strings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Event {
    Cluster(cluster::Event),
    Project(project::Event),
    Volume(volume::Event),
    Snapshot(snapshot::Event),
    Policy(policy::Event),
    Credential(credential::Event),
    Config(config::Event),
    Flag(flag::Event),
    Inventory(inventory::Event),
    Schedule(schedule::Event),
    Federation(federation::Event),
    Endpoint(endpoint::Event),
}

/// A projection row that an event changed; the store persists exactly these.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RowKey {
    Cluster,
    Project(String),
    Volume(Uuid),
    Snapshot(Uuid),
    Policy(Uuid),
    Credential(String, String),
    ConfigParam(String),
    Flag(String),
    Server(Uuid),
    Node(Uuid),
    Device(String),
    ResourcePolicy(Uuid),
    /// The federated authentication switch.
    Federation,
    Idp(String),
    IdpClient(String),
    AuthMap(String),
    AdminEndpoint(Uuid, u16),
    /// A node's role (`inventory::Inventory::roles`).
    NodeRole(Uuid),
    /// A server created through the API, until it joins (`inventory::Inventory::created`).
    ServerCreation(Uuid),
    /// A device's LED pattern (`inventory::Inventory::leds`).
    DeviceLed(String),
    /// A spare device (`inventory::Inventory::spares`).
    Spare(String),
}

/// Decides what `command` means given `state`: the events to append, or why not.
pub fn decide(state: &State, ctx: &Ctx, command: &Command) -> Result<Vec<Event>, DomainError> {
    match command {
        Command::Cluster(c) => cluster::decide(state, ctx, c),
        Command::Project(c) => project::decide(state, ctx, c),
        // A volume's deletion also deletes its resource policies.
        Command::Volume(c) => volume::decide(state, ctx, c)
            .map(|events| schedule::cascade_volume_deletions(state, events)),
        Command::Snapshot(c) => snapshot::decide(state, ctx, c),
        Command::Policy(c) => policy::decide(state, ctx, c),
        Command::Credential(c) => credential::decide(state, ctx, c),
        Command::Config(c) => config::decide(state, ctx, c),
        Command::Flag(c) => flag::decide(state, ctx, c),
        Command::Inventory(c) => inventory::decide(state, ctx, c),
        Command::Schedule(c) => schedule::decide(state, ctx, c),
        Command::Federation(c) => federation::decide(state, ctx, c),
        Command::Endpoint(c) => endpoint::decide(state, ctx, c),
    }
}

impl State {
    /// Applies one event; returns the projection rows it changed.
    pub fn evolve(&mut self, at: Applied, event: &Event) -> Vec<RowKey> {
        match event {
            Event::Cluster(e) => cluster::evolve(self, at, e),
            Event::Project(e) => project::evolve(self, at, e),
            Event::Volume(e) => volume::evolve(self, at, e),
            Event::Snapshot(e) => snapshot::evolve(self, at, e),
            Event::Policy(e) => policy::evolve(self, at, e),
            Event::Credential(e) => credential::evolve(self, at, e),
            Event::Config(e) => config::evolve(self, at, e),
            Event::Flag(e) => flag::evolve(self, at, e),
            Event::Inventory(e) => inventory::evolve(self, at, e),
            Event::Schedule(e) => schedule::evolve(self, at, e),
            Event::Federation(e) => federation::evolve(self, at, e),
            Event::Endpoint(e) => endpoint::evolve(self, at, e),
        }
    }
}

impl Event {
    /// The stable type string stored in the envelope (the inner variant's name).
    pub fn type_name(&self) -> &'static str {
        match self {
            Event::Cluster(e) => e.type_name(),
            Event::Project(e) => e.type_name(),
            Event::Volume(e) => e.type_name(),
            Event::Snapshot(e) => e.type_name(),
            Event::Policy(e) => e.type_name(),
            Event::Credential(e) => e.type_name(),
            Event::Config(e) => e.type_name(),
            Event::Flag(e) => e.type_name(),
            Event::Inventory(e) => e.type_name(),
            Event::Schedule(e) => e.type_name(),
            Event::Federation(e) => e.type_name(),
            Event::Endpoint(e) => e.type_name(),
        }
    }

    /// The project the event belongs to, empty for cluster-wide events.
    pub fn project<'a>(&'a self, state: &'a State) -> &'a str {
        match self {
            Event::Project(e) => e.project(),
            Event::Volume(e) => e.project(state),
            Event::Snapshot(e) => e.project(state),
            Event::Credential(e) => e.project(),
            Event::Schedule(e) => e.project(state),
            _ => "",
        }
    }
}

/// Given/when/then for domain tests: apply `given`, decide `when`, return the outcome.
#[cfg(test)]
pub(crate) fn given_when(given: &[Event], when: Command) -> Result<Vec<Event>, DomainError> {
    let mut state = State::default();
    for (i, e) in given.iter().enumerate() {
        let at = Applied {
            seq: i as u64 + 1,
            time_unix_ns: 1_000 + i as u64,
        };
        state.evolve(at, e);
    }
    decide(&state, &test_ctx(), &when)
}

#[cfg(test)]
pub(crate) fn test_ctx() -> Ctx {
    Ctx {
        now_unix_ns: 1_700_000_000_000_000_000,
        actor: "tester".into(),
        seed: [7; 16],
    }
}
