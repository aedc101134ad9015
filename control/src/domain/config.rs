//! Cluster configuration parameters: the documented names, each with a kind that decides which
//! values are valid and a default that describes what evstor does when nobody set it.
//!
//! Values are stored in canonical text (durations as `"<seconds>s"`, booleans as
//! `true`/`false`), so a GET returns the same text whatever spelling the PUT used.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::duration::parse_go_duration_ns;
use super::names::check_name;
use super::policy::PolicyVisibility;
use super::{Applied, Ctx, DomainError, Event as AnyEvent, RowKey, State};

/// Values set by operators; a name absent here has its default.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ClusterConfig {
    pub values: BTreeMap<String, String>,
}

/// What a parameter's value is (the reference's `[name]`, `[time]`, `[string]`, `[int]`,
/// `[bool]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamKind {
    /// A resource name (`^[a-zA-Z0-9-_.]{1,253}$`).
    Name,
    /// A Go duration (`"7200s"`, `"120m"`, `"2h"`), stored as whole seconds.
    Time,
    /// Free text; for `DefaultQoSName` the name of a global QoS policy, or empty.
    Str,
    /// A non-negative integer.
    Int,
    /// A Go `strconv.ParseBool` value.
    Bool,
}

/// One documented parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParamSpec {
    pub name: &'static str,
    pub kind: ParamKind,
    /// Default text; `ClusterName` defaults to the cluster's own name instead.
    pub default: &'static str,
}

const fn spec(name: &'static str, kind: ParamKind, default: &'static str) -> ParamSpec {
    ParamSpec {
        name,
        kind,
        default,
    }
}

/// Every documented parameter, in the reference's order.
pub const PARAMS: [ParamSpec; 11] = [
    spec(CLUSTER_NAME, ParamKind::Name, ""),
    spec(
        "ClockDriftIntervalForRaisingEvent",
        ParamKind::Time,
        "3600s",
    ),
    spec(
        "DeviceHealthIntervalForRaisingEvent",
        ParamKind::Time,
        "3600s",
    ),
    spec(PERMANENT_FAILURE, ParamKind::Time, "3600s"),
    // Volumes are released from the node as soon as their deletion is reconciled.
    spec("VolumeDeletionFromNodeDelay", ParamKind::Time, "0s"),
    spec(DEFAULT_QOS, ParamKind::Str, ""),
    spec("AllowedNumRevives", ParamKind::Int, "3"),
    spec("DisableVolumeStatisticsExport", ParamKind::Bool, "false"),
    // The data path implements Dataset Management (deallocate).
    spec("EnableTrim", ParamKind::Bool, "true"),
    spec("EvictionNoProgressTimeout", ParamKind::Time, "3600s"),
    spec("RevivesWindowDuration", ParamKind::Time, "86400s"),
];

pub const CLUSTER_NAME: &str = "ClusterName";
pub const DEFAULT_QOS: &str = "DefaultQoSName";
pub const PERMANENT_FAILURE: &str = "DurationToTurnIntoPermanentFailure";
/// Shortest permanent-failure timeout other than 0 (= never), as for DisableServer.
pub const PERMANENT_FAILURE_SECS_MIN: u64 = 3600;
/// Longest duration any parameter accepts: 10 years.
pub const DURATION_SECS_MAX: u64 = 10 * 365 * 24 * 3600;

pub fn spec_of(name: &str) -> Option<&'static ParamSpec> {
    PARAMS.iter().find(|p| p.name == name)
}

impl ClusterConfig {
    /// The value of a documented parameter (set or default); `None` for an unknown name.
    pub fn value(&self, state: &State, name: &str) -> Option<String> {
        let spec = spec_of(name)?;
        if let Some(v) = self.values.get(name) {
            return Some(v.clone());
        }
        if name == CLUSTER_NAME {
            return Some(state.cluster.name.clone());
        }
        Some(spec.default.to_string())
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// `value` as the client sent it; `decide` validates and canonicalizes it.
    UpdateClusterConfigParam { name: String, value: String },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Event {
    /// `value` is canonical text.
    ClusterConfigParamUpdated { name: String, value: String },
}

impl Event {
    pub fn type_name(&self) -> &'static str {
        match self {
            Event::ClusterConfigParamUpdated { .. } => "ClusterConfigParamUpdated",
        }
    }
}

fn invalid(name: &str, value: &str, why: &str) -> DomainError {
    DomainError::InvalidArgument(format!("invalid value {value:?} for {name}: {why}"))
}

/// Checks `value` against the parameter's kind; returns the canonical text.
pub fn canonical(state: &State, spec: &ParamSpec, value: &str) -> Result<String, DomainError> {
    let name = spec.name;
    let v = value.trim();
    match spec.kind {
        ParamKind::Name => {
            check_name("cluster", v)?;
            Ok(v.to_string())
        }
        ParamKind::Time => {
            let secs = parse_go_duration_secs(v).ok_or_else(|| {
                invalid(
                    name,
                    value,
                    "expected a duration like \"7200s\", \"120m\" or \"2h\"",
                )
            })?;
            if secs > DURATION_SECS_MAX {
                return Err(invalid(name, value, "longer than 10 years"));
            }
            if name == PERMANENT_FAILURE && secs != 0 && secs < PERMANENT_FAILURE_SECS_MIN {
                return Err(invalid(name, value, "must be 0s (never) or at least 1h"));
            }
            Ok(format!("{secs}s"))
        }
        ParamKind::Int => v
            .parse::<u32>()
            .map(|n| n.to_string())
            .map_err(|_| invalid(name, value, "expected a non-negative integer")),
        ParamKind::Bool => match v {
            "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok("true".into()),
            "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok("false".into()),
            _ => Err(invalid(name, value, "expected true or false")),
        },
        ParamKind::Str => {
            if name == DEFAULT_QOS && !v.is_empty() {
                let global = state
                    .policies
                    .by_uuid
                    .values()
                    .any(|p| p.name == v && p.visibility == PolicyVisibility::Global);
                if !global {
                    return Err(invalid(name, value, "no global QoS policy has that name"));
                }
            }
            Ok(v.to_string())
        }
    }
}

/// Parses a Go `time.ParseDuration` string into whole seconds (rounded to the nearest);
/// `None` if malformed, negative or beyond the API's duration range. `"0"` alone is allowed,
/// as in Go.
pub fn parse_go_duration_secs(text: &str) -> Option<u64> {
    let ns = parse_go_duration_ns(text).ok()?;
    u64::try_from((ns + 500_000_000) / 1_000_000_000).ok()
}

pub fn decide(state: &State, _: &Ctx, cmd: &Command) -> Result<Vec<AnyEvent>, DomainError> {
    let Command::UpdateClusterConfigParam { name, value } = cmd;
    let spec = spec_of(name).ok_or_else(|| {
        DomainError::NotFound(format!(
            "cluster configuration parameter {name:?} not found"
        ))
    })?;
    let value = canonical(state, spec, value)?;
    if state.config.value(state, name).as_deref() == Some(value.as_str()) {
        return Ok(vec![]);
    }
    Ok(vec![AnyEvent::Config(Event::ClusterConfigParamUpdated {
        name: name.clone(),
        value,
    })])
}

pub fn evolve(state: &mut State, at: Applied, event: &Event) -> Vec<RowKey> {
    let Event::ClusterConfigParamUpdated { name, value } = event;
    state.config.values.insert(name.clone(), value.clone());
    let mut rows = vec![RowKey::ConfigParam(name.clone())];
    // The cluster object carries its name too (GET /api/v2/cluster `clusterName`).
    if name == CLUSTER_NAME {
        state.cluster.name = value.clone();
        state.cluster.etag = at.seq;
        rows.push(RowKey::Cluster);
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::cluster::tests::{bootstrap_events, bootstrapped};
    use crate::domain::{given_when, Command as AnyCommand};

    fn set(name: &str, value: &str) -> AnyCommand {
        AnyCommand::Config(Command::UpdateClusterConfigParam {
            name: name.into(),
            value: value.into(),
        })
    }

    fn updated(name: &str, value: &str) -> Vec<AnyEvent> {
        vec![AnyEvent::Config(Event::ClusterConfigParamUpdated {
            name: name.into(),
            value: value.into(),
        })]
    }

    #[test]
    fn given_cluster_when_setting_each_kind_then_canonical_value_is_recorded() {
        let g = bootstrap_events();
        for (name, value, stored) in [
            ("EnableTrim", "False", "false"),
            ("DisableVolumeStatisticsExport", "1", "true"),
            ("AllowedNumRevives", " 7 ", "7"),
            ("RevivesWindowDuration", "2h", "7200s"),
            ("ClockDriftIntervalForRaisingEvent", "90m", "5400s"),
            (PERMANENT_FAILURE, "0s", "0s"),
            (PERMANENT_FAILURE, "1h30m", "5400s"),
            (CLUSTER_NAME, "prod-1", "prod-1"),
        ] {
            assert_eq!(
                given_when(&g, set(name, value)),
                Ok(updated(name, stored)),
                "{name}"
            );
        }
    }

    #[test]
    fn given_cluster_when_value_has_wrong_kind_then_invalid_argument() {
        let g = bootstrap_events();
        for (name, value) in [
            ("EnableTrim", "yes"),
            ("AllowedNumRevives", "-1"),
            ("AllowedNumRevives", "three"),
            ("RevivesWindowDuration", "10"),
            ("RevivesWindowDuration", "-5s"),
            ("RevivesWindowDuration", "100000h"),
            (PERMANENT_FAILURE, "30m"),
            (CLUSTER_NAME, "bad name"),
            (DEFAULT_QOS, "no-such-policy"),
        ] {
            assert!(
                matches!(
                    given_when(&g, set(name, value)),
                    Err(DomainError::InvalidArgument(_))
                ),
                "{name}={value}"
            );
        }
    }

    #[test]
    fn given_cluster_when_unknown_parameter_then_not_found() {
        assert!(matches!(
            given_when(&bootstrap_events(), set("NoSuchParam", "1")),
            Err(DomainError::NotFound(_))
        ));
    }

    #[test]
    fn given_default_value_when_set_to_it_again_then_nothing_happens() {
        assert_eq!(
            given_when(&bootstrap_events(), set("EnableTrim", "true")),
            Ok(vec![])
        );
        assert_eq!(
            given_when(&bootstrap_events(), set(DEFAULT_QOS, "")),
            Ok(vec![])
        );
    }

    #[test]
    fn every_parameter_has_a_valid_default_and_cluster_name_follows_the_cluster() {
        let mut s = bootstrapped();
        for p in &PARAMS {
            let v = s.config.value(&s, p.name).unwrap();
            if p.name != DEFAULT_QOS {
                assert_eq!(canonical(&s, p, &v), Ok(v.clone()), "{}", p.name);
            }
        }
        assert_eq!(s.config.value(&s, CLUSTER_NAME).unwrap(), s.cluster.name);
        let at = Applied {
            seq: 99,
            time_unix_ns: 5,
        };
        let rows = s.evolve(at, &updated(CLUSTER_NAME, "renamed")[0]);
        assert_eq!(
            rows,
            [RowKey::ConfigParam(CLUSTER_NAME.into()), RowKey::Cluster]
        );
        assert_eq!((s.cluster.name.as_str(), s.cluster.etag), ("renamed", 99));
    }

    #[test]
    fn go_durations() {
        for (t, s) in [
            ("7200s", 7200),
            ("120m", 7200),
            ("2h", 7200),
            ("1h0m0s", 3600),
            ("0", 0),
            ("1.5h", 5400),
            ("500ms", 1),
        ] {
            assert_eq!(parse_go_duration_secs(t), Some(s), "{t}");
        }
        for t in ["", "10", "h", "-1s", "1d", "1 h"] {
            assert_eq!(parse_go_duration_secs(t), None, "{t}");
        }
    }
}
