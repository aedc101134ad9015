//! NVMe Qualified Names: the one validator for NQNs from the wire (Connect) and from
//! configuration (subsystem NQN, host ACLs).
//!
//! The rules (NVMe Base Specification, "NVMe Qualified Names"): an NQN is UTF-8, at most
//! [`NQN_MAX_BYTES`] bytes, and starts with `nqn.` (the date-and-domain form, the UUID form
//! `nqn.2014-08.org.nvmexpress:uuid:...` and the well-known discovery NQN all do). In a
//! 256-byte wire field it is NUL-terminated.

use crate::limits::NQN_BYTES;

/// Longest NQN in bytes, terminator excluded.
pub const NQN_MAX_BYTES: usize = 223;

/// The mandatory prefix.
pub const NQN_PREFIX: &str = "nqn.";

/// Why a name is not a valid NQN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NqnError {
    /// A wire field has no NUL terminator.
    Unterminated,
    /// Longer than [`NQN_MAX_BYTES`].
    TooLong,
    /// Not UTF-8.
    NotUtf8,
    /// Does not start with `nqn.` (an empty name included).
    NoPrefix,
    /// Contains a NUL (only possible for a name given as a string).
    EmbeddedNul,
}

impl std::fmt::Display for NqnError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NqnError::Unterminated => "NQN field is not NUL-terminated",
            NqnError::TooLong => "NQN is longer than 223 bytes",
            NqnError::NotUtf8 => "NQN is not UTF-8",
            NqnError::NoPrefix => "NQN does not start with \"nqn.\"",
            NqnError::EmbeddedNul => "NQN contains a NUL byte",
        })
    }
}

impl std::error::Error for NqnError {}

/// Validates an NQN given as a string (configuration, ACL entries).
pub fn validate(name: &str) -> Result<&str, NqnError> {
    if name.contains('\0') {
        return Err(NqnError::EmbeddedNul);
    }
    check(name.as_bytes())
}

/// Validates a wire field (the 256-byte SUBNQN or HOSTNQN of Connect data) and returns
/// the name before its terminator.
pub fn validate_field(field: &[u8]) -> Result<&str, NqnError> {
    let field = &field[..field.len().min(NQN_BYTES)];
    let end = field
        .iter()
        .position(|&b| b == 0)
        .ok_or(NqnError::Unterminated)?;
    check(&field[..end])
}

fn check(name: &[u8]) -> Result<&str, NqnError> {
    if name.len() > NQN_MAX_BYTES {
        return Err(NqnError::TooLong);
    }
    let s = std::str::from_utf8(name).map_err(|_| NqnError::NotUtf8)?;
    if !s.starts_with(NQN_PREFIX) {
        return Err(NqnError::NoPrefix);
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nvme::DISCOVERY_NQN;

    fn field(name: &[u8]) -> [u8; NQN_BYTES] {
        let mut f = [0u8; NQN_BYTES];
        f[..name.len()].copy_from_slice(name);
        f
    }

    #[test]
    fn accepts_the_standard_forms() {
        for n in [
            DISCOVERY_NQN,
            "nqn.2014-08.org.nvmexpress:uuid:11111111-2222-3333-4444-555555555555",
            "nqn.2016-01.com.lightbitslabs:uuid:0b7d5fc2-2c1b-4d4a-9d3c-0c0c0c0c0c0c",
            "nqn.2024-01.io.evstor:ünïcødé",
        ] {
            assert_eq!(validate(n), Ok(n));
            assert_eq!(validate_field(&field(n.as_bytes())), Ok(n));
        }
        let longest = format!("nqn.{}", "a".repeat(NQN_MAX_BYTES - 4));
        assert_eq!(validate(&longest), Ok(longest.as_str()));
    }

    #[test]
    fn refuses_what_the_spec_rules_out() {
        assert_eq!(
            validate_field(&[b'n'; NQN_BYTES]),
            Err(NqnError::Unterminated)
        );
        let long = format!("nqn.{}", "a".repeat(NQN_MAX_BYTES - 3));
        assert_eq!(
            validate_field(&field(long.as_bytes())),
            Err(NqnError::TooLong)
        );
        assert_eq!(validate(&long), Err(NqnError::TooLong));
        assert_eq!(
            validate_field(&field(b"nqn.2024-01.x:\xff\xfe")),
            Err(NqnError::NotUtf8)
        );
        assert_eq!(validate_field(&field(b"host-a")), Err(NqnError::NoPrefix));
        assert_eq!(validate_field(&field(b"")), Err(NqnError::NoPrefix));
        assert_eq!(validate("NQN.2024-01.x"), Err(NqnError::NoPrefix));
        assert_eq!(validate("nqn.a\0b"), Err(NqnError::EmbeddedNul));
    }
}
