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
    /// Replaces the root key (`system:root`) with a new one: tokens the old key signed stop
    /// verifying. The API has checked that `payload_pem` is an RSA public key.
    RotateRootKey {
        payload_pem: String,
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
    /// `system:root` has a new public key.
    RootKeyRotated {
        payload_pem: String,
    },
}

impl Event {
    pub fn type_name(&self) -> &'static str {
        match self {
            Event::CredentialCreated { .. } => "CredentialCreated",
            Event::CredentialDeleted { .. } => "CredentialDeleted",
            Event::RootKeyRotated { .. } => "RootKeyRotated",
        }
    }

    pub fn project(&self) -> &str {
        match self {
            Event::CredentialCreated { project, .. } | Event::CredentialDeleted { project, .. } => {
                project
            }
            Event::RootKeyRotated { .. } => "system",
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
        Command::RotateRootKey { payload_pem } => rotate_root_key(state, payload_pem)?,
    };
    Ok(vec![AnyEvent::Credential(event)])
}

fn rotate_root_key(state: &State, payload_pem: &str) -> Result<Event, DomainError> {
    let root = state
        .credentials
        .get("system", "root")
        .ok_or_else(|| DomainError::Unavailable("the cluster is not initialized yet".into()))?;
    if payload_pem.len() > CREDENTIAL_PEM_BYTES_MAX {
        return Err(DomainError::InvalidArgument(format!(
            "root key of {} bytes is larger than {CREDENTIAL_PEM_BYTES_MAX}",
            payload_pem.len()
        )));
    }
    if root.payload_pem == payload_pem {
        return Err(DomainError::Conflict(
            "the new root key is the current one".into(),
        ));
    }
    Ok(Event::RootKeyRotated {
        payload_pem: payload_pem.to_string(),
    })
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
        Event::RootKeyRotated { payload_pem } => {
            let root = state
                .credentials
                .by_kid
                .get_mut(&kid("system", "root"))
                .expect("invariant: decide rotates an existing root key only");
            root.payload_pem = payload_pem.clone();
            vec![RowKey::Credential("system".into(), "root".into())]
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
    fn given_cluster_when_root_key_rotated_then_root_credential_has_the_new_key() {
        let mut g = bootstrap_events();
        let rotate = |pem: &str| {
            AnyCommand::Credential(Command::RotateRootKey {
                payload_pem: pem.into(),
            })
        };
        assert!(matches!(
            given_when(&g, rotate("PEM")),
            Err(DomainError::Conflict(_))
        ));
        let rotated = given_when(&g, rotate("NEW")).unwrap();
        assert_eq!(
            rotated,
            vec![AnyEvent::Credential(Event::RootKeyRotated {
                payload_pem: "NEW".into()
            })]
        );
        g.extend(rotated);
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
            s.credentials.get("system", "root").unwrap().payload_pem,
            "NEW"
        );
        assert!(matches!(
            given_when(&[], rotate("NEW")),
            Err(DomainError::Unavailable(_))
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
