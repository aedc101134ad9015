//! The cluster itself: identity, subsystem NQN, the one-time bootstrap that creates the
//! first server, node, devices, the `system` and `default` projects and the root credential,
//! and (cluster mode) which server leads the orchestration, under which epoch.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{credential, inventory, project, Applied, Ctx, DomainError, Event as AnyEvent};
use super::{RowKey, State};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ClusterState {
    pub initialized: bool,
    pub uuid: Uuid,
    pub name: String,
    pub subsystem_nqn: String,
    pub created_unix_ns: u64,
    /// Seq of the last event that changed the cluster object (its ETag).
    pub etag: u64,
    /// The server whose orchestrator leads (cluster mode; nil before the first election).
    pub leader_server: Uuid,
    /// The leader's epoch: the etcd revision that created its leader key. Only grows.
    pub leader_epoch: u64,
}

/// What `evstor serve` found on first start.
#[derive(Debug, Clone, PartialEq)]
pub struct Bootstrap {
    pub hostname: String,
    pub api_endpoint: String,
    pub nvme_endpoint: String,
    pub devices: Vec<inventory::Device>,
    /// PEM of the root public key, stored as credential `system:root`.
    pub root_public_key_pem: String,
    /// The first server's id (cluster mode: chosen by the server); `None` mints one.
    pub server_uuid: Option<Uuid>,
    pub failure_domain: String,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    Bootstrap(Bootstrap),
    /// The orchestrator of `server_uuid` won the election with `epoch`.
    RecordLeader {
        server_uuid: Uuid,
        epoch: u64,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Event {
    ClusterInitialized {
        uuid: Uuid,
        name: String,
        subsystem_nqn: String,
    },
    LeaderElected {
        server_uuid: Uuid,
        epoch: u64,
    },
}

impl Event {
    pub fn type_name(&self) -> &'static str {
        match self {
            Event::ClusterInitialized { .. } => "ClusterInitialized",
            Event::LeaderElected { .. } => "LeaderElected",
        }
    }
}

/// An orchestrator step must come from the recorded leader's epoch: an older epoch is a
/// deposed leader, a newer one has not recorded its election yet.
pub fn check_epoch(state: &State, epoch: u64) -> Result<(), DomainError> {
    if epoch != state.cluster.leader_epoch {
        return Err(DomainError::StaleEpoch(format!(
            "stale leader: epoch {epoch} is not the recorded leader's epoch {}",
            state.cluster.leader_epoch
        )));
    }
    Ok(())
}

fn record_leader(
    state: &State,
    server_uuid: Uuid,
    epoch: u64,
) -> Result<Vec<AnyEvent>, DomainError> {
    if !state.cluster.initialized {
        return Err(DomainError::Unavailable(
            "the cluster is not initialized yet".into(),
        ));
    }
    let c = &state.cluster;
    if epoch == c.leader_epoch && server_uuid == c.leader_server {
        return Ok(vec![]);
    }
    if epoch <= c.leader_epoch {
        return Err(DomainError::StaleEpoch(format!(
            "stale leader: epoch {epoch} is not newer than the recorded {}",
            c.leader_epoch
        )));
    }
    Ok(vec![AnyEvent::Cluster(Event::LeaderElected {
        server_uuid,
        epoch,
    })])
}

/// The subsystem NQN of a cluster, derived from its UUID.
pub fn subsystem_nqn(uuid: Uuid) -> String {
    format!("nqn.2016-01.com.lightbitslabs:uuid:{uuid}")
}

pub fn decide(state: &State, ctx: &Ctx, cmd: &Command) -> Result<Vec<AnyEvent>, DomainError> {
    let b = match cmd {
        Command::Bootstrap(b) => b,
        Command::RecordLeader { server_uuid, epoch } => {
            return record_leader(state, *server_uuid, *epoch)
        }
    };
    inventory::check_failure_domain(&b.failure_domain)?;
    if state.cluster.initialized {
        return Err(DomainError::AlreadyExists(
            "the cluster is already initialized".into(),
        ));
    }
    let uuid = ctx.new_id(0);
    let server_uuid = b.server_uuid.unwrap_or_else(|| ctx.new_id(1));
    let node_uuid = ctx.new_id(2);
    let mut events = vec![AnyEvent::Cluster(Event::ClusterInitialized {
        uuid,
        name: format!("evstor-{}", &uuid.simple().to_string()[..8]),
        subsystem_nqn: subsystem_nqn(uuid),
    })];
    events.extend(inventory::registration(
        server_uuid,
        node_uuid,
        &b.hostname,
        &b.api_endpoint,
        &b.nvme_endpoint,
        &b.failure_domain,
        &b.devices,
    ));
    for (n, name, description) in [
        (3, "system", "cluster administration project"),
        (4, "default", "default project"),
    ] {
        events.push(AnyEvent::Project(project::Event::ProjectCreated {
            uuid: ctx.new_id(n),
            name: name.into(),
            description: description.into(),
            default_policies: vec![],
        }));
    }
    events.push(AnyEvent::Credential(credential::Event::CredentialCreated {
        project: "system".into(),
        id: "root".into(),
        kind: credential::CredentialType::Rs256PubKey,
        payload_pem: b.root_public_key_pem.clone(),
    }));
    Ok(events)
}

pub fn evolve(state: &mut State, at: Applied, event: &Event) -> Vec<RowKey> {
    match event {
        Event::ClusterInitialized {
            uuid,
            name,
            subsystem_nqn,
        } => {
            state.cluster = ClusterState {
                initialized: true,
                uuid: *uuid,
                name: name.clone(),
                subsystem_nqn: subsystem_nqn.clone(),
                created_unix_ns: at.time_unix_ns,
                etag: at.seq,
                leader_server: Uuid::nil(),
                leader_epoch: 0,
            };
        }
        // Not an ETag change: the cluster object a client sees is the same.
        Event::LeaderElected { server_uuid, epoch } => {
            state.cluster.leader_server = *server_uuid;
            state.cluster.leader_epoch = *epoch;
        }
    }
    vec![RowKey::Cluster]
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::domain::{decide as decide_any, test_ctx, Command as AnyCommand};

    pub(crate) fn bootstrap_events() -> Vec<AnyEvent> {
        let cmd = AnyCommand::Cluster(Command::Bootstrap(Bootstrap {
            hostname: "host".into(),
            api_endpoint: "127.0.0.1:443".into(),
            nvme_endpoint: "127.0.0.1:4420".into(),
            devices: vec![inventory::Device::backing_file("dev0", "/d/dev0", 1 << 40)],
            root_public_key_pem: "PEM".into(),
            server_uuid: None,
            failure_domain: String::new(),
        }));
        decide_any(&State::default(), &test_ctx(), &cmd).unwrap()
    }

    /// A state as `evstor serve` leaves it after first start.
    pub(crate) fn bootstrapped() -> State {
        let mut s = State::default();
        for (i, e) in bootstrap_events().iter().enumerate() {
            s.evolve(
                Applied {
                    seq: i as u64 + 1,
                    time_unix_ns: 1,
                },
                e,
            );
        }
        s
    }

    #[test]
    fn given_nothing_when_bootstrap_then_cluster_server_node_projects_and_root_key() {
        let events = bootstrap_events();
        let names: Vec<_> = events.iter().map(AnyEvent::type_name).collect();
        assert_eq!(
            names,
            [
                "ClusterInitialized",
                "ServerRegistered",
                "NodeRegistered",
                "DeviceAdded",
                "ProjectCreated",
                "ProjectCreated",
                "CredentialCreated"
            ]
        );
        let s = bootstrapped();
        assert!(s
            .cluster
            .subsystem_nqn
            .starts_with("nqn.2016-01.com.lightbitslabs:uuid:"));
        assert!(s.projects.get("system").is_some() && s.projects.get("default").is_some());
        assert_eq!(s.inventory.servers.len(), 1);
    }

    #[test]
    fn given_initialized_when_bootstrap_again_then_already_exists() {
        let s = bootstrapped();
        let cmd = AnyCommand::Cluster(Command::Bootstrap(Bootstrap {
            hostname: "h".into(),
            api_endpoint: String::new(),
            nvme_endpoint: String::new(),
            devices: vec![],
            root_public_key_pem: String::new(),
            server_uuid: None,
            failure_domain: String::new(),
        }));
        assert!(matches!(
            decide_any(&s, &test_ctx(), &cmd),
            Err(DomainError::AlreadyExists(_))
        ));
    }
}
