//! Event ⇄ envelope payload. Payloads are bincode of [`Event`]; bincode encodes enum variants
//! by position, so variants are only ever appended, never reordered or removed, and a payload
//! change bumps [`SCHEMA_VERSION`] with an upcast from the old shape added in [`decode`].

use evstor_journal::{Envelope, NewEvent};

use crate::domain::Event;
use crate::error::ControlError;

/// Version of the payload schema written today.
pub const SCHEMA_VERSION: u16 = 1;

/// Frames a domain event for the journal.
pub fn encode(event: &Event, project: &str, actor: &str, request_id: &str, time: u64) -> NewEvent {
    NewEvent {
        time_unix_ns: time,
        actor: actor.to_string(),
        project: project.to_string(),
        request_id: request_id.to_string(),
        event_type: event.type_name().to_string(),
        schema_version: SCHEMA_VERSION,
        payload: bincode::serialize(event).expect("invariant: domain events always serialize"),
    }
}

/// Reads a stored event back, upcasting old schema versions to today's shape.
pub fn decode(env: &Envelope) -> Result<Event, ControlError> {
    let event: Event = match env.schema_version {
        1 => bincode::deserialize(&env.payload).map_err(|e| ControlError::Codec {
            seq: env.seq,
            reason: e.to_string(),
        })?,
        // Upcasts live here: `0 => upcast_v0(&env.payload)?` and so on.
        v => {
            return Err(ControlError::Codec {
                seq: env.seq,
                reason: format!("unknown schema version {v} of {}", env.event_type),
            })
        }
    };
    if event.type_name() != env.event_type {
        return Err(ControlError::Codec {
            seq: env.seq,
            reason: format!(
                "envelope says {} but the payload is {}",
                env.event_type,
                event.type_name()
            ),
        });
    }
    Ok(event)
}
