//! Projects: the tenancy unit. Every volume, snapshot and credential belongs to one.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::names::{check_description, check_name};
use super::policy::PolicyRef;
use super::{Applied, Ctx, DomainError, Event as AnyEvent, RowKey, State};
use crate::limits::{DEFAULT_POLICIES_MAX, PROJECTS_MAX};

/// Projects that exist from bootstrap on and can never be deleted.
pub const BUILTIN_PROJECTS: [&str; 2] = ["system", "default"];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PolicyType {
    Unknown,
    Snapshot,
    QosRateLimit,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DefaultPolicy {
    pub policy_type: PolicyType,
    pub policy_uuid: Uuid,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Project {
    /// Fresh for every incarnation: a project deleted and created again gets a new one.
    pub uuid: Uuid,
    pub name: String,
    pub description: String,
    pub default_policies: Vec<DefaultPolicy>,
    /// When this incarnation was created (the time of its `ProjectCreated`): tokens issued
    /// before it carry no role in it (see `api::auth`).
    pub created_unix_ns: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Projects {
    pub by_name: BTreeMap<String, Project>,
}

impl Projects {
    pub fn get(&self, name: &str) -> Option<&Project> {
        self.by_name.get(name)
    }

    /// The project or a 404.
    pub fn require(&self, name: &str) -> Result<&Project, DomainError> {
        self.get(name)
            .ok_or_else(|| DomainError::not_found("project", name))
    }

    /// The project's default QoS policy, if it has one.
    pub fn default_qos(&self, name: &str) -> Option<Uuid> {
        self.get(name)?
            .default_policies
            .iter()
            .find(|p| p.policy_type == PolicyType::QosRateLimit)
            .map(|p| p.policy_uuid)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    CreateProject {
        name: String,
        description: String,
        default_policies: Vec<DefaultPolicy>,
    },
    UpdateProject {
        name: String,
        default_policies: Vec<DefaultPolicy>,
    },
    DeleteProject {
        name: String,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Event {
    ProjectCreated {
        uuid: Uuid,
        name: String,
        description: String,
        default_policies: Vec<DefaultPolicy>,
    },
    ProjectDefaultPoliciesUpdated {
        name: String,
        default_policies: Vec<DefaultPolicy>,
    },
    ProjectDeleted {
        name: String,
    },
}

impl Event {
    pub fn type_name(&self) -> &'static str {
        match self {
            Event::ProjectCreated { .. } => "ProjectCreated",
            Event::ProjectDefaultPoliciesUpdated { .. } => "ProjectDefaultPoliciesUpdated",
            Event::ProjectDeleted { .. } => "ProjectDeleted",
        }
    }

    pub fn project(&self) -> &str {
        match self {
            Event::ProjectCreated { name, .. }
            | Event::ProjectDefaultPoliciesUpdated { name, .. }
            | Event::ProjectDeleted { name } => name,
        }
    }
}

/// A QoS default must be a policy the project may use (a policy scoped to other projects
/// does not exist as far as this one is concerned: 404).
fn check_default_policies(
    state: &State,
    project: &str,
    policies: &[DefaultPolicy],
) -> Result<(), DomainError> {
    if policies.len() > DEFAULT_POLICIES_MAX {
        return Err(DomainError::InvalidArgument(format!(
            "at most {DEFAULT_POLICIES_MAX} default policies per project"
        )));
    }
    for (i, p) in policies.iter().enumerate() {
        if policies[..i].contains(p) {
            return Err(DomainError::InvalidArgument(format!(
                "default policy {} is listed twice",
                p.policy_uuid
            )));
        }
        match p.policy_type {
            PolicyType::QosRateLimit => {
                state
                    .policies
                    .resolve_for(project, &PolicyRef::Uuid(p.policy_uuid))?;
            }
            PolicyType::Snapshot => {}
            PolicyType::Unknown => {
                return Err(DomainError::InvalidArgument(
                    "default policy needs a policyType".into(),
                ))
            }
        }
    }
    let qos = policies
        .iter()
        .filter(|p| p.policy_type == PolicyType::QosRateLimit)
        .count();
    if qos > 1 {
        return Err(DomainError::InvalidArgument(
            "at most one default qosRateLimit policy per project".into(),
        ));
    }
    Ok(())
}

pub fn decide(state: &State, ctx: &Ctx, cmd: &Command) -> Result<Vec<AnyEvent>, DomainError> {
    let event = match cmd {
        Command::CreateProject {
            name,
            description,
            default_policies,
        } => {
            check_name("project", name)?;
            check_description(description)?;
            if state.projects.get(name).is_some() {
                return Err(DomainError::exists("project", name));
            }
            if state.projects.by_name.len() >= PROJECTS_MAX {
                return Err(DomainError::ResourceExhausted(format!(
                    "at most {PROJECTS_MAX} projects"
                )));
            }
            check_default_policies(state, name, default_policies)?;
            Event::ProjectCreated {
                uuid: ctx.new_id(0),
                name: name.clone(),
                description: description.clone(),
                default_policies: default_policies.clone(),
            }
        }
        Command::UpdateProject {
            name,
            default_policies,
        } => {
            state.projects.require(name)?;
            check_default_policies(state, name, default_policies)?;
            Event::ProjectDefaultPoliciesUpdated {
                name: name.clone(),
                default_policies: default_policies.clone(),
            }
        }
        Command::DeleteProject { name } => {
            state.projects.require(name)?;
            if BUILTIN_PROJECTS.contains(&name.as_str()) {
                return Err(DomainError::FailedPrecondition(format!(
                    "project {name} is built in and cannot be deleted"
                )));
            }
            if state.volumes.in_project(name).next().is_some() {
                return Err(DomainError::FailedPrecondition(format!(
                    "project {name} still has volumes"
                )));
            }
            if state.snapshots.in_project(name).next().is_some() {
                return Err(DomainError::FailedPrecondition(format!(
                    "project {name} still has snapshots"
                )));
            }
            Event::ProjectDeleted { name: name.clone() }
        }
    };
    Ok(vec![AnyEvent::Project(event)])
}

pub fn evolve(state: &mut State, at: Applied, event: &Event) -> Vec<RowKey> {
    let projects = &mut state.projects.by_name;
    match event {
        Event::ProjectCreated {
            uuid,
            name,
            description,
            default_policies,
        } => {
            projects.insert(
                name.clone(),
                Project {
                    uuid: *uuid,
                    name: name.clone(),
                    description: description.clone(),
                    default_policies: default_policies.clone(),
                    created_unix_ns: at.time_unix_ns,
                },
            );
        }
        Event::ProjectDefaultPoliciesUpdated {
            name,
            default_policies,
        } => {
            let p = projects
                .get_mut(name)
                .expect("invariant: policies are only updated on existing projects");
            p.default_policies = default_policies.clone();
        }
        Event::ProjectDeleted { name } => {
            projects.remove(name);
        }
    }
    // Credentials die with their project.
    let mut rows = vec![RowKey::Project(event.project().to_string())];
    if let Event::ProjectDeleted { name } = event {
        rows.extend(state.credentials.remove_project(name));
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::cluster::tests::bootstrap_events;
    use crate::domain::{given_when, Command as AnyCommand};

    fn create(name: &str) -> AnyCommand {
        AnyCommand::Project(Command::CreateProject {
            name: name.into(),
            description: String::new(),
            default_policies: vec![],
        })
    }

    #[test]
    fn given_bootstrap_when_create_project_then_created() {
        let events = given_when(&bootstrap_events(), create("p1")).unwrap();
        assert!(
            matches!(&events[..], [AnyEvent::Project(Event::ProjectCreated { name, .. })] if name == "p1")
        );
    }

    #[test]
    fn given_project_when_create_same_name_then_409() {
        let err = given_when(&bootstrap_events(), create("default")).unwrap_err();
        assert!(matches!(err, DomainError::AlreadyExists(_)));
    }

    #[test]
    fn bad_name_is_400() {
        let err = given_when(&bootstrap_events(), create("no spaces")).unwrap_err();
        assert!(matches!(err, DomainError::InvalidArgument(_)));
    }

    #[test]
    fn builtin_projects_cannot_be_deleted_and_missing_is_404() {
        let del = |n: &str| AnyCommand::Project(Command::DeleteProject { name: n.into() });
        assert!(matches!(
            given_when(&bootstrap_events(), del("system")),
            Err(DomainError::FailedPrecondition(_))
        ));
        assert!(matches!(
            given_when(&bootstrap_events(), del("nope")),
            Err(DomainError::NotFound(_))
        ));
    }

    #[test]
    fn default_policies_are_distinct_and_bounded() {
        let snapshot_policy = |n: u128| DefaultPolicy {
            policy_type: PolicyType::Snapshot,
            policy_uuid: Uuid::from_u128(n),
        };
        let cmd = |default_policies: Vec<DefaultPolicy>| {
            AnyCommand::Project(Command::CreateProject {
                name: "p".into(),
                description: String::new(),
                default_policies,
            })
        };
        let twice = vec![snapshot_policy(1), snapshot_policy(1)];
        assert!(matches!(
            given_when(&bootstrap_events(), cmd(twice)),
            Err(DomainError::InvalidArgument(_))
        ));
        let many = (0..=DEFAULT_POLICIES_MAX as u128)
            .map(snapshot_policy)
            .collect();
        assert!(matches!(
            given_when(&bootstrap_events(), cmd(many)),
            Err(DomainError::InvalidArgument(_))
        ));
        let distinct = vec![snapshot_policy(1), snapshot_policy(2)];
        assert!(given_when(&bootstrap_events(), cmd(distinct)).is_ok());
    }

    #[test]
    fn default_qos_policy_must_exist() {
        let cmd = AnyCommand::Project(Command::CreateProject {
            name: "p".into(),
            description: String::new(),
            default_policies: vec![DefaultPolicy {
                policy_type: PolicyType::QosRateLimit,
                policy_uuid: Uuid::nil(),
            }],
        });
        assert!(matches!(
            given_when(&bootstrap_events(), cmd),
            Err(DomainError::NotFound(_))
        ));
    }
}
