//! Admin endpoints: the TCP ports and local addresses each server serves the management API
//! on. The set is per server (keyed by its UUID); a server with nothing recorded serves its
//! `--api-addr`, the bootstrap default, which the first change records along with itself.
//!
//! `decide` keeps every server reachable: a change may not leave a server without an
//! endpoint. That the new addresses can be bound is the API's to check before it submits
//! (it binds them first, so a refused bind changes nothing).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::names::check_etag;
use super::{Applied, Ctx, DomainError, Event as AnyEvent, RowKey, State};
use crate::limits::{ADMIN_ENDPOINTS_MAX, ADMIN_ENDPOINT_IPS_MAX};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminEndpoint {
    pub server: Uuid,
    pub port: u16,
    /// Local addresses the API listens on at this port, canonical text, sorted.
    pub ips: Vec<String>,
    /// Seq of the event that last changed it (0: the unrecorded bootstrap default).
    pub etag: u64,
}

impl AdminEndpoint {
    /// The socket addresses it listens on.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.ips
            .iter()
            .filter_map(|ip| ip.parse::<IpAddr>().ok())
            .map(|ip| SocketAddr::new(ip, self.port))
            .collect()
    }
}

/// Every server's recorded endpoints.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AdminEndpoints {
    pub by_server: BTreeMap<Uuid, BTreeMap<u16, AdminEndpoint>>,
}

impl AdminEndpoints {
    /// What `server` serves on: its recorded endpoints, or `default` if none is recorded.
    pub fn effective(&self, server: Uuid, default: SocketAddr) -> Vec<AdminEndpoint> {
        match self.by_server.get(&server) {
            Some(recorded) if !recorded.is_empty() => recorded.values().cloned().collect(),
            _ => vec![AdminEndpoint {
                server,
                port: default.port(),
                ips: vec![default.ip().to_string()],
                etag: 0,
            }],
        }
    }

    /// Every socket address of `server`'s effective endpoints.
    pub fn addrs(&self, server: Uuid, default: SocketAddr) -> Vec<SocketAddr> {
        self.effective(server, default)
            .iter()
            .flat_map(AdminEndpoint::addrs)
            .collect()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    CreateAdminEndpoint {
        server: Uuid,
        /// The server's `--api-addr`, recorded too if nothing is recorded yet.
        default: SocketAddr,
        port: u32,
        ips: Vec<String>,
    },
    UpdateAdminEndpoint {
        server: Uuid,
        default: SocketAddr,
        port: u32,
        ips: Vec<String>,
        if_match: Option<String>,
        /// The local address the request came to: the change must leave an endpoint on it.
        caller: Option<IpAddr>,
    },
    DeleteAdminEndpoint {
        server: Uuid,
        default: SocketAddr,
        port: u32,
        if_match: Option<String>,
        caller: Option<IpAddr>,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Event {
    AdminEndpointCreated {
        server: Uuid,
        port: u16,
        ips: Vec<String>,
    },
    AdminEndpointUpdated {
        server: Uuid,
        port: u16,
        ips: Vec<String>,
    },
    AdminEndpointDeleted {
        server: Uuid,
        port: u16,
    },
}

impl Event {
    pub fn type_name(&self) -> &'static str {
        match self {
            Event::AdminEndpointCreated { .. } => "AdminEndpointCreated",
            Event::AdminEndpointUpdated { .. } => "AdminEndpointUpdated",
            Event::AdminEndpointDeleted { .. } => "AdminEndpointDeleted",
        }
    }

    pub fn subject(&self) -> String {
        match self {
            Event::AdminEndpointCreated { server, port, ips }
            | Event::AdminEndpointUpdated { server, port, ips } => {
                format!(
                    "admin endpoint {port} ({}) of server {server}",
                    ips.join(", ")
                )
            }
            Event::AdminEndpointDeleted { server, port } => {
                format!("admin endpoint {port} of server {server}")
            }
        }
    }
}

fn invalid(what: impl Into<String>) -> DomainError {
    DomainError::InvalidArgument(what.into())
}

/// A TCP port a listener can have.
pub fn check_port(port: u32) -> Result<u16, DomainError> {
    match u16::try_from(port) {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(invalid(format!("port {port} is not a TCP port (1-65535)"))),
    }
}

/// Distinct IP addresses, in canonical text, sorted. A wildcard (`0.0.0.0`, `::`) covers
/// every address of its family, so it stands alone in it: both could not be bound.
pub fn check_ips(ips: &[String]) -> Result<Vec<String>, DomainError> {
    if ips.is_empty() || ips.len() > ADMIN_ENDPOINT_IPS_MAX {
        return Err(invalid(format!(
            "ips must list 1-{ADMIN_ENDPOINT_IPS_MAX} local addresses (0.0.0.0 for all IPv4)"
        )));
    }
    let mut parsed = Vec::with_capacity(ips.len());
    for text in ips {
        let ip: IpAddr = text
            .trim()
            .parse()
            .map_err(|_| invalid(format!("{text:?} is not an IP address")))?;
        if parsed.contains(&ip) {
            return Err(invalid(format!("address {ip} is listed twice")));
        }
        parsed.push(ip);
    }
    for ip in parsed.iter().filter(|ip| ip.is_unspecified()) {
        if parsed
            .iter()
            .any(|o| o != ip && o.is_ipv4() == ip.is_ipv4())
        {
            return Err(invalid(format!(
                "{ip} already covers every address of its family; list it alone"
            )));
        }
    }
    parsed.sort();
    Ok(parsed.iter().map(IpAddr::to_string).collect())
}

pub fn decide(state: &State, _ctx: &Ctx, cmd: &Command) -> Result<Vec<AnyEvent>, DomainError> {
    let (server, default) = match cmd {
        Command::CreateAdminEndpoint {
            server, default, ..
        }
        | Command::UpdateAdminEndpoint {
            server, default, ..
        }
        | Command::DeleteAdminEndpoint {
            server, default, ..
        } => (*server, *default),
    };
    if !state.inventory.servers.contains_key(&server) {
        return Err(DomainError::not_found("server", server));
    }
    let recorded = state
        .endpoints
        .by_server
        .get(&server)
        .is_some_and(|r| !r.is_empty());
    let current = state.endpoints.effective(server, default);
    let change = change_of(cmd, server, &current, recorded)?;
    if let Command::UpdateAdminEndpoint {
        caller: Some(ip), ..
    }
    | Command::DeleteAdminEndpoint {
        caller: Some(ip), ..
    } = cmd
    {
        keeps_caller(&current, &change, *ip)?;
    }
    let mut events = Vec::new();
    // Nothing recorded: a creation records the default beside the new endpoint (an update
    // of the default records it as it becomes; a deletion never gets here).
    if !recorded && matches!(cmd, Command::CreateAdminEndpoint { .. }) {
        let d = &current[0];
        events.push(AnyEvent::Endpoint(Event::AdminEndpointCreated {
            server,
            port: d.port,
            ips: d.ips.clone(),
        }));
    }
    events.push(AnyEvent::Endpoint(change));
    Ok(events)
}

/// Refuses a change after which no endpoint listens on `caller` (the address the request
/// came to), directly or through its family's wildcard: the caller would be locked out.
fn keeps_caller(
    current: &[AdminEndpoint],
    change: &Event,
    caller: IpAddr,
) -> Result<(), DomainError> {
    let covers = |ips: &[String]| {
        ips.iter()
            .filter_map(|t| t.parse::<IpAddr>().ok())
            .any(|ip| ip == caller || (ip.is_unspecified() && ip.is_ipv4() == caller.is_ipv4()))
    };
    let (changed_port, new_ips) = match change {
        Event::AdminEndpointCreated { port, ips, .. }
        | Event::AdminEndpointUpdated { port, ips, .. } => (*port, Some(ips.as_slice())),
        Event::AdminEndpointDeleted { port, .. } => (*port, None),
    };
    let others = current.iter().filter(|e| e.port != changed_port);
    if others.map(|e| e.ips.as_slice()).chain(new_ips).any(covers) {
        return Ok(());
    }
    Err(DomainError::FailedPrecondition(format!(
        "after this change no admin endpoint would listen on {caller}, the address this \
         request came to: you would be locked out; add an endpoint on it first"
    )))
}

/// The event that records `cmd` against the server's `current` endpoints.
fn change_of(
    cmd: &Command,
    server: Uuid,
    current: &[AdminEndpoint],
    recorded: bool,
) -> Result<Event, DomainError> {
    let find = |port: u16| {
        current
            .iter()
            .find(|e| e.port == port)
            .ok_or_else(|| DomainError::NotFound(format!("no admin endpoint on port {port}")))
    };
    Ok(match cmd {
        Command::CreateAdminEndpoint { port, ips, .. } => {
            let port = check_port(*port)?;
            let ips = check_ips(ips)?;
            if find(port).is_ok() {
                return Err(DomainError::AlreadyExists(format!(
                    "admin endpoint on port {port} already exists"
                )));
            }
            if current.len() >= ADMIN_ENDPOINTS_MAX {
                return Err(DomainError::ResourceExhausted(format!(
                    "a server has at most {ADMIN_ENDPOINTS_MAX} admin endpoints"
                )));
            }
            Event::AdminEndpointCreated { server, port, ips }
        }
        Command::UpdateAdminEndpoint {
            port,
            ips,
            if_match,
            ..
        } => {
            let port = check_port(*port)?;
            let ips = check_ips(ips)?;
            let e = find(port)?;
            check_etag("admin endpoint", port, e.etag, if_match)?;
            if !recorded {
                // The default was never recorded: record the endpoint as it now is.
                Event::AdminEndpointCreated { server, port, ips }
            } else {
                Event::AdminEndpointUpdated { server, port, ips }
            }
        }
        Command::DeleteAdminEndpoint { port, if_match, .. } => {
            let port = check_port(*port)?;
            let e = find(port)?;
            check_etag("admin endpoint", port, e.etag, if_match)?;
            if current.len() == 1 {
                return Err(DomainError::FailedPrecondition(format!(
                    "port {port} is the last admin endpoint of this server: the API would be \
                     unreachable; create another endpoint first"
                )));
            }
            Event::AdminEndpointDeleted { server, port }
        }
    })
}

pub fn evolve(state: &mut State, at: Applied, event: &Event) -> Vec<RowKey> {
    let by_server = &mut state.endpoints.by_server;
    match event {
        Event::AdminEndpointCreated { server, port, ips }
        | Event::AdminEndpointUpdated { server, port, ips } => {
            by_server.entry(*server).or_default().insert(
                *port,
                AdminEndpoint {
                    server: *server,
                    port: *port,
                    ips: ips.clone(),
                    etag: at.seq,
                },
            );
            vec![RowKey::AdminEndpoint(*server, *port)]
        }
        Event::AdminEndpointDeleted { server, port } => {
            if let Some(ports) = by_server.get_mut(server) {
                ports.remove(port);
                if ports.is_empty() {
                    by_server.remove(server);
                }
            }
            vec![RowKey::AdminEndpoint(*server, *port)]
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::cluster::tests::{bootstrap_events, bootstrapped};
    use crate::domain::{given_when, Command as AnyCommand};

    fn default() -> SocketAddr {
        "127.0.0.1:8443".parse().unwrap()
    }

    fn server() -> Uuid {
        *bootstrapped().inventory.servers.keys().next().unwrap()
    }

    fn create(port: u32, ips: &[&str]) -> AnyCommand {
        AnyCommand::Endpoint(Command::CreateAdminEndpoint {
            server: server(),
            default: default(),
            port,
            ips: ips.iter().map(|s| s.to_string()).collect(),
        })
    }

    fn delete(port: u32, if_match: Option<&str>) -> AnyCommand {
        AnyCommand::Endpoint(Command::DeleteAdminEndpoint {
            server: server(),
            default: default(),
            port,
            if_match: if_match.map(str::to_string),
            caller: None,
        })
    }

    #[test]
    fn a_change_that_leaves_no_endpoint_on_the_callers_address_is_refused() {
        let mut g = bootstrap_events();
        g.extend(given_when(&g, create(9443, &["127.0.0.2"])).unwrap());
        let caller: IpAddr = "127.0.0.1".parse().unwrap();
        let delete_as = |port: u32| {
            AnyCommand::Endpoint(Command::DeleteAdminEndpoint {
                server: server(),
                default: default(),
                port,
                if_match: None,
                caller: Some(caller),
            })
        };
        let update_as = |port: u32, ips: &[&str]| {
            AnyCommand::Endpoint(Command::UpdateAdminEndpoint {
                server: server(),
                default: default(),
                port,
                ips: ips.iter().map(|s| s.to_string()).collect(),
                if_match: None,
                caller: Some(caller),
            })
        };
        // 8443 is the only endpoint on 127.0.0.1.
        assert!(matches!(
            given_when(&g, delete_as(8443)),
            Err(DomainError::FailedPrecondition(_))
        ));
        assert!(matches!(
            given_when(&g, update_as(8443, &["127.0.0.3"])),
            Err(DomainError::FailedPrecondition(_))
        ));
        assert!(
            given_when(&g, update_as(8443, &["0.0.0.0"])).is_ok(),
            "the wildcard covers it"
        );
        assert!(given_when(&g, delete_as(9443)).is_ok());
        assert!(given_when(&g, update_as(9443, &["127.0.0.1"])).is_ok());
    }

    #[test]
    fn given_nothing_recorded_when_create_then_the_default_is_recorded_with_it() {
        let events = given_when(&bootstrap_events(), create(9443, &["127.0.0.1"])).unwrap();
        assert_eq!(
            events,
            vec![
                AnyEvent::Endpoint(Event::AdminEndpointCreated {
                    server: server(),
                    port: 8443,
                    ips: vec!["127.0.0.1".into()]
                }),
                AnyEvent::Endpoint(Event::AdminEndpointCreated {
                    server: server(),
                    port: 9443,
                    ips: vec!["127.0.0.1".into()]
                }),
            ]
        );
        let mut g = bootstrap_events();
        g.extend(events);
        // Now recorded: the next change records itself only.
        let more = given_when(&g, create(9444, &["::1", "127.0.0.1"])).unwrap();
        assert_eq!(more.len(), 1);
        assert!(matches!(
            given_when(&g, create(8443, &["127.0.0.1"])),
            Err(DomainError::AlreadyExists(_))
        ));
    }

    #[test]
    fn the_last_endpoint_cannot_go_and_moving_is_create_then_delete() {
        let g = bootstrap_events();
        assert!(matches!(
            given_when(&g, delete(8443, None)),
            Err(DomainError::FailedPrecondition(_))
        ));
        assert!(matches!(
            given_when(&g, delete(1, None)),
            Err(DomainError::NotFound(_))
        ));
        let mut g = g;
        g.extend(given_when(&g, create(9443, &["127.0.0.1"])).unwrap());
        assert!(matches!(
            given_when(&g, delete(8443, Some("1"))),
            Err(DomainError::EtagMismatch(_))
        ));
        g.extend(given_when(&g, delete(8443, None)).unwrap());
        let mut s = State::default();
        for (i, e) in g.iter().enumerate() {
            s.evolve(
                Applied {
                    seq: i as u64 + 1,
                    time_unix_ns: 1,
                },
                e,
            );
        }
        assert_eq!(
            s.endpoints.addrs(server(), default()),
            vec!["127.0.0.1:9443".parse::<SocketAddr>().unwrap()]
        );
        assert!(matches!(
            given_when(&g, delete(9443, None)),
            Err(DomainError::FailedPrecondition(_))
        ));
    }

    #[test]
    fn ports_and_addresses_are_checked() {
        let g = bootstrap_events();
        for (port, ips) in [
            (0, vec!["127.0.0.1"]),
            (70000, vec!["127.0.0.1"]),
            (9443, vec![]),
            (9443, vec!["localhost"]),
            (9443, vec!["127.0.0.1", "127.0.0.1"]),
            (9443, vec!["0.0.0.0", "127.0.0.1"]),
        ] {
            assert!(
                matches!(
                    given_when(&g, create(port, &ips)),
                    Err(DomainError::InvalidArgument(_))
                ),
                "{port} {ips:?}"
            );
        }
        assert!(given_when(&g, create(9443, &["0.0.0.0", "::1"])).is_ok());
        let unknown = AnyCommand::Endpoint(Command::CreateAdminEndpoint {
            server: Uuid::nil(),
            default: default(),
            port: 9443,
            ips: vec!["127.0.0.1".into()],
        });
        assert!(matches!(
            given_when(&g, unknown),
            Err(DomainError::NotFound(_))
        ));
    }
}
