//! Servers created through the API (`CreateServer`) before their process joins.
//!
//! In evstor a server is an `evstor serve --etcd … --name …` process, and it joins by
//! itself (`JoinServer`). `CreateServer` pre-registers one by its endpoint so an operator
//! can add servers through the API: `ServerCreated` lists it `Creating`, with that
//! endpoint, the UUID given (or a fresh one) and a slot. LightOS names the new server's
//! etcd peer URL; evstor's etcd is external, so the endpoint is the address the new
//! process will publish: its `--api-addr` or its `--nvme-addr` (`host:port`, or a URL
//! such as `https://10.0.0.4:8443`; only host and port count). A process starting for the
//! first time (no `server-id` in its data directory) takes the UUID of the `Creating`
//! server whose endpoint is one of its addresses ([`created_for`]) and joins as that
//! server, which turns `Enabled` (`CreatedServerJoined` follows its registration). With
//! `extendCluster` false its node joins `Unattached` (no volume is placed there; it can be
//! the target of a node replacement), as in LightOS. A process whose addresses match no
//! created server joins as before, under its own UUID.
//!
//! Refused: no endpoint or a malformed one (400), more than one (400, "Multiple endpoints
//! provided"), a UUID in use (409), an endpoint another `Creating` server has (409), or
//! one a registered server uses as its API or NVMe/TCP endpoint (409 unless `reuseIP`).
//! The leader records no health for a `Creating` server (it has no process yet); enabling
//! or disabling one is refused (409); deleting one needs no flag.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::inventory::{Event, Inventory, Server, ServerState};
use super::url::HttpUrl;
use super::{Applied, Ctx, DomainError, Event as AnyEvent, RowKey, State};
use crate::limits::SERVERS_MAX;

/// What `CreateServer` recorded of a server that has not joined yet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerCreation {
    /// `host:port`, as [`endpoint`] normalizes it.
    pub endpoint: String,
    pub extend_cluster: bool,
}

/// `CreateServer`'s request.
#[derive(Debug, Clone, PartialEq)]
pub struct Create {
    /// `None`: a fresh one.
    pub uuid: Option<Uuid>,
    pub endpoints: Vec<String>,
    pub reuse_ip: bool,
    pub extend_cluster: bool,
}

/// An endpoint as `host:port` (an IPv6 host in brackets), from `host:port` or an http(s)
/// URL with an explicit port and no path.
pub fn endpoint(text: &str) -> Result<String, DomainError> {
    let bad = |why: &str| DomainError::InvalidArgument(format!("server endpoint {text:?} {why}"));
    let url = if text.contains("://") {
        text.to_string()
    } else {
        format!("http://{text}")
    };
    let u = HttpUrl::parse(&url).map_err(|e| bad(&e))?;
    if u.path != "/" {
        return Err(bad("has a path; give host:port"));
    }
    let authority = u.authority();
    let written = url
        .split_once("://")
        .map_or("", |(_, rest)| rest.trim_end_matches('/'));
    if !written.eq_ignore_ascii_case(&authority) {
        return Err(bad("needs an explicit port (host:port)"));
    }
    Ok(authority.to_ascii_lowercase())
}

/// `endpoint`, or `None` for text that is not one (recorded endpoints of older servers).
fn normalized(text: &str) -> Option<String> {
    endpoint(text).ok()
}

/// The endpoints registered servers use: their API endpoints and their nodes' NVMe/TCP
/// endpoints, with the server.
fn endpoints_in_use(inv: &Inventory) -> impl Iterator<Item = (String, &Server)> {
    let api = inv
        .servers
        .values()
        .filter(|s| s.state != ServerState::Creating)
        .filter_map(|s| normalized(&s.api_endpoint).map(|e| (e, s)));
    let nvme = inv.nodes.values().filter_map(|n| {
        let s = inv.servers.get(&n.server_uuid)?;
        normalized(&n.nvme_endpoint).map(|e| (e, s))
    });
    api.chain(nvme)
}

/// `CreateServer` (see the module doc).
pub fn create(state: &State, ctx: &Ctx, c: &Create) -> Result<Vec<AnyEvent>, DomainError> {
    if !state.cluster.initialized {
        return Err(DomainError::Unavailable(
            "the cluster is not initialized yet".into(),
        ));
    }
    let text = match c.endpoints.as_slice() {
        [one] => one,
        [] => {
            return Err(DomainError::InvalidArgument(
                "serverEndpoints needs the new server's endpoint".into(),
            ))
        }
        _ => {
            return Err(DomainError::InvalidArgument(format!(
                "multiple endpoints provided ({}): give one",
                c.endpoints.len()
            )))
        }
    };
    let endpoint = endpoint(text)?;
    let uuid = c.uuid.unwrap_or_else(|| ctx.new_id(0));
    let inv = &state.inventory;
    if uuid.is_nil() {
        return Err(DomainError::InvalidArgument(
            "serverUUID must not be the nil UUID".into(),
        ));
    }
    if let Some(s) = inv.servers.get(&uuid) {
        return Err(DomainError::AlreadyExists(format!(
            "server {uuid} exists already ({})",
            state_name(s)
        )));
    }
    if inv.created.values().any(|x| x.endpoint == endpoint) {
        return Err(DomainError::AlreadyExists(format!(
            "a server with endpoint {endpoint} is being created already"
        )));
    }
    if let Some((_, s)) = endpoints_in_use(inv).find(|(e, _)| *e == endpoint) {
        if !c.reuse_ip {
            return Err(DomainError::AlreadyExists(format!(
                "endpoint {endpoint} is used by server {} ({}); set reuseIP to use it anyway",
                s.name, s.uuid
            )));
        }
    }
    if inv.servers.len() >= SERVERS_MAX {
        return Err(DomainError::FailedPrecondition(format!(
            "the cluster has {SERVERS_MAX} servers, the most it can have"
        )));
    }
    Ok(vec![AnyEvent::Inventory(Event::ServerCreated {
        uuid,
        endpoint,
        extend_cluster: c.extend_cluster,
    })])
}

fn state_name(s: &Server) -> &str {
    if s.name.is_empty() {
        "being created"
    } else {
        &s.name
    }
}

/// The `Creating` server a first-starting process with these addresses joins as: the one
/// whose endpoint is one of them (the first by id if several, which `create` prevents).
pub fn created_for(state: &State, addresses: &[String]) -> Option<Uuid> {
    let mine: Vec<String> = addresses.iter().filter_map(|a| normalized(a)).collect();
    state
        .inventory
        .created
        .iter()
        .find(|(_, c)| mine.contains(&c.endpoint))
        .map(|(uuid, _)| *uuid)
}

/// Whether `uuid` names a server created through the API that has not joined yet.
pub fn creating(state: &State, uuid: Uuid) -> bool {
    state.inventory.created.contains_key(&uuid)
}

/// The slot a new server gets: the smallest free one.
pub fn free_slot(inv: &Inventory) -> u32 {
    let used: std::collections::BTreeSet<u32> = inv.servers.values().map(|s| s.slot).collect();
    (1..).find(|n| !used.contains(n)).unwrap_or(1)
}

/// Applies `ServerCreated` and `CreatedServerJoined`.
pub fn evolve(state: &mut State, at: Applied, event: &Event) -> Vec<RowKey> {
    let inv = &mut state.inventory;
    match event {
        Event::ServerCreated {
            uuid,
            endpoint,
            extend_cluster,
        } => {
            let slot = free_slot(inv);
            inv.servers.insert(
                *uuid,
                Server {
                    uuid: *uuid,
                    name: String::new(),
                    state: ServerState::Creating,
                    api_endpoint: endpoint.clone(),
                    etag: at.seq,
                    failed: false,
                    failure_domain: String::new(),
                    slot,
                    eviction: None,
                },
            );
            inv.created.insert(
                *uuid,
                ServerCreation {
                    endpoint: endpoint.clone(),
                    extend_cluster: *extend_cluster,
                },
            );
            vec![RowKey::Server(*uuid), RowKey::ServerCreation(*uuid)]
        }
        Event::CreatedServerJoined { uuid } => {
            let mut rows = vec![RowKey::ServerCreation(*uuid)];
            let extend = inv.created.remove(uuid).is_none_or(|c| c.extend_cluster);
            let node = inv.node_of(*uuid).map(|n| n.uuid);
            if let (false, Some(node)) = (extend, node) {
                inv.roles.entry(node).or_default().unattached = true;
                rows.push(RowKey::NodeRole(node));
            }
            rows
        }
        _ => unreachable!("creation::evolve handles server creation events only"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::inventory::tests::{four_servers, join_cmd, run, types};
    use crate::domain::inventory::{Command, Join};
    use crate::domain::Command as AnyCommand;

    fn create(uuid: u128, endpoints: &[&str], reuse_ip: bool, extend_cluster: bool) -> AnyCommand {
        AnyCommand::Inventory(Command::CreateServer(Create {
            uuid: Some(Uuid::from_u128(uuid)),
            endpoints: endpoints.iter().map(|e| e.to_string()).collect(),
            reuse_ip,
            extend_cluster,
        }))
    }

    /// The join of server `uuid`'s process with API address `api`.
    fn join_as(uuid: u128, name: &str, api: &str) -> AnyCommand {
        let AnyCommand::Inventory(Command::JoinServer(j)) = join_cmd(uuid, name, "") else {
            unreachable!()
        };
        AnyCommand::Inventory(Command::JoinServer(Join {
            api_endpoint: api.into(),
            ..j
        }))
    }

    #[test]
    fn endpoints_are_host_and_port_from_an_address_or_a_url() {
        for (text, want) in [
            ("https://10.0.0.1:8443", "10.0.0.1:8443"),
            ("http://10.0.0.1:2380/", "10.0.0.1:2380"),
            ("10.0.0.1:8443", "10.0.0.1:8443"),
            ("[fd00::1]:4420", "[fd00::1]:4420"),
            ("http://Storage.Example:80", "storage.example:80"),
        ] {
            assert_eq!(endpoint(text).unwrap(), want, "{text}");
        }
        for bad in [
            "",
            "10.0.0.1",
            "https://10.0.0.1",
            "http://10.0.0.1:2380/x",
            "ftp://a:1",
            "a b:1",
        ] {
            assert!(
                matches!(endpoint(bad), Err(DomainError::InvalidArgument(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn a_created_server_is_creating_until_its_process_joins_under_its_id() {
        let mut s = four_servers();
        let created = Uuid::from_u128(50);
        let err = |s: &mut State, cmd| run(s, cmd).unwrap_err();
        assert!(matches!(
            err(&mut s, create(50, &[], false, false)),
            DomainError::InvalidArgument(_)
        ));
        assert!(matches!(
            err(&mut s, create(50, &["127.0.0.1:9000", "127.0.0.1:9001"], false, false)),
            DomainError::InvalidArgument(m) if m.contains("multiple")
        ));
        // s2's API endpoint (join_cmd: 127.0.0.1:<id>) and its node's NVMe/TCP endpoint.
        for used in ["https://127.0.0.1:2", "127.0.0.1:3"] {
            assert!(matches!(
                err(&mut s, create(50, &[used], false, false)),
                DomainError::AlreadyExists(_)
            ));
        }
        assert!(matches!(
            err(&mut s, create(2, &["127.0.0.1:9000"], false, false)),
            DomainError::AlreadyExists(_)
        ));
        let events = run(
            &mut s,
            create(50, &["https://127.0.0.1:9000"], false, false),
        )
        .unwrap();
        assert_eq!(types(&events), ["ServerCreated"]);
        let server = s.inventory.servers[&created].clone();
        assert_eq!(
            (server.state, server.api_endpoint.as_str()),
            (ServerState::Creating, "127.0.0.1:9000")
        );
        assert_eq!(server.slot, 5, "the smallest free slot");
        // Its endpoint is taken, even with reuseIP; a registered server's may be reused.
        assert!(matches!(
            err(&mut s, create(51, &["127.0.0.1:9000"], true, false)),
            DomainError::AlreadyExists(_)
        ));
        run(&mut s, create(51, &["127.0.0.1:2"], true, true)).unwrap();
        // Nothing to enable or disable yet; deleting needs no flag.
        let enable = AnyCommand::Inventory(Command::EnableServer {
            uuid: created,
            if_match: None,
        });
        assert!(matches!(err(&mut s, enable), DomainError::Conflict(_)));
        let delete = AnyCommand::Inventory(Command::DeleteServer {
            uuid: Uuid::from_u128(51),
            if_match: None,
            force: false,
        });
        assert_eq!(types(&run(&mut s, delete).unwrap()), ["ServerDeleted"]);
        assert!(!s.inventory.created.contains_key(&Uuid::from_u128(51)));
        // A first-starting process with that address takes the id and joins.
        let addresses = ["0.0.0.0:1".to_string(), "127.0.0.1:9000".to_string()];
        assert_eq!(created_for(&s, &addresses), Some(created));
        assert_eq!(created_for(&s, &addresses[..1]), None);
        let joined = run(&mut s, join_as(50, "s5", "127.0.0.1:9000")).unwrap();
        assert_eq!(
            types(&joined),
            [
                "ServerRegistered",
                "NodeRegistered",
                "DeviceAdded",
                "CreatedServerJoined"
            ]
        );
        let server = &s.inventory.servers[&created];
        assert_eq!(
            (server.state, server.name.as_str(), server.slot),
            (ServerState::Enabled, "s5", 5)
        );
        assert!(s.inventory.created.is_empty());
        assert_eq!(created_for(&s, &addresses), None);
        // Not extending the cluster: its node is unattached.
        let node = s.inventory.node_of(created).unwrap().uuid;
        assert!(s.inventory.role(node).unattached && !s.inventory.takes_new_copies(node));
        assert!(
            run(&mut s, join_as(50, "s5", "127.0.0.1:9000"))
                .unwrap()
                .is_empty(),
            "a restart"
        );
    }

    #[test]
    fn a_created_server_that_extends_the_cluster_takes_volumes() {
        let mut s = four_servers();
        run(&mut s, create(50, &["127.0.0.1:9000"], false, true)).unwrap();
        run(&mut s, join_as(50, "s5", "127.0.0.1:9000")).unwrap();
        let node = s.inventory.node_of(Uuid::from_u128(50)).unwrap().uuid;
        assert!(s.inventory.takes_new_copies(node));
        let nodes = crate::domain::inventory::place(&s, 5, None).unwrap();
        assert!(nodes.contains(&node), "{nodes:?}");
    }
}
