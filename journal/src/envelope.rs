//! The envelope: what one stored event looks like, how it is framed on disk, and the hash
//! chain that makes the log tamper-evident.
//!
//! Stored value = `crc32(body) as u32 LE ‖ body`, with `body = bincode(Envelope)`.
//! The hash of an envelope is SHA-256 over the whole stored value; every envelope carries the
//! hash of its predecessor (`GENESIS_HASH` for seq 1), so changing any stored byte breaks
//! either its checksum or the chain at the next envelope (or the head hash kept in `meta`).

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::limits::{FIELD_BYTES_MAX, PAYLOAD_BYTES_MAX};
use crate::{JournalError, Result};

pub type Hash = [u8; 32];

/// The predecessor hash of the first event.
pub const GENESIS_HASH: Hash = [0; 32];

/// One event as stored. Field order is part of the on-disk format: append new fields only
/// behind a new framing version, never reorder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// Gapless position in the log, starting at 1.
    pub seq: u64,
    /// Wall-clock time of the append, Unix nanoseconds; never decreases along the log.
    pub time_unix_ns: u64,
    /// Token subject of the request, or `system` for reconcilers.
    pub actor: String,
    /// Project the event belongs to (empty for cluster-wide events).
    pub project: String,
    /// Request id of the API call that caused the event.
    pub request_id: String,
    /// Stable event type name, e.g. `VolumeCreated`; never renamed.
    pub event_type: String,
    /// Version of the payload schema for `event_type`; old versions are upcast on read.
    pub schema_version: u16,
    /// The event body, encoded by the owner of the event type.
    pub payload: Vec<u8>,
    /// Hash of the previous envelope's stored bytes.
    pub prev_hash: Hash,
}

/// An event before the journal has placed it in the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEvent {
    pub time_unix_ns: u64,
    pub actor: String,
    pub project: String,
    pub request_id: String,
    pub event_type: String,
    pub schema_version: u16,
    pub payload: Vec<u8>,
}

impl NewEvent {
    /// Checks the bounds right before the event is written.
    pub fn check(&self) -> Result<()> {
        for (field, value) in [
            ("actor", &self.actor),
            ("project", &self.project),
            ("request_id", &self.request_id),
            ("event_type", &self.event_type),
        ] {
            if value.len() > FIELD_BYTES_MAX {
                return Err(JournalError::FieldTooLong {
                    field,
                    len: value.len(),
                    max: FIELD_BYTES_MAX,
                });
            }
        }
        if self.payload.len() > PAYLOAD_BYTES_MAX {
            return Err(JournalError::FieldTooLong {
                field: "payload",
                len: self.payload.len(),
                max: PAYLOAD_BYTES_MAX,
            });
        }
        Ok(())
    }

    pub(crate) fn place(self, seq: u64, time_unix_ns: u64, prev_hash: Hash) -> Envelope {
        Envelope {
            seq,
            time_unix_ns,
            actor: self.actor,
            project: self.project,
            request_id: self.request_id,
            event_type: self.event_type,
            schema_version: self.schema_version,
            payload: self.payload,
            prev_hash,
        }
    }
}

impl Envelope {
    /// Frames the envelope for storage: checksum then body.
    pub fn encode(&self) -> Vec<u8> {
        let body = bincode::serialize(self).expect("invariant: an Envelope always serializes");
        let mut out = Vec::with_capacity(4 + body.len());
        out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
        out.extend_from_slice(&body);
        out
    }

    /// Decodes a stored value, verifying its checksum first. `seq` is the key it was read
    /// under, used for error context and checked against the body.
    pub fn decode(seq: u64, stored: &[u8]) -> Result<Envelope> {
        if stored.len() < 4 {
            return Err(JournalError::Decode {
                seq,
                reason: format!(
                    "value of {} bytes is shorter than its checksum",
                    stored.len()
                ),
            });
        }
        let (crc, body) = stored.split_at(4);
        let stored_crc = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
        let computed = crc32fast::hash(body);
        if stored_crc != computed {
            return Err(JournalError::Checksum {
                seq,
                stored: stored_crc,
                computed,
            });
        }
        let envelope: Envelope = bincode::deserialize(body).map_err(|e| JournalError::Decode {
            seq,
            reason: e.to_string(),
        })?;
        if envelope.seq != seq {
            return Err(JournalError::Decode {
                seq,
                reason: format!("stored under seq {seq} but says seq {}", envelope.seq),
            });
        }
        Ok(envelope)
    }
}

/// Hash of a stored value, the link the next envelope carries.
pub fn hash_stored(stored: &[u8]) -> Hash {
    Sha256::digest(stored).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(seq: u64) -> Envelope {
        NewEvent {
            time_unix_ns: 7,
            actor: "admin".into(),
            project: "default".into(),
            request_id: "r1".into(),
            event_type: "VolumeCreated".into(),
            schema_version: 1,
            payload: vec![1, 2, 3],
        }
        .place(seq, 7, GENESIS_HASH)
    }

    #[test]
    fn encode_decode_round_trip() {
        let e = sample(3);
        assert_eq!(Envelope::decode(3, &e.encode()).unwrap(), e);
    }

    #[test]
    fn any_flipped_byte_is_detected() {
        let stored = sample(1).encode();
        for i in 0..stored.len() {
            let mut bad = stored.clone();
            bad[i] ^= 0x40;
            assert!(
                Envelope::decode(1, &bad).is_err(),
                "flip at byte {i} went unnoticed"
            );
        }
    }

    #[test]
    fn seq_must_match_key() {
        let stored = sample(1).encode();
        assert!(matches!(
            Envelope::decode(2, &stored),
            Err(JournalError::Decode { seq: 2, .. })
        ));
    }
}
