//! Federated authentication: the OpenID Connect identity providers (IdPs) whose tokens the API
//! accepts, the client configurations that say which tokens of an IdP are meant for us and
//! how their roles are found, the auth maps (identifier → `scope:role`), and the switch.
//!
//! Only configuration lives here; verifying a token (discovery, JWKS, signatures) is
//! [`crate::idp`]'s. Secrets never reach an event: a proxy is named by its URL only (the API
//! refuses proxy credentials), and OIDC needs no client secret on a resource server.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::names::check_name;
use super::url::HttpUrl;
use super::{Applied, Ctx, DomainError, Event as AnyEvent, RowKey, State};
use crate::limits::{AUTH_MAPS_MAX, CLAIM_BYTES_MAX, IDP_CLIENT_CONFS_MAX, IDP_CONFIGURATIONS_MAX};

/// The `clientId` a Converge client configuration must carry.
pub const NOT_APPLICABLE: &str = "NOT_APPLICABLE";

/// The IdP product (`IDPType`); every kind is spoken to as plain OpenID Connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum IdpType {
    Unknown,
    Adfs,
}

/// How a token's identifiers are found (`AuthorizationMode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AuthzMode {
    /// The calling application: the token's `client_id` (or `azp`).
    App,
    /// The user: `sub`, the `groups` claim and the configured claim.
    User,
    /// Both, for every token of the IdP another configuration accepted.
    Converge,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdpConfig {
    pub uuid: Uuid,
    pub name: String,
    /// The issuer identifier: tokens' `iss` must equal it, discovery is under it.
    pub issuer_url: String,
    pub kind: IdpType,
    /// An HTTP proxy to reach the IdP through (`http://host:port`), or empty.
    pub proxy_url: String,
    /// Seq of the event that last changed it: its ETag, and the JWKS cache's generation.
    pub etag: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdpClientConf {
    pub uuid: Uuid,
    pub name: String,
    /// The audience a token must name to be accepted ([`NOT_APPLICABLE`] for Converge).
    pub client_id: String,
    pub idp: String,
    /// The claim whose values are identifiers (User and Converge modes).
    pub claim_name: String,
    pub mode: AuthzMode,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthMapEntry {
    pub uuid: Uuid,
    pub name: String,
    /// Matched exactly against a token's identifiers.
    pub identifier: String,
    /// A project name, or `system`.
    pub scope: String,
    /// `admin` or `viewer` on a project, `cluster-admin` on `system`.
    pub role: String,
    pub idp: String,
}

/// Every federation setting.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Federation {
    pub enabled: bool,
    pub idps: BTreeMap<String, IdpConfig>,
    pub clients: BTreeMap<String, IdpClientConf>,
    pub maps: BTreeMap<String, AuthMapEntry>,
}

impl Federation {
    /// The IdP whose issuer is `iss` (a trailing `/` does not count).
    pub fn idp_by_issuer(&self, iss: &str) -> Option<&IdpConfig> {
        let want = iss.trim_end_matches('/');
        self.idps
            .values()
            .find(|i| i.issuer_url.trim_end_matches('/') == want)
    }

    pub fn clients_of<'a>(&'a self, idp: &'a str) -> impl Iterator<Item = &'a IdpClientConf> {
        self.clients.values().filter(move |c| c.idp == idp)
    }

    pub fn maps_of<'a>(&'a self, idp: &'a str) -> impl Iterator<Item = &'a AuthMapEntry> {
        self.maps.values().filter(move |m| m.idp == idp)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    CreateIdpConfiguration {
        name: String,
        issuer_url: String,
        kind: IdpType,
        proxy_url: String,
    },
    /// Fields left `None` keep their value.
    UpdateIdpConfiguration {
        name: String,
        issuer_url: Option<String>,
        kind: Option<IdpType>,
        proxy_url: Option<String>,
    },
    DeleteIdpConfiguration {
        name: String,
    },
    CreateIdpClientConf {
        name: String,
        client_id: String,
        idp: String,
        claim_name: String,
        mode: AuthzMode,
    },
    UpdateIdpClientConf {
        name: String,
        claim_name: String,
    },
    DeleteIdpClientConf {
        name: String,
    },
    /// Creates the entry, or (`update`) replaces an existing one.
    PutAuthMapEntry {
        name: String,
        identifier: String,
        scope: String,
        role: String,
        idp: String,
        update: bool,
    },
    DeleteAuthMapEntry {
        name: String,
    },
    EnableFederatedAuthentication,
    DisableFederatedAuthentication,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Event {
    IdpConfigurationCreated { config: IdpConfig },
    IdpConfigurationUpdated { config: IdpConfig },
    IdpConfigurationDeleted { name: String },
    IdpClientConfCreated { conf: IdpClientConf },
    IdpClientConfUpdated { name: String, claim_name: String },
    IdpClientConfDeleted { name: String },
    AuthMapEntryCreated { entry: AuthMapEntry },
    AuthMapEntryUpdated { entry: AuthMapEntry },
    AuthMapEntryDeleted { name: String },
    FederatedAuthenticationEnabled,
    FederatedAuthenticationDisabled,
}

impl Event {
    pub fn type_name(&self) -> &'static str {
        match self {
            Event::IdpConfigurationCreated { .. } => "IdpConfigurationCreated",
            Event::IdpConfigurationUpdated { .. } => "IdpConfigurationUpdated",
            Event::IdpConfigurationDeleted { .. } => "IdpConfigurationDeleted",
            Event::IdpClientConfCreated { .. } => "IdpClientConfCreated",
            Event::IdpClientConfUpdated { .. } => "IdpClientConfUpdated",
            Event::IdpClientConfDeleted { .. } => "IdpClientConfDeleted",
            Event::AuthMapEntryCreated { .. } => "AuthMapEntryCreated",
            Event::AuthMapEntryUpdated { .. } => "AuthMapEntryUpdated",
            Event::AuthMapEntryDeleted { .. } => "AuthMapEntryDeleted",
            Event::FederatedAuthenticationEnabled => "FederatedAuthenticationEnabled",
            Event::FederatedAuthenticationDisabled => "FederatedAuthenticationDisabled",
        }
    }

    /// What the event is about, for the events API.
    pub fn subject(&self) -> String {
        match self {
            Event::IdpConfigurationCreated { config }
            | Event::IdpConfigurationUpdated { config } => {
                format!("IdP configuration {} ({})", config.name, config.issuer_url)
            }
            Event::IdpConfigurationDeleted { name } => format!("IdP configuration {name}"),
            Event::IdpClientConfCreated { conf } => {
                format!("IdP client configuration {}", conf.name)
            }
            Event::IdpClientConfUpdated { name, .. } | Event::IdpClientConfDeleted { name } => {
                format!("IdP client configuration {name}")
            }
            Event::AuthMapEntryCreated { entry } | Event::AuthMapEntryUpdated { entry } => format!(
                "auth map entry {} ({} -> {}:{})",
                entry.name, entry.identifier, entry.scope, entry.role
            ),
            Event::AuthMapEntryDeleted { name } => format!("auth map entry {name}"),
            Event::FederatedAuthenticationEnabled | Event::FederatedAuthenticationDisabled => {
                "federated authentication".into()
            }
        }
    }
}

fn invalid(what: impl Into<String>) -> DomainError {
    DomainError::InvalidArgument(what.into())
}

/// An issuer evstor can trust: https, or http on this machine's loopback only (plain http
/// elsewhere would let anyone on the path swap the IdP's keys).
pub fn check_issuer(url: &str) -> Result<(), DomainError> {
    let u = HttpUrl::parse(url).map_err(|e| invalid(format!("idpIssuerURL {url:?} {e}")))?;
    if u.path.contains('?') {
        return Err(invalid(format!("idpIssuerURL {url:?} has a query")));
    }
    if !u.https && !u.is_loopback() {
        return Err(invalid(format!(
            "idpIssuerURL {url:?} is plain http; use https (http is accepted on loopback only)"
        )));
    }
    Ok(())
}

/// A proxy is `http://host:port` (empty: none).
pub fn check_proxy(url: &str) -> Result<(), DomainError> {
    if url.is_empty() {
        return Ok(());
    }
    let u = HttpUrl::parse(url).map_err(|e| invalid(format!("proxy URL {url:?} {e}")))?;
    if u.https || u.path != "/" {
        return Err(invalid(format!(
            "proxy URL {url:?} must be http://<host>:<port>"
        )));
    }
    Ok(())
}

/// Identifiers, client ids and claim names: 1-256 bytes of printable text.
fn check_text(what: &str, value: &str) -> Result<(), DomainError> {
    if value.is_empty() || value.len() > CLAIM_BYTES_MAX || value.chars().any(char::is_control) {
        return Err(invalid(format!(
            "{what} {value:?} must be 1-{CLAIM_BYTES_MAX} bytes without control characters"
        )));
    }
    Ok(())
}

/// `scope:role` as tokens grant it: `system:cluster-admin`, `<project>:admin|viewer`.
pub fn check_scope_role(scope: &str, role: &str) -> Result<(), DomainError> {
    check_name("scope", scope)?;
    let ok = match scope {
        "system" => role == "cluster-admin",
        _ => matches!(role, "admin" | "viewer"),
    };
    if !ok {
        return Err(invalid(format!(
            "role {role:?} on scope {scope:?} does not exist: use system:cluster-admin, \
             <project>:admin or <project>:viewer"
        )));
    }
    Ok(())
}

fn require_idp<'a>(f: &'a Federation, name: &str) -> Result<&'a IdpConfig, DomainError> {
    f.idps
        .get(name)
        .ok_or_else(|| DomainError::not_found("IdP configuration", name))
}

pub fn decide(state: &State, ctx: &Ctx, cmd: &Command) -> Result<Vec<AnyEvent>, DomainError> {
    let f = &state.federation;
    let event = match cmd {
        Command::CreateIdpConfiguration {
            name,
            issuer_url,
            kind,
            proxy_url,
        } => create_idp(f, ctx, name, issuer_url, *kind, proxy_url)?,
        Command::UpdateIdpConfiguration {
            name,
            issuer_url,
            kind,
            proxy_url,
        } => update_idp(f, name, issuer_url.as_deref(), *kind, proxy_url.as_deref())?,
        Command::DeleteIdpConfiguration { name } => delete_idp(f, name)?,
        Command::CreateIdpClientConf {
            name,
            client_id,
            idp,
            claim_name,
            mode,
        } => create_client(f, ctx, name, client_id, idp, claim_name, *mode)?,
        Command::UpdateIdpClientConf { name, claim_name } => {
            let conf = f
                .clients
                .get(name)
                .ok_or_else(|| DomainError::not_found("IdP client configuration", name))?;
            check_claim_name(claim_name, conf.mode)?;
            Event::IdpClientConfUpdated {
                name: name.clone(),
                claim_name: claim_name.clone(),
            }
        }
        Command::DeleteIdpClientConf { name } => {
            if !f.clients.contains_key(name) {
                return Err(DomainError::not_found("IdP client configuration", name));
            }
            Event::IdpClientConfDeleted { name: name.clone() }
        }
        Command::PutAuthMapEntry {
            name,
            identifier,
            scope,
            role,
            idp,
            update,
        } => put_map(f, ctx, name, identifier, scope, role, idp, *update)?,
        Command::DeleteAuthMapEntry { name } => {
            if !f.maps.contains_key(name) {
                return Err(DomainError::not_found("auth map entry", name));
            }
            Event::AuthMapEntryDeleted { name: name.clone() }
        }
        Command::EnableFederatedAuthentication if f.enabled => return Ok(vec![]),
        Command::EnableFederatedAuthentication => {
            if f.idps.is_empty() {
                return Err(DomainError::FailedPrecondition(
                    "no IdP configuration: create one before enabling federated authentication"
                        .into(),
                ));
            }
            Event::FederatedAuthenticationEnabled
        }
        Command::DisableFederatedAuthentication if !f.enabled => return Ok(vec![]),
        Command::DisableFederatedAuthentication => Event::FederatedAuthenticationDisabled,
    };
    Ok(vec![AnyEvent::Federation(event)])
}

fn create_idp(
    f: &Federation,
    ctx: &Ctx,
    name: &str,
    issuer_url: &str,
    kind: IdpType,
    proxy_url: &str,
) -> Result<Event, DomainError> {
    check_name("IdP configuration", name)?;
    check_issuer(issuer_url)?;
    check_proxy(proxy_url)?;
    if f.idps.contains_key(name) {
        return Err(DomainError::exists("IdP configuration", name));
    }
    if f.idps.len() >= IDP_CONFIGURATIONS_MAX {
        return Err(DomainError::ResourceExhausted(format!(
            "at most {IDP_CONFIGURATIONS_MAX} IdP configurations"
        )));
    }
    unique_issuer(f, name, issuer_url)?;
    Ok(Event::IdpConfigurationCreated {
        config: IdpConfig {
            uuid: ctx.new_id(0),
            name: name.to_string(),
            issuer_url: issuer_url.to_string(),
            kind,
            proxy_url: proxy_url.to_string(),
            etag: 0,
        },
    })
}

fn update_idp(
    f: &Federation,
    name: &str,
    issuer_url: Option<&str>,
    kind: Option<IdpType>,
    proxy_url: Option<&str>,
) -> Result<Event, DomainError> {
    let mut config = require_idp(f, name)?.clone();
    if let Some(url) = issuer_url {
        check_issuer(url)?;
        unique_issuer(f, name, url)?;
        config.issuer_url = url.to_string();
    }
    if let Some(p) = proxy_url {
        check_proxy(p)?;
        config.proxy_url = p.to_string();
    }
    config.kind = kind.unwrap_or(config.kind);
    Ok(Event::IdpConfigurationUpdated { config })
}

fn delete_idp(f: &Federation, name: &str) -> Result<Event, DomainError> {
    require_idp(f, name)?;
    let clients = f
        .clients_of(name)
        .map(|c| format!("client configuration {}", c.name));
    let maps = f
        .maps_of(name)
        .map(|m| format!("auth map entry {}", m.name));
    let used: Vec<String> = clients.chain(maps).collect();
    if !used.is_empty() {
        return Err(DomainError::FailedPrecondition(format!(
            "IdP configuration {name} is in use by {}; delete them first",
            used.join(", ")
        )));
    }
    Ok(Event::IdpConfigurationDeleted {
        name: name.to_string(),
    })
}

fn unique_issuer(f: &Federation, name: &str, url: &str) -> Result<(), DomainError> {
    match f.idp_by_issuer(url) {
        Some(other) if other.name != name => Err(DomainError::AlreadyExists(format!(
            "IdP configuration {} already has issuer {url}",
            other.name
        ))),
        _ => Ok(()),
    }
}

fn create_client(
    f: &Federation,
    ctx: &Ctx,
    name: &str,
    client_id: &str,
    idp: &str,
    claim_name: &str,
    mode: AuthzMode,
) -> Result<Event, DomainError> {
    check_name("IdP client configuration", name)?;
    if f.clients.contains_key(name) {
        return Err(DomainError::exists("IdP client configuration", name));
    }
    if f.clients.len() >= IDP_CLIENT_CONFS_MAX {
        return Err(DomainError::ResourceExhausted(format!(
            "at most {IDP_CLIENT_CONFS_MAX} IdP client configurations"
        )));
    }
    require_idp(f, idp)?;
    check_client(f, idp, client_id, claim_name, mode)?;
    Ok(Event::IdpClientConfCreated {
        conf: IdpClientConf {
            uuid: ctx.new_id(0),
            name: name.to_string(),
            client_id: client_id.to_string(),
            idp: idp.to_string(),
            claim_name: claim_name.to_string(),
            mode,
        },
    })
}

fn check_claim_name(claim_name: &str, mode: AuthzMode) -> Result<(), DomainError> {
    match mode {
        AuthzMode::App if claim_name.is_empty() => Ok(()),
        _ => check_text("claimName", claim_name),
    }
}

/// App and User configurations name the audience their tokens carry (distinct per IdP);
/// Converge takes `NOT_APPLICABLE` and is at most one per IdP.
fn check_client(
    f: &Federation,
    idp: &str,
    client_id: &str,
    claim_name: &str,
    mode: AuthzMode,
) -> Result<(), DomainError> {
    check_claim_name(claim_name, mode)?;
    if mode == AuthzMode::Converge {
        if client_id != NOT_APPLICABLE {
            return Err(invalid(format!(
                "a Converge client configuration takes clientId {NOT_APPLICABLE}"
            )));
        }
        if f.clients_of(idp).any(|c| c.mode == AuthzMode::Converge) {
            return Err(DomainError::AlreadyExists(format!(
                "IdP configuration {idp} already has a Converge client configuration"
            )));
        }
        return Ok(());
    }
    check_text("clientId", client_id)?;
    if client_id == NOT_APPLICABLE {
        return Err(invalid(format!(
            "clientId {NOT_APPLICABLE} is for Converge mode only"
        )));
    }
    if let Some(other) = f.clients_of(idp).find(|c| c.client_id == client_id) {
        return Err(DomainError::AlreadyExists(format!(
            "IdP client configuration {} already has clientId {client_id} for IdP {idp}",
            other.name
        )));
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn put_map(
    f: &Federation,
    ctx: &Ctx,
    name: &str,
    identifier: &str,
    scope: &str,
    role: &str,
    idp: &str,
    update: bool,
) -> Result<Event, DomainError> {
    check_name("auth map entry", name)?;
    let existing = f.maps.get(name);
    match (update, existing) {
        (true, None) => return Err(DomainError::not_found("auth map entry", name)),
        (false, Some(_)) => return Err(DomainError::exists("auth map entry", name)),
        (false, None) if f.maps.len() >= AUTH_MAPS_MAX => {
            return Err(DomainError::ResourceExhausted(format!(
                "at most {AUTH_MAPS_MAX} auth map entries"
            )))
        }
        _ => {}
    }
    check_text("identifier", identifier)?;
    check_scope_role(scope, role)?;
    require_idp(f, idp)?;
    let entry = AuthMapEntry {
        uuid: existing.map_or_else(|| ctx.new_id(0), |e| e.uuid),
        name: name.to_string(),
        identifier: identifier.to_string(),
        scope: scope.to_string(),
        role: role.to_string(),
        idp: idp.to_string(),
    };
    Ok(if update {
        Event::AuthMapEntryUpdated { entry }
    } else {
        Event::AuthMapEntryCreated { entry }
    })
}

pub fn evolve(state: &mut State, at: Applied, event: &Event) -> Vec<RowKey> {
    let f = &mut state.federation;
    match event {
        Event::IdpConfigurationCreated { config } | Event::IdpConfigurationUpdated { config } => {
            let mut c = config.clone();
            c.etag = at.seq;
            f.idps.insert(c.name.clone(), c);
            vec![RowKey::Idp(config.name.clone())]
        }
        Event::IdpConfigurationDeleted { name } => {
            f.idps.remove(name);
            vec![RowKey::Idp(name.clone())]
        }
        Event::IdpClientConfCreated { conf } => {
            f.clients.insert(conf.name.clone(), conf.clone());
            vec![RowKey::IdpClient(conf.name.clone())]
        }
        Event::IdpClientConfUpdated { name, claim_name } => {
            let conf = f
                .clients
                .get_mut(name)
                .expect("invariant: decide updates existing client configurations only");
            conf.claim_name = claim_name.clone();
            vec![RowKey::IdpClient(name.clone())]
        }
        Event::IdpClientConfDeleted { name } => {
            f.clients.remove(name);
            vec![RowKey::IdpClient(name.clone())]
        }
        Event::AuthMapEntryCreated { entry } | Event::AuthMapEntryUpdated { entry } => {
            f.maps.insert(entry.name.clone(), entry.clone());
            vec![RowKey::AuthMap(entry.name.clone())]
        }
        Event::AuthMapEntryDeleted { name } => {
            f.maps.remove(name);
            vec![RowKey::AuthMap(name.clone())]
        }
        Event::FederatedAuthenticationEnabled | Event::FederatedAuthenticationDisabled => {
            f.enabled = matches!(event, Event::FederatedAuthenticationEnabled);
            vec![RowKey::Federation]
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::cluster::tests::bootstrap_events;
    use crate::domain::{given_when, Command as AnyCommand};

    fn cmd(c: Command) -> AnyCommand {
        AnyCommand::Federation(c)
    }

    fn create_idp(name: &str, url: &str) -> AnyCommand {
        cmd(Command::CreateIdpConfiguration {
            name: name.into(),
            issuer_url: url.into(),
            kind: IdpType::Adfs,
            proxy_url: String::new(),
        })
    }

    fn client(name: &str, client_id: &str, mode: AuthzMode, claim: &str) -> AnyCommand {
        cmd(Command::CreateIdpClientConf {
            name: name.into(),
            client_id: client_id.into(),
            idp: "idp".into(),
            claim_name: claim.into(),
            mode,
        })
    }

    fn map(name: &str, scope: &str, role: &str, update: bool) -> AnyCommand {
        cmd(Command::PutAuthMapEntry {
            name: name.into(),
            identifier: "group-1".into(),
            scope: scope.into(),
            role: role.into(),
            idp: "idp".into(),
            update,
        })
    }

    /// Applies `when` to `given`, appending its events; panics if refused.
    fn then_ok(given: &mut Vec<AnyEvent>, when: AnyCommand) {
        let events = given_when(given, when).expect("accepted");
        given.extend(events);
    }

    fn with_idp() -> Vec<AnyEvent> {
        let mut g = bootstrap_events();
        then_ok(&mut g, create_idp("idp", "https://idp.example.com/realm"));
        g
    }

    #[test]
    fn given_nothing_when_create_idp_then_issuer_rules_apply() {
        let g = bootstrap_events();
        assert!(given_when(&g, create_idp("idp", "https://idp.example.com/")).is_ok());
        assert!(given_when(&g, create_idp("idp", "http://127.0.0.1:9000")).is_ok());
        for bad in [
            "http://idp.example.com/",
            "https://idp.example.com/?x=1",
            "ldap://idp",
        ] {
            assert!(
                matches!(
                    given_when(&g, create_idp("idp", bad)),
                    Err(DomainError::InvalidArgument(_))
                ),
                "{bad}"
            );
        }
        let g = with_idp();
        assert!(matches!(
            given_when(&g, create_idp("idp", "https://other/")),
            Err(DomainError::AlreadyExists(_))
        ));
        assert!(matches!(
            given_when(&g, create_idp("idp2", "https://idp.example.com/realm/")),
            Err(DomainError::AlreadyExists(_))
        ));
        let proxied = cmd(Command::CreateIdpConfiguration {
            name: "p".into(),
            issuer_url: "https://p.example.com".into(),
            kind: IdpType::Unknown,
            proxy_url: "https://proxy:3128".into(),
        });
        assert!(matches!(
            given_when(&g, proxied),
            Err(DomainError::InvalidArgument(_))
        ));
    }

    #[test]
    fn given_idp_when_update_then_only_given_fields_change_and_etag_moves() {
        let mut g = with_idp();
        let upd = cmd(Command::UpdateIdpConfiguration {
            name: "idp".into(),
            issuer_url: None,
            kind: None,
            proxy_url: Some("http://10.0.0.9:3128".into()),
        });
        let events = given_when(&g, upd).unwrap();
        let AnyEvent::Federation(Event::IdpConfigurationUpdated { config }) = &events[0] else {
            panic!("{events:?}")
        };
        assert_eq!(config.issuer_url, "https://idp.example.com/realm");
        assert_eq!(config.proxy_url, "http://10.0.0.9:3128");
        g.extend(events);
        let missing = cmd(Command::UpdateIdpConfiguration {
            name: "nope".into(),
            issuer_url: None,
            kind: None,
            proxy_url: None,
        });
        assert!(matches!(
            given_when(&g, missing),
            Err(DomainError::NotFound(_))
        ));
    }

    #[test]
    fn client_confs_name_distinct_audiences_and_converge_is_special() {
        let mut g = with_idp();
        then_ok(&mut g, client("app", "evstor-app", AuthzMode::App, ""));
        assert!(matches!(
            given_when(&g, client("app2", "evstor-app", AuthzMode::User, "groups")),
            Err(DomainError::AlreadyExists(_))
        ));
        assert!(matches!(
            given_when(&g, client("u", "evstor-ui", AuthzMode::User, "")),
            Err(DomainError::InvalidArgument(_))
        ));
        assert!(matches!(
            given_when(&g, client("c", "x", AuthzMode::Converge, "groups")),
            Err(DomainError::InvalidArgument(_))
        ));
        then_ok(
            &mut g,
            client("c", NOT_APPLICABLE, AuthzMode::Converge, "grp"),
        );
        assert!(matches!(
            given_when(&g, client("c2", NOT_APPLICABLE, AuthzMode::Converge, "grp")),
            Err(DomainError::AlreadyExists(_))
        ));
        let other_idp = cmd(Command::CreateIdpClientConf {
            name: "z".into(),
            client_id: "z".into(),
            idp: "missing".into(),
            claim_name: String::new(),
            mode: AuthzMode::App,
        });
        assert!(matches!(
            given_when(&g, other_idp),
            Err(DomainError::NotFound(_))
        ));
        let rename_claim = |claim: &str| {
            cmd(Command::UpdateIdpClientConf {
                name: "c".into(),
                claim_name: claim.into(),
            })
        };
        assert!(given_when(&g, rename_claim("roles")).is_ok());
        assert!(matches!(
            given_when(&g, rename_claim("")),
            Err(DomainError::InvalidArgument(_))
        ));
    }

    #[test]
    fn auth_maps_grant_existing_roles_and_are_replaced_or_deleted_by_name() {
        let mut g = with_idp();
        for (scope, role) in [
            ("system", "admin"),
            ("p1", "cluster-admin"),
            ("p 1", "viewer"),
        ] {
            assert!(
                matches!(
                    given_when(&g, map("m", scope, role, false)),
                    Err(DomainError::InvalidArgument(_))
                ),
                "{scope}:{role}"
            );
        }
        assert!(matches!(
            given_when(&g, map("m", "p1", "viewer", true)),
            Err(DomainError::NotFound(_))
        ));
        then_ok(&mut g, map("m", "p1", "viewer", false));
        assert!(matches!(
            given_when(&g, map("m", "p1", "viewer", false)),
            Err(DomainError::AlreadyExists(_))
        ));
        let updated = given_when(&g, map("m", "system", "cluster-admin", true)).unwrap();
        assert_eq!(updated[0].type_name(), "AuthMapEntryUpdated");
        let del = || cmd(Command::DeleteAuthMapEntry { name: "m".into() });
        then_ok(&mut g, del());
        assert!(matches!(
            given_when(&g, del()),
            Err(DomainError::NotFound(_))
        ));
    }

    #[test]
    fn an_idp_in_use_cannot_be_deleted_and_enabling_needs_one() {
        let g = bootstrap_events();
        assert!(matches!(
            given_when(&g, cmd(Command::EnableFederatedAuthentication)),
            Err(DomainError::FailedPrecondition(_))
        ));
        assert_eq!(
            given_when(&g, cmd(Command::DisableFederatedAuthentication)),
            Ok(vec![])
        );
        let mut g = with_idp();
        then_ok(&mut g, map("m", "p1", "viewer", false));
        let del = || cmd(Command::DeleteIdpConfiguration { name: "idp".into() });
        assert!(matches!(
            given_when(&g, del()),
            Err(DomainError::FailedPrecondition(_))
        ));
        then_ok(
            &mut g,
            cmd(Command::DeleteAuthMapEntry { name: "m".into() }),
        );
        then_ok(&mut g, cmd(Command::EnableFederatedAuthentication));
        assert_eq!(
            given_when(&g, cmd(Command::EnableFederatedAuthentication)),
            Ok(vec![])
        );
        assert!(given_when(&g, del()).is_ok());
    }
}
