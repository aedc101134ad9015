//! NVMe device LED patterns (`UpdateNvmeDevice`'s `ledPattern`): the pattern an operator set
//! on a device, recorded and shown, so the API contract holds (validated, persisted, ETag,
//! 404 for an unknown serial). evstor's pool devices are files or block devices reached
//! through the kernel's block layer, which exposes no enclosure LED: nothing lights up.
//! The pattern is kept apart from `Device` (whose shape `DeviceAdded` stores) in its own
//! projection row.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::inventory::Event;
use super::names::check_etag;
use super::{Applied, DomainError, Event as AnyEvent, RowKey, State};

/// `ledPattern`: "locate", "rebuild" or "locate-off".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LedPattern {
    Locate,
    Rebuild,
    LocateOff,
}

impl LedPattern {
    /// Every pattern, with its API name.
    pub const ALL: [(LedPattern, &'static str); 3] = [
        (LedPattern::Locate, "locate"),
        (LedPattern::Rebuild, "rebuild"),
        (LedPattern::LocateOff, "locate-off"),
    ];

    pub fn parse(text: &str) -> Option<LedPattern> {
        Self::ALL.iter().find(|(_, n)| *n == text).map(|(p, _)| *p)
    }

    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(p, _)| *p == self)
            .map_or("", |(_, n)| n)
    }
}

/// `UpdateNvmeDevice`: the device `serial` (on `server`, when named) shows `pattern`.
pub fn set(
    state: &State,
    serial: &str,
    server: Option<Uuid>,
    pattern: LedPattern,
    if_match: &Option<String>,
) -> Result<Vec<AnyEvent>, DomainError> {
    let d = state
        .inventory
        .devices
        .get(serial)
        .ok_or_else(|| DomainError::NotFound(format!("NVMe device {serial} not found")))?;
    if let Some(s) = server {
        if !state.inventory.servers.contains_key(&s) {
            return Err(DomainError::not_found("server", s));
        }
        if s != d.server_uuid {
            return Err(DomainError::InvalidArgument(format!(
                "NVMe device {serial} is in server {}, not {s}",
                d.server_uuid
            )));
        }
    }
    check_etag("NVMe device", serial, d.etag, if_match)?;
    // The pattern it shows already: nothing to record (a retried request changes nothing).
    if state.inventory.leds.get(serial) == Some(&pattern) {
        return Ok(vec![]);
    }
    Ok(vec![AnyEvent::Inventory(Event::DeviceLedPatternSet {
        serial: serial.to_string(),
        pattern,
    })])
}

/// Applies `DeviceLedPatternSet`: the pattern, and the device's ETag.
pub fn evolve(state: &mut State, at: Applied, serial: &str, pattern: LedPattern) -> Vec<RowKey> {
    let inv = &mut state.inventory;
    let d = inv
        .devices
        .get_mut(serial)
        .expect("invariant: a LED pattern is set on an existing device");
    d.etag = at.seq;
    inv.leds.insert(serial.to_string(), pattern);
    vec![
        RowKey::Device(serial.to_string()),
        RowKey::DeviceLed(serial.to_string()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::inventory::tests::{four_servers, run, types};
    use crate::domain::inventory::Command;
    use crate::domain::Command as AnyCommand;

    fn set_cmd(serial: &str, server: Option<u128>, p: LedPattern, tag: Option<u64>) -> AnyCommand {
        AnyCommand::Inventory(Command::SetDeviceLedPattern {
            serial: serial.into(),
            server: server.map(Uuid::from_u128),
            pattern: p,
            if_match: tag.map(|t| t.to_string()),
        })
    }

    #[test]
    fn a_led_pattern_is_recorded_per_device_with_its_etag() {
        let mut s = four_servers();
        // join_cmd names s2's device `dev-s2`.
        let etag = s.inventory.devices["dev-s2"].etag;
        let err = |s: &mut State, cmd| run(s, cmd).unwrap_err();
        assert!(matches!(
            err(&mut s, set_cmd("nope", None, LedPattern::Locate, None)),
            DomainError::NotFound(_)
        ));
        assert!(matches!(
            err(
                &mut s,
                set_cmd("dev-s2", Some(99), LedPattern::Locate, None)
            ),
            DomainError::NotFound(_)
        ));
        assert!(matches!(
            err(&mut s, set_cmd("dev-s2", Some(3), LedPattern::Locate, None)),
            DomainError::InvalidArgument(_)
        ));
        assert!(matches!(
            err(
                &mut s,
                set_cmd("dev-s2", None, LedPattern::Locate, Some(etag + 1))
            ),
            DomainError::EtagMismatch(_)
        ));
        let events = run(
            &mut s,
            set_cmd("dev-s2", Some(2), LedPattern::Locate, Some(etag)),
        )
        .unwrap();
        assert_eq!(types(&events), ["DeviceLedPatternSet"]);
        assert_eq!(s.inventory.leds.get("dev-s2"), Some(&LedPattern::Locate));
        assert_ne!(s.inventory.devices["dev-s2"].etag, etag);
        let again = run(&mut s, set_cmd("dev-s2", None, LedPattern::Locate, None)).unwrap();
        assert!(again.is_empty(), "the same pattern again records nothing");
        run(&mut s, set_cmd("dev-s2", None, LedPattern::LocateOff, None)).unwrap();
        assert_eq!(s.inventory.leds.get("dev-s2"), Some(&LedPattern::LocateOff));
        assert_eq!(LedPattern::parse("locate-off"), Some(LedPattern::LocateOff));
        assert_eq!(LedPattern::parse("blink"), None);
        assert_eq!(LedPattern::Rebuild.name(), "rebuild");
    }
}
