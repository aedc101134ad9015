//! Credentials: RS256 public keys per project. A JWT whose `kid` header is
//! `<project>:<credential ID>` is checked against that key.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::names::check_name;
use super::{Applied, Ctx, DomainError, Event as AnyEvent, RowKey, State};
use crate::limits::{CREDENTIAL_PEM_BYTES_MAX, PROJECTS_MAX};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CredentialType {
    Rs256PubKey,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credential {
    pub project: String,
    pub id: String,
    pub kind: CredentialType,
    pub payload_pem: String,
}

/// Credentials keyed by `<project>:<id>`, the form a token's `kid` uses.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Credentials {
    pub by_kid: BTreeMap<String, Credential>,
}

pub fn kid(project: &str, id: &str) -> String {
    format!("{project}:{id}")
}

impl Credentials {
    pub fn get(&self, project: &str, id: &str) -> Option<&Credential> {
        self.by_kid.get(&kid(project, id))
    }

    pub fn by_kid(&self, kid: &str) -> Option<&Credential> {
        self.by_kid.get(kid)
    }

    pub fn in_project<'a>(&'a self, project: &'a str) -> impl Iterator<Item = &'a Credential> {
        self.by_kid.values().filter(move |c| c.project == project)
    }

    pub(super) fn remove_project(&mut self, project: &str) -> Vec<RowKey> {
        let gone: Vec<String> = self.in_project(project).map(|c| c.id.clone()).collect();
        gone.into_iter()
            .map(|id| {
                self.by_kid.remove(&kid(project, &id));
                RowKey::Credential(project.to_string(), id)
            })
            .collect()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// The API has already checked that `payload_pem` is an RSA public key.
    CreateCredential {
        project: String,
        id: String,
        kind: CredentialType,
        payload_pem: String,
    },
    DeleteCredential {
        project: String,
        id: String,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Event {
    CredentialCreated {
        project: String,
        id: String,
        kind: CredentialType,
        payload_pem: String,
    },
    CredentialDeleted {
        project: String,
        id: String,
    },
}

impl Event {
    pub fn type_name(&self) -> &'static str {
        match self {
            Event::CredentialCreated { .. } => "CredentialCreated",
            Event::CredentialDeleted { .. } => "CredentialDeleted",
        }
    }

    pub fn project(&self) -> &str {
        match self {
            Event::CredentialCreated { project, .. } | Event::CredentialDeleted { project, .. } => {
                project
            }
        }
    }
}

pub fn decide(state: &State, _ctx: &Ctx, cmd: &Command) -> Result<Vec<AnyEvent>, DomainError> {
    let event = match cmd {
        Command::CreateCredential {
            project,
            id,
            kind,
            payload_pem,
        } => {
            state.projects.require(project)?;
            check_name("credential", id)?;
            if payload_pem.len() > CREDENTIAL_PEM_BYTES_MAX {
                return Err(DomainError::InvalidArgument(format!(
                    "credential payload of {} bytes is larger than {CREDENTIAL_PEM_BYTES_MAX}",
                    payload_pem.len()
                )));
            }
            if state.credentials.get(project, id).is_some() {
                return Err(DomainError::exists("credential", kid(project, id)));
            }
            if state.credentials.by_kid.len() >= PROJECTS_MAX * 4 {
                return Err(DomainError::ResourceExhausted(
                    "too many credentials".into(),
                ));
            }
            Event::CredentialCreated {
                project: project.clone(),
                id: id.clone(),
                kind: *kind,
                payload_pem: payload_pem.clone(),
            }
        }
        Command::DeleteCredential { project, id } => {
            state.projects.require(project)?;
            if state.credentials.get(project, id).is_none() {
                return Err(DomainError::not_found("credential", kid(project, id)));
            }
            if project == "system" && id == "root" {
                return Err(DomainError::FailedPrecondition(
                    "system:root signs the admin token and cannot be deleted".into(),
                ));
            }
            Event::CredentialDeleted {
                project: project.clone(),
                id: id.clone(),
            }
        }
    };
    Ok(vec![AnyEvent::Credential(event)])
}

pub fn evolve(state: &mut State, _at: Applied, event: &Event) -> Vec<RowKey> {
    match event {
        Event::CredentialCreated {
            project,
            id,
            kind,
            payload_pem,
        } => {
            state.credentials.by_kid.insert(
                kid(project, id),
                Credential {
                    project: project.clone(),
                    id: id.clone(),
                    kind: *kind,
                    payload_pem: payload_pem.clone(),
                },
            );
            vec![RowKey::Credential(project.clone(), id.clone())]
        }
        Event::CredentialDeleted { project, id } => {
            state.credentials.by_kid.remove(&kid(project, id));
            vec![RowKey::Credential(project.clone(), id.clone())]
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::cluster::tests::bootstrap_events;
    use crate::domain::{given_when, Command as AnyCommand};

    fn create(project: &str, id: &str) -> AnyCommand {
        AnyCommand::Credential(Command::CreateCredential {
            project: project.into(),
            id: id.into(),
            kind: CredentialType::Rs256PubKey,
            payload_pem: "PEM".into(),
        })
    }

    #[test]
    fn create_then_duplicate_is_409() {
        assert!(given_when(&bootstrap_events(), create("default", "k1")).is_ok());
        assert!(matches!(
            given_when(&bootstrap_events(), create("system", "root")),
            Err(DomainError::AlreadyExists(_))
        ));
    }

    #[test]
    fn unknown_project_is_404_and_root_is_protected() {
        assert!(matches!(
            given_when(&bootstrap_events(), create("nope", "k")),
            Err(DomainError::NotFound(_))
        ));
        let del = AnyCommand::Credential(Command::DeleteCredential {
            project: "system".into(),
            id: "root".into(),
        });
        assert!(matches!(
            given_when(&bootstrap_events(), del),
            Err(DomainError::FailedPrecondition(_))
        ));
    }

    #[test]
    fn given_credential_when_deleted_then_gone_and_second_delete_is_404() {
        let mut g = bootstrap_events();
        let created = given_when(&g, create("default", "k1")).unwrap();
        g.extend(created);
        let del = || {
            AnyCommand::Credential(Command::DeleteCredential {
                project: "default".into(),
                id: "k1".into(),
            })
        };
        let deleted = given_when(&g, del()).unwrap();
        assert_eq!(deleted[0].type_name(), "CredentialDeleted");
        g.extend(deleted);
        assert!(matches!(
            given_when(&g, del()),
            Err(DomainError::NotFound(_))
        ));
        assert!(matches!(
            given_when(&g, create("default", "bad id")),
            Err(DomainError::InvalidArgument(_))
        ));
    }

    #[test]
    fn an_oversized_key_is_400() {
        let cmd = AnyCommand::Credential(Command::CreateCredential {
            project: "default".into(),
            id: "k".into(),
            kind: CredentialType::Rs256PubKey,
            payload_pem: "x".repeat(CREDENTIAL_PEM_BYTES_MAX + 1),
        });
        assert!(matches!(
            given_when(&bootstrap_events(), cmd),
            Err(DomainError::InvalidArgument(_))
        ));
    }
}
