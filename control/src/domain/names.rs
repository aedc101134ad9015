//! Name and text rules shared by every resource.

use super::DomainError;
use crate::limits::{DESCRIPTION_BYTES_MAX, NAME_BYTES_MAX};

/// `^[a-zA-Z0-9-_.]{1,253}$`, the rule for volume, snapshot, project, policy and label names.
pub fn check_name(what: &str, name: &str) -> Result<(), DomainError> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    if name.is_empty() || name.len() > NAME_BYTES_MAX || !name.chars().all(ok_char) {
        return Err(DomainError::InvalidArgument(format!(
            "invalid {what} name {name:?}: 1-{NAME_BYTES_MAX} characters of [a-zA-Z0-9-_.]"
        )));
    }
    Ok(())
}

/// Descriptions are free text of at most 256 bytes.
pub fn check_description(text: &str) -> Result<(), DomainError> {
    if text.len() > DESCRIPTION_BYTES_MAX {
        return Err(DomainError::InvalidArgument(format!(
            "description of {} bytes is longer than {DESCRIPTION_BYTES_MAX}",
            text.len()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for good in ["a", "vol-1", "A_b.c", &"x".repeat(253)] {
            assert!(check_name("volume", good).is_ok(), "{good}");
        }
        for bad in ["", "a b", "ü", "a/b", &"x".repeat(254)] {
            assert!(check_name("volume", bad).is_err(), "{bad}");
        }
    }
}
