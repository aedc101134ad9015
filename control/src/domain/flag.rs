//! Feature flags: the documented named switches an operator enables or disables.
//!
//! `event-log` is on and stays on: the event log is the journal every other resource is
//! built from, so disabling it is refused as unimplemented (the documented 501).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{Applied, Ctx, DomainError, Event as AnyEvent, RowKey, State};

/// The documented flags with their defaults, sorted by name.
pub const FLAGS: [(&str, bool); 5] = [
    (EVENT_LOG, true),
    ("evict-data", false),
    ("fail-in-place", false),
    ("in-band-authentication", false),
    ("proactive-rebalance", false),
];

pub const EVENT_LOG: &str = "event-log";

/// Values set by operators; a name absent here has its default.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FeatureFlags {
    pub values: BTreeMap<String, bool>,
}

impl FeatureFlags {
    /// Whether a documented flag is enabled; `None` for an unknown name.
    pub fn enabled(&self, name: &str) -> Option<bool> {
        let (_, default) = FLAGS.iter().find(|(n, _)| *n == name)?;
        Some(self.values.get(name).copied().unwrap_or(*default))
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    EnableFeatureFlag { name: String },
    DisableFeatureFlag { name: String },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Event {
    FeatureFlagEnabled { name: String },
    FeatureFlagDisabled { name: String },
}

impl Event {
    pub fn type_name(&self) -> &'static str {
        match self {
            Event::FeatureFlagEnabled { .. } => "FeatureFlagEnabled",
            Event::FeatureFlagDisabled { .. } => "FeatureFlagDisabled",
        }
    }
}

fn unknown(name: &str) -> DomainError {
    let names: Vec<&str> = FLAGS.iter().map(|(n, _)| *n).collect();
    DomainError::InvalidArgument(format!(
        "unknown feature flag {name:?}; known flags: {}",
        names.join(", ")
    ))
}

pub fn decide(state: &State, _: &Ctx, cmd: &Command) -> Result<Vec<AnyEvent>, DomainError> {
    let (name, enable) = match cmd {
        Command::EnableFeatureFlag { name } => (name, true),
        Command::DisableFeatureFlag { name } => (name, false),
    };
    let current = state.flags.enabled(name).ok_or_else(|| unknown(name))?;
    if !enable && name == EVENT_LOG {
        return Err(DomainError::Unimplemented(
            "event-log cannot be disabled: the event log is evstor's journal".into(),
        ));
    }
    if current == enable {
        return Ok(vec![]);
    }
    let name = name.clone();
    let event = if enable {
        Event::FeatureFlagEnabled { name }
    } else {
        Event::FeatureFlagDisabled { name }
    };
    Ok(vec![AnyEvent::Flag(event)])
}

pub fn evolve(state: &mut State, _: Applied, event: &Event) -> Vec<RowKey> {
    let (name, enabled) = match event {
        Event::FeatureFlagEnabled { name } => (name, true),
        Event::FeatureFlagDisabled { name } => (name, false),
    };
    state.flags.values.insert(name.clone(), enabled);
    vec![RowKey::Flag(name.clone())]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::cluster::tests::bootstrap_events;
    use crate::domain::{given_when, Command as AnyCommand};

    fn enable(name: &str) -> AnyCommand {
        AnyCommand::Flag(Command::EnableFeatureFlag { name: name.into() })
    }

    fn disable(name: &str) -> AnyCommand {
        AnyCommand::Flag(Command::DisableFeatureFlag { name: name.into() })
    }

    fn enabled_event(name: &str) -> AnyEvent {
        AnyEvent::Flag(Event::FeatureFlagEnabled { name: name.into() })
    }

    #[test]
    fn given_default_off_when_enable_then_enabled_and_again_is_a_no_op() {
        let mut g = bootstrap_events();
        assert_eq!(
            given_when(&g, enable("evict-data")),
            Ok(vec![enabled_event("evict-data")])
        );
        g.push(enabled_event("evict-data"));
        assert_eq!(given_when(&g, enable("evict-data")), Ok(vec![]));
        assert_eq!(
            given_when(&g, disable("evict-data")),
            Ok(vec![AnyEvent::Flag(Event::FeatureFlagDisabled {
                name: "evict-data".into()
            })])
        );
    }

    #[test]
    fn given_cluster_when_unknown_flag_then_invalid_argument() {
        for cmd in [enable("warp-drive"), disable("warp-drive"), enable("")] {
            assert!(matches!(
                given_when(&bootstrap_events(), cmd),
                Err(DomainError::InvalidArgument(_))
            ));
        }
    }

    #[test]
    fn given_cluster_when_disable_event_log_then_unimplemented() {
        assert!(matches!(
            given_when(&bootstrap_events(), disable(EVENT_LOG)),
            Err(DomainError::Unimplemented(_))
        ));
        assert_eq!(
            given_when(&bootstrap_events(), enable(EVENT_LOG)),
            Ok(vec![])
        );
    }
}
