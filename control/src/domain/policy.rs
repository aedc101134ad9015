//! QoS rate-limit policies: IOPS, bandwidth or IOPS-per-GB limits, global or scoped to
//! projects, attached to volumes directly or as a project's default.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{Applied, Ctx, DomainError, Event as AnyEvent, RowKey, State};

/// How a command names a policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicyRef {
    Uuid(Uuid),
    Name(String),
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum PolicyVisibility {
    #[default]
    Global,
    Scoped,
}

/// The three limit kinds; 0 means unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum QosLimit {
    Iops { read: u32, write: u32 },
    BandwidthMbps { read: u32, write: u32 },
    IopsPerGb { read: u32, write: u32 },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Policy {
    pub uuid: Uuid,
    pub name: String,
    pub description: String,
    pub visibility: PolicyVisibility,
    /// Projects allowed to use a `Scoped` policy.
    pub projects_scope: Vec<String>,
    pub limit: QosLimit,
}

impl Policy {
    pub fn visible_to(&self, project: &str) -> bool {
        self.visibility == PolicyVisibility::Global
            || self.projects_scope.iter().any(|p| p == project)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Policies {
    pub by_uuid: BTreeMap<Uuid, Policy>,
}

impl Policies {
    pub fn get(&self, uuid: Uuid) -> Option<&Policy> {
        self.by_uuid.get(&uuid)
    }

    pub fn by_name(&self, name: &str) -> Option<&Policy> {
        self.by_uuid.values().find(|p| p.name == name)
    }

    pub fn require(&self, uuid: Uuid) -> Result<&Policy, DomainError> {
        self.get(uuid)
            .ok_or_else(|| DomainError::not_found("policy", uuid))
    }

    /// Resolves a policy a volume of `project` may use, or 404 (a policy scoped to other
    /// projects does not exist as far as this project is concerned).
    pub fn resolve_for(&self, project: &str, r: &PolicyRef) -> Result<&Policy, DomainError> {
        let found = match r {
            PolicyRef::Uuid(u) => self.get(*u),
            PolicyRef::Name(n) => self.by_name(n),
        };
        found
            .filter(|p| p.visible_to(project))
            .ok_or_else(|| match r {
                PolicyRef::Uuid(u) => DomainError::not_found("policy", u),
                PolicyRef::Name(n) => DomainError::not_found("policy", n),
            })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Command {}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Event {}

impl Event {
    pub fn type_name(&self) -> &'static str {
        match *self {}
    }
}

pub fn decide(_: &State, _: &Ctx, cmd: &Command) -> Result<Vec<AnyEvent>, DomainError> {
    match *cmd {}
}

pub fn evolve(_: &mut State, _: Applied, event: &Event) -> Vec<RowKey> {
    match *event {}
}
