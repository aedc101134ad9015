//! Name and text rules shared by every resource: names, descriptions, ETag preconditions,
//! NVMe qualified names.

use super::DomainError;
use crate::limits::{DESCRIPTION_BYTES_MAX, NAME_BYTES_MAX};

/// Longest NQN the NVMe base specification allows (bytes of UTF-8, without the NUL).
pub const NQN_BYTES_MAX: usize = 223;
/// The naming authority of the UUID-based NQN form.
const NQN_UUID_PREFIX: &str = "nqn.2014-08.org.nvmexpress:uuid:";

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

/// An `If-Match` precondition against the object's ETag (the seq that last changed it). The
/// API hands out numbers only, so anything else is not a condition that can be judged.
pub fn check_etag(
    what: &str,
    id: impl std::fmt::Display,
    etag: u64,
    if_match: &Option<String>,
) -> Result<(), DomainError> {
    let Some(tag) = if_match else {
        return Ok(());
    };
    if tag.is_empty() || !tag.bytes().all(|b| b.is_ascii_digit()) {
        return Err(DomainError::InvalidArgument(format!(
            "If-Match {tag:?} is not an ETag (a number)"
        )));
    }
    if tag.parse::<u64>() != Ok(etag) {
        return Err(DomainError::EtagMismatch(format!(
            "{what} {id} is at ETag {etag}, not {tag}"
        )));
    }
    Ok(())
}

/// An NVMe qualified name as the NVMe base specification defines it: at most 223 bytes of
/// UTF-8, either `nqn.2014-08.org.nvmexpress:uuid:` and a UUID in 8-4-4-4-12 hex form, or
/// `nqn.`, a `yyyy-mm` date, `.`, the reverse domain name of the naming authority, and
/// optionally `:` and a string that authority assigns. Control characters (a NUL ends the
/// name on the wire) are refused anywhere.
pub fn check_nqn(nqn: &str) -> Result<(), String> {
    if nqn.len() > NQN_BYTES_MAX {
        return Err(format!("longer than {NQN_BYTES_MAX} bytes"));
    }
    if nqn.chars().any(char::is_control) {
        return Err("holds a control character".into());
    }
    if let Some(uuid) = nqn.strip_prefix(NQN_UUID_PREFIX) {
        return check_uuid_text(uuid);
    }
    let rest = nqn
        .strip_prefix("nqn.")
        .ok_or("does not start with \"nqn.\"")?;
    let (date, rest) = rest.split_at_checked(7).ok_or("has no yyyy-mm date")?;
    check_nqn_date(date)?;
    let rest = rest
        .strip_prefix('.')
        .ok_or("needs a '.' after its yyyy-mm date")?;
    let (domain, user) = match rest.split_once(':') {
        Some((d, u)) => (d, Some(u)),
        None => (rest, None),
    };
    check_reverse_domain(domain)?;
    if user == Some("") {
        return Err("has nothing after its ':'".into());
    }
    Ok(())
}

fn check_nqn_date(date: &str) -> Result<(), String> {
    let b = date.as_bytes();
    let digits = |r: std::ops::Range<usize>| b[r].iter().all(u8::is_ascii_digit);
    let month = date.get(5..7).and_then(|m| m.parse::<u8>().ok());
    if b.len() != 7 || !digits(0..4) || b[4] != b'-' || !digits(5..7) {
        return Err(format!("date {date:?} is not yyyy-mm"));
    }
    if !matches!(month, Some(1..=12)) {
        return Err(format!("date {date:?} has no month 01-12"));
    }
    Ok(())
}

/// `com.example` or `org.nvmexpress`: dot-separated labels of letters, digits and inner
/// hyphens, each 1-63 bytes.
fn check_reverse_domain(domain: &str) -> Result<(), String> {
    let label_ok = |l: &str| {
        (1..=63).contains(&l.len())
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if domain.is_empty() || !domain.split('.').all(label_ok) {
        return Err(format!("{domain:?} is not a reverse domain name"));
    }
    Ok(())
}

/// `11111111-2222-3333-4444-555555555555`: hex digits in groups of 8-4-4-4-12.
fn check_uuid_text(text: &str) -> Result<(), String> {
    let groups: Vec<&str> = text.split('-').collect();
    let lens = groups.iter().map(|g| g.len()).collect::<Vec<_>>();
    let hex = groups
        .iter()
        .all(|g| g.bytes().all(|b| b.is_ascii_hexdigit()));
    if lens != [8, 4, 4, 4, 12] || !hex {
        return Err(format!(
            "{text:?} after \"{NQN_UUID_PREFIX}\" is not a UUID (8-4-4-4-12 hex digits)"
        ));
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

    #[test]
    fn nqns_follow_the_base_specification() {
        let long_ok = format!("nqn.2014-08.com.example:{}", "x".repeat(199));
        assert_eq!(long_ok.len(), NQN_BYTES_MAX);
        for good in [
            "nqn.2014-08.org.nvmexpress:uuid:f81d4fae-7dec-11d0-a765-00a0c91e6bf6",
            "nqn.2014-08.org.nvmexpress:uuid:F81D4FAE-7DEC-11D0-A765-00A0C91E6BF6",
            "nqn.2014-08.com.example:nvme:nvm-subsystem-sn-d78432",
            "nqn.2014-08.com.example:nvme.host.sys.xyz",
            "nqn.2016-01.com.lightbitslabs:uuid:0b1e0b1e-0000-4000-8000-000000000001",
            "nqn.2014-08.org.nvmexpress.discovery",
            "nqn.2024-12.io.evstor:hôte-ü",
            &long_ok,
        ] {
            assert_eq!(check_nqn(good), Ok(()), "{good}");
        }
        for bad in [
            "",
            "nqn.",
            "nqn.x",
            "host1",
            "NQN.2014-08.com.example:a",
            "nqn.2014-8.com.example:a",
            "nqn.2014-13.com.example:a",
            "nqn.2014-00.com.example:a",
            "nqn.201a-08.com.example:a",
            "nqn.2014-08com.example:a",
            "nqn.2014-08.:a",
            "nqn.2014-08.com..example:a",
            "nqn.2014-08.-com.example:a",
            "nqn.2014-08.com_x.example:a",
            "nqn.2014-08.com.example:",
            "nqn.2014-08.com.example:a\0b",
            "nqn.2014-08.com.example:a\nb",
            "nqn.2014-08.org.nvmexpress:uuid:host",
            "nqn.2014-08.org.nvmexpress:uuid:f81d4fae-7dec-11d0-a765-00a0c91e6bf",
            "nqn.2014-08.org.nvmexpress:uuid:f81d4fae7dec-11d0-a765-00a0c91e6bf6a",
            "nqn.2014-08.org.nvmexpress:uuid:g81d4fae-7dec-11d0-a765-00a0c91e6bf6",
            &format!("{long_ok}x"),
        ] {
            assert!(check_nqn(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn etag_preconditions() {
        assert_eq!(check_etag("volume", 1, 7, &None), Ok(()));
        assert_eq!(check_etag("volume", 1, 7, &Some("7".into())), Ok(()));
        assert!(matches!(
            check_etag("volume", 1, 7, &Some("8".into())),
            Err(DomainError::EtagMismatch(_))
        ));
        for bad in ["", "x", "-7", "+7", "7 ", "\u{0}7", "99999999999999999999x"] {
            assert!(
                matches!(
                    check_etag("volume", 1, 7, &Some(bad.into())),
                    Err(DomainError::InvalidArgument(_))
                ),
                "{bad:?}"
            );
        }
    }
}
