//! Feature flags: named switches an operator enables or disables.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{Applied, Ctx, DomainError, Event as AnyEvent, RowKey, State};

/// Values set by operators; a name absent here has its default.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FeatureFlags {
    pub values: BTreeMap<String, String>,
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
