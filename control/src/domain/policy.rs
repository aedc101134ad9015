//! QoS rate-limit policies: IOPS, bandwidth or IOPS-per-GB limits, global or scoped to
//! projects, attached to volumes directly or as a project's default.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::names::{check_description, check_name};
use super::volume::VolumeState;
use super::{Applied, Ctx, DomainError, Event as AnyEvent, RowKey, State};
use crate::limits::PROJECTS_MAX;

/// IOPS limits are set in steps of this many IOPS (SCHEMAS.md 2.4).
pub const IOPS_STEP: u32 = 256;

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

    /// Resolves a reference regardless of visibility, or 404.
    pub fn resolve(&self, r: &PolicyRef) -> Result<&Policy, DomainError> {
        match r {
            PolicyRef::Uuid(u) => self.require(*u),
            PolicyRef::Name(n) => self
                .by_name(n)
                .ok_or_else(|| DomainError::not_found("policy", n)),
        }
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

/// The limits and scope of a policy, as given on create and update.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QosSpec {
    pub visibility: PolicyVisibility,
    pub projects_scope: Vec<String>,
    pub limit: QosLimit,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    CreatePolicy {
        name: String,
        description: String,
        qos: QosSpec,
    },
    /// `None` leaves a part alone; a new `qos` replaces limits and scope together.
    UpdatePolicy {
        target: PolicyRef,
        description: Option<String>,
        qos: Option<QosSpec>,
    },
    DeletePolicy {
        target: PolicyRef,
    },
}

/// Append only: bincode stores the variant's position.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Event {
    PolicyCreated {
        policy: Policy,
    },
    /// The whole policy as it is after the update.
    PolicyUpdated {
        policy: Policy,
    },
    PolicyDeleted {
        uuid: Uuid,
    },
}

impl Event {
    pub fn type_name(&self) -> &'static str {
        match self {
            Event::PolicyCreated { .. } => "PolicyCreated",
            Event::PolicyUpdated { .. } => "PolicyUpdated",
            Event::PolicyDeleted { .. } => "PolicyDeleted",
        }
    }
}

fn check_limit(limit: &QosLimit) -> Result<(), DomainError> {
    if let QosLimit::Iops { read, write } = limit {
        for (what, v) in [("readIOPSLimit", read), ("writeIOPSLimit", write)] {
            if v % IOPS_STEP != 0 {
                return Err(DomainError::InvalidArgument(format!(
                    "{what} {v} is not a multiple of {IOPS_STEP} (0 means unlimited)"
                )));
            }
        }
    }
    Ok(())
}

fn check_spec(state: &State, q: &QosSpec) -> Result<(), DomainError> {
    check_limit(&q.limit)?;
    match q.visibility {
        PolicyVisibility::Global if !q.projects_scope.is_empty() => {
            Err(DomainError::InvalidArgument(
                "projectsNamesScope applies only to a Scoped policy".into(),
            ))
        }
        PolicyVisibility::Global => Ok(()),
        PolicyVisibility::Scoped if q.projects_scope.is_empty() => {
            Err(DomainError::InvalidArgument(
                "a Scoped policy needs at least one project in projectsNamesScope".into(),
            ))
        }
        PolicyVisibility::Scoped => {
            if q.projects_scope.len() > PROJECTS_MAX {
                return Err(DomainError::InvalidArgument(format!(
                    "projectsNamesScope lists more than {PROJECTS_MAX} projects"
                )));
            }
            let mut seen = std::collections::BTreeSet::new();
            for p in &q.projects_scope {
                state.projects.require(p)?;
                if !seen.insert(p) {
                    return Err(DomainError::InvalidArgument(format!(
                        "projectsNamesScope lists project {p} twice"
                    )));
                }
            }
            Ok(())
        }
    }
}

/// Who still relies on `p` being visible to them: volumes (not already going away) and
/// projects that default to it. Each entry is (project, what).
fn users(state: &State, p: &Policy) -> Vec<(String, String)> {
    let volumes = state
        .volumes
        .by_uuid
        .values()
        .filter(|v| v.qos_policy == Some(p.uuid) && v.state != VolumeState::Deleting)
        .map(|v| {
            (
                v.project.clone(),
                format!("volume {} of project {}", v.name, v.project),
            )
        });
    let defaults = state
        .projects
        .by_name
        .values()
        .filter(|pr| state.projects.default_qos(&pr.name) == Some(p.uuid))
        .map(|pr| {
            (
                pr.name.clone(),
                format!("project {} (default policy)", pr.name),
            )
        });
    volumes.chain(defaults).collect()
}

fn create(
    state: &State,
    ctx: &Ctx,
    name: &str,
    description: &str,
    qos: &QosSpec,
) -> Result<Vec<AnyEvent>, DomainError> {
    check_name("policy", name)?;
    check_description(description)?;
    check_spec(state, qos)?;
    if state.policies.by_name(name).is_some() {
        return Err(DomainError::exists("policy", name));
    }
    if state.policies.by_uuid.len() >= PROJECTS_MAX {
        return Err(DomainError::ResourceExhausted(format!(
            "at most {PROJECTS_MAX} policies"
        )));
    }
    let policy = Policy {
        uuid: ctx.new_id(0),
        name: name.to_string(),
        description: description.to_string(),
        visibility: qos.visibility,
        projects_scope: qos.projects_scope.clone(),
        limit: qos.limit,
    };
    Ok(vec![AnyEvent::Policy(Event::PolicyCreated { policy })])
}

fn update(
    state: &State,
    old: &Policy,
    description: &Option<String>,
    qos: &Option<QosSpec>,
) -> Result<Vec<AnyEvent>, DomainError> {
    let mut p = old.clone();
    if let Some(d) = description {
        check_description(d)?;
        p.description = d.clone();
    }
    if let Some(q) = qos {
        check_spec(state, q)?;
        p.visibility = q.visibility;
        p.projects_scope = q.projects_scope.clone();
        p.limit = q.limit;
        // Narrowing the scope must not strand a volume or default that uses the policy.
        if let Some((_, who)) = users(state, old)
            .into_iter()
            .find(|(project, _)| !p.visible_to(project))
        {
            return Err(DomainError::FailedPrecondition(format!(
                "policy {} is used by {who}, which the new scope leaves out",
                p.name
            )));
        }
    }
    if p == *old {
        return Ok(vec![]);
    }
    Ok(vec![AnyEvent::Policy(Event::PolicyUpdated { policy: p })])
}

fn delete(state: &State, p: &Policy) -> Result<Vec<AnyEvent>, DomainError> {
    if let Some((_, who)) = users(state, p).first() {
        return Err(DomainError::FailedPrecondition(format!(
            "policy {} is in use by {who}; detach it first",
            p.name
        )));
    }
    Ok(vec![AnyEvent::Policy(Event::PolicyDeleted {
        uuid: p.uuid,
    })])
}

pub fn decide(state: &State, ctx: &Ctx, cmd: &Command) -> Result<Vec<AnyEvent>, DomainError> {
    match cmd {
        Command::CreatePolicy {
            name,
            description,
            qos,
        } => create(state, ctx, name, description, qos),
        Command::UpdatePolicy {
            target,
            description,
            qos,
        } => update(state, state.policies.resolve(target)?, description, qos),
        Command::DeletePolicy { target } => delete(state, state.policies.resolve(target)?),
    }
}

pub fn evolve(state: &mut State, _at: Applied, event: &Event) -> Vec<RowKey> {
    match event {
        Event::PolicyCreated { policy } | Event::PolicyUpdated { policy } => {
            state.policies.by_uuid.insert(policy.uuid, policy.clone());
            vec![RowKey::Policy(policy.uuid)]
        }
        Event::PolicyDeleted { uuid } => {
            state.policies.by_uuid.remove(uuid);
            vec![RowKey::Policy(*uuid)]
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::domain::cluster::tests::bootstrap_events;
    use crate::domain::project::{Command as ProjectCommand, DefaultPolicy, PolicyType};
    use crate::domain::volume::tests::{new_volume, with_volume};
    use crate::domain::volume::{Command as VolumeCommand, Event as VolumeEvent, VolumeRef};
    use crate::domain::{given_when, test_ctx, Command as AnyCommand};

    pub(crate) fn iops(read: u32, write: u32) -> QosSpec {
        QosSpec {
            visibility: PolicyVisibility::Global,
            projects_scope: vec![],
            limit: QosLimit::Iops { read, write },
        }
    }

    pub(crate) fn create_cmd(name: &str, qos: QosSpec) -> AnyCommand {
        AnyCommand::Policy(Command::CreatePolicy {
            name: name.into(),
            description: String::new(),
            qos,
        })
    }

    /// Bootstrap plus a global policy `q1` (uuid `test_ctx().new_id(0)`) and project `p1`.
    fn with_policy() -> Vec<AnyEvent> {
        let mut given = bootstrap_events();
        given.extend(given_when(&given, create_cmd("q1", iops(1024, 512))).unwrap());
        given.push(AnyEvent::Project(
            crate::domain::project::Event::ProjectCreated {
                uuid: Uuid::from_u128(0x91),
                name: "p1".into(),
                description: String::new(),
                default_policies: vec![],
            },
        ));
        given
    }

    fn q1() -> Uuid {
        test_ctx().new_id(0)
    }

    fn err_of(given: &[AnyEvent], cmd: AnyCommand) -> DomainError {
        given_when(given, cmd).unwrap_err()
    }

    #[test]
    fn given_bootstrap_when_create_policy_then_created() {
        let events = given_when(&bootstrap_events(), create_cmd("q1", iops(256, 0))).unwrap();
        let [AnyEvent::Policy(Event::PolicyCreated { policy })] = &events[..] else {
            panic!("{events:?}")
        };
        assert_eq!(
            policy.limit,
            QosLimit::Iops {
                read: 256,
                write: 0
            }
        );
        assert!(policy.visible_to("anything"));
    }

    #[test]
    fn bad_inputs_are_400_duplicates_409_unknown_scope_404() {
        let given = with_policy();
        let err = err_of(&given, create_cmd("q1", iops(256, 256)));
        assert!(matches!(err, DomainError::AlreadyExists(_)), "{err:?}");
        let err = err_of(&given, create_cmd("bad name", iops(256, 256)));
        assert!(matches!(err, DomainError::InvalidArgument(_)), "{err:?}");
        let err = err_of(&given, create_cmd("q2", iops(300, 0)));
        assert!(matches!(err, DomainError::InvalidArgument(_)), "{err:?}");
        let scoped = |scope: &[&str]| QosSpec {
            visibility: PolicyVisibility::Scoped,
            projects_scope: scope.iter().map(|s| s.to_string()).collect(),
            limit: QosLimit::BandwidthMbps {
                read: 100,
                write: 7,
            },
        };
        let err = err_of(&given, create_cmd("q2", scoped(&[])));
        assert!(matches!(err, DomainError::InvalidArgument(_)), "{err:?}");
        let err = err_of(&given, create_cmd("q2", scoped(&["nope"])));
        assert!(matches!(err, DomainError::NotFound(_)), "{err:?}");
        let mut global_with_scope = scoped(&["p1"]);
        global_with_scope.visibility = PolicyVisibility::Global;
        let err = err_of(&given, create_cmd("q2", global_with_scope));
        assert!(matches!(err, DomainError::InvalidArgument(_)), "{err:?}");
        assert!(given_when(&given, create_cmd("q2", scoped(&["p1"]))).is_ok());
        // A scope is a set: a project listed twice (or a hundred thousand times) is refused.
        let err = err_of(&given, create_cmd("q2", scoped(&["p1", "default", "p1"])));
        assert!(matches!(err, DomainError::InvalidArgument(_)), "{err:?}");
        let many = vec!["p1"; 100_000];
        let err = err_of(&given, create_cmd("q2", scoped(&many)));
        assert!(matches!(err, DomainError::InvalidArgument(_)), "{err:?}");
        let mut long = AnyCommand::Policy(Command::CreatePolicy {
            name: "q3".into(),
            description: "x".repeat(257),
            qos: iops(0, 0),
        });
        let err = err_of(&given, long.clone());
        assert!(matches!(err, DomainError::InvalidArgument(_)), "{err:?}");
        if let AnyCommand::Policy(Command::CreatePolicy { description, .. }) = &mut long {
            description.truncate(256);
        }
        assert!(given_when(&given, long).is_ok());
    }

    #[test]
    fn update_replaces_limits_and_missing_is_404() {
        let given = with_policy();
        let upd = |target: PolicyRef, qos: Option<QosSpec>| {
            AnyCommand::Policy(Command::UpdatePolicy {
                target,
                description: Some("new".into()),
                qos,
            })
        };
        let events = given_when(
            &given,
            upd(PolicyRef::Name("q1".into()), Some(iops(0, 256))),
        )
        .unwrap();
        let [AnyEvent::Policy(Event::PolicyUpdated { policy })] = &events[..] else {
            panic!("{events:?}")
        };
        assert_eq!(policy.uuid, q1());
        assert_eq!(policy.description, "new");
        assert_eq!(
            policy.limit,
            QosLimit::Iops {
                read: 0,
                write: 256
            }
        );
        let err = err_of(&given, upd(PolicyRef::Uuid(Uuid::nil()), None));
        assert!(matches!(err, DomainError::NotFound(_)), "{err:?}");
        let err = err_of(&given, upd(PolicyRef::Uuid(q1()), Some(iops(1, 0))));
        assert!(matches!(err, DomainError::InvalidArgument(_)), "{err:?}");
    }

    #[test]
    fn a_policy_in_use_cannot_be_deleted_or_scoped_away() {
        let del = AnyCommand::Policy(Command::DeletePolicy {
            target: PolicyRef::Uuid(q1()),
        });
        // Unused: deletable.
        assert_eq!(
            given_when(&with_policy(), del.clone()).unwrap()[0].type_name(),
            "PolicyDeleted"
        );
        // Attached to a volume by name.
        let mut given = with_policy();
        let mut n = new_volume("v1");
        n.qos = Some(PolicyRef::Name("q1".into()));
        let created = given_when(&given, AnyCommand::Volume(VolumeCommand::CreateVolume(n)));
        given.extend(created.unwrap());
        let err = err_of(&given, del.clone());
        assert!(
            matches!(&err, DomainError::FailedPrecondition(m) if m.contains("volume v1")),
            "{err:?}"
        );
        let scope_away = AnyCommand::Policy(Command::UpdatePolicy {
            target: PolicyRef::Uuid(q1()),
            description: None,
            qos: Some(QosSpec {
                visibility: PolicyVisibility::Scoped,
                projects_scope: vec!["p1".into()],
                limit: QosLimit::Iops { read: 0, write: 0 },
            }),
        });
        let err = err_of(&given, scope_away);
        assert!(matches!(err, DomainError::FailedPrecondition(_)), "{err:?}");
        // A volume on its way out does not hold the policy.
        given.push(AnyEvent::Volume(VolumeEvent::VolumeBecameAvailable {
            uuid: test_ctx().new_id(0),
        }));
        given.extend(
            given_when(
                &given,
                AnyCommand::Volume(VolumeCommand::DeleteVolume {
                    project: "default".into(),
                    target: VolumeRef::Name("v1".into()),
                    if_match: None,
                }),
            )
            .unwrap(),
        );
        assert!(given_when(&given, del.clone()).is_ok());

        // A project default.
        let mut given = with_policy();
        given.extend(
            given_when(
                &given,
                AnyCommand::Project(ProjectCommand::UpdateProject {
                    name: "p1".into(),
                    default_policies: vec![DefaultPolicy {
                        policy_type: PolicyType::QosRateLimit,
                        policy_uuid: q1(),
                    }],
                }),
            )
            .unwrap(),
        );
        let err = err_of(&given, del);
        assert!(
            matches!(&err, DomainError::FailedPrecondition(m) if m.contains("project p1")),
            "{err:?}"
        );
        let missing = AnyCommand::Policy(Command::DeletePolicy {
            target: PolicyRef::Name("nope".into()),
        });
        assert!(matches!(err_of(&given, missing), DomainError::NotFound(_)));
    }

    #[test]
    fn a_scoped_policy_cannot_be_the_default_of_a_project_outside_its_scope() {
        let mut given = with_policy();
        let mut ev = given_when(
            &given,
            create_cmd(
                "p1only",
                QosSpec {
                    visibility: PolicyVisibility::Scoped,
                    projects_scope: vec!["p1".into()],
                    limit: QosLimit::Iops { read: 0, write: 0 },
                },
            ),
        )
        .unwrap();
        if let AnyEvent::Policy(Event::PolicyCreated { policy }) = &mut ev[0] {
            policy.uuid = Uuid::from_u128(0x78);
        }
        given.extend(ev);
        let set_default = |project: &str| {
            AnyCommand::Project(ProjectCommand::UpdateProject {
                name: project.into(),
                default_policies: vec![DefaultPolicy {
                    policy_type: PolicyType::QosRateLimit,
                    policy_uuid: Uuid::from_u128(0x78),
                }],
            })
        };
        assert!(given_when(&given, set_default("p1")).is_ok());
        let err = err_of(&given, set_default("default"));
        assert!(matches!(err, DomainError::NotFound(_)), "{err:?}");
    }

    #[test]
    fn a_new_volume_gets_the_project_default_and_scoped_policies_stay_private() {
        let mut given = with_policy();
        given.extend(
            given_when(
                &given,
                AnyCommand::Project(ProjectCommand::UpdateProject {
                    name: "default".into(),
                    default_policies: vec![DefaultPolicy {
                        policy_type: PolicyType::QosRateLimit,
                        policy_uuid: q1(),
                    }],
                }),
            )
            .unwrap(),
        );
        let events = given_when(
            &given,
            AnyCommand::Volume(VolumeCommand::CreateVolume(new_volume("v1"))),
        )
        .unwrap();
        let AnyEvent::Volume(VolumeEvent::VolumeCreationRequested { volume }) = &events[0] else {
            panic!("{events:?}")
        };
        assert_eq!(volume.qos_policy, Some(q1()));

        let mut given = with_volume();
        let mut ev = given_when(
            &given,
            create_cmd(
                "private",
                QosSpec {
                    visibility: PolicyVisibility::Scoped,
                    projects_scope: vec!["system".into()],
                    limit: QosLimit::IopsPerGb { read: 3, write: 3 },
                },
            ),
        )
        .unwrap();
        if let AnyEvent::Policy(Event::PolicyCreated { policy }) = &mut ev[0] {
            policy.uuid = Uuid::from_u128(0x77);
        }
        given.extend(ev);
        let mut n = new_volume("v2");
        n.qos = Some(PolicyRef::Name("private".into()));
        let err = err_of(&given, AnyCommand::Volume(VolumeCommand::CreateVolume(n)));
        assert!(matches!(err, DomainError::NotFound(_)), "{err:?}");
    }
}
